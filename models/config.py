"""ModelConfig: the static, hashable description of one decoder-only transformer.

GPT-2, GPT-J and LLaMA differ in a handful of architectural switches (norm kind,
position encoding, residual wiring, MLP gating, biases); everything else is one
transformer. The config names those switches so that one forward pass
(`models/transformer.py`) serves all three families.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Literal

import jax.numpy as jnp

Family = Literal["gpt2", "gptj", "llama"]
Norm = Literal["layernorm", "rmsnorm"]
Positions = Literal["learned", "rope_half", "rope_interleaved"]
Activation = Literal["gelu_tanh", "silu"]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: Family
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    max_positions: int  # longest sequence the model supports (learned positions: table size)
    norm: Norm
    norm_eps: float
    positions: Positions
    rope_theta: float = 10000.0
    rotary_dim: int = 0  # rope on the first rotary_dim dims of each head (0 = all of them)
    parallel_residual: bool = False  # GPT-J: x + attn(ln(x)) + mlp(ln(x))
    gated_mlp: bool = False  # LLaMA SwiGLU: down(act(gate(x)) * up(x))
    activation: Activation = "gelu_tanh"
    attention_bias: bool = False  # biases on q, k, v and the output projection
    mlp_bias: bool = False
    lm_head_bias: bool = False
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Weights and activations; softmax, norms and logits always run in float32.
    dtype: str = "float32"

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(ModelConfig)
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not _has_type(value, hints[field.name]):
                raise ValueError(f"{field.name}={value!r}: must be {_describe(hints[field.name])}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "d_ff", "max_positions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        for name in ("norm_eps", "rope_theta"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name}={getattr(self, name)}: must be > 0 and finite")
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
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ValueError(
                f"rotary_dim={self.rotary_dim}: must be even and <= head_dim={self.head_dim}"
            )

    @property
    def jnp_dtype(self) -> jnp.dtype:
        return DTYPES[self.dtype]

    @property
    def rope_dims(self) -> int:
        """How many dims of each head the rotary embedding turns (GPT-J: a prefix)."""
        return self.rotary_dim or self.head_dim

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
        d = dict(d)
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)


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
