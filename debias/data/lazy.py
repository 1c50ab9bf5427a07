"""Images rendered on access, and the split that holds them: real datasets at any image size without the memory.

A 224 px split of 10,000 images would take 6 GB as a float tensor; :class:`LazyImages` keeps only what it needs to
render (base images and per-image parameters, or file paths) and renders a batch when it is indexed.
:class:`LazySplit` is a :class:`~debias.data.splits.Split` over such images whose DataLoader batches are rendered in
one call.
"""
from __future__ import annotations

import numbers
from typing import Callable, Sequence

import torch

from .splits import Split

EVAL_CHUNK = 512
"""Most images rendered at once when a large index is asked for (bounds the temporary memory)."""


class LazyImages:
    """Images rendered on access, indexed like an ``(N, 3, H, W)`` tensor.

    ``images[i]`` gives ``(3, H, W)``; a slice, an index tensor, a list or a boolean mask gives ``(n, 3, H, W)``;
    a tuple indexes the rendered result further (``images[:, 0]``). ``render(indices)`` must be deterministic in
    the indices, so an image is the same whether it is drawn alone or in any batch.
    """

    def __init__(self, n: int, size: int, render: Callable[[torch.Tensor], torch.Tensor]):
        self.n = int(n)
        self.size = int(size)
        self.render = render

    def __len__(self) -> int:
        return self.n

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.n, 3, self.size, self.size))

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def __repr__(self) -> str:
        return f"LazyImages(n={self.n}, size={self.size})"

    def _indices(self, index) -> torch.Tensor:
        if isinstance(index, slice):
            return torch.arange(self.n)[index]
        idx = torch.as_tensor(index)
        if idx.numel() == 0:
            return torch.zeros(0, dtype=torch.long)
        if idx.dtype == torch.bool:
            if idx.shape != (self.n,):
                raise IndexError(f"boolean mask of shape {tuple(idx.shape)} for {self.n} images")
            return torch.nonzero(idx).flatten()
        if idx.is_floating_point() or idx.dim() != 1:
            raise IndexError(f"cannot index {self!r} with {type(index).__name__} of shape {tuple(idx.shape)}")
        idx = idx.long()
        idx = torch.where(idx < 0, idx + self.n, idx)
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= self.n):
            raise IndexError(f"index out of range for {self.n} images")
        return idx

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        """Render the images at ``idx`` (a 1-D long tensor), in chunks of :data:`EVAL_CHUNK`."""
        if len(idx) <= EVAL_CHUNK:
            return self.render(idx)
        return torch.cat([self.render(part) for part in idx.split(EVAL_CHUNK)])

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, tuple):
            first, rest = index[0], index[1:]
            out = self[first]
            return out[rest] if isinstance(first, int) else out[(slice(None),) + rest]
        if isinstance(index, numbers.Integral) or (torch.is_tensor(index) and index.dim() == 0
                                                   and not index.is_floating_point()):
            i = int(index)
            if not -self.n <= i < self.n:
                raise IndexError(f"image index {i} out of range for {self.n} images")
            return self.render(torch.tensor([i % self.n]))[0]
        return self.take(self._indices(index))

    def materialize(self) -> torch.Tensor:
        """Every image as one tensor (mind the memory: ``N * 3 * H * W * 4`` bytes)."""
        return self.take(torch.arange(self.n))


class LazySplit(Split):
    """A :class:`Split` whose ``images`` is a :class:`LazyImages`; a DataLoader batch is rendered in one call.

    PyTorch's map-style fetcher calls ``__getitems__`` with a whole batch of indices when a dataset has it.
    """

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int, int]]:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        images = self.images[idx]
        labels, attrs = self.labels[idx].tolist(), self.attrs[idx].tolist()
        return list(zip(images.unbind(0), labels, attrs))
