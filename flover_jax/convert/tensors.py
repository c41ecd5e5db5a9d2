"""What every importer shares: one error type and a shape-checked tensor getter."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded; the message names the file and the problem."""


def shape_checked_getter(
    path: Path, read: Callable[[str], np.ndarray | None]
) -> Callable[[str, tuple[int, ...]], np.ndarray]:
    """Wrap `read(name) -> array | None` into the `get(name, shape)` the model families use.

    Every tensor comes back as float32 numpy, or a CheckpointError names the
    file, the tensor and what was expected.
    """

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        array = read(name)
        if array is None:
            raise CheckpointError(f"{path}: tensor {name!r} is missing")
        if tuple(array.shape) != tuple(shape):
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {tuple(array.shape)} but the config "
                f"implies {tuple(shape)}"
            )
        return np.asarray(array, dtype=np.float32)

    return get
