"""Mixtral (MixtralForCausalLM): LLaMA's attention and norms, and in every layer a mixture
of SwiGLU experts (`block_sparse_moe`: router `gate`, experts' w1 = gate, w3 = up,
w2 = down) with the top num_experts_per_tok renormalized; Mistral's sliding window, when
set, on every layer."""

from __future__ import annotations

import dataclasses

from models.config import LayerSpec, ModelConfig, Moe
from models.gpt import TensorGetter, _count
from models.llama import hf_rope, llama_fields, llama_params, swiglu
from models.transformer import Params

_EXPERT_NAMES = (
    "{p}.block_sparse_moe.gate.weight", "{p}.block_sparse_moe.experts.{j}.w1.weight",
    "{p}.block_sparse_moe.experts.{j}.w3.weight", "{p}.block_sparse_moe.experts.{j}.w2.weight",
)


def mixtral_config(hf: dict) -> ModelConfig:
    moe = Moe(n_experts=_count(hf, "num_local_experts", 8), top_k=_count(hf, "num_experts_per_tok", 2),
              d_ff=_count(hf, "intermediate_size"))
    window = hf.get("sliding_window")

    def layer(head_dim: int) -> LayerSpec:
        spec = dataclasses.replace(swiglu(hf, "mixtral", hf_rope(hf, "mixtral", head_dim)), moe=moe)
        if window is None:
            return spec
        return dataclasses.replace(spec, attention="sliding", window=_count(hf, "sliding_window"))

    return ModelConfig(**llama_fields(hf, "mixtral", layer))


def mixtral_params(get: TensorGetter, cfg: ModelConfig) -> Params:
    return llama_params(get, cfg, _EXPERT_NAMES)
