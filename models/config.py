"""ModelConfig: the static, hashable description of one decoder-only transformer.

GPT-2, GPT-J and LLaMA differ in a handful of architectural switches (norm kind,
position encoding, residual wiring, MLP gating, biases); everything else is one
transformer. The config names those switches so that one forward pass
(`models/transformer.py`) serves all three families.
"""

from __future__ import annotations

import dataclasses
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
