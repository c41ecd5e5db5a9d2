"""ModelConfig: the static, hashable description of one decoder-only transformer.

Families differ in what each layer does (its attention kind and window, its
rotary embedding, its norms, its MLP, its residual wiring) and in a few
model-wide facts (norm kind, biases, tied head). As gemma's own code describes
its blocks, each layer carries a `LayerSpec`; one transformer
(`models/transformer.py`) reads them, and a family file (`models/llama.py`,
`models/gpt.py`, ...) only maps checkpoint names and config fields onto them.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Literal

import jax.numpy as jnp

Family = Literal[
    "gpt2", "gptj", "gpt_neox", "llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "mixtral",
    "qwen3_moe",
]
Norm = Literal["layernorm", "rmsnorm"]
Activation = Literal["gelu_tanh", "gelu", "silu"]
MlpKind = Literal["dense", "gated"]
Residual = Literal["sequential", "parallel", "parallel_shared_norm"]
AttentionKind = Literal["global", "sliding"]
RopeScaling = Literal["none", "linear", "llama3", "yarn", "factors"]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
QUANTIZATIONS = ("int8",)  # weight-only (models/layers.QuantizedWeight)


def check_quantize(quantize: str | None) -> None:
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize={quantize!r}: must be one of {list(QUANTIZATIONS)} or None")


@dataclasses.dataclass(frozen=True)
class Rope:
    """One layer's rotary position embedding; the scaling fields are transformers' names
    (`rope_scaling` / `rope_parameters`), each used by the scalings noted beside it."""

    theta: float = 10000.0
    dims: int | None = None  # dims of each head that turn, a prefix (None: all of them)
    interleaved: bool = False  # GPT-J pairs dims 2i and 2i + 1; the others i and i + dims / 2
    scaling: RopeScaling = "none"
    factor: float = 1.0  # linear, llama3, yarn
    original_max_positions: int | None = None  # llama3, yarn
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float = 1.0  # scales cos and sin (yarn's mscale; 1 for the others)
    truncate: bool = True  # yarn: round the correction range to whole dims
    # factors: each inverse frequency divided by its own factor (llama.cpp's rope_freqs.weight,
    # in which GGUF files carry Llama 3's scaling); one per turning pair of dims.
    freq_factors: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        _check_types(self)
        if self.dims is not None and (self.dims % 2 or self.dims < 2):
            raise ValueError(f"rope dims={self.dims}: must be even and >= 2 (None: all)")
        if self.factor <= 0:
            raise ValueError(f"rope factor={self.factor}: must be > 0")
        if self.scaling in ("llama3", "yarn") and self.original_max_positions is None:
            raise ValueError(f"rope scaling={self.scaling!r} needs original_max_positions")
        if (self.scaling == "factors") != (self.freq_factors is not None):
            raise ValueError(f"rope scaling={self.scaling!r} with freq_factors="
                             f"{self.freq_factors}: factors are given exactly when scaling is "
                             "'factors'")
        if self.freq_factors is not None and min(self.freq_factors) <= 0:
            raise ValueError(f"rope freq_factors={self.freq_factors}: each must be > 0")
        if self.scaling == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"rope high_freq_factor={self.high_freq_factor}: must exceed "
                             f"low_freq_factor={self.low_freq_factor}")


@dataclasses.dataclass(frozen=True)
class Moe:
    """A mixture of experts in place of one MLP: each token's router picks top_k of n_experts
    (softmax over all, then top k, renormalized when `normalize`), as transformers routes
    Mixtral (always renormalized) and Qwen3-MoE (norm_topk_prob)."""

    n_experts: int
    top_k: int
    d_ff: int  # each expert's MLP width
    normalize: bool = True

    def __post_init__(self) -> None:
        _check_types(self)
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"moe top_k={self.top_k}: must be in [1, n_experts={self.n_experts}]")
        if self.d_ff < 1:
            raise ValueError(f"moe d_ff={self.d_ff}: must be >= 1")


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """What one transformer layer computes (its weights are `models.transformer.LayerWeights`)."""

    rope: Rope | None = None  # None: no rotary embedding (GPT-2's learned positions)
    attention: AttentionKind = "global"
    window: int | None = None  # sliding: each query reads its own and the window - 1 before
    # sequential: x += attn(norm1(x)); x += mlp(norm2(x)).  parallel (GPT-NeoX):
    # x + attn(norm1(x)) + mlp(norm2(x)).  parallel_shared_norm (GPT-J): norm2 is norm1.
    residual: Residual = "sequential"
    mlp: MlpKind = "dense"  # gated (LLaMA's SwiGLU): down(act(gate(x)) * up(x))
    moe: Moe | None = None  # a mixture of such (gated) MLPs instead of one
    activation: Activation = "gelu_tanh"
    qk_norm: bool = False  # RMSNorm over each head's q and k before the rotary (Qwen3, Gemma 3)
    post_norms: bool = False  # Gemma 2/3: norms on the attention's and the MLP's outputs too

    def __post_init__(self) -> None:
        _check_types(self)
        if (self.attention == "sliding") != (self.window is not None):
            raise ValueError(f"attention={self.attention!r} with window={self.window}: a "
                             "window is given exactly when attention is 'sliding'")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window={self.window}: must be >= 1")
        if self.post_norms and self.residual != "sequential":
            raise ValueError(f"post_norms with residual={self.residual!r}: Gemma's norms after "
                             "attention and MLP come with the sequential residual only")
        if self.moe is not None and self.mlp != "gated":
            raise ValueError(f"mlp={self.mlp!r} with moe: experts are gated MLPs")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: Family
    vocab_size: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    max_positions: int  # longest sequence the model supports (learned positions: table size)
    norm: Norm
    norm_eps: float
    layers: tuple[LayerSpec, ...]
    learned_positions: bool = False  # GPT-2: a learned position table added to the embedding
    qkv_bias: bool = False  # biases on the q, k and v projections
    out_bias: bool = False  # a bias on the attention's output projection
    mlp_bias: bool = False
    lm_head_bias: bool = False
    tie_embeddings: bool = False
    embed_scale: float = 1.0  # Gemma: the embedding times sqrt(d_model)
    attention_scale: float | None = None  # scores times this (None: head_dim ** -0.5)
    attention_softcap: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap)
    final_softcap: float | None = None  # Gemma 2: logits -> cap * tanh(logits / cap)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Weights, KV cache and activations; softmax, norms and logits always run in float32.
    dtype: str = "float32"
    # The activations' dtype where it differs from `dtype` (None: dtype). A CPU engine computes
    # bfloat16 weights in float32 (the executor says so here): its kernels sum in float32 anyway.
    activations: Literal["float32", "bfloat16", "float16"] | None = None
    # "int8": every matmul weight is int8 with float32 scales (layers.QuantizedWeight), the
    # embedding and norms stay in dtype; None: all in dtype.
    quantize: str | None = None

    def __post_init__(self) -> None:
        _check_types(self)
        for name in ("vocab_size", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff",
                     "max_positions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if not 0 < self.norm_eps < math.inf:
            raise ValueError(f"norm_eps={self.norm_eps}: must be > 0 and finite")
        for token_id in (self.bos_token_id, *self.eos_token_ids):
            if token_id is not None and not 0 <= token_id < self.vocab_size:
                name = "bos_token_id" if token_id is self.bos_token_id else "eos_token_ids"
                raise ValueError(f"{name}: {token_id} is not a token id; ids must be in "
                                 f"[0, {self.vocab_size}) (vocab_size)")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: must be one of {sorted(DTYPES)}")
        check_quantize(self.quantize)
        if not self.layers:
            raise ValueError("layers=(): a model has at least one layer")
        for i, layer in enumerate(self.layers):
            if layer.rope is not None and (layer.rope.dims or 0) > self.head_dim:
                raise ValueError(f"layers[{i}].rope.dims={layer.rope.dims}: must be <= "
                                 f"head_dim={self.head_dim}")
            pairs = ((layer.rope.dims or self.head_dim) // 2) if layer.rope else None
            if layer.rope is not None and layer.rope.freq_factors is not None and len(
                    layer.rope.freq_factors) != pairs:
                raise ValueError(f"layers[{i}].rope.freq_factors: {len(layer.rope.freq_factors)} "
                                 f"factors; the rotary turns {pairs} pairs of dims")

    @property
    def attention_kernel_misfit(self) -> str:
        """Why the CPU decode-attention kernel (scaled softmax over a contiguous range of
        positions: sliding windows and any scale fit) cannot compute this model's attention;
        "" when it can."""
        if self.attention_softcap is None:
            return ""
        return ("it does not soft-cap the scores, and this model's attention does: "
                f"attention_softcap={self.attention_softcap}")

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def jnp_dtype(self) -> jnp.dtype:
        return DTYPES[self.dtype]

    @property
    def activation_dtype(self) -> jnp.dtype:
        return DTYPES[self.activations or self.dtype]

    @property
    def q_per_kv(self) -> int:
        """Query heads sharing one KV head (grouped-query attention; 1 = multi-head)."""
        return self.n_heads // self.n_kv_heads

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """The inverse of `to_dict` (JSON turns tuples into lists and specs into dicts)."""
        d = dict(d)
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        d["layers"] = tuple(_layer_spec(layer) for layer in d.get("layers", ()))
        return cls(**d)


def _check_types(config: object) -> None:
    """Each field of a config dataclass has its annotated type, or ValueError names it (a
    config.json holding "1e-5" as a string loads, then fails every request with a tracer
    error far from the cause)."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if not _has_type(value, hints[field.name]):
            raise ValueError(f"{field.name}={value!r}: must be {_describe(hints[field.name])}")


def _has_type(value: object, hint: object) -> bool:
    """Whether a config value has its field's annotated type (an int is a float too; a bool
    is not an int; floats are finite)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return value in args
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, arg) for arg in args)
    if origin is tuple:
        return isinstance(value, tuple) and all(_has_type(v, args[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return (isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value))
    return isinstance(value, hint)


def _describe(hint: object) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return f"one of {list(args)}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args)
    if origin is tuple:
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if hint is type(None):
        return "null"
    return {bool: "a bool", int: "an int", float: "a finite number", str: "a string"}.get(
        hint, f"a {getattr(hint, '__name__', hint)}")


def _layer_spec(fields: dict) -> LayerSpec:
    if not isinstance(fields, dict):
        raise TypeError(f"layers: each layer must be a JSON object, got {fields!r}")
    rope, moe = fields.get("rope"), fields.get("moe")
    if rope is not None and rope.get("freq_factors") is not None:  # JSON made the tuple a list
        rope = {**rope, "freq_factors": tuple(rope["freq_factors"])}
    return LayerSpec(**{**fields, "rope": None if rope is None else Rope(**rope),
                        "moe": None if moe is None else Moe(**moe)})
