"""DeviceExecutor: the device verbs of `step.py` bound to one model and one DecodeState.

It pads every host list to its bucket (prompts, batches, moves) so that the
verbs see only bucketed shapes, and hands back device arrays without waiting
for them: JAX's async dispatch lets the host run ahead of the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flover_jax import step
from flover_jax.buckets import Buckets, bucket
from flover_jax.sampling import SamplingParams, SlotSampling
from flover_jax.state import DecodeState
from models.config import ModelConfig
from models.transformer import Params


class DeviceExecutor:
    def __init__(
        self,
        params: Params,
        cfg: ModelConfig,
        num_slots: int,
        max_len: int,
        eos_ids: Sequence[int] = (),
        buckets: Buckets | None = None,
    ) -> None:
        if num_slots < 1:
            raise ValueError(f"max_slots={num_slots}: must be >= 1")
        if not 2 <= max_len <= cfg.max_positions:
            raise ValueError(
                f"max_len={max_len}: must be in [2, {cfg.max_positions}] (the model's positions)"
            )
        self.params, self.cfg = params, cfg
        self.num_slots, self.max_len, self.vocab_size = num_slots, max_len, cfg.vocab_size
        self.eos_ids = tuple(int(e) for e in eos_ids)
        self.buckets = buckets or Buckets.for_engine(num_slots, max_len)
        self.state = DecodeState.empty(cfg, num_slots, max_len)

    def _pad_slots(self, slots: Sequence[int], size: int) -> np.ndarray:
        """Slot ids padded with the out-of-range slot S, which every scatter drops."""
        out = np.full(size, self.num_slots, np.int32)
        out[: len(slots)] = slots
        return out

    def prefill(
        self, slots: Sequence[int], prompts: Sequence[list[int]], params: Sequence[SamplingParams]
    ) -> jax.Array:
        b = bucket(len(prompts), self.buckets.prefill_batches)
        t = bucket(max(len(p) for p in prompts), self.buckets.prompt_lengths)
        tokens = np.zeros((b, t), np.int32)
        lengths = np.ones(b, np.int32)
        for i, prompt in enumerate(prompts):
            tokens[i, : len(prompt)] = prompt
            lengths[i] = len(prompt)
        return self._prefill_insert(tokens, lengths, self._pad_slots(slots, b), params)

    def _prefill_insert(
        self, tokens: np.ndarray, lengths: np.ndarray, slots: np.ndarray,
        params: Sequence[SamplingParams],
    ) -> jax.Array:
        b = len(slots)
        sampling = SlotSampling.from_params(list(params), b)
        max_new = np.ones(b, np.int32)
        max_new[: len(params)] = [p.max_new_tokens for p in params]
        ignore_eos = np.zeros(b, bool)
        ignore_eos[: len(params)] = [p.ignore_eos for p in params]
        prefilled = step.prefill(self.params, self.cfg, tokens, lengths, sampling)
        self.state = step.insert(
            self.state, prefilled, slots, lengths, max_new, ignore_eos, sampling,
            eos_ids=self.eos_ids,
        )
        return prefilled.first_token

    def decode(self, start: int, width: int, kv_len: int) -> jax.Array:
        self.state, tokens = step.decode_step(
            self.params, self.state, jnp.int32(start), cfg=self.cfg, width=width,
            kv_len=kv_len, eos_ids=self.eos_ids,
        )
        return tokens

    # Move and release lists are padded to the capacity: one shape, one compile per kv_len.
    def compact(self, moves: Sequence[tuple[int, int]], kv_len: int) -> None:
        src = self._pad_slots([s for s, _ in moves], self.num_slots)
        dst = self._pad_slots([d for _, d in moves], self.num_slots)
        self.state = step.compact(self.state, src, dst, kv_len=kv_len)

    def release(self, slots: Sequence[int]) -> None:
        self.state = step.release(self.state, self._pad_slots(slots, self.num_slots))

    def read(self, handle: jax.Array) -> np.ndarray:
        return np.asarray(handle)

    def warmup(
        self,
        windows: Sequence[int] | None = None,
        kv_lengths: Sequence[int] | None = None,
        prompt_lengths: Sequence[int] | None = None,
    ) -> None:
        """Compile the given buckets (all by default) by running every verb on padding rows
        only: no slot changes, so a warm-up never disturbs the state."""
        b = self.buckets
        kv_lengths = kv_lengths or b.kv_lengths
        for t in prompt_lengths or b.prompt_lengths:
            for size in b.prefill_batches:
                tokens = np.zeros((size, t), np.int32)
                self._prefill_insert(tokens, np.full(size, t, np.int32), self._pad_slots([], size), [])
        for width in windows or b.windows:
            for kv_len in kv_lengths:
                self.decode(0, width, kv_len)
        for kv_len in kv_lengths:
            self.compact([], kv_len)
        self.release([])
        jax.block_until_ready(self.state)
