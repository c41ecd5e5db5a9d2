"""Import a Hugging Face model directory: config.json plus safetensors (one file or sharded)."""

from __future__ import annotations

import functools
import json
import math
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from flover_jax.convert.tensors import CheckpointError, shape_checked_getter, stored_dtype
from models.config import ModelConfig
from models.gemma import gemma2_config, gemma3_config, gemma_params
from models.gpt import _eos_ids, gpt2_config, gpt2_params, gptj_config, gptj_params
from models.gpt_neox import gpt_neox_config, gpt_neox_params
from models.lazy import LazyTensor
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


# safetensors dtype -> numpy; the floating ones a checkpoint's weights come in.
_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                       "F64": np.float64}


def _safetensors_header(path: Path) -> dict[str, tuple[np.dtype, tuple[int, ...], int]]:
    """name -> (dtype, shape, file offset) of each tensor in a safetensors file.

    The format: an 8-byte little-endian header length, a JSON header (per tensor: dtype, shape,
    data_offsets [begin, end) from the end of the header), then the data. Tensors are read
    later with plain reads (`_read_tensor`), not a memory map: a mapped file's pages stay in
    the process's resident memory once touched, which would double a load's footprint.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                raise ValueError(f"header length {length} exceeds the file's {size} bytes")
            header = json.loads(f.read(length))
        if not isinstance(header, dict):
            raise TypeError("the header is not a JSON object")
        tensors = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if entry["dtype"] not in _SAFETENSORS_DTYPES:
                raise ValueError(f"tensor {name!r} has dtype {entry['dtype']!r}; floating "
                                 f"weights are read: {', '.join(_SAFETENSORS_DTYPES)}")
            dtype, shape = np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]]), tuple(entry["shape"])
            begin, end = entry["data_offsets"]
            if end - begin != math.prod(shape) * dtype.itemsize or 8 + length + end > size:
                raise ValueError(f"tensor {name!r}: data_offsets {entry['data_offsets']} do not "
                                 f"hold shape {list(shape)} of {entry['dtype']} within the file")
            tensors[name] = (dtype, shape, 8 + length + begin)
        return tensors
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def _read_tensor(path: Path, dtype: np.dtype, shape: tuple[int, ...], offset: int) -> np.ndarray:
    out = np.empty(shape, dtype)
    with path.open("rb") as f:
        f.seek(offset)
        if f.readinto(out.reshape(-1).view(np.uint8)) != out.nbytes:
            raise CheckpointError(f"{path}: ends before a tensor's data (the file is truncated)")
    return out


def _open_tensors(files: list[Path]) -> dict[str, LazyTensor]:
    """name -> the tensor, not yet read; every file's header is read (and checked) up front."""
    tensors = {}
    for path in files:
        if not path.exists():
            raise CheckpointError(f"{path}: file not found")
        for name, (dtype, shape, offset) in _safetensors_header(path).items():
            tensors[name] = LazyTensor(shape, dtype, functools.partial(
                _read_tensor, path, dtype, shape, offset))
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
    """config + params of a Hugging Face model directory: each param a `LazyTensor` read when
    it is placed, the config's dtype the checkpoint's own (its embedding's)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    hf, cfg = load_hf_config(directory)
    _, make_params, prefix = ARCHITECTURES[hf["architectures"][0]]
    files = _safetensors_files(directory)
    tensors = _open_tensors(files)

    def tensor(name: str) -> LazyTensor | None:
        return tensors.get(name, tensors.get(prefix + name))

    params = make_params(shape_checked_getter(Path(", ".join(map(str, files))), tensor), cfg)
    return cfg.replace(dtype=stored_dtype(params)), params
