"""The trainer: one loop for every method, with checkpoints, TensorBoard, a progress bar and the final evaluation.

A run directory holds ``recipe.toml`` (resolved), ``model.safetensors`` + ``checkpoint.pt`` (last checkpoint; the
resumable state is deleted once the run has finished unless ``keep_training_state``), ``best_<rule>.safetensors``
(a selection rule's pick of an earlier epoch than the last; one file per epoch picked), ``metrics.json``, ``tb/``
(TensorBoard events), plots, and a ``done`` marker once finished.

Several processes (``torchrun --nproc_per_node=N -m debias train ...``, see :mod:`debias.distributed`): the model
is wrapped in DistributedDataParallel (``self.model``; ``self.net`` is the plain model for weights, matching and
evaluation); each process takes the stride share ``batch[rank::world]`` of every global batch (the batches a
single process would draw, ``train.batch_size`` images) and of every unlabeled-stream batch; BatchNorm layers
normalise with the global batch's statistics on CUDA (SyncBatchNorm, ``train.sync_batchnorm``) and with each
process's share on the CPU (the run prints a note), and their buffers are broadcast from rank 0 at every epoch
boundary, so all processes hold the same model whenever they match, track or evaluate; matching statistics are
all-reduced and evaluation predictions and embeddings gathered, so every process computes the same figures; only
rank 0 writes the run directory and prints.
"""
from __future__ import annotations

import json
import random
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler, WeightedRandomSampler
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from .. import io
from ..concepts import build_concepts
from ..data import load_dataset
from ..data.splits import Split
from ..distributed import (Dist, convert_sync_batchnorm, init_distributed, per_process_batchnorm_note,
                           plan_batchnorm)
