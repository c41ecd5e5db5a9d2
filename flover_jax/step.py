"""The device verbs: pure, jitted, DecodeState donated. Everything the host dispatches.

- `prefill`:  a piece of each of b prompts [b, t] into its slot; a prompt's last piece
              samples its first token and starts it decoding (padding rows: slot = S).
- `decode_step`: one token for every active slot in the window [start, start + width).
- `compact`:  move whole slots src -> dst (the memory shuffle), in place.
- `copy_prefix`: copy the first positions of rows src -> dst (prefix caching).
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
    greedy_report,
    mark_tokens,
    plain_greedy,
    report,
    sample_tokens,
)
from flover_jax.state import DecodeState
from models import transformer
from models.config import ModelConfig
from models.transformer import KVCache, Params


def _is_eos(tokens: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
    hit = jnp.zeros(tokens.shape, bool)
    for eos in eos_ids:
        hit = hit | (tokens == eos)
    return hit


def prefill(
    params: Params,
    state: DecodeState,
    slots: jax.Array,
    tokens: jax.Array,
    starts: jax.Array,
    lengths: jax.Array,
    finals: jax.Array,
    max_new_tokens: jax.Array,
    ignore_eos: jax.Array,
    sampling: SlotSampling,
    kv_len: int,
    *,
    cfg: ModelConfig,
    eos_ids: tuple[int, ...],
    attention_kernel: bool = False,
) -> tuple[DecodeState, Sampled]:
    """A piece of each of b prompts into its slot (`transformer.extend`): tokens [b, t]
    right-padded, `lengths[i]` real from position starts[i]; the other arrays [b], slots = S
    for padding rows. A row whose piece ends its prompt (finals) samples the first token
    and starts decoding; the others only fill the cache and the prompt's token marks."""
    b = tokens.shape[0]
    hidden, cache = transformer.extend(params, cfg, state.cache, slots, tokens, starts, lengths,
                                       kv_len, attention_kernel)
    last = hidden[jnp.arange(b), lengths - 1]  # [b, d]: only the last real position matters
    logits = transformer.logits(params, last, cfg)
    # The prompt's marks (repetition penalty) grow piece by piece from the piece at 0. A slot
    # may take consecutive pieces in one call: its marks gather all of them.
    real = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
    restarted = jnp.zeros(state.num_slots, bool).at[slots].max(starts == 0, mode="drop")
    marks = (state.seen & ~restarted[:, None]).at[slots[:, None], jnp.where(real, tokens, 0)].max(
        real, mode="drop")
    seen = marks.at[slots].get(mode="fill", fill_value=False)  # [b, vocab]: each row's prompt
    no_output = jnp.zeros(seen.shape, jnp.int32)
    first = sample_tokens(logits, sampling, jnp.zeros((b,), jnp.int32), seen, no_output)
    first = report(logits, first, finals, sampling)
    tokens_first = first.tokens
    prompt_len = starts + lengths
    done = (max_new_tokens <= 1) | (_is_eos(tokens_first, eos_ids) & ~ignore_eos)
    done = done | (prompt_len >= state.max_len)
    everyone = jnp.ones_like(finals)
    first_counts = count_tokens(no_output, tokens_first, everyone)
    starting = jnp.where(finals, slots, state.num_slots)  # rows that start decoding

    def put(array, values, where=starting):
        return array.at[where].set(values, mode="drop")

    state = DecodeState(
        cache=cache,
        tokens=put(state.tokens, tokens_first),
        pos=put(state.pos, prompt_len),
        active=put(state.active, ~done),
        remaining=put(state.remaining, max_new_tokens - 1),
        generated=put(state.generated, jnp.ones_like(tokens_first)),
        ignore_eos=put(state.ignore_eos, ignore_eos),
        sampling=jax.tree.map(put, state.sampling, sampling),
        seen=marks.at[starting, tokens_first].set(True, mode="drop"),
        output_counts=put(state.output_counts, first_counts),
    )
    return state, first


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
    hidden, cache = transformer.decode_hidden(
        params, cfg, state.cache, window(state.tokens), pos, active, start, kv_len, attention_kernel
    )
    # Finished rows sample greedily: their token is dropped, and a sampling row
    # would otherwise keep the whole window on the slower sampling path.
    sampling = jax.tree.map(window, state.sampling)
    sampling = dataclasses.replace(
        sampling, temperature=jnp.where(active, sampling.temperature, 0.0)
    )

    def sample() -> Sampled:
        logits = transformer.logits(params, hidden, cfg)
        with jax.named_scope("sampling"):
            # The whole table's masks: the window's rows are read only if a row uses a penalty.
            new = sample_tokens(logits, sampling, window(state.generated), state.seen,
                                state.output_counts, mask_offset=start)
            return report(logits, new, active, sampling)

    if transformer.argmax_head(params, cfg):  # the same tokens, without the logits when greedy
        sampled = jax.lax.cond(
            plain_greedy(sampling, active),
            lambda: greedy_report(transformer.greedy_tokens(params, hidden, cfg), active), sample)
    else:
        sampled = sample()
    new = sampled.tokens  # -1 where inactive: those rows' tokens are dropped below
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
    return state, sampled


