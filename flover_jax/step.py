"""The device verbs: pure, jitted, DecodeState donated. Everything the host dispatches.

- `prefill`:  right-padded prompts [b, t] -> their K/V and first sampled token.
- `insert`:   write a prefill into chosen slots (padding rows carry slot = S and drop).
- `decode_step`: one token for every active slot in the window [start, start + width).
- `compact`:  move whole slots src -> dst (the memory shuffle), in place.
- `release`:  deactivate slots the host finished (stop strings, stop ids, cancel).

Sampled tokens come back as `Sampled`: the tokens, and their log-probabilities for the rows
whose request asked.

The functions are pure; `Verbs` jits them for one model and mesh with explicit
in/out shardings and the state donated. Static arguments (width, kv_len and the
prompt shapes) come from small bucket sets chosen by the host, so the number of
compiles is bounded by those sets and never by traffic. Index arrays padded
with the out-of-range slot S make scatters drop the padding rows.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp

from flover_jax.sampling import (
    Sampled,
    SlotSampling,
    count_tokens,
    mark_tokens,
    report,
    sample_tokens,
)
from flover_jax.state import DecodeState
from models import transformer
from models.config import ModelConfig
from models.layers import pytree_dataclass
from models.transformer import KVCache, Params


@pytree_dataclass
class Prefilled:
    k: jax.Array  # [layers, b, kv_heads, t, head_dim]
    v: jax.Array  # [layers, b, kv_heads, t, head_dim]
    first: Sampled  # [b]: the first token (and its log-probability)
    seen: jax.Array  # [b, vocab] bool: the prompt's tokens


def _is_eos(tokens: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
    hit = jnp.zeros(tokens.shape, bool)
    for eos in eos_ids:
        hit = hit | (tokens == eos)
    return hit


def prefill(
    params: Params,
    tokens: jax.Array,
    lengths: jax.Array,
    sampling: SlotSampling,
    *,
    cfg: ModelConfig,
) -> Prefilled:
    """tokens [b, t] right-padded, lengths [b] >= 1, sampling fields [b]."""
    b, t = tokens.shape
    hidden, k, v = transformer.prefill(params, cfg, tokens)
    last = hidden[jnp.arange(b), lengths - 1]  # [b, d]: only the last real position matters
    logits = transformer.logits(params, last, cfg)
    real = jnp.arange(t)[None, :] < lengths[:, None]
    seen = jnp.zeros((b, cfg.vocab_size), bool)
    seen = seen.at[jnp.arange(b)[:, None], jnp.where(real, tokens, 0)].max(real)
    no_output = jnp.zeros(seen.shape, jnp.int32)
    first = sample_tokens(logits, sampling, jnp.zeros((b,), jnp.int32), seen, no_output)
    first = report(logits, first, jnp.ones((b,), bool), sampling)
    return Prefilled(k=k, v=v, first=first, seen=seen)


def insert(
    state: DecodeState,
    prefilled: Prefilled,
    slots: jax.Array,
    lengths: jax.Array,
    max_new_tokens: jax.Array,
    ignore_eos: jax.Array,
    sampling: SlotSampling,
    *,
    eos_ids: tuple[int, ...],
) -> DecodeState:
    """Give each prefilled prompt its slot; all arrays [b], slots = S for padding rows."""
    t = prefilled.k.shape[3]

    def write(layers, prompts):  # prompts [layers, b, kv_heads, t, head_dim]
        return tuple(c.at[slots, :, :t].set(p, mode="drop") for c, p in zip(layers, prompts))

    cache = KVCache(write(state.cache.k, prefilled.k), write(state.cache.v, prefilled.v))
    first = prefilled.first.tokens
    done = (max_new_tokens <= 1) | (_is_eos(first, eos_ids) & ~ignore_eos)
    done = done | (lengths >= state.max_len)
    everyone = jnp.ones_like(first, bool)
    first_seen = mark_tokens(jnp.zeros_like(prefilled.seen), first, everyone)
    first_counts = count_tokens(jnp.zeros(prefilled.seen.shape, jnp.int32), first, everyone)

    def put(array, values):
        return array.at[slots].set(values, mode="drop")

    return DecodeState(
        cache=cache,
        tokens=put(state.tokens, first),
        pos=put(state.pos, lengths),
        active=put(state.active, ~done),
        remaining=put(state.remaining, max_new_tokens - 1),
        generated=put(state.generated, jnp.ones_like(first)),
        ignore_eos=put(state.ignore_eos, ignore_eos),
        sampling=jax.tree.map(put, state.sampling, sampling),
        seen=put(state.seen, prefilled.seen | first_seen),
        output_counts=put(state.output_counts, first_counts),
    )


def decode_step(
    params: Params,
    state: DecodeState,
    start: jax.Array,
    width: int,
    kv_len: int,
    *,
    cfg: ModelConfig,
    eos_ids: tuple[int, ...],
    attention_kernel: bool = False,
) -> tuple[DecodeState, Sampled]:
    """One token for each active slot of [start, start + width); -1 for the others.

    Rows outside the window are not computed. kv_len must exceed the position
    of every active slot in the window. attention_kernel: see `transformer.decode`.
    """

    def window(array):
        return jax.lax.dynamic_slice_in_dim(array, start, width, axis=0)

    def put(array, rows):
        return jax.lax.dynamic_update_slice_in_dim(array, rows, start, axis=0)

    active, pos = window(state.active), window(state.pos)
    logits, cache = transformer.decode(
        params, cfg, state.cache, window(state.tokens), pos, active, start, kv_len, attention_kernel
    )
    # Finished rows sample greedily: their token is dropped, and a sampling row
    # would otherwise keep the whole window on the slower sampling path.
    sampling = jax.tree.map(window, state.sampling)
    sampling = dataclasses.replace(
        sampling, temperature=jnp.where(active, sampling.temperature, 0.0)
    )
    with jax.named_scope("sampling"):
        # The whole table's masks: the window's rows are read only if a row uses a penalty.
        new = sample_tokens(logits, sampling, window(state.generated), state.seen,
                            state.output_counts, mask_offset=start)
    remaining = window(state.remaining) - active
    stop = (remaining <= 0) | (_is_eos(new, eos_ids) & ~window(state.ignore_eos))
    stop = stop | (pos + 1 >= state.max_len)
    state = state.replace(
        cache=cache,
        tokens=put(state.tokens, jnp.where(active, new, window(state.tokens))),
        pos=put(state.pos, pos + active),
        active=put(state.active, active & ~stop),
        remaining=put(state.remaining, remaining),
        generated=put(state.generated, window(state.generated) + active),
        seen=mark_tokens(state.seen, new, active, start),
        output_counts=count_tokens(state.output_counts, new, active, start),
    )
    return state, report(logits, new, active, sampling)


# XLA:CPU allocates a program's temporaries on every call, and glibc maps an allocation over
# 32 MB afresh from the kernel each time: zero-filled pages, a fault per 4 kB touched. A move
# holds every layer's K and V block at once, so on CPU it copies in pieces whose blocks stay
# under this (one move at kv_len 1024, SmolLM2 with 32 slots: 14 ms whole, 3.3 ms in pieces).
CPU_COMPACT_PIECE_BYTES = 16 << 20


def compact(
    state: DecodeState, src: jax.Array, dst: jax.Array, kv_len: int, piece_bytes: int | None = None
) -> DecodeState:
    """Move slot src[i] to dst[i] (whole rows; KV up to kv_len), src slots become inactive.

    dst must be free and distinct from every src (Flover's plan guarantees it).
    Padding entries carry src = dst = S. The cost grows with the number of
    moves, not with the capacity: each real move copies one slot's KV block in
    place into the donated cache (a loop of dynamic-update-slices, which XLA
    runs as plain copies; a gather/scatter over the slot axis ran 10x slower).
    piece_bytes: copy each block in pieces of positions whose blocks, over every layer's K and
    V, take at most this many bytes (None: whole blocks).
    """
    src_read = jnp.clip(src, 0, state.num_slots - 1)
    position_bytes = state.cache.nbytes // (state.num_slots * state.max_len)  # of one slot
    piece = kv_len  # halved until it fits: equal pieces for the power-of-two kv_len buckets
    while piece_bytes is not None and piece > 1 and piece * position_bytes > piece_bytes:
        piece = -(-piece // 2)
    pieces = -(-kv_len // piece)  # else the last piece ends at kv_len, overlapping the one before

    def move(array):
        return array.at[dst].set(array.at[src_read].get(), mode="drop")

    def copy_piece(n, layers):  # piece n % pieces of move n // pieces, in every layer's arrays
        i, start = n // pieces, jnp.minimum(n % pieces * piece, kv_len - piece)

        def copy_block(cache):
            _, heads, _, dim = cache.shape
            block = jax.lax.dynamic_slice(cache, (src_read[i], 0, start, 0), (1, heads, piece, dim))
            return jax.lax.dynamic_update_slice(cache, block, (dst[i], 0, start, 0))

        return jax.tree.map(copy_block, layers)

    moves = jnp.sum(dst < state.num_slots)  # padding sits at the end
    cache = jax.lax.fori_loop(0, moves * pieces, copy_piece, state.cache)
    moved = jax.tree.map(move, state.replace(cache=None))
    return moved.replace(cache=cache).deactivate(src)


def release(state: DecodeState, slots: jax.Array) -> DecodeState:
    """Deactivate slots (padding entries = S)."""
    return state.deactivate(slots)


class Verbs:
    """The verbs jitted for one model and mesh, with explicit in/out shardings.

    The state is donated everywhere; host arrays (tokens, slot ids, sampling
    settings) are replicated. width, kv_len (and the prompt shapes) stay static.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        eos_ids: tuple[int, ...],
        params_sharding,
        state_sharding,
        kv_sharding,
        replicated,
        attention_kernel: bool = False,
        compact_piece_bytes: int | None = None,
    ) -> None:
        sampled = Sampled(replicated, replicated, replicated, replicated)
        prefilled = Prefilled(k=kv_sharding, v=kv_sharding, first=sampled, seen=replicated)
        self.prefill = jax.jit(
            partial(prefill, cfg=cfg),
            in_shardings=(params_sharding, replicated, replicated, replicated),
            out_shardings=prefilled,
        )
        self.insert = jax.jit(
            partial(insert, eos_ids=eos_ids),
            in_shardings=(state_sharding, prefilled) + (replicated,) * 5,
            out_shardings=state_sharding,
            donate_argnums=0,
        )
        self.decode_step = jax.jit(
            partial(decode_step, cfg=cfg, eos_ids=eos_ids, attention_kernel=attention_kernel),
            static_argnums=(3, 4),  # width, kv_len
            in_shardings=(params_sharding, state_sharding, replicated),
            out_shardings=(state_sharding, sampled),
            donate_argnums=1,
        )
        self.compact = jax.jit(
            partial(compact, piece_bytes=compact_piece_bytes),
            static_argnums=3,  # kv_len
            in_shardings=(state_sharding, replicated, replicated),
            out_shardings=state_sharding,
            donate_argnums=0,
        )
        self.release = jax.jit(
            release,
            in_shardings=(state_sharding, replicated),
            out_shardings=state_sharding,
            donate_argnums=0,
        )