from ..errors import DebiasError, TrainingInterrupted, did_you_mean
from ..evaluate import evaluate_splits
from ..explain import explain_model, probe_split
from ..models.clip import load_clip
from ..models.standalone import StandaloneModel, load_fitting_weights
from ..recipe import Recipe, recipe_to_toml, require_same_recipe
from ..methods import build_method, needs_unlabeled
from ..methods.base import MethodContext
from ..methods.graft_schedule import GraftSchedule
from .schedule import warmup_cosine


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):  # torch also parses mps, xla, meta: never run here
        raise DebiasError(f"train.device = {name!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DebiasError(f"train.device = {name!r}: CUDA is not available on this machine; use 'auto' or 'cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DebiasError(f"train.device = {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                          f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


class Trainer:
    """Trains the standalone model with the recipe's method, then evaluates and explains it."""

    def __init__(self, recipe: Recipe, out: str | Path, progress: bool = True, keep_training_state: bool = False):
        self.recipe = recipe
        self.out = Path(out)
        self.keep_training_state = keep_training_state
        """Keep ``checkpoint.pt`` (the optimizer and method state a stopped run resumes from) once the run has
        finished; by default it is deleted then, as a finished run is never resumed."""
        self.dist: Dist = init_distributed(recipe.train.device)  # a no-op single-process Dist without torchrun
        self.progress = progress and self.dist.is_main
        self.device = self.dist.device if self.dist.active else resolve_device(recipe.train.device)
        seed_everything(recipe.seed)
        self.bundle = load_dataset(recipe)
        self._init_rng = torch.get_rng_state()
        """The random state the model's initial weights are drawn from (``reset_model_and_optimizer`` draws them
        again)."""
        self.net = StandaloneModel(recipe.model.name, self.bundle.num_classes, recipe.model.pretrained,
                                   recipe.model.checkpoint).to(self.device)
        self.net.check_input(self.bundle.splits["train"].images[0])
        if recipe.train.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.batchnorm = plan_batchnorm(recipe.train.sync_batchnorm, self.dist, self.net)
        """Several processes with BatchNorm layers: ``synchronized`` or ``per_process`` (else None)."""
        if self.batchnorm == "synchronized":
            self.net = convert_sync_batchnorm(self.net)
        elif self.batchnorm == "per_process" and self.dist.is_main:
            print(per_process_batchnorm_note(self.dist.world, recipe.train.sync_batchnorm), file=sys.stderr,
                  flush=True)
        self.model: torch.nn.Module = self.net
        """What methods call for training forwards: the plain model, or its DistributedDataParallel wrapper."""
        if self.dist.active:
            self._check_batch_sizes()
            self.model = DistributedDataParallel(self.net, device_ids=[self.device.index]
                                                 if self.device.type == "cuda" else None)
        self._clip = load_clip(recipe.clip, self.device)  # eager: a bad CLIP name or file fails before training
        self.amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[recipe.train.precision]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=recipe.train.precision == "fp16"
                                           and self.device.type == "cuda")
        self.concepts = build_concepts(recipe, self.bundle)
        t = recipe.train
        n_train = len(self.bundle.splits["train"])
        # a trailing batch too small to give every process two images is dropped (BatchNorm needs two)
        self.steps_per_epoch = max(1, n_train // t.batch_size + (n_train % t.batch_size >= 2 * self.dist.world))
        self.total_steps = self.steps_per_epoch * t.epochs
        """Steps of one learning-rate schedule (``train.epochs``)."""
        self.step = 0
        self.epoch = 0
        self.grafts = GraftSchedule(self.net, self._clip, recipe, self.bundle, self.device, self.dist,
                                    clock=lambda: (self.epoch, self.step))
        """The matchings of the model to CLIP and their grafts: the tracking's latest, and the concept penalty's."""
        self.method = build_method(recipe.train.method, MethodContext(
            recipe=recipe, bundle=self.bundle, model=self.model, net=self.net, device=self.device, dist=self.dist,
            concepts=self.concepts, clip=self._clip, total_steps=self.total_steps, grafts=self.grafts,
            next_unlabeled=lambda: self.next_unlabeled(), restart=lambda: self.reset_model_and_optimizer(),
            clock=lambda: (self.epoch, self.step)))
        for key, split in (("selection.split", recipe.selection.split), ("explain.split", recipe.explain.split)):
            if split not in self.bundle.splits:  # read every epoch / at the end: named now, before training
                raise DebiasError(f"{key} = {split!r}: not a split of this dataset; expected one of "
                                  f"{sorted(self.bundle.splits)}{did_you_mean(split, self.bundle.splits)}")
        if recipe.selection.track_concepts:
            self.concept_split()  # a bad selection.concept_split fails before training
        self.oracle_split()  # likewise selection.oracle_split
        self.total_epochs = t.epochs + self.method.extra_epochs()
        """Epochs the loop runs: ``train.epochs``, plus those a method trains before a restart (JTT's first stage)."""
        self._new_optimizer()
        self.clip_cache: dict = {}
        """Plain-CLIP embeddings of the splits explained every epoch (CLIP is fixed: computed once)."""
        self._unlabeled_iter = None
        self.best: dict[str, dict[str, Any]] = {}
        self.batch_in_epoch = 0
        self.unlabeled_epoch = 0
        self.train_s = 0.0
        self.skipped_steps: list[int] = []
        self.history: list[dict[str, Any]] = []
        self.step_times: list[float] = []
        self.tracking_s = 0.0
        """Seconds spent in the concept tracking (matching + explanation for the dominance record)."""
        self.writer: SummaryWriter | NullWriter | None = None

    @property
    def clip(self):
        return self._clip

    # the latest matching and graft, as the shared schedule holds them
    @property
    def matching(self):
        return self.grafts.matching

    @property
    def graft(self):
        return self.grafts.graft

    @property
    def matching_epoch(self) -> int:
        return self.grafts.epoch

    @property
    def matching_step(self) -> int:
        """The training step the latest matching was computed at (a model matched once is not matched again)."""
        return self.grafts.step

    @matching_step.setter
    def matching_step(self, step: int) -> None:
        self.grafts.step = step

    def _new_model(self) -> StandaloneModel:
        """The standalone model with its initial weights, on the CPU: drawn again from the random state the first
        one was drawn from, leaving the global random state as it was."""
        r = self.recipe
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self._init_rng)
            return StandaloneModel(r.model.name, self.bundle.num_classes, r.model.pretrained, r.model.checkpoint)

    def _new_optimizer(self) -> None:
        """A fresh optimizer over the model's (and the method's own) parameters, and a fresh learning-rate schedule
        of ``train.epochs`` epochs with its warmup."""
        t = self.recipe.train
        groups = [{"params": list(self.net.parameters())}]
        if self.method.parameters():  # the method's own (an adversary): a second group, same rate and schedule
            groups.append({"params": self.method.parameters()})
        self.optimizer = torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)
        warmup = int(round(t.warmup_epochs * self.steps_per_epoch))
        self.scheduler = warmup_cosine(self.optimizer, self.total_steps, warmup)

    def reset_model_and_optimizer(self) -> None:
        """Start training over (JTT's second stage): the model gets its initial weights back (the same draw from the
        seed as at the start), with a fresh optimizer, learning-rate schedule and gradient scaler. What belonged to
        the model trained so far is dropped: its matchings and grafts (the penalty's too), and the selection's picks
        (the ``best_*`` checkpoints), so no model from before the restart can be selected; its history rows stay,
        marked ``"discarded": true``. The step and epoch counters keep counting (TensorBoard, checkpoints). A
        method's own parameters are the method's to reset."""
        self.net.load_state_dict(self._new_model().state_dict())  # in place: a DDP wrapper keeps its parameters
        self._new_optimizer()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.scaler.is_enabled())
        self.grafts.reset()
        for rule in self.best:
            if self.dist.is_main:
                (self.out / f"best_{rule}.safetensors").unlink(missing_ok=True)
        self.best = {}
        for row in self.history:
            row["discarded"] = True

    def _check_batch_sizes(self) -> None:
        """Every process needs a share of every global batch."""
        world = self.dist.world
        if self.recipe.train.batch_size < world:
            raise DebiasError(f"train.batch_size = {self.recipe.train.batch_size}: the global batch is split across "
                              f"{world} processes; give it at least {world} images")
        if needs_unlabeled(self.recipe.train.method) and self.recipe.concept.unlabeled_batch_size < world:
            raise DebiasError(f"concept.unlabeled_batch_size = {self.recipe.concept.unlabeled_batch_size}: the "
                              f"unlabeled batch is split across {world} processes; give it at least {world} images")

    def _sync_buffers(self) -> None:
        """Broadcast rank 0's buffers (BatchNorm running statistics), so that every process holds the same model.

        DistributedDataParallel keeps parameters in step; buffers it copies from rank 0 at the start of each
        training forward, after which each process updates them from its own share of the batch."""
        if self.dist.active:
            self.dist.broadcast_(list(self.net.buffers()))

    # ------------------------------------------------------------------------------------------- data
    def train_loader(self, epoch: int) -> DataLoader:
        split = self.bundle.splits["train"]
        split.set_epoch(epoch)
        gen = torch.Generator().manual_seed(self.recipe.seed * 7_919 + epoch)
        weights = self.method.sample_weights()
        # the same global batches on any number of processes (this rank loads its share); a trailing batch too small
        # for BatchNorm's batch statistics (under 2 images a process) is skipped
        t = self.recipe.train
        sampler = (RandomSampler(split, generator=gen) if weights is None else
                   WeightedRandomSampler(weights.double(), num_samples=len(split), replacement=True, generator=gen))
        shares = _RankShares(BatchSampler(sampler, t.batch_size, drop_last=False), self.dist)
        return DataLoader(split, batch_sampler=shares, num_workers=t.num_workers,
                          generator=gen if weights is None else None)

    def next_unlabeled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch of the unlabeled stream: images and their indices in the stream (labels withheld)."""
        stream = self.bundle.unlabeled
        size = self.recipe.concept.unlabeled_batch_size
        while True:
            if self._unlabeled_iter is None:
                self._unlabeled_round = getattr(self, "_unlabeled_round", 0) + 1
                gen = torch.Generator().manual_seed(self.recipe.seed * 104_729 + self.unlabeled_epoch * 1_009
                                                    + self._unlabeled_round)
                order = torch.randperm(len(stream), generator=gen)
                self._unlabeled_iter = iter(order.split(size))
            idx = next(self._unlabeled_iter, None)
            if idx is not None and len(idx) == size:
                idx = self.dist.stride(idx)  # this process's share of the global batch
                return stream.images[idx].to(self.device), idx
            self._unlabeled_iter = None

    # ------------------------------------------------------------------------------------------- graft
    def rematch(self) -> None:
        """Match the current model to CLIP on the probe images and rebuild the latest graft."""
        self.grafts.rematch()

    def concept_split(self) -> Split:
        name = self.recipe.selection.concept_split
        if name == "probe":
            return probe_split(self.recipe, self.bundle)
        if name not in self.bundle.splits:
            raise DebiasError(f"selection.concept_split = {name!r}: not a split; expected 'probe' or one of "
                              f"{sorted(self.bundle.splits)}")
        return self.bundle.splits[name]

    def oracle_split(self) -> str | None:
        """The split recorded every epoch for reporting (``selection.oracle_split``), or None."""
        name = self.recipe.selection.oracle_split
        if name == "auto":
            return "shifted" if "shifted" in self.bundle.splits else None
        if not name:
            return None
        if name not in self.bundle.splits:
            raise DebiasError(f"selection.oracle_split = {name!r}: not a split; expected 'auto', '' or one of "
                              f"{sorted(self.bundle.splits)}")
        return name

    def tracks_concepts_now(self) -> bool:
        """Whether the end-of-epoch tracking of the epoch just finished scores the concept dominance: every
        ``selection.track_every``-th epoch and the last one."""
        sel = self.recipe.selection
        return sel.track_concepts and (self.epoch % sel.track_every == 0 or self.epoch >= self.total_epochs)

    def track(self) -> dict[str, Any]:
        """End-of-epoch figures: validation accuracy, worst-group accuracy and (optionally) concept dominance."""
        sel = self.recipe.selection
        oracle = self.oracle_split()
        names = [sel.split] + ([oracle] if oracle is not None else [])
        figures = evaluate_splits(self.net, {n: self.bundle.splits[n] for n in names}, self.device, dist=self.dist)
        val = figures[sel.split]
        row: dict[str, Any] = {"epoch": self.epoch, "val_accuracy": val["accuracy"],
                               "val_worst_group_accuracy": val["worst_group_accuracy"]}
        if oracle is not None:
            row["oracle_split"], row["oracle_accuracy"] = oracle, figures[oracle]["accuracy"]
            self.writer.add_scalar(f"oracle/{oracle}_accuracy", row["oracle_accuracy"], self.epoch)
        if self.tracks_concepts_now():
            started = time.perf_counter()
            matching = self.grafts.current()  # the matching of this epoch's model
            ex = explain_model(self.net, self.clip, matching, self.recipe, self.concept_split(), self.concepts,
                               self.device, progress=False, control_draws=0, dist=self.dist,
                               limit=sel.concept_images, clip_cache=self.clip_cache)
            core = [v for k, v in ex["scores"].items() if ex["roles"][k] == "core"]
            spur = [v for k, v in ex["scores"].items() if ex["roles"][k] == "spurious"]
            row["concept_scores"] = ex["scores"]
            row["dominant_concept"] = ex["dominant_concept"]
            row["dominance_margin"] = float(np.nanmean(core) - np.nanmean(spur)) if core and spur else float("nan")
            self.tracking_s += time.perf_counter() - started
            for k, v in ex["scores"].items():
                self.writer.add_scalar(f"concepts/{k}", v, self.epoch)
            self.writer.add_scalar("concepts/dominance_margin", row["dominance_margin"], self.epoch)
        self.writer.add_scalar("val/accuracy", row["val_accuracy"], self.epoch)
        self.writer.add_scalar("val/worst_group_accuracy", row["val_worst_group_accuracy"], self.epoch)
        return row

    @staticmethod
    def _rule_values(row: dict[str, Any]) -> dict[str, float]:
        """Each selection rule's figure in a history row (no dominance rule where the tracking gave none)."""
        rules = {"val_accuracy": row["val_accuracy"], "worst_group": row["val_worst_group_accuracy"]}
        if "dominance_margin" in row and row["dominance_margin"] == row["dominance_margin"]:
            rules["dominance"] = row["dominance_margin"]
        return rules

    def update_selection(self, row: dict[str, Any]) -> None:
        """Keep the best checkpoint under each selection rule (ties go to the later epoch)."""
        for rule, value in self._rule_values(row).items():
            if rule not in self.best or value >= self.best[rule]["value"]:
                self.best[rule] = {"epoch": self.epoch, "value": value}
                # a pick of the last epoch is the final model: model.safetensors holds it (selection_weights)
                if self.dist.is_main and self.epoch < self.total_epochs:
                    io.save_tensors(self.out / f"best_{rule}.safetensors", self.net.state_dict())

    def select_post_hoc_model(self) -> None:
        """After a post-hoc step (``leace``'s erasure) the method's model is the final one alone: an earlier epoch's
        checkpoint is a model before that step, not one the method yields. Every selection rule picks the final
        model (its ``value``: the rule's figure of the last epoch, read before the step), and the epochs' history
        rows are marked ``"discarded": true`` (no best-epoch oracle among them), as JTT marks its identification
        model's."""
        last = self.history[-1]
        self.best = {rule: {"epoch": self.epoch, "value": value} for rule, value in self._rule_values(last).items()}
        for row in self.history:
            row["discarded"] = True

    # ------------------------------------------------------------------------------------------- loop
    def fit(self, force: bool = False) -> dict[str, Any]:
        """Train (or resume an unfinished run in ``out``), then evaluate and explain.

        A finished run (``done`` marker) is returned as it is unless ``force``; an unfinished one resumes from
        its last checkpoint, which must come from the same resolved recipe.
        """
        r = self.recipe
        done = self.out / io.DONE_MARKER
        if done.exists() and not force:
            self.check_same_recipe(finished=True)  # a finished run of another recipe is not this run's result
            return io.read_json(self.out / "metrics.json") | {"already_finished": True}
        resumed = False
        if (self.out / CHECKPOINT).exists() and not force:
            self.check_same_recipe()
            self.load_checkpoint()
            resumed = True
        elif force and self.dist.is_main:
            done.unlink(missing_ok=True)
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            io.atomic_write_text(self.out / "recipe.toml", recipe_to_toml(r))
            self.writer = SummaryWriter(str(self.out / "tb"))
        else:
            self.writer = NullWriter()
        stop = _StopFlag()
        t0 = time.perf_counter()
        bar = tqdm(total=self.steps_per_epoch * self.total_epochs, initial=self.step, desc=f"train {r.train.method}",
                   unit="step", disable=not self.progress)
        if resumed and self.dist.is_main:
            bar.write(f"resumed {self.out} at epoch {self.epoch}, step {self.step}")
        with stop:
            for epoch in range(self.epoch, self.total_epochs):
                self._sync_buffers()
                if self.batch_in_epoch == 0:
                    self.method.on_epoch_start(epoch)
                self._unlabeled_iter = None
                self._round_at_epoch_start = getattr(self, "_unlabeled_round", 0)
                self.unlabeled_epoch = epoch
                self.model.train()
                for i, (images, labels, attrs) in enumerate(self.train_loader(epoch)):
                    if i < self.batch_in_epoch:  # resuming inside an epoch: the order is fixed by (seed, epoch)
                        if self.method.needs_unlabeled:
                            self.next_unlabeled()
                        continue
                    batch = {"images": images.to(self.device), "labels": labels.to(self.device),
                             "attrs": attrs.to(self.device)}
                    ts = time.perf_counter()
                    terms = self.train_step(batch)
                    self.step_times.append(time.perf_counter() - ts)
                    if terms and self.step % r.train.log_every == 0:
                        for k, v in terms.items():
                            self.writer.add_scalar(f"train/{k}", v, self.step)
                        self.writer.add_scalar("train/lr", self.scheduler.get_last_lr()[0], self.step)
                    self.step += 1
                    self.batch_in_epoch = i + 1
                    bar.update(1)
                    if terms:
                        bar.set_postfix(loss=f"{terms['loss']:.3f}")
                    if self.dist.any(stop.requested is not None):  # every process stops after the same step
                        self.save_checkpoint()
                        bar.close()
                        self._stopped(stop, f"after step {self.step} (epoch {epoch})")
                self.epoch = epoch + 1
                self.batch_in_epoch = 0
                self._sync_buffers()
                row = self.track()
                self.history.append(row)
                self.update_selection(row)
                self.save_checkpoint()
                if self.dist.any(stop.requested is not None):  # a signal during the tracking: stop here
                    bar.close()
                    self._stopped(stop, f"after epoch {epoch}")
            bar.close()
            changed = self.method.on_train_end()  # a post-hoc step on the trained model (leace)
            self.train_s += time.perf_counter() - t0
            if changed:  # what the evaluation reads is what the run directory and a resumed run hold
                self.select_post_hoc_model()
                self.save_checkpoint()
            return self.finish(self.train_s, stop)

    def _stopped(self, stop: "_StopFlag", where: str) -> None:
        """Raise TrainingInterrupted for a signal (to this process or another one) once the checkpoint is written."""
        self.dist.barrier()
        raise TrainingInterrupted(stop.requested or "SIGTERM",
                                  f"stopped by {stop.requested or 'a signal to another process'} {where}; checkpoint "
                                  f"written to {self.out / CHECKPOINT}; resume with the same command (same --out)")

    def check_same_recipe(self, finished: bool = False) -> None:
        """A run may only be resumed, or its finished results reported, with the recipe it was started with."""
        require_same_recipe(self.out, self.recipe, f"--out {str(self.out)!r}", finished,
                            f"use another --out, or --force to {'train again' if finished else 'start over'}")

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimisation step of the method on a batch; returns the loss terms as floats."""
        if self.recipe.train.channels_last:
            batch = {**batch, "images": batch["images"].contiguous(memory_format=torch.channels_last)}
        amp = self.amp_dtype is not None
        skip = self.recipe.train.skip_nonfinite
        # the training forward updates BatchNorm's running statistics before the loss can be checked: a batch that
        # is skipped must not leave them poisoned, so they are copied first (about a thousandth of the weights)
        buffers = [b.detach().clone() for b in self.net.buffers()] if skip else []
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=amp):
            terms = self.method.loss_terms(batch, self.step)  # the method's state updates are staged, not applied
        loss = terms["loss"].float()
        logged = terms
        if self.dist.active:  # the mean over processes: logged, and one finiteness verdict for every process
            means = self.dist.mean(torch.stack([v.detach().float() for v in terms.values()]))
            logged = dict(zip(terms, means))
        if not torch.isfinite(logged["loss"]):  # every process takes the same verdict (the mean over processes)
            self.method.discard()
            detail = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in logged.items())
            if skip:
                with torch.no_grad():
                    for b, saved in zip(self.net.buffers(), buffers):
                        b.copy_(saved)
                self.skipped_steps.append(self.step)
                self.writer.add_scalar("train/skipped_nonfinite", len(self.skipped_steps), self.step)
                return {}
            raise DebiasError(f"non-finite loss at step {self.step} (epoch {self.epoch}): {detail}; the last good "
                              f"checkpoint is kept in {self.out}; set train.skip_nonfinite = true to skip such "
                              "batches")
        self.method.commit()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.dist.active:  # the method's own parameters sit outside DDP: average their gradients as DDP does
            grads = [p.grad for p in self.method.parameters() if p.grad is not None]
            self.dist.all_reduce_(grads)
            for g in grads:
                g /= self.dist.world
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return {k: float(v.detach()) for k, v in logged.items()}

    # ------------------------------------------------------------------------------------------- end of run
    def finish(self, train_s: float, stop: "_StopFlag | None" = None) -> dict[str, Any]:
        """The final evaluation, explanation and selection figures, then ``metrics.json`` and the ``done`` marker.

        A signal (``stop``) is honoured between its parts, before anything of the finished run is written: the run
        stops with its last epoch's checkpoint, and the same command runs the final evaluation again."""
        r = self.recipe

        def check_stop(where: str) -> None:
            if stop is not None and self.dist.any(stop.requested is not None):
                self._stopped(stop, f"during the final evaluation ({where})")

        # a method that trains against the unlabeled stream is also scored on it: how well the penalty's own images
        # were fitted, next to fresh images (the stream's labels are read here for this report only)
        # (a stream whose labels or attributes are not all known, rows of a folder dataset's CSV, is not scored)
        u = self.bundle.unlabeled
        known = u is not None and bool((u.labels >= 0).all() and (u.attrs >= 0).all())
        stream = {"stream": u} if self.method.needs_unlabeled and known else {}
        splits = evaluate_splits(self.net, {**self.bundle.splits, **stream}, self.device, dist=self.dist)
        for name, m in splits.items():
            self.writer.add_scalar(f"final/{name}/accuracy", m["accuracy"], self.epoch)
            self.writer.add_scalar(f"final/{name}/worst_group_accuracy", m["worst_group_accuracy"], self.epoch)
        stream = splits.pop("stream", None)
        check_stop("after the splits' accuracies")
        explanation = self.explain()
        check_stop("after the explanation")
        selection = self.evaluate_selection(final={k: v for k, v in splits.items() if k != "train"})
        check_stop("after the selection rules' figures")
        metrics = {
            "method": r.train.method,
            "seed": r.seed,
            "splits": splits,
            "explain": explanation,
            "timing": {"train_s": train_s,
                       "step_s_median": statistics.median(self.step_times) if self.step_times else 0.0,
                       "steps": self.step, "skipped_steps": len(self.skipped_steps),
                       "tracking_s": self.tracking_s},
            "selection": selection,
            "history": self.history,
            "recipe": r.to_dict(),
        }
        if stream is not None:
            metrics["stream"] = stream
        if self.dist.active:
            metrics["distributed"] = {"world_size": self.dist.world, "backend": torch.distributed.get_backend()}
            if self.batchnorm is not None:
                metrics["distributed"]["batchnorm"] = self.batchnorm
        if self.dist.is_main:
            io.atomic_write_json(self.out / "metrics.json", metrics)
            from ..report import plot_concept_scores

            plot_concept_scores(explanation, self.out / "concept_scores.png",
                                title=f"{r.model.name} / {r.train.method} / bias {r.data.bias}")
            self.writer.close()
            io.atomic_write_text(self.out / io.DONE_MARKER, "finished\n")
            self._drop_finished_run_files(selection)
        self.dist.barrier()  # the other processes return once the run directory is complete
        return metrics

    def _drop_finished_run_files(self, selection: dict[str, Any]) -> None:
        """Once ``done`` is written: the resumable state (unless kept) and the selection picks' duplicate weights
        (a pick of the last epoch is ``model.safetensors``; two rules' picks of one epoch share one file)."""
        if not self.keep_training_state:
            (self.out / CHECKPOINT).unlink(missing_ok=True)
        kept = {pick["weights"] for pick in selection.values()}
        for rule in selection:
            if f"best_{rule}.safetensors" not in kept:
                (self.out / f"best_{rule}.safetensors").unlink(missing_ok=True)

    def explain(self) -> dict[str, Any]:
        r = self.recipe
        split_name = r.explain.split
        if split_name not in self.bundle.splits:
            raise DebiasError(f"explain.split = {split_name!r}: not a split of this dataset; "
                              f"splits: {sorted(self.bundle.splits)}")
        matching = self.grafts.current()
        if self.dist.is_main:
            io.save_tensors(self.out / "matching.safetensors", matching.state_dict())
        return explain_model(self.net, self.clip, matching, r, self.bundle.splits[split_name], self.concepts,
                             self.device, self.progress, dist=self.dist, clip_cache=self.clip_cache)

    def selection_weights(self) -> dict[str, str]:
        """The file holding each selection rule's pick: ``model.safetensors`` for a pick of the last epoch (the final
        model), else ``best_<rule>.safetensors`` of the first rule (in name order) that picked the same epoch."""
        first: dict[int, str] = {}
        out = {}
        for rule, best in sorted(self.best.items()):
            first.setdefault(best["epoch"], rule)
            out[rule] = ("model.safetensors" if best["epoch"] == self.epoch
                         else f"best_{first[best['epoch']]}.safetensors")
        return out

    def evaluate_selection(self, final: dict[str, Any] | None = None) -> dict[str, Any]:
        """Test figures of the checkpoint each selection rule picked (``final``: the final model's figures on the
        splits other than train, which a pick of the last epoch reuses)."""
        import copy

        out = {}
        shadow = None
        weights = self.selection_weights()
        self.dist.barrier()  # rank 0 wrote the best_*.safetensors files
        for rule, best in sorted(self.best.items()):
            if weights[rule] == "model.safetensors":
                model = self.net
            else:
                if shadow is None:
                    shadow = copy.deepcopy(self.net)
                shadow.load_state_dict(io.load_tensors(self.out / weights[rule]))
                model = shadow
            splits = (final if final is not None and model is self.net else
                      evaluate_splits(model, {k: v for k, v in self.bundle.splits.items() if k != "train"},
                                      self.device, dist=self.dist))
            out[rule] = {"epoch": best["epoch"], "value": best["value"], "weights": weights[rule], "splits": splits}
        return out

    def save_checkpoint(self) -> None:
        """One atomic file with everything a resumed run needs, plus the weights as safetensors for sharing.

        Rank 0 writes (every process holds the same model, optimizer and schedule); the others do nothing."""
        if not self.dist.is_main:
            return
        state = {
            "epoch": self.epoch, "step": self.step, "batch_in_epoch": self.batch_in_epoch,
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "method": self.method.state_dict(),
            "history_json": json.dumps(self.history), "best_json": json.dumps(self.best),
            "step_times": torch.tensor(self.step_times, dtype=torch.float64),
            "skipped_steps": torch.tensor(self.skipped_steps, dtype=torch.long),
            "train_s": self.train_s, "tracking_s": self.tracking_s,
            "rng_torch": torch.get_rng_state(), "rng_numpy_json": json.dumps(_numpy_state()),
            # this process's CUDA generator (augmentations and dropout draw there); absent on the CPU
            **({"rng_cuda": torch.cuda.get_rng_state(self.device)} if self.device.type == "cuda" else {}),
            "rng_python_json": json.dumps(_python_state()),
            **self.grafts.state_dict(),  # matching, matching_epoch, matching_step
            # the stream's position at the start of the epoch the checkpoint resumes in: skipped batches replay it
            "unlabeled_round": (getattr(self, "_unlabeled_round", 0) if self.batch_in_epoch == 0
                                else self._round_at_epoch_start),
            "meta": {"model": self.recipe.model.name, "classes": ",".join(self.bundle.class_names)},
        }
        io.save_state(self.out / CHECKPOINT, state)
        io.save_tensors(self.out / "model.safetensors", self.net.state_dict(),
                        metadata={"model": self.recipe.model.name, "num_classes": str(self.bundle.num_classes),
                                  "classes": ",".join(self.bundle.class_names), "epoch": str(self.epoch)})

    def load_checkpoint(self) -> None:
        path = self.out / CHECKPOINT
        state = io.load_state(path)
        load_fitting_weights(self.net, state["model"], state.get("meta", {}), self.recipe.model.name,
                             self.bundle.class_names, path, require_meta=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.grafts.load_state_dict(state)  # before the method's state, which may share this graft
        self.method.load_state_dict(state["method"])
        self.epoch, self.step, self.batch_in_epoch = state["epoch"], state["step"], state["batch_in_epoch"]
        # the training split (re-drawn each epoch) as the stopped run held it: the current epoch's draw mid-epoch,
        # the last finished epoch's at an epoch boundary, where the final evaluation, a matching on training images
        # or a method's epoch start reads it before (or without) the loop drawing it again
        self.bundle.splits["train"].set_epoch(self.epoch if self.batch_in_epoch else max(self.epoch - 1, 0))
        self.history = json.loads(state["history_json"])
        self.best = json.loads(state["best_json"])
        self.step_times = state["step_times"].tolist()
        self.skipped_steps = state["skipped_steps"].tolist()
        self.train_s = float(state["train_s"])
        self.tracking_s = float(state.get("tracking_s", 0.0))  # absent from a checkpoint of an older version
        torch.set_rng_state(state["rng_torch"])
        if "rng_cuda" in state and self.device.type == "cuda":  # a checkpoint written on the CPU has none
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)
        _set_numpy_state(json.loads(state["rng_numpy_json"]))
        _set_python_state(json.loads(state["rng_python_json"]))
        self._unlabeled_round = int(state["unlabeled_round"])


