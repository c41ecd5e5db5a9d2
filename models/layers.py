"""Building blocks shared by every family: norms, rotary embeddings, attention, MLPs.

Weights are stored in the layout that streams fast for `x @ W` on CPU: inputs
first, outputs last ((in, out); per head where heads exist). Where the CPU matmul
kernel runs, each is packed into column panels instead (`kernels.pack`), and
`dense` sends it there. Shapes use
b = batch, t = query positions, s = key positions, d = model width,
h = query heads, k = KV heads, g = query heads per KV head, e = head dim,
f = MLP width.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from models import kernels
from models.config import LayerSpec, ModelConfig, Norm, Rope


def pytree_dataclass(cls):
    """A frozen dataclass whose fields are all pytree children (None = absent)."""
    return jax.tree_util.register_dataclass(dataclasses.dataclass(frozen=True)(cls))


@functools.partial(jax.tree_util.register_dataclass, data_fields=["scale", "bias"],
                   meta_fields=["kernel"])
@dataclasses.dataclass(frozen=True)
class NormWeights:
    scale: jax.Array  # [d]
    bias: jax.Array | None = None  # [d]; LayerNorm only
    # An RMSNorm of float32 activations runs in the CPU kernel (`kernels.rms_norm`): set with
    # the matmul weights' packing for it (transformer.pack_weights).
    kernel: bool = False


@pytree_dataclass
class AttentionWeights:
    # Packed for the CPU matmul kernel (transformer.pack_weights), wq holds wq, wk and wv side by
    # side (`kernels.pack_side_by_side`: one call) and wk and wv are None.
    wq: jax.Array  # [d, h, e]
    wk: jax.Array | None  # [d, k, e]
    wv: jax.Array | None  # [d, k, e]
    wo: jax.Array  # [h, e, d]
    bq: jax.Array | None = None  # [h, e]
    bk: jax.Array | None = None  # [k, e]
    bv: jax.Array | None = None  # [k, e]
    bo: jax.Array | None = None  # [d]
    q_norm: NormWeights | None = None  # [e]; RMSNorm over each head's q (LayerSpec.qk_norm)
    k_norm: NormWeights | None = None  # [e]


@pytree_dataclass
class MlpWeights:
    # Packed for the CPU matmul kernel (transformer.pack_weights), a gated MLP's w_gate holds
    # w_gate and w_in, side by side (`kernels.pack_side_by_side`: one call) or in pairs for
    # SiLU (`kernels.pack_gated`: the call applies it too), and w_in is None.
    w_in: jax.Array | None  # [d, f]  (LLaMA: "up")
    w_out: jax.Array  # [f, d]  (LLaMA: "down")
    w_gate: jax.Array | None = None  # [d, f]; gated MLPs only
    b_in: jax.Array | None = None  # [f]
    b_out: jax.Array | None = None  # [d]


@pytree_dataclass
class ExpertWeights:
    """A mixture of gated MLPs (LayerSpec.moe): the router and each expert's weights, an array
    per expert: a step's matmul reads a chosen expert where it lies (on XLA:CPU, a slice of one
    stacked array is a copy, and made a decode step several times slower)."""

    router: jax.Array  # [d, experts]
    expert_gate: tuple[jax.Array, ...]  # experts x [d, f]
    expert_in: tuple[jax.Array, ...]  # experts x [d, f]  ("up")
    expert_out: tuple[jax.Array, ...]  # experts x [f, d]  ("down")


@pytree_dataclass
class QuantizedWeight:
    """A weight [*inputs, *outputs] stored as int8 `values`, each times the float32 scale of its
    output channel and group of `kernels.GROUP` (64) inputs, the inputs counted flattened:
    weight-only quantization (activations stay in the model's dtype). A scale per group rather
    than per channel alone keeps SmolLM2's next-token agreement with float32 above 97%
    (docs/benchmarks.md)."""

    values: jax.Array  # int8 [*inputs, *outputs]
    scales: jax.Array  # float32 [ceil(inputs / 64), *outputs]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    def dequantized(self, in_dims: int, dtype) -> jax.Array:
        """The weight [k, n] (inputs and outputs flattened) in `dtype`."""
        k = math.prod(self.values.shape[:in_dims])
        scales = _per_input(self.scales.reshape(self.scales.shape[0], -1), k)
        return (self.values.reshape(k, -1).astype(jnp.float32) * scales).astype(dtype)


def _per_input(scales: jax.Array, k: int) -> jax.Array:
    """Group scales [groups, n] as one row per input [k, n]."""
    return jnp.repeat(scales, kernels.GROUP, axis=0)[:k]


def quantize(w: jax.Array, in_dims: int = 1) -> QuantizedWeight:
    """Symmetric int8: in each output channel and group of 64 inputs, the largest |w| maps to
    127 and every weight to its nearest step."""
    k, n = math.prod(w.shape[:in_dims]), math.prod(w.shape[in_dims:])
    groups = -(-k // kernels.GROUP)
    wf = jnp.pad(w.astype(jnp.float32).reshape(k, n), ((0, groups * kernels.GROUP - k), (0, 0)))
    largest = jnp.max(jnp.abs(wf.reshape(groups, kernels.GROUP, n)), axis=1)
    scales = jnp.where(largest > 0, largest / 127.0, 1.0).astype(jnp.float32)
    values = jnp.clip(jnp.round(wf[:k] / _per_input(scales, k)), -127, 127).astype(jnp.int8)
    return QuantizedWeight(values.reshape(w.shape), scales.reshape(groups, *w.shape[in_dims:]))


def dense(
    x: jax.Array, w: jax.Array | QuantizedWeight | kernels.PackedWeight, in_dims: int = 1,
    preferred_element_type=None,
) -> jax.Array:
    """x [..., *inputs] @ w [*inputs, *outputs] -> [..., *outputs]: every weight matmul, in
    x's dtype (or `preferred_element_type`).

    A weight packed for the CPU kernel (`kernels.pack`) goes to `kernels.packed_matmul`; an
    array to one XLA dot over the flattened inputs and outputs (contracting two input dims
    separately made XLA:CPU copy the weight every step). A quantized weight is dequantized
    into x's dtype as the dot's operand (XLA fuses that into the dot on GPU and TPU): in float32
    the reference the kernel's int8 panels are held to.
    """
    if isinstance(w, kernels.PackedWeight):
        return kernels.packed_matmul(x, w).astype(preferred_element_type or x.dtype)
    lead, inputs, outputs = x.shape[: x.ndim - in_dims], w.shape[:in_dims], w.shape[in_dims:]
    k, n = math.prod(inputs), math.prod(outputs)
    weight = w.dequantized(in_dims, x.dtype) if isinstance(w, QuantizedWeight) else w.reshape(k, n)
    y = jnp.matmul(x.reshape(*lead, k), weight, preferred_element_type=preferred_element_type)
    return y.reshape(*lead, *outputs)


def side_by_side(w) -> bool:
    """Whether `w` holds several weights side by side (`kernels.pack_side_by_side`)."""
    return isinstance(w, kernels.PackedWeight) and bool(w.parts)


def dense_parts(x: jax.Array, w: kernels.PackedWeight) -> list[jax.Array]:
    """x [..., k] @ each of the weights packed side by side in `w` (`kernels.pack_side_by_side`),
    in x's dtype."""
    return [y.astype(x.dtype) for y in kernels.packed_matmul_parts(x, w)]


def norm(x: jax.Array, w: NormWeights, cfg: ModelConfig, kind: Norm | None = None) -> jax.Array:
    """LayerNorm or RMSNorm (cfg.norm, or `kind`), in float32 like the reference
    implementations."""
    xf = x.astype(jnp.float32)
    if (kind or cfg.norm) == "rmsnorm":
        if w.kernel and x.dtype == jnp.float32:
            return kernels.rms_norm(x, w.scale, cfg.norm_eps).astype(jnp.result_type(w.scale, x))
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + cfg.norm_eps)
        return w.scale * y.astype(x.dtype)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + cfg.norm_eps)
    return (y * w.scale + w.bias).astype(x.dtype)


