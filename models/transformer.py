"""One decoder-only transformer for every family, over a slot KV cache.

Each layer computes what its `LayerSpec` (cfg.layers) says: the families differ
only in those specs and in where their checkpoints keep each weight.

Two entry points, both pure and jittable (the config is static):

- `extend(params, cfg, cache, slots[b], tokens[b, t], starts[b], ...)`: a piece of each
  of b right-padded prompts, from its start position on, into its slot's cache (a whole
  prompt is the piece that starts at 0). Padding never leaks: padding tokens write
  nothing, and the mask is causal, so a real position never reads a later one.
- `decode(params, cfg, tokens[w], positions[w], ...)`: one new token for each
  of `w` consecutive slots starting at `start`; writes its K/V at its position
  and attends over the first `kv_len` cache entries of its slot (or over the
  whole cache in place, masked, when that is cheaper).

Layers are a Python loop (unrolled under jit): on CPU this ran a decode step
about 1.5x faster than `lax.scan` over stacked layers.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from models import kernels
from models.config import LayerSpec, ModelConfig
from models.layers import (
    AttentionWeights,
    ExpertWeights,
    MlpWeights,
    NormWeights,
    QuantizedWeight,
    attend,
    attention_output,
    dense,
    mlp,
    norm,
    project_qkv,
    pytree_dataclass,
    quantize,
)


@pytree_dataclass
class LayerWeights:
    attn_norm: NormWeights
    attn: AttentionWeights
    mlp: MlpWeights | ExpertWeights  # ExpertWeights where the layer's spec has moe
    mlp_norm: NormWeights | None = None  # None when the MLP shares attn_norm (GPT-J)
    post_attn_norm: NormWeights | None = None  # on the attention's output (LayerSpec.post_norms)
    post_mlp_norm: NormWeights | None = None  # on the MLP's output


@pytree_dataclass
class Params:
    embed: jax.Array  # [vocab, d]
    layers: list[LayerWeights]
    final_norm: NormWeights
    # [d, vocab]; a copy even when tied: x @ W streams fast (and quantizes on its own).
    lm_head: jax.Array | QuantizedWeight | kernels.PackedWeight
    lm_head_bias: jax.Array | None = None  # [vocab]
    pos_embed: jax.Array | None = None  # [max_positions, d]; learned positions only


@pytree_dataclass
class KVCache:
    """One K and one V array per layer, each [slots, kv_heads, max_len, head_dim], in
    `cache_dtype`.

    Separate per-layer buffers (not one stacked array) let a decode step hand a
    layer's whole cache to the attention dots with no copy: on XLA:CPU, any slice
    of a bigger buffer is first copied out, and that copy dominated long-context
    steps.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @classmethod
    def zeros(cls, cfg: ModelConfig, slots: int, max_len: int) -> KVCache:
        shape = (slots, cfg.n_kv_heads, max_len, cfg.head_dim)
        # Distinct buffers: the verbs donate and update every layer in place.
        return cls(*(tuple(jnp.zeros(shape, cache_dtype(cfg)) for _ in range(cfg.n_layers))
                     for _ in range(2)))

    @property
    def max_len(self) -> int:
        return int(self.k[0].shape[2])

    @property
    def nbytes(self) -> int:
        return sum(int(x.nbytes) for x in (*self.k, *self.v))

    def stacked(self) -> tuple[jax.Array, jax.Array]:
        """k, v as [layers, slots, kv_heads, max_len, head_dim] (a copy; for tests)."""
        return jnp.stack(self.k), jnp.stack(self.v)


def cache_dtype(cfg: ModelConfig) -> jnp.dtype:
    """What the KV cache holds: cfg's dtype, or for a 16-bit float its bits as uint16. XLA:CPU
    scatters a float array narrower than 32 bits by converting all of it to float32 and back,
    so each layer's one-position write cost a conversion of its whole cache (a bfloat16 decode
    step took over a second); bit casts in and out of the cache cost nothing."""
    dtype = jnp.dtype(cfg.jnp_dtype)
    return jnp.dtype(jnp.uint16) if dtype.itemsize == 2 else dtype


