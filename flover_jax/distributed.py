"""Past one host: jax.distributed's multi-controller runtime, with one scheduler.

Every process runs the same program on its own devices, and JAX requires them
all to issue the same device computations in the same order. So only process
0 schedules: its executor is a `BroadcastExecutor`, which sends each device
call (prefill, decode, compact, copy_prefix, release, with its arguments) to every process
before running it; the other processes `follow`, replaying the calls. No
process can diverge, because none decides anything. Tokens come back
replicated, so process 0 reads them from its own devices.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from flover_jax.buckets import powers_of_two
from flover_jax.chunks import PromptPiece
from flover_jax.executor import DeviceExecutor
from flover_jax.sampling import Sampled

_STOP = "stop"
# Message sizes are padded to these buckets so the broadcast compiles a few times only.
_MESSAGE_BUCKETS = powers_of_two(1 << 10, 1 << 26)


def initialize(coordinator_address: str, num_processes: int, process_id: int) -> None:
    """Join the job (before any other JAX call). On CPU, collectives go through gloo."""
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id}: must be in [0, {num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)


def _broadcast(payload: bytes | None) -> bytes:
    """Process 0's bytes on every process (others pass None)."""
    is_source = jax.process_index() == 0
    size = multihost_utils.broadcast_one_to_all(
        np.array([len(payload) if is_source else 0], np.int64), is_source
    )
    n = int(size[0])
    padded = next(b for b in _MESSAGE_BUCKETS if b >= n)
    buffer = np.zeros(padded, np.uint8)
    if is_source:
        buffer[:n] = np.frombuffer(payload, np.uint8)
    return multihost_utils.broadcast_one_to_all(buffer, is_source)[:n].tobytes()


class BroadcastExecutor:
    """Process 0's executor: each call is broadcast, then run here too."""

    def __init__(self, executor: DeviceExecutor) -> None:
        self.executor = executor
        self.num_slots, self.max_len = executor.num_slots, executor.max_len
        self.prefix_rows = executor.prefix_rows
        self.vocab_size, self.buckets = executor.vocab_size, executor.buckets
        self.attention_kernel, self.matmul_kernel = executor.attention_kernel, executor.matmul_kernel
        self.op_choice = executor.op_choice
        self.batch_invariant = executor.batch_invariant

    def _call(self, name: str, *args) -> Any:
        _broadcast(pickle.dumps((name, args)))
        return getattr(self.executor, name)(*args)

    def prefill(self, pieces: Sequence[PromptPiece]) -> Sampled:
        return self._call("prefill", list(pieces))

    def copy_prefix(self, copies: Sequence[tuple[int, int, Sequence[int]]]) -> None:
        self._call("copy_prefix", [(s, d, list(t)) for s, d, t in copies])

    def decode(self, start: int, width: int, kv_len: int) -> Sampled:
        return self._call("decode", start, width, kv_len)

    def compact(self, moves: Sequence[tuple[int, int]], kv_len: int) -> None:
        self._call("compact", list(moves), kv_len)

    def release(self, slots: Sequence[int]) -> None:
        self._call("release", list(slots))

    def warmup(self, windows=None, kv_lengths=None, prompt_lengths=None) -> None:
        self._call("warmup", windows, kv_lengths, prompt_lengths)

    def read(self, handle):
        return self.executor.read(handle)

    @property
    def state(self):
        return self.executor.state

    def close(self) -> None:
        """Release the followers."""
        _broadcast(pickle.dumps((_STOP, ())))


def follow(executor: DeviceExecutor) -> None:
    """On processes other than 0: replay process 0's device calls until it closes."""
    while True:
        name, args = pickle.loads(_broadcast(None))
        if name == _STOP:
            return
        try:
            getattr(executor, name)(*args)
        except Exception as e:  # process 0 met the same error and decides what follows
            logging.getLogger(__name__).warning("replayed %s failed: %s", name, e)
