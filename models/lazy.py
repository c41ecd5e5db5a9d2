"""Checkpoint tensors the model families rearrange before anything is read.

An importer (flover_jax/convert) hands the family files `LazyTensor`s: a tensor's shape and
dtype from the file's header, and how to read it. The family files rearrange them (transpose,
reshape, slice, add a constant) without reading anything, so a whole model is described
before a byte of it is loaded; the loader then reads one leaf at a time straight to its device
shards (`flover_jax.loader`), and host memory holds a tensor or two, never the model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class LazyTensor:
    """A checkpoint tensor, or a rearrangement of some, not read until `read()` (or
    `np.asarray`). Each operation gives a new LazyTensor with its shape and dtype known."""

    shape: tuple[int, ...]
    dtype: np.dtype
    read: Callable[[], np.ndarray]  # the values, in `dtype`, of `shape`

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self.read()
        return array if dtype is None else array.astype(dtype)

    def _then(self, op: Callable[[np.ndarray], np.ndarray], shape=None, dtype=None) -> LazyTensor:
        read = self.read
        return LazyTensor(self.shape if shape is None else tuple(shape),
                          self.dtype if dtype is None else np.dtype(dtype), lambda: op(read()))

    def map(self, op: Callable[[np.ndarray], np.ndarray]) -> LazyTensor:
        """`op` applied to the values as they are read; it keeps their shape and dtype."""
        return self._then(op)

    @property
    def T(self) -> LazyTensor:
        return self._then(lambda a: a.T, self.shape[::-1])

    def reshape(self, *shape) -> LazyTensor:  # reshape(2, 3) or reshape((2, 3)), as numpy's
        new_shape = _probe(self.shape).reshape(*shape).shape
        return self._then(lambda a: a.reshape(new_shape), new_shape)

    def __getitem__(self, index) -> LazyTensor:
        return self._then(lambda a: a[index], _probe(self.shape)[index].shape)

    def __add__(self, constant: float) -> LazyTensor:
        if not isinstance(constant, (int, float)):
            return NotImplemented
        # In float32, as transformers adds Gemma's 1 + w; the loader casts to the model's dtype.
        return self._then(lambda a: a.astype(np.float32) + np.float32(constant), dtype=np.float32)

    __radd__ = __add__


def _probe(shape: tuple[int, ...]) -> np.ndarray:
    """An array of `shape` that takes no memory: numpy's view ops on it give their shapes."""
    return np.broadcast_to(np.empty((), np.uint8), shape)