CHECKPOINT = "checkpoint.pt"


class _RankShares(Sampler[list[int]]):
    """This process's stride share ``batch[rank::world]`` of every global batch of ``batches`` (one process: every
    batch whole); a trailing batch with fewer than two images per process is skipped (by every process alike):
    BatchNorm cannot take batch statistics of one image."""

    def __init__(self, batches: BatchSampler, dist: Dist):
        self.batches, self.dist = batches, dist

    def __iter__(self):
        for batch in self.batches:
            if len(batch) >= 2 * self.dist.world:
                yield batch[self.dist.rank::self.dist.world]

    def __len__(self) -> int:
        n, size = len(self.batches.sampler), self.batches.batch_size
        return n // size + (n % size >= 2 * self.dist.world)


class NullWriter:
    """A TensorBoard writer that writes nothing: the processes' other than rank 0, and a benchmark's trainers."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


class _StopFlag:
    """Turns SIGINT/SIGTERM into a request to stop after the current step (restores the old handlers on exit)."""

    def __init__(self):
        self.requested: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        self.requested = self.requested or signal.Signals(signum).name  # the first signal is the reason

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _numpy_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _set_numpy_state(state: list) -> None:
    name, keys, pos, has_gauss, cached = state
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _python_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _set_python_state(state: list) -> None:
    version, internal, gauss = state
    random.setstate((version, tuple(internal), gauss))
