"""One decoder-only transformer for GPT-2, GPT-J and LLaMA, over a slot KV cache.

Two entry points, both pure and jittable (the config is static):

- `prefill(params, cfg, tokens[b, t])`: causal forward over right-padded prompts.
  Returns the hidden states and the prompts' K/V; `flover_jax.step.insert`
  copies them into slots. Padding never leaks: the mask is causal, so a real
  position never reads a padded one, and padded cache rows lie beyond a slot's
  position, where decode never looks before overwriting them.
- `decode(params, cfg, tokens[w], positions[w], ...)`: one new token for each
  of `w` consecutive slots starting at `start`; writes its K/V at its position
  and attends over the first `kv_len` cache entries of its slot.

Layers are a Python loop (unrolled under jit): on CPU this ran a decode step
about 1.5x faster than `lax.scan` over stacked layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.config import ModelConfig
from models.layers import (
    AttentionWeights,
    MlpWeights,
    NormWeights,
    attend,
    attention_output,
    mlp,
    norm,
    project_qkv,
    pytree_dataclass,
)


@pytree_dataclass
class LayerWeights:
    attn_norm: NormWeights
    attn: AttentionWeights
    mlp: MlpWeights
    mlp_norm: NormWeights | None = None  # None when the residual is parallel (GPT-J)


@pytree_dataclass
class Params:
    embed: jax.Array  # [vocab, d]
    layers: list[LayerWeights]
    final_norm: NormWeights
    lm_head: jax.Array  # [d, vocab]; a (d, vocab) copy even when tied: x @ W streams fast
    lm_head_bias: jax.Array | None = None  # [vocab]
    pos_embed: jax.Array | None = None  # [max_positions, d]; learned positions only


@pytree_dataclass
class KVCache:
    k: jax.Array  # [layers, slots, max_len, kv_heads, head_dim]
    v: jax.Array  # [layers, slots, max_len, kv_heads, head_dim]

    @classmethod
    def zeros(cls, cfg: ModelConfig, slots: int, max_len: int) -> KVCache:
        shape = (cfg.n_layers, slots, max_len, cfg.n_kv_heads, cfg.head_dim)
        return cls(jnp.zeros(shape, cfg.jnp_dtype), jnp.zeros(shape, cfg.jnp_dtype))


def _block(
    x: jax.Array, w: LayerWeights, positions: jax.Array, cfg: ModelConfig, attend_with_cache
) -> jax.Array:
    # Named scopes label the ops in profiles (benchmarks/profile_step.py, XProf, Perfetto).
    with jax.named_scope("projections"):
        h = norm(x, w.attn_norm, cfg)
        q, k, v = project_qkv(h, w.attn, positions, cfg)
    with jax.named_scope("attention"):
        o = attend_with_cache(q, k, v)
    with jax.named_scope("projections"):
        a = attention_output(o, w.attn)
    with jax.named_scope("mlp"):
        if cfg.parallel_residual:
            return x + a + mlp(h, w.mlp, cfg)
        x = x + a
        return x + mlp(norm(x, w.mlp_norm, cfg), w.mlp, cfg)


def _embed(params: Params, tokens: jax.Array, positions: jax.Array, cfg: ModelConfig):
    x = params.embed[tokens]
    if params.pos_embed is not None:
        x = x + params.pos_embed[positions]
    return x.astype(cfg.jnp_dtype)


def logits(params: Params, hidden: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Final norm and LM head: hidden [..., d] -> float32 logits [..., vocab]."""
    with jax.named_scope("lm_head"):
        h = norm(hidden, params.final_norm, cfg)
        out = jnp.matmul(h, params.lm_head, preferred_element_type=jnp.float32)
        return out if params.lm_head_bias is None else out + params.lm_head_bias


def prefill(
    params: Params, cfg: ModelConfig, tokens: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """tokens [b, t] -> hidden [b, t, d], k and v [layers, b, t, kv_heads, head_dim]."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    causal = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
    x = _embed(params, tokens, positions, cfg)
    ks, vs = [], []

    def self_attend(q, k, v):
        ks.append(k)
        vs.append(v)
        return attend(q, k, v, causal, cfg)

    for layer in params.layers:
        x = _block(x, layer, positions, cfg, self_attend)
    return x, jnp.stack(ks), jnp.stack(vs)


def forward(params: Params, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    """Full-sequence float32 logits [b, t, vocab] (the parity reference)."""
    hidden, _, _ = prefill(params, cfg, tokens)
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
) -> tuple[jax.Array, KVCache]:
    """One token for each slot of the window [start, start + w).

    tokens, positions [w]: the new token of each slot and its position (= the
    number of tokens already cached). writes [w]: rows whose K/V is stored;
    the others (free or finished slots) compute garbage the caller drops, and
    change nothing.
    kv_len (static) bounds the positions read; it must exceed max(positions).
    Returns float32 logits [w, vocab] and the updated cache.
    """
    w = tokens.shape[0]
    max_len = cache.k.shape[2]
    slots = start + jnp.arange(w, dtype=jnp.int32)
    # Out-of-range positions make the scatter drop the rows that must not write.
    write_pos = jnp.where(writes, positions, max_len)
    mask = (jnp.arange(kv_len)[None, :] <= positions[:, None])[:, None, :]  # [w, 1, s]
    x = _embed(params, tokens[:, None], positions[:, None], cfg)
    k_cache, v_cache = cache.k, cache.v

    for layer_index, layer in enumerate(params.layers):

        def cached_attend(q, k, v, i=layer_index):
            nonlocal k_cache, v_cache
            k_cache = k_cache.at[i, slots, write_pos].set(k[:, 0], mode="drop")
            v_cache = v_cache.at[i, slots, write_pos].set(v[:, 0], mode="drop")
            window = (1, w, kv_len, cfg.n_kv_heads, cfg.head_dim)
            k_all = jax.lax.dynamic_slice(k_cache, (i, start, 0, 0, 0), window)[0]
            v_all = jax.lax.dynamic_slice(v_cache, (i, start, 0, 0, 0), window)[0]
            return attend(q, k_all, v_all, mask, cfg)

        x = _block(x, layer, positions[:, None], cfg, cached_attend)
    return logits(params, x[:, 0], cfg), KVCache(k_cache, v_cache)


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

    layers = [
        LayerWeights(
            attn_norm=norm_weights(),
            attn=AttentionWeights(
                wq=rand(d, h, e), wk=rand(d, k, e), wv=rand(d, k, e), wo=rand(h, e, d),
                bq=maybe(cfg.attention_bias, h, e), bk=maybe(cfg.attention_bias, k, e),
                bv=maybe(cfg.attention_bias, k, e), bo=maybe(cfg.attention_bias, d),
            ),
            mlp=MlpWeights(
                w_in=rand(d, f), w_out=rand(f, d), w_gate=maybe(cfg.gated_mlp, d, f),
                b_in=maybe(cfg.mlp_bias, f), b_out=maybe(cfg.mlp_bias, d),
            ),
            mlp_norm=None if cfg.parallel_residual else norm_weights(),
        )
        for _ in range(cfg.n_layers)
    ]
    embed = rand(vocab, d)
    return Params(
        embed=embed,
        layers=layers,
        final_norm=norm_weights(),
        lm_head=embed.T if cfg.tie_embeddings else rand(d, vocab),
        lm_head_bias=maybe(cfg.lm_head_bias, vocab),
        pos_embed=maybe(cfg.positions == "learned", cfg.max_positions, d),
    )
