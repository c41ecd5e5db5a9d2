"""DecodeState: everything the device keeps about the in-flight requests, slot by slot.

A slot is one row of every array below. A request owns one slot from insert
until it finishes; `compact` moves whole rows. Nothing here knows request ids:
the host scheduler maps slots to requests.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from flover_jax.sampling import SlotSampling
from models.config import ModelConfig
from models.layers import pytree_dataclass
from models.transformer import KVCache


@pytree_dataclass
class DecodeState:
    cache: KVCache  # k, v: per layer [slots, kv_heads, max_len, head_dim]
    tokens: jax.Array  # [slots] int32: the last sampled token, the next step's input
    pos: jax.Array  # [slots] int32: tokens in the cache = the position `tokens` will take
    active: jax.Array  # [slots] bool: decoding; False for free and finished slots
    remaining: jax.Array  # [slots] int32: tokens the request may still generate
    generated: jax.Array  # [slots] int32: tokens generated so far (the sampler's stream step)
    ignore_eos: jax.Array  # [slots] bool
    sampling: SlotSampling  # each field [slots]
    seen: jax.Array  # [slots, vocab] bool: in the prompt or output (repetition penalty)
    output_counts: jax.Array  # [slots, vocab] int32: times in the output (presence, frequency)

    @classmethod
    def empty(cls, cfg: ModelConfig, slots: int, max_len: int) -> DecodeState:
        # Distinct buffers for every field: the verbs donate the whole state.
        def zeros(shape=(slots,), dtype=jnp.int32):
            return jnp.zeros(shape, dtype)

        return cls(
            cache=KVCache.zeros(cfg, slots, max_len),
            tokens=zeros(),
            pos=zeros(),
            active=zeros(dtype=bool),
            remaining=zeros(),
            generated=zeros(),
            ignore_eos=zeros(dtype=bool),
            sampling=SlotSampling.greedy(slots),
            seen=zeros((slots, cfg.vocab_size), bool),
            output_counts=zeros((slots, cfg.vocab_size)),
        )

    def replace(self, **changes) -> DecodeState:
        return dataclasses.replace(self, **changes)

    def busy(self, live: int, context: int) -> DecodeState:
        """This state with its first `live` rows decoding at `context` cached tokens, never
        finishing: what timing a decode step needs (the cache's contents do not matter)."""
        n = self.num_slots
        return self.replace(
            active=jnp.asarray(np.arange(n) < live), pos=jnp.full((n,), context, jnp.int32),
            remaining=jnp.full((n,), 1 << 30, jnp.int32), ignore_eos=jnp.ones((n,), bool),
        )

    def deactivate(self, slots: jax.Array) -> DecodeState:
        """Mark slots inactive; out-of-range entries (padding) are dropped."""
        return self.replace(active=self.active.at[slots].set(False, mode="drop"))

    @property
    def num_slots(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def slot_rows(self) -> dict[str, np.ndarray]:
        """Every per-slot array except the KV cache, on the host (for tests and debugging)."""
        leaves = jax.tree_util.tree_leaves_with_path(self)
        return {
            jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in leaves
            if not jax.tree_util.keystr(path).startswith(".cache")
        }