def to_cache(x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """K or V in the cache's dtype (`cache_dtype`)."""
    x = x.astype(cfg.jnp_dtype)
    return x if cache_dtype(cfg) == x.dtype else jax.lax.bitcast_convert_type(x, cache_dtype(cfg))


def write_kv(k_cache: jax.Array, v_cache: jax.Array, slots: jax.Array, positions: jax.Array,
             k: jax.Array, v: jax.Array, cfg: ModelConfig,
             kernel: bool) -> tuple[jax.Array, jax.Array]:
    """New tokens' k, v [..., kv_heads, e] into one layer's caches at (slots, positions), arrays
    broadcast against k's leading dims; a token whose slot or position is out of range writes
    nothing. kernel (static): with the CPU kernel (in place, a copy per head's row), where XLA's
    scatter moves one element at a time."""
    k, v = to_cache(k, cfg), to_cache(v, cfg)
    if not kernel:
        return (k_cache.at[slots, :, positions].set(k, mode="drop"),
                v_cache.at[slots, :, positions].set(v, mode="drop"))
    slots, positions = (jnp.broadcast_to(a, k.shape[:-2]).reshape(-1) for a in (slots, positions))
    rows = (-1, *k.shape[-2:])
    return kernels.write_cache(k_cache, v_cache, slots, positions, k.reshape(rows), v.reshape(rows))


def from_cache(x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Cached K or V back in cfg's dtype."""
    return x if x.dtype == cfg.jnp_dtype else jax.lax.bitcast_convert_type(x, cfg.jnp_dtype)


def reads_whole_cache(num_slots: int, max_len: int, width: int, kv_len: int) -> bool:
    """Whether a decode step attends over every slot's whole cache in place rather than over
    the window's first kv_len positions. Decode attention is bound by reading K/V: the whole
    cache is read once, in place; the window's block is read, written to a copy, and read
    again, about 2.3x the cost per (slot, position) pair on XLA:CPU (profile_step.py)."""
    return num_slots * max_len <= 2 * width * kv_len


def _block(
    x: jax.Array,
    w: LayerWeights,
    spec: LayerSpec,
    positions: jax.Array,
    cfg: ModelConfig,
    attend_with_cache,
) -> jax.Array:
    # Named scopes label the ops in profiles (benchmarks/profile_step.py, XProf, Perfetto).
    with jax.named_scope("projections"):
        h = norm(x, w.attn_norm, cfg)
        q, k, v = project_qkv(h, w.attn, positions, spec, cfg)
    with jax.named_scope("attention"):
        o = attend_with_cache(q, k, v, spec.window)
    with jax.named_scope("projections"):
        a = attention_output(o, w.attn)
        if spec.post_norms:
            a = norm(a, w.post_attn_norm, cfg)
    with jax.named_scope("mlp"):
        if spec.residual == "sequential":
            x = x + a
            y = mlp(norm(x, w.mlp_norm, cfg), w.mlp, spec)
            return x + (norm(y, w.post_mlp_norm, cfg) if spec.post_norms else y)
        m = h if spec.residual == "parallel_shared_norm" else norm(x, w.mlp_norm, cfg)
        return x + a + mlp(m, w.mlp, spec)


def visible(query_positions: jax.Array, key_positions: jax.Array, window: int | None) -> jax.Array:
    """Which keys each query reads (broadcasting): those at or before it, and with a sliding
    window the last `window` of them (the query's own included), as transformers masks them."""
    seen = key_positions <= query_positions
    return seen if window is None else seen & (query_positions - key_positions < window)


def _embed(params: Params, tokens: jax.Array, positions: jax.Array, cfg: ModelConfig):
    x = params.embed[tokens]
    if params.pos_embed is not None:
        x = x + params.pos_embed[positions]
    # Gemma scales the embedding by sqrt(d) in the activations' dtype.
    x = x.astype(cfg.activation_dtype)
    return x if cfg.embed_scale == 1.0 else x * jnp.asarray(cfg.embed_scale, cfg.activation_dtype)


def argmax_head(params: Params, cfg: ModelConfig) -> bool:
    """Whether `greedy_tokens` can pick tokens without the logits: the LM head is packed for the
    CPU kernel and nothing follows its matmul (no bias, no soft cap)."""
    return (isinstance(params.lm_head, kernels.PackedWeight) and params.lm_head_bias is None
            and cfg.final_softcap is None)


def greedy_tokens(params: Params, hidden: jax.Array, cfg: ModelConfig) -> jax.Array:
    """argmax(logits(params, hidden, cfg)) per row (the first of equal maxima), int32 [...]:
    the LM head kernel keeps each row's best as it goes (`kernels.packed_argmax`), so the
    [..., vocab] logits are neither written nor read back. Where `argmax_head` holds."""
    if not argmax_head(params, cfg):
        raise ValueError("greedy_tokens: the LM head is not a packed weight alone (argmax_head)")
    with jax.named_scope("lm_head"):
        return kernels.packed_argmax(norm(hidden, params.final_norm, cfg), params.lm_head)


def logits(params: Params, hidden: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Final norm and LM head: hidden [..., d] -> float32 logits [..., vocab]."""
    with jax.named_scope("lm_head"):
        h = norm(hidden, params.final_norm, cfg)
        out = dense(h, params.lm_head, preferred_element_type=jnp.float32)
        if params.lm_head_bias is not None:
            out = out + params.lm_head_bias
        if cfg.final_softcap is not None:
            out = jnp.tanh(out / cfg.final_softcap) * cfg.final_softcap
        return out


def extend(
    params: Params,
    cfg: ModelConfig,
    cache: KVCache,
    slots: jax.Array,
    tokens: jax.Array,
    starts: jax.Array,
    lengths: jax.Array,
    kv_len: int,
    attention_kernel: bool = False,
) -> tuple[jax.Array, KVCache]:
    """A piece of each of b prompts, continued in its slot: the one forward pass over prompts.

    Row i holds `lengths[i]` tokens of a prompt at positions starts[i], starts[i] + 1, ...,
    right-padded to t; the slot's cache already holds the positions before starts[i] (a
    prompt's first piece starts at 0). Each real token's K/V is written at its position, and
    each token attends over its slot's first kv_len positions (static: it must exceed every
    real position), causally. Rows whose slot is out of range (padding) write nothing.
    attention_kernel (static): each token attends with the CPU kernel instead, which reads
    its slot's positions up to its own in place (kv_len then plays no part); XLA's attention
    over a long context copies the slot's first kv_len positions and computes every masked
    score. Returns hidden [b, t, d] and the cache.
    """
    if attention_kernel and (why := cfg.attention_kernel_misfit):
        raise ValueError(f"attention_kernel=True: {why}")
    b, t = tokens.shape
    max_len = cache.max_len
    positions = starts[:, None] + jnp.arange(t, dtype=jnp.int32)  # [b, t]
    real = jnp.arange(t) < lengths[:, None]
    # Padding positions write nowhere (out of range: `write_kv` drops them).
    write_pos = jnp.where(real, positions, max_len)
    read_slots = jnp.clip(slots, 0, cache.k[0].shape[0] - 1)
    if attention_kernel:  # one kernel row per token; padding tokens read nothing
        token_slots = jnp.repeat(read_slots, t)
        token_lengths = jnp.where(real, positions + 1, 0).reshape(b * t)
    x = _embed(params, tokens, positions, cfg)
    k_cache, v_cache = list(cache.k), list(cache.v)

    for layer_index, (layer, spec) in enumerate(zip(params.layers, cfg.layers)):

        def cached_attend(q, k, v, window, i=layer_index):
            k_cache[i], v_cache[i] = write_kv(k_cache[i], v_cache[i], slots[:, None], write_pos,
                                              k, v, cfg, attention_kernel)
            if attention_kernel:
                rows = q.reshape(b * t, cfg.n_kv_heads, cfg.q_per_kv, cfg.head_dim)
                firsts = None if window is None else jnp.maximum(token_lengths - window, 0)
                out = kernels.cached_attention(rows, k_cache[i], v_cache[i], token_slots,
                                               token_lengths, firsts, cfg.attention_scale)
                return out.reshape(q.shape).astype(q.dtype)
            # [b, kv_heads, kv_len, head_dim]
            k_rows = from_cache(k_cache[i][read_slots, :, :kv_len], cfg)
            v_rows = from_cache(v_cache[i][read_slots, :, :kv_len], cfg)
            mask = visible(positions[:, :, None], jnp.arange(kv_len)[None, None, :], window)
            return attend(q, k_rows, v_rows, mask, cfg)

        x = _block(x, layer, spec, positions, cfg, cached_attend)
    return x, KVCache(tuple(k_cache), tuple(v_cache))


def forward(params: Params, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    """Full-sequence float32 logits [b, t, vocab] (the parity reference): the prompts as one
    piece each, into a cache of their own."""
    b, t = tokens.shape
    cache = KVCache.zeros(cfg, b, t)
    rows = jnp.arange(b, dtype=jnp.int32)
    hidden, _ = extend(params, cfg, cache, rows, tokens, jnp.zeros_like(rows),
                       jnp.full_like(rows, t), t)
    return logits(params, hidden, cfg)


def decode(
    params: Params,
    cfg: ModelConfig,
    cache: KVCache,
    tokens: jax.Array,
    positions: jax.Array,
    writes: jax.Array,
    start: jax.Array,
    kv_len: int,
    attention_kernel: bool = False,
) -> tuple[jax.Array, KVCache]:
    """`decode_hidden` and the LM head: float32 logits [w, vocab] and the updated cache."""
    hidden, cache = decode_hidden(params, cfg, cache, tokens, positions, writes, start, kv_len,
                                  attention_kernel)
    return logits(params, hidden, cfg), cache


def decode_hidden(
    params: Params,
    cfg: ModelConfig,
    cache: KVCache,
    tokens: jax.Array,
    positions: jax.Array,
    writes: jax.Array,
    start: jax.Array,
    kv_len: int,
    attention_kernel: bool = False,
) -> tuple[jax.Array, KVCache]:
    """One token for each slot of the window [start, start + w), up to the LM head.

    tokens, positions [w]: the new token of each slot and its position (= the
    number of tokens already cached). writes [w]: rows whose K/V is stored;
    the others (free or finished slots) compute garbage the caller drops, and
    change nothing.
    kv_len (static) bounds the positions read; it must exceed max(positions).
    Returns the last layer's output [w, d] (`logits` takes it) and the updated cache.

    Attention reads either the window's first kv_len positions (a copy of that
    block) or, when the window covers enough of the cache, every slot's whole
    cache in place, masked by position (no copy; the extra rows and positions
    are cheaper than copying). Both are exact; the choice is static.
    attention_kernel (static; XLA:CPU, float32 or bfloat16): attend with the hand-written
    kernel instead (models/kernels), which reads each written row's live
    positions (within its layer's sliding window) in place and nothing else;
    kv_len then plays no part.
    """
    if attention_kernel and (why := cfg.attention_kernel_misfit):
        raise ValueError(f"attention_kernel=True: {why}")
    w = tokens.shape[0]
    num_slots, max_len = cache.k[0].shape[0], cache.max_len
    whole = not attention_kernel and reads_whole_cache(num_slots, max_len, w, kv_len)
    slots = start + jnp.arange(w, dtype=jnp.int32)
    # Out-of-range positions make `write_kv` drop the rows that must not write.
    write_pos = jnp.where(writes, positions, max_len)
    if attention_kernel:
        lengths = jnp.where(writes, positions + 1, 0)  # positions each row reads
    elif whole:  # every slot's rows; those outside the window attend nowhere and are dropped
        all_positions = jnp.full((num_slots,), -1, jnp.int32).at[slots].set(positions)
        query_positions, key_positions = all_positions, jnp.arange(max_len)  # mask [S, 1, T]
    else:
        query_positions, key_positions = positions, jnp.arange(kv_len)  # mask [w, 1, s]
    x = _embed(params, tokens[:, None], positions[:, None], cfg)
    k_cache, v_cache = list(cache.k), list(cache.v)

    for layer_index, (layer, spec) in enumerate(zip(params.layers, cfg.layers)):

        def cached_attend(q, k, v, window, i=layer_index):
            k_cache[i], v_cache[i] = write_kv(k_cache[i], v_cache[i], slots, write_pos, k[:, 0],
                                              v[:, 0], cfg, attention_kernel)
            if attention_kernel:
                rows = q.reshape(w, cfg.n_kv_heads, cfg.q_per_kv, cfg.head_dim)
                # A sliding window reads only its last `window` live positions.
                firsts = None if window is None else jnp.maximum(lengths - window, 0)
                out = kernels.cached_attention(rows, k_cache[i], v_cache[i], slots, lengths,
                                               firsts, cfg.attention_scale)
                return out.reshape(q.shape).astype(q.dtype)
            mask = visible(query_positions[:, None], key_positions[None, :], window)[:, None, :]
            if whole:
                q_all = jnp.zeros((num_slots, *q.shape[1:]), q.dtype)
                q_all = jax.lax.dynamic_update_slice_in_dim(q_all, q, start, axis=0)
                out = attend(q_all, from_cache(k_cache[i], cfg), from_cache(v_cache[i], cfg), mask, cfg)
                return jax.lax.dynamic_slice_in_dim(out, start, w, axis=0)
            block = (w, cfg.n_kv_heads, kv_len, cfg.head_dim)
            k_all = from_cache(jax.lax.dynamic_slice(k_cache[i], (start, 0, 0, 0), block), cfg)
            v_all = from_cache(jax.lax.dynamic_slice(v_cache[i], (start, 0, 0, 0), block), cfg)
            return attend(q, k_all, v_all, mask, cfg)

        x = _block(x, layer, spec, positions[:, None], cfg, cached_attend)
    return x[:, 0], KVCache(tuple(k_cache), tuple(v_cache))


def init_params(cfg: ModelConfig, key: jax.Array, scale: float = 0.05) -> Params:
    """Random weights with exactly the structure the importers produce for `cfg`.

    Used for tests and as the abstract target when restoring a checkpoint.
    """
    d, f, h, k, e, vocab = (
        cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.vocab_size
    )
    keys = iter(jax.random.split(key, 16 * cfg.n_layers + 8))

    def rand(*shape: int) -> jax.Array:
        return (scale * jax.random.normal(next(keys), shape)).astype(cfg.jnp_dtype)

    def maybe(flag: bool, *shape: int) -> jax.Array | None:
        return rand(*shape) if flag else None

    def norm_weights() -> NormWeights:
        scale_ = (1.0 + rand(d)).astype(cfg.jnp_dtype)
        return NormWeights(scale_, maybe(cfg.norm == "layernorm", d))

    def head_norm(on: bool) -> NormWeights | None:
        return NormWeights((1.0 + rand(e)).astype(cfg.jnp_dtype)) if on else None

    def post_norm(on: bool) -> NormWeights | None:
        return norm_weights() if on else None

    layers = [
        LayerWeights(
            attn_norm=norm_weights(),
            attn=AttentionWeights(
                wq=rand(d, h, e), wk=rand(d, k, e), wv=rand(d, k, e), wo=rand(h, e, d),
                bq=maybe(cfg.qkv_bias, h, e), bk=maybe(cfg.qkv_bias, k, e),
                bv=maybe(cfg.qkv_bias, k, e), bo=maybe(cfg.out_bias, d),
                q_norm=head_norm(spec.qk_norm), k_norm=head_norm(spec.qk_norm),
            ),
            mlp=MlpWeights(
                w_in=rand(d, f), w_out=rand(f, d), w_gate=maybe(spec.mlp == "gated", d, f),
                b_in=maybe(cfg.mlp_bias, f), b_out=maybe(cfg.mlp_bias, d),
            ) if spec.moe is None else ExpertWeights(
                router=rand(d, spec.moe.n_experts),
                expert_gate=tuple(rand(spec.moe.n_experts, d, spec.moe.d_ff)),
                expert_in=tuple(rand(spec.moe.n_experts, d, spec.moe.d_ff)),
                expert_out=tuple(rand(spec.moe.n_experts, spec.moe.d_ff, d)),
            ),
            mlp_norm=None if spec.residual == "parallel_shared_norm" else norm_weights(),
            post_attn_norm=post_norm(spec.post_norms), post_mlp_norm=post_norm(spec.post_norms),
        )
        for spec in cfg.layers
    ]
    embed = rand(vocab, d)
    params = Params(
        embed=embed,
        layers=layers,
        final_norm=norm_weights(),
        lm_head=embed.T if cfg.tie_embeddings else rand(d, vocab),
        lm_head_bias=maybe(cfg.lm_head_bias, vocab),
        pos_embed=maybe(cfg.learned_positions, cfg.max_positions, d),
    )
    return quantize_weights(params) if cfg.quantize else params


def map_matmul_weights(params: Params, fn, experts: bool = True) -> Params:
    """The same params with fn(w, in_dims) in place of every matmul weight (the attention's and
    the MLPs' projections and the LM head; the experts' too unless `experts` is False)."""

    def maybe(w, in_dims: int):  # None: a weight packed side by side with others
        return None if w is None else fn(w, in_dims)

    def layer(w: LayerWeights) -> LayerWeights:
        attn, mlp_ = w.attn, w.mlp
        if isinstance(mlp_, MlpWeights):
            mlp_ = dataclasses.replace(
                mlp_, w_in=maybe(mlp_.w_in, 1), w_out=fn(mlp_.w_out, 1), w_gate=maybe(mlp_.w_gate, 1),
            )
        elif experts:
            mlp_ = dataclasses.replace(mlp_, **{
                name: tuple(fn(e, 1) for e in getattr(mlp_, name))
                for name in ("expert_gate", "expert_in", "expert_out")})
        return dataclasses.replace(
            w,
            attn=dataclasses.replace(
                attn, wq=maybe(attn.wq, 1), wk=maybe(attn.wk, 1), wv=maybe(attn.wv, 1),
                wo=fn(attn.wo, 2)
            ),
            mlp=mlp_,
        )

    return dataclasses.replace(
        params, layers=[layer(w) for w in params.layers], lm_head=fn(params.lm_head, 1)
    )


def is_packed(params: Params) -> bool:
    return isinstance(params.lm_head, kernels.PackedWeight)


def is_quantized(params: Params) -> bool:
    return isinstance(params.lm_head, QuantizedWeight)


def with_dtype(params: Params, dtype) -> Params:
    """The params cast to `dtype`, but for quantized weights (int8 values, float32 scales);
    leaves already in it are not copied."""
    return jax.tree.map(
        lambda x: x if isinstance(x, QuantizedWeight) or x.dtype == dtype else x.astype(dtype),
        params, is_leaf=lambda x: isinstance(x, QuantizedWeight))


def quantize_weights(params: Params) -> Params:
    """Every matmul weight as int8 with a scale per output channel (ModelConfig.quantize);
    quantized params come back as they are."""
    if is_packed(params):
        raise ValueError("params: packed for the CPU matmul kernel; quantize the params as loaded")
    if is_quantized(params):
        return params
    return map_matmul_weights(params, lambda w, in_dims: quantize(w, in_dims))


def prompt_tiles(params: Params) -> Params:
    """Packed params with their float32 layer weights marked for AMX tiles, which multiply them
    as bfloat16 parts (`kernels.PackedWeight`): the prompts' matmuls where many rows share each
    weight (`flover_jax.op_choice.choose_prompt_matmul`). The same arrays; the LM head as it is."""
    def tiled(w):
        if isinstance(w, kernels.PackedWeight) and w.panels.dtype == jnp.float32:
            return dataclasses.replace(w, tiles=True)
        return w

    layers = jax.tree.map(tiled, params.layers, is_leaf=lambda x: isinstance(x, kernels.PackedWeight))
    return dataclasses.replace(params, layers=layers)


def layer_matmuls(params: Params, rows: int) -> jax.Array:
    """Every packed layer weight of `params` times a [rows, inputs] activation, one after
    another (each input depends on the product before it, so XLA neither skips nor overlaps
    one): what a prefill call of `rows` prompt tokens spends in the matmul kernel, to time."""
    weights = [w for w in jax.tree.leaves(params.layers,
                                          is_leaf=lambda x: isinstance(x, kernels.PackedWeight))
               if isinstance(w, kernels.PackedWeight)]
    carry = jnp.zeros((), jnp.float32)
    for w in weights:
        x = jnp.full((rows, *w.shape[: w.in_dims]), 0.01, jnp.float32) + carry
        carry = kernels.packed_matmul(x, w).reshape(rows, -1)[0, 0] * 0.0
    return carry


def pack_weights(params: Params, cfg: ModelConfig, tiles: bool = False) -> Params:
    """The same params with every matmul weight packed for the CPU matmul kernel
    (`kernels.pack`; XLA:CPU, one device): float32 and bfloat16 weights as they are, int8 ones
    with their scales; packed params keep their panels. `tiles`: bfloat16 panels multiplied on
    AMX tiles (set on already packed params too). `dense` then sends each weight to the kernel;
    the experts stay arrays, which XLA's dots run. A layer's q, k and v projections go side by
    side in one packed weight (in `wq`), and so do a gated MLP's gate and up (in `w_gate`): one
    kernel call each (`kernels.pack_side_by_side` says why). Where that MLP's activation is
    SiLU and it has no bias, gate and up go in pairs instead (`kernels.pack_gated`), and the
    kernel applies the activation too. The norms are marked for the CPU RMSNorm kernel."""
    if not is_packed(params):
        def pack(w, in_dims: int) -> kernels.PackedWeight:
            if isinstance(w, kernels.PackedWeight):  # packed side by side (below)
                return w
            if isinstance(w, QuantizedWeight):
                return kernels.pack(w.values, in_dims, w.scales)
            return kernels.pack(w, in_dims)

        def pack_together(ws, packer=kernels.pack_side_by_side) -> kernels.PackedWeight:
            if isinstance(ws[0], QuantizedWeight):
                return packer([w.values for w in ws], [w.scales for w in ws])
            return packer(ws)

        def layer(w: LayerWeights, spec: LayerSpec) -> LayerWeights:
            attn = dataclasses.replace(w.attn, wq=pack_together([w.attn.wq, w.attn.wk, w.attn.wv]),
                                       wk=None, wv=None)
            mlp_ = w.mlp
            if isinstance(mlp_, MlpWeights) and mlp_.w_gate is not None:
                gated = spec.activation == "silu" and mlp_.b_in is None
                packer = kernels.pack_gated if gated else kernels.pack_side_by_side
                mlp_ = dataclasses.replace(
                    mlp_, w_gate=pack_together([mlp_.w_gate, mlp_.w_in], packer), w_in=None)
            return dataclasses.replace(w, attn=attn, mlp=mlp_)

        params = dataclasses.replace(
            params, layers=[layer(w, spec) for w, spec in zip(params.layers, cfg.layers)])
        params = map_matmul_weights(params, pack, experts=False)

    def tiled(w):
        if isinstance(w, NormWeights):
            return dataclasses.replace(w, kernel=True)
        if not isinstance(w, kernels.PackedWeight):
            return w
        return dataclasses.replace(w, tiles=tiles and w.panels.dtype == jnp.bfloat16)

    return jax.tree.map(tiled, params,
                        is_leaf=lambda x: isinstance(x, (kernels.PackedWeight, NormWeights)))
