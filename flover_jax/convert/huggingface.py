"""Import a Hugging Face model directory: config.json plus safetensors (one file or sharded)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open

from flover_jax.convert.tensors import CheckpointError, shape_checked_getter
from models.config import ModelConfig
from models.gemma import gemma2_config, gemma3_config, gemma_params
from models.gpt import _eos_ids, gpt2_config, gpt2_params, gptj_config, gptj_params
from models.gpt_neox import gpt_neox_config, gpt_neox_params
from models.llama import llama_config, llama_params
from models.mixtral import mixtral_config, mixtral_params
from models.phi3 import phi3_config, phi3_params
from models.qwen import qwen2_config, qwen3_config, qwen3_moe_config
from models.transformer import Params

# architecture -> (config from config.json, params from tensors, name prefix some exports add)
ARCHITECTURES = {
    "GPT2LMHeadModel": (gpt2_config, gpt2_params, "transformer."),
    "GPTJForCausalLM": (gptj_config, gptj_params, "transformer."),
    "LlamaForCausalLM": (llama_config, llama_params, ""),
    "MistralForCausalLM": (llama_config, llama_params, ""),
    "Qwen2ForCausalLM": (qwen2_config, llama_params, ""),
    "Qwen3ForCausalLM": (qwen3_config, llama_params, ""),
    "Phi3ForCausalLM": (phi3_config, phi3_params, ""),
    "GPTNeoXForCausalLM": (gpt_neox_config, gpt_neox_params, "gpt_neox."),
    "Gemma2ForCausalLM": (gemma2_config, gemma_params, ""),
    "Gemma3ForCausalLM": (gemma3_config, gemma_params, ""),
    "MixtralForCausalLM": (mixtral_config, mixtral_params, ""),
    "Qwen3MoeForCausalLM": (qwen3_moe_config, llama_params, ""),
}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(name, str) for name in weight_map.values()
        ):
            raise CheckpointError(f"{index}: weight_map must map tensor names to file names")
        return [directory / name for name in sorted(set(weight_map.values()))]
    single = directory / "model.safetensors"
    if single.exists():
        return [single]
    raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json")


def _open_tensors(files: list[Path]) -> dict[str, tuple[Path, object]]:
    """name -> (file, open handle); every file is opened (and so validated) up front."""
    tensors = {}
    for path in files:
        if not path.exists():
            raise CheckpointError(f"{path}: file not found")
        try:
            # "flax" reads bfloat16 too, which the numpy reader cannot.
            handle = safe_open(str(path), framework="flax")
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
        for name in handle.keys():
            tensors[name] = (path, handle)
    return tensors


def load_hf_config(directory: Path) -> tuple[dict, ModelConfig]:
    hf = _read_json(directory / "config.json")
    architectures = hf.get("architectures") or ["?"]
    arch = architectures[0] if isinstance(architectures, list) else architectures
    if not isinstance(architectures, list) or not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise CheckpointError(
            f"{directory / 'config.json'}: architecture {arch!r} is unsupported; "
            f"supported: {', '.join(ARCHITECTURES)} (architectures: a list of names)"
        )
    make_config = ARCHITECTURES[arch][0]
    try:
        cfg = make_config(hf)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{directory / 'config.json'}: {e}") from None
    # transformers' generate stops at generation_config.json's EOS ids (Llama 3.1: three of
    # them) where that file gives any, else at config.json's.
    generation = directory / "generation_config.json"
    if generation.exists():
        try:
            eos = _eos_ids(_read_json(generation))
        except ValueError as e:
            raise CheckpointError(f"{generation}: {e}") from None
        if eos:
            cfg = cfg.replace(eos_token_ids=eos)
    return hf, cfg


def load_hf(directory: str | Path) -> tuple[ModelConfig, Params]:
    """config + float32 numpy params of a Hugging Face model directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    hf, cfg = load_hf_config(directory)
    _, make_params, prefix = ARCHITECTURES[hf["architectures"][0]]
    tensors = _open_tensors(_safetensors_files(directory))

    def read(name: str) -> np.ndarray | None:
        for candidate in (name, prefix + name):
            if candidate in tensors:
                path, handle = tensors[candidate]
                try:
                    return np.asarray(handle.get_tensor(candidate), dtype=np.float32)
                except Exception as e:
                    raise CheckpointError(f"{path}: tensor {candidate!r} is unreadable ({e})")
        return None

    files = sorted({str(p) for p, _ in tensors.values()})
    return cfg, make_params(shape_checked_getter(Path(", ".join(files)), read), cfg)