def rope_frequencies(rope: Rope, head_dim: int) -> np.ndarray:
    """Inverse frequencies [n / 2] of the rotary embedding over n = rope.dims (or head_dim)
    dims, scaled as transformers' `ROPE_INIT_FUNCTIONS` scale them, in float32 as it does.

    Dynamic NTK scaling is not among them: its frequencies depend on the longest sequence a
    forward pass has seen, so no per-slot cache reproduces it (the family files refuse it).
    """
    n = rope.dims or head_dim
    inv_freq = (1.0 / rope.theta ** (np.arange(0, n, 2, dtype=np.float32) / n)).astype(np.float32)
    if rope.scaling == "linear":
        return (inv_freq / np.float32(rope.factor)).astype(np.float32)
    if rope.scaling == "factors":
        return (inv_freq / np.asarray(rope.freq_factors, np.float32)).astype(np.float32)
    if rope.scaling == "llama3":
        # Long wavelengths are divided by factor, short ones kept, the band between blended.
        old = rope.original_max_positions
        low_wavelen, high_wavelen = old / rope.low_freq_factor, old / rope.high_freq_factor
        wavelen = 2 * np.float32(np.pi) / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(rope.factor), inv_freq)
        smooth = (old / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / np.float32(rope.factor) + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    if rope.scaling == "yarn":
        def correction_dim(rotations: float) -> float:
            return (n * math.log(rope.original_max_positions / (rotations * 2 * math.pi))
                    / (2 * math.log(rope.theta)))

        low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
        if rope.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, n - 1)
        if low == high:
            high += 0.001  # transformers' guard against a zero-width ramp
        ramp = np.clip((np.arange(n // 2, dtype=np.float32) - low) / (high - low), 0, 1)
        extrapolation = (1 - ramp).astype(np.float32)  # 1: keep the trained frequency
        pos_freqs = np.float32(rope.theta) ** (np.arange(0, n, 2, dtype=np.float32) / n)
        interpolated = 1.0 / (np.float32(rope.factor) * pos_freqs)
        return (interpolated * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation).astype(
            np.float32)
    return inv_freq


def rotary(x: jax.Array, positions: jax.Array, rope: Rope) -> jax.Array:
    """Rotary position embedding of x [b, t, heads, e] at integer positions [b, t].

    Half-split pairs (LLaMA, GPT-NeoX) pair dim i with dim i + n/2; interleaved
    ones (GPT-J) pair dims 2i and 2i + 1. Only the first n = rope.dims dims turn.
    """
    e = x.shape[-1]
    n = rope.dims or e
    inv_freq = jnp.asarray(rope_frequencies(rope, e))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, t, n/2]
    rot, rest = x[..., :n].astype(jnp.float32), x[..., n:]
    # Each dim turns as x * cos + partner * (-sin or sin), its partner reached by flipping the
    # pair axis: XLA:CPU fuses this into one cheap loop, where concatenating the two turned
    # halves cost about 1 ms of a 16-slot decode step (benchmarks/profile_step.py).
    pair_axis = -1 if rope.interleaved else -2
    pairs = (n // 2, 2) if pair_axis == -1 else (2, n // 2)

    def spread(first, second):  # two [b, t, n/2] -> [b, t, 1, n], laid out as the pairs are
        return jnp.stack([first, second], axis=pair_axis).reshape(*angles.shape[:2], 1, n)

    partner = jnp.flip(rot.reshape(*rot.shape[:-1], *pairs), axis=pair_axis).reshape(rot.shape)
    # transformers scales cos and sin (yarn's attention factor) before they turn q and k.
    cos, sin = jnp.cos(angles) * rope.attention_factor, jnp.sin(angles) * rope.attention_factor
    turned = rot * spread(cos, cos) + partner * spread(-sin, sin)
    return jnp.concatenate([turned.astype(x.dtype), rest], axis=-1)


def project_qkv(
    x: jax.Array, w: AttentionWeights, positions: jax.Array, spec: LayerSpec, cfg: ModelConfig
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [b, t, d] -> q [b, t, h, e], k and v [b, t, k, e], head norms and rotary applied."""
    if side_by_side(w.wq):
        q, k, v = dense_parts(x, w.wq)
    else:
        q, k, v = dense(x, w.wq), dense(x, w.wk), dense(x, w.wv)
    if w.bq is not None:
        q, k, v = q + w.bq, k + w.bk, v + w.bv
    if spec.qk_norm:
        q, k = norm(q, w.q_norm, cfg, "rmsnorm"), norm(k, w.k_norm, cfg, "rmsnorm")
    if spec.rope is not None:
        q, k = rotary(q, positions, spec.rope), rotary(k, positions, spec.rope)
    return q, k, v


def attend(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, cfg: ModelConfig
) -> jax.Array:
    """The one attention of the project: q [b, t, h, e] over k, v [b, k, s, e].

    K/V are laid out head-major, as the slot cache stores them, so XLA's dots
    take them without a transposing copy. The query heads sharing a KV head and
    the query positions form one axis of r = t * h / k rows, and scores are
    computed as K @ q^T (keys as the matmul's long axis): on XLA:CPU at decode
    shapes this ran about 3x faster than q @ K^T with separate t and group axes.
    mask [b, t, s] is True where query t may read key s. Softmax runs in float32.
    """
    b, t, h, e = q.shape
    kv_heads, group = cfg.n_kv_heads, cfg.q_per_kv
    rows = q.reshape(b, t, kv_heads, group, e).transpose(0, 2, 1, 3, 4).reshape(b, kv_heads, t * group, e)
    scores = jnp.einsum("bkse,bkre->bksr", k, rows, preferred_element_type=jnp.float32)
    scores = scores * (e**-0.5 if cfg.attention_scale is None else cfg.attention_scale)
    if cfg.attention_softcap is not None:
        scores = jnp.tanh(scores / cfg.attention_softcap) * cfg.attention_softcap
    s = k.shape[2]
    row_mask = jnp.broadcast_to(jnp.swapaxes(mask, 1, 2)[..., None], (b, s, t, group))
    scores = jnp.where(row_mask.reshape(b, 1, s, t * group), scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=2).astype(q.dtype)  # the activations' dtype
    out = jnp.einsum("bksr,bkse->bkre", probs, v)
    return out.reshape(b, kv_heads, t, group, e).transpose(0, 2, 1, 3, 4).reshape(b, t, h, e)


def attention_output(o: jax.Array, w: AttentionWeights) -> jax.Array:
    """o [b, t, h, e] -> [b, t, d]."""
    y = dense(o, w.wo, in_dims=2)
    return y if w.bo is None else y + w.bo


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda z: jax.nn.gelu(z, approximate=True),
    "gelu": lambda z: jax.nn.gelu(z, approximate=False),
}


def mlp(x: jax.Array, w: MlpWeights | ExpertWeights, spec: LayerSpec) -> jax.Array:
    if isinstance(w, ExpertWeights):
        return experts(x, w, spec)
    act = ACTIVATIONS[spec.activation]
    if isinstance(w.w_gate, kernels.PackedWeight) and w.w_gate.gated:  # silu(gate) * up, at once
        if spec.activation != "silu" or w.b_in is not None:
            raise ValueError(f"mlp: gate and up packed in pairs (SiLU, no bias) for a layer with "
                             f"activation={spec.activation!r}, b_in={w.b_in is not None}")
        hidden = dense(x, w.w_gate)
    else:
        if side_by_side(w.w_gate):
            gate, hidden = dense_parts(x, w.w_gate)
        else:
            gate = None if w.w_gate is None else dense(x, w.w_gate)
            hidden = dense(x, w.w_in)
        if w.b_in is not None:
            hidden = hidden + w.b_in
        hidden = act(gate) * hidden if gate is not None else act(hidden)
    y = dense(hidden, w.w_out)
    return y if w.b_out is None else y + w.b_out


def experts(x: jax.Array, w: ExpertWeights, spec: LayerSpec) -> jax.Array:
    """x [..., d] through each token's top_k experts, weighted by the router as transformers
    weights them: softmax over every expert in float32, the top k, renormalized when asked.

    Each expert runs under a `lax.cond`, only when some token chose it, over all the tokens
    (those that did not choose it weighted 0), and the experts' outputs are summed in expert
    order, as transformers adds them. So a step reads each chosen expert once, where it lies,
    and no other: a decode step's cost follows its active parameters (benchmarks/moe_step.py);
    a prefill reads every chosen expert once.
    """
    moe, act = spec.moe, ACTIVATIONS[spec.activation]
    lead, d = x.shape[:-1], x.shape[-1]
    tokens = x.reshape(-1, d)
    probs = jax.nn.softmax(
        jnp.matmul(tokens, w.router, preferred_element_type=jnp.float32), axis=-1)
    top_probs, chosen = jax.lax.top_k(probs, moe.top_k)  # [n, k]
    if moe.normalize:
        top_probs = top_probs / jnp.sum(top_probs, axis=-1, keepdims=True)
    rows = jnp.arange(tokens.shape[0])[:, None]
    weights = jnp.zeros((tokens.shape[0], moe.n_experts), x.dtype).at[rows, chosen].set(
        top_probs.astype(x.dtype))  # [n, experts]; 0 where a token did not choose the expert
    used = jnp.zeros(moe.n_experts, bool).at[chosen.reshape(-1)].set(True)

    def expert(e: int, tokens: jax.Array) -> jax.Array:
        hidden = act(dense(tokens, w.expert_gate[e])) * dense(tokens, w.expert_in[e])
        return dense(hidden, w.expert_out[e]) * weights[:, e, None]

    out = jnp.zeros_like(tokens)
    for e in range(moe.n_experts):
        out = out + jax.lax.cond(used[e], functools.partial(expert, e), jnp.zeros_like, tokens)
    return out.reshape(*lead, d)