# XLA:CPU allocates a program's temporaries on every call, and glibc maps an allocation over
# 32 MB afresh from the kernel each time: zero-filled pages, a fault per 4 kB touched. A move
# holds every layer's K and V block at once, so on CPU it copies in pieces whose blocks stay
# under this (one move at kv_len 1024, SmolLM2 with 32 slots: 14 ms whole, 3.3 ms in pieces).
CPU_COMPACT_PIECE_BYTES = 16 << 20


def _copy_kv(
    cache: KVCache, src: jax.Array, dst: jax.Array, kv_len: int, piece_bytes: int | None
) -> KVCache:
    """The cache with slot src[i]'s first kv_len positions copied to slot dst[i], in place.

    The cost grows with the number of copies, not with the capacity: each real copy moves
    one slot's KV block into the donated cache (a loop of dynamic-update-slices, which XLA
    runs as plain copies; a gather/scatter over the slot axis ran 10x slower). Padding
    entries (dst = S) sit at the end and copy nothing. piece_bytes: copy each block in
    pieces of positions whose blocks, over every layer's K and V, take at most this many
    bytes (None: whole blocks).
    """
    num_slots = cache.k[0].shape[0]
    src_read = jnp.clip(src, 0, num_slots - 1)
    position_bytes = cache.nbytes // (num_slots * cache.max_len)  # of one slot
    piece = kv_len  # halved until it fits: equal pieces for the power-of-two kv_len buckets
    while piece_bytes is not None and piece > 1 and piece * position_bytes > piece_bytes:
        piece = -(-piece // 2)
    pieces = -(-kv_len // piece)  # else the last piece ends at kv_len, overlapping the one before

    def copy_piece(n, layers):  # piece n % pieces of copy n // pieces, in every layer's arrays
        i, start = n // pieces, jnp.minimum(n % pieces * piece, kv_len - piece)

        def copy_block(array):
            _, heads, _, dim = array.shape
            block = jax.lax.dynamic_slice(array, (src_read[i], 0, start, 0), (1, heads, piece, dim))
            return jax.lax.dynamic_update_slice(array, block, (dst[i], 0, start, 0))

        return jax.tree.map(copy_block, layers)

    copies = jnp.sum(dst < num_slots)
    return jax.lax.fori_loop(0, copies * pieces, copy_piece, cache)


def compact(
    state: DecodeState, src: jax.Array, dst: jax.Array, kv_len: int, piece_bytes: int | None = None
) -> DecodeState:
    """Move slot src[i] to dst[i] (whole rows; KV up to kv_len), src slots become inactive.

    dst must be free and distinct from every src (Flover's plan guarantees it).
    Padding entries carry src = dst = S. piece_bytes: see `_copy_kv`.
    """
    src_read = jnp.clip(src, 0, state.num_slots - 1)

    def move(array):
        return array.at[dst].set(array.at[src_read].get(), mode="drop")

    cache = _copy_kv(state.cache, src, dst, kv_len, piece_bytes)
    moved = jax.tree.map(move, state.replace(cache=None))
    return moved.replace(cache=cache).deactivate(src)


def copy_prefix(
    state: DecodeState, src: jax.Array, dst: jax.Array, tokens: jax.Array, lengths: jax.Array,
    kv_len: int, piece_bytes: int | None = None,
) -> DecodeState:
    """Copy row src[i]'s first kv_len cache positions to row dst[i] (prefix caching: a
    prompt's opening into a row of the prefix cache, or a cached opening into the slot of a
    request that opens with it), and make dst[i]'s prompt marks those of its `lengths[i]`
    tokens (tokens [n, kv_len]): a row may hold a longer opening than a request shares.
    Nothing else changes. Padding: src = dst = S."""
    real = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
    marks = jnp.zeros((tokens.shape[0], state.seen.shape[1]), bool)
    marks = marks.at[jnp.arange(tokens.shape[0])[:, None], jnp.where(real, tokens, 0)].max(real)
    return state.replace(
        cache=_copy_kv(state.cache, src, dst, kv_len, piece_bytes),
        seen=state.seen.at[dst].set(marks, mode="drop"),
    )


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
        replicated,
        attention_kernel: bool = False,
        compact_piece_bytes: int | None = None,
        prompt_params_sharding=None,
    ) -> None:
        """prompt_params_sharding: that of the params prefill takes, where they differ from the
        decode step's (None: params_sharding)."""
        sampled = Sampled(replicated, replicated, replicated, replicated)
        self.prefill = jax.jit(
            partial(prefill, cfg=cfg, eos_ids=eos_ids, attention_kernel=attention_kernel),
            static_argnums=10,  # kv_len
            in_shardings=(prompt_params_sharding or params_sharding, state_sharding)
            + (replicated,) * 8,
            out_shardings=(state_sharding, sampled),
            donate_argnums=1,
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
        self.copy_prefix = jax.jit(
            partial(copy_prefix, piece_bytes=compact_piece_bytes),
            static_argnums=5,  # kv_len
            in_shardings=(state_sharding,) + (replicated,) * 4,
            out_shardings=state_sharding,
            donate_argnums=0,
        )
        self.release = jax.jit(
            release,
            in_shardings=(state_sharding, replicated),
            out_shardings=state_sharding,
            donate_argnums=0,
        )
