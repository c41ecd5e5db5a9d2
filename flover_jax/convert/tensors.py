"""What every importer shares: one error type and a shape-checked getter of lazy tensors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from models.config import DTYPES
from models.lazy import LazyTensor


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded; the message names the file and the problem."""


def shape_checked_getter(
    path: Path, tensor: Callable[[str], LazyTensor | None]
) -> Callable[[str, tuple[int, ...]], LazyTensor]:
    """Wrap `tensor(name) -> LazyTensor | None` into the `get(name, shape)` the model families
    use: the tensor as stored, or a CheckpointError naming the file, the tensor and what was
    expected. Nothing is read."""

    def get(name: str, shape: tuple[int, ...]) -> LazyTensor:
        found = tensor(name)
        if found is None:
            raise CheckpointError(f"{path}: tensor {name!r} is missing")
        if tuple(found.shape) != tuple(shape):
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {tuple(found.shape)} but the config "
                f"implies {tuple(shape)}"
            )
        return found

    return get


def stored_dtype(params) -> str:
    """The dtype a checkpoint's model runs in unless told otherwise: its embedding's, where that
    is one of ModelConfig's (a float64 or quantized one runs in float32)."""
    name = np.dtype(params.embed.dtype).name
    return name if name in DTYPES else "float32"
