"""Multi-process training with torch's DistributedDataParallel, launched by ``torchrun``.

``torchrun --nproc_per_node=N -m debias train RECIPE ...`` starts N processes with ``RANK``, ``LOCAL_RANK`` and
``WORLD_SIZE`` set; :func:`init_distributed` joins them (NCCL on CUDA, one GPU per process, ``cuda:LOCAL_RANK``;
gloo on CPU) and returns a :class:`Dist`, the one object the trainer, the matching and the evaluation use for
collectives. Without ``torchrun`` (``WORLD_SIZE`` unset or 1) it returns a single-process :class:`Dist` whose
collectives are no-ops, so the single-process code path is exactly the one that ran before.

Sharding conventions: a training batch (and an unlabeled-stream batch) is split by stride, rank ``r`` taking
``batch[r::world]`` of the global batch a single process would have drawn; probe and evaluation images are split
into contiguous blocks (:meth:`Dist.block`) whose results are gathered back in order (:meth:`Dist.gather_blocks`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import DebiasError


@dataclass(frozen=True)
class Dist:
    """This process's place in the job (rank ``rank`` of ``world``) and the collectives the project needs."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def active(self) -> bool:
        """True when several processes train together."""
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes the run directory and prints."""
        return self.rank == 0

    # ------------------------------------------------------------------------------------------- sharding
    def block(self, n: int) -> tuple[int, int]:
        """This rank's contiguous block ``[lo, hi)`` of ``n`` items (block sizes differ by at most one)."""
        return n * self.rank // self.world, n * (self.rank + 1) // self.world

    def stride(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's share ``batch[rank::world]`` of a global batch (identity in a single process)."""
        return batch[self.rank::self.world] if self.active else batch

    # ------------------------------------------------------------------------------------------- collectives
    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def _on_comm_device(self, t: torch.Tensor) -> torch.Tensor:
        """NCCL moves CUDA tensors only; gloo takes CPU tensors."""
        return t.to(self.device) if dist.get_backend() == "nccl" else t.cpu()

    def broadcast_(self, tensors: list[torch.Tensor], src: int = 0) -> None:
        """Overwrite ``tensors`` in place with rank ``src``'s values."""
        if not self.active:
            return
        for t in tensors:
            buf = self._on_comm_device(t)
            dist.broadcast(buf, src)
            if buf is not t:
                t.copy_(buf)

    def all_reduce_(self, tensors: list[torch.Tensor]) -> None:
        """Sum ``tensors`` over all ranks, in place."""
        if not self.active:
            return
        for t in tensors:
            buf = self._on_comm_device(t)
            dist.all_reduce(buf)
            if buf is not t:
                t.copy_(buf)

    def sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of ``t`` over ranks, differentiable (torch's ``torch.distributed.nn.functional.all_reduce``):
        its backward sums the gradients over ranks, so that, as with :meth:`gather_rows`, DistributedDataParallel's
        mean over ranks gives the parameters the gradient of a statistic of the global batch."""
        if not self.active:
            return t
        from torch.distributed.nn.functional import all_reduce

        return all_reduce(self._on_comm_device(t)).to(t.device)

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of a (detached) tensor of values, returned on this rank's device."""
        if not self.active:
            return values
        buf = self._on_comm_device(values.detach().clone())
        dist.all_reduce(buf)
        return (buf / self.world).to(values.device)

    def any(self, flag: bool) -> bool:
        """True when ``flag`` is true on any rank (so that every rank takes the same branch)."""
        if not self.active:
            return flag
        buf = self._on_comm_device(torch.tensor([float(flag)]))
        dist.all_reduce(buf)
        return bool(buf.item() > 0)

    def _sizes(self, n: int) -> list[int]:
        return [n * (r + 1) // self.world - n * r // self.world for r in range(self.world)]

    def gather_blocks(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """Every rank's block (rows of ``t``, this rank's :meth:`block` of ``n``) concatenated in rank order,
        on the CPU: the result a single process computing all ``n`` rows would have (up to float rounding)."""
        if not self.active:
            return t
        sizes = self._sizes(n)
        if t.shape[0] != sizes[self.rank]:
            raise DebiasError(f"internal: rank {self.rank} gathers {t.shape[0]} rows, expected {sizes[self.rank]}")
        width = max(sizes)
        pad = torch.zeros((width - t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
        buf = self._on_comm_device(torch.cat([t, pad]).contiguous())
        parts = [torch.empty_like(buf) for _ in range(self.world)]
        dist.all_gather(parts, buf)
        return torch.cat([p[:s].cpu() for p, s in zip(parts, sizes)])

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Rows of ``t`` from every rank (this rank's stride share of a global batch), differentiable.

        For batch-level statistics (the concept penalty's joint distribution) computed on the global batch. The
        backward pass sums every rank's gradient for the rows this rank owns; DistributedDataParallel then averages
        over ranks, so the parameters get exactly the gradient of the statistic of the global batch. Row order is
        rank-major (irrelevant for sums over the batch). Shares may differ in size by one: padded, then trimmed.
        """
        if not self.active:
            return t
        count = self._on_comm_device(torch.tensor([t.shape[0]]))
        counts = [torch.zeros_like(count) for _ in range(self.world)]
        dist.all_gather(counts, count)
        return _GatherRows.apply(t, [int(c.item()) for c in counts], self)


class _GatherRows(torch.autograd.Function):
    """All-gather of row blocks of different sizes whose backward sums the gradients over ranks (all-reduce)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, counts: list[int], d: Dist) -> torch.Tensor:
        ctx.counts, ctx.d = counts, d
        width = max(counts)
        padded = torch.cat([t, t.new_zeros((width - t.shape[0], *t.shape[1:]))]) if width > t.shape[0] else t
        buf = d._on_comm_device(padded.contiguous())
        parts = [torch.empty_like(buf) for _ in range(d.world)]
        dist.all_gather(parts, buf)
        return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(t.device)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        counts, d = ctx.counts, ctx.d
        buf = d._on_comm_device(grad.contiguous().clone())
        dist.all_reduce(buf)
        start = sum(counts[:d.rank])
        return buf[start:start + counts[d.rank]].to(grad.device), None, None


def init_distributed(device_name: str) -> Dist:
    """Join the ``torchrun`` job described by the environment, or return a single-process :class:`Dist`.

    ``device_name`` is ``train.device``: under ``torchrun``, ``auto`` and ``cuda`` give each process
    ``cuda:LOCAL_RANK`` (NCCL) when CUDA is available, ``cpu`` (or ``auto`` without CUDA) runs on the CPU (gloo).
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Dist()
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device_name not in ("auto", "cuda", "cpu"):
        raise DebiasError(f"train.device = {device_name!r}: under torchrun each process takes cuda:LOCAL_RANK; "
                          "use 'auto', 'cuda' or 'cpu'")
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if device_name == "cuda" and not use_cuda:
        raise DebiasError("train.device = 'cuda': CUDA is not available on this machine; use 'auto' or 'cpu'")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise DebiasError(f"LOCAL_RANK {local_rank}: this machine has {torch.cuda.device_count()} GPU(s); "
                              "start at most that many processes per node (--nproc_per_node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=60))
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise DebiasError(f"process group (rank {dist.get_rank()} of {dist.get_world_size()}) does not match "
                          f"RANK={rank}, WORLD_SIZE={world}")
    return Dist(rank=rank, world=world, local_rank=local_rank, device=device)


def has_batchnorm(model: torch.nn.Module) -> bool:
    """True when ``model`` has a BatchNorm layer (torch's, or a subclass such as timm's ``BatchNormAct2d``)."""
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def plan_batchnorm(setting: bool | str, d: Dist, model: torch.nn.Module) -> str | None:
    """How ``model``'s BatchNorm layers normalise when several processes train (``train.sync_batchnorm``):
    ``"synchronized"`` (the global batch's statistics: torch's SyncBatchNorm, CUDA only), ``"per_process"`` (each
    process's own share of the batch), or None (one process, or no BatchNorm layer: nothing to decide).
    ``true`` with processes on the CPU is refused, whatever the model."""
    if not d.active:
        return None
    cuda = d.device.type == "cuda"
    if setting is True and not cuda:
        raise DebiasError(f"train.sync_batchnorm = true: torch's SyncBatchNorm runs on CUDA only, and these "
                          f"{d.world} processes train on the CPU; set it to 'auto' or false (each process then "
                          "normalises with the statistics of its own share of each batch)")
    if not has_batchnorm(model):
        return None
    return "synchronized" if cuda and setting in ("auto", True) else "per_process"


def convert_sync_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every BatchNorm layer replaced by a synchronised one (timm's ``convert_sync_batchnorm``:
    torch's ``SyncBatchNorm``, and timm's ``SyncBatchNormAct`` for its norm + activation layers). The new layers
    take over the old ones' parameters and buffers under the same names, so the state dict (checkpoints, the
    safetensors weights) keeps its keys, and a plain model loads it."""
    from timm.layers import convert_sync_batchnorm as timm_convert

    return timm_convert(model)


def per_process_batchnorm_note(world: int, setting: bool | str) -> str:
    """The line a run prints when its processes normalise BatchNorm layers each with its own share of the batch."""
    shown = repr(setting) if isinstance(setting, str) else str(setting).lower()
    return (f"note: BatchNorm statistics are per process: each of the {world} processes normalises with its own "
            f"share of each batch (train.sync_batchnorm = {shown}; torch's SyncBatchNorm runs on CUDA only), so "
            "this run trains a different model than a 1-process run of the same recipe")


def shutdown_distributed() -> None:
    """Leave the process group (after the last collective), so that the process exits cleanly."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
