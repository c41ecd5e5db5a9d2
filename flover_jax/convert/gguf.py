"""Import a GGUF file (llama.cpp's format; LLaMA architecture): float tensors in their own
dtype, quantized ones dequantized to float32.

llama.cpp's converter permutes the rows of q and k so that its rotary kernel
can pair adjacent dims; we undo that permutation, after which every tensor
equals Hugging Face's.
"""

from __future__ import annotations

import functools
from pathlib import Path

import gguf
import ml_dtypes
import numpy as np

from flover_jax.convert.tensors import CheckpointError, shape_checked_getter, stored_dtype
from flover_jax.tokenizer import gguf_stop_ids
from models.config import LayerSpec, ModelConfig, Rope
from models.lazy import LazyTensor
from models.llama import llama_params
from models.transformer import Params


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # truncated or corrupt files fail in many ways inside gguf
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _field(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_config(reader: gguf.GGUFReader, path: Path) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is unsupported (llama only)")

    def need(key: str):
        value = _field(reader, f"llama.{key}")
        if value is None:
            raise CheckpointError(f"{path}: GGUF metadata llama.{key} is missing")
        return value

    d, heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(_field(reader, "llama.attention.key_length", d // heads))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _field(reader, "llama.vocab_size") or (len(tokens.data) if tokens else None)
    if vocab is None:
        raise CheckpointError(
            f"{path}: neither llama.vocab_size nor tokenizer.ggml.tokens gives the vocabulary size")
    # Scaled or partial rotary embeddings would compute other logits than llama.cpp: refuse.
    for key, plain in (("llama.rope.scaling.type", "none"), ("llama.rope.scaling.factor", 1.0),
                       ("llama.rope.dimension_count", head_dim)):
        value = _field(reader, key)
        if value not in (None, plain):
            raise CheckpointError(f"{path}: GGUF metadata {key}={value!r} is unsupported "
                                  f"({plain!r} only)")
    if "rope_freqs.weight" in {t.name for t in reader.tensors}:
        raise CheckpointError(f"{path}: rope_freqs.weight (scaled rotary frequencies) is "
                              "unsupported")
    layer = LayerSpec(rope=Rope(theta=float(_field(reader, "llama.rope.freq_base", 10000.0))),
                      mlp="gated", activation="silu")
    return ModelConfig(
        family="llama",
        vocab_size=int(vocab),
        d_model=d,
        layers=(layer,) * int(need("block_count")),
        n_heads=heads,
        n_kv_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
        head_dim=head_dim,
        d_ff=int(need("feed_forward_length")),
        max_positions=int(_field(reader, "llama.context_length", 2048)),
        norm="rmsnorm",
        norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in {t.name for t in reader.tensors},
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=gguf_stop_ids(lambda key: _field(reader, key)),
    )


# Hugging Face name -> GGUF name (layer-local names get "blk.{i}.").
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _gguf_name(hf_name: str) -> str | None:
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    parts = hf_name.split(".", 3)  # model, layers, i, rest
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER_NAMES:
        return f"blk.{parts[2]}.{_LAYER_NAMES[parts[3]]}"
    return None


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: w [n_heads * head_dim, in]."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def _read_gguf_tensor(path: Path, tensor) -> np.ndarray:
    """A GGUF tensor in numpy's (row-major) shape: float tensors in their own dtype, quantized
    ones dequantized to float32."""
    shape = tuple(reversed([int(n) for n in tensor.shape]))  # GGUF lists dims innermost first
    try:
        if tensor.tensor_type == gguf.GGMLQuantizationType.BF16:
            return np.ascontiguousarray(tensor.data).view(ml_dtypes.bfloat16).reshape(shape)
        if tensor.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            return np.array(tensor.data).reshape(shape)
        return gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)
    except Exception as e:
        raise CheckpointError(f"{path}: tensor {tensor.name!r} cannot be dequantized ({e})") from None


def _gguf_dtype(tensor) -> np.dtype:
    return np.dtype({gguf.GGMLQuantizationType.BF16: ml_dtypes.bfloat16,
                     gguf.GGMLQuantizationType.F16: np.float16}.get(tensor.tensor_type, np.float32))


def load_gguf(path: str | Path, reader: gguf.GGUFReader | None = None) -> tuple[ModelConfig, Params]:
    """config + params of a GGUF file (any quant type `gguf` can dequantize): each param a
    `LazyTensor` read when it is placed, in its own dtype (quantized ones in float32)."""
    path = Path(path)
    reader = reader or open_gguf(path)
    cfg = gguf_config(reader, path)
    by_name = {t.name: t for t in reader.tensors}

    def read(hf_name: str) -> LazyTensor | None:
        name = _gguf_name(hf_name)
        tensor = by_name.get(name) if name else None
        if tensor is None:
            return None
        w = LazyTensor(tuple(reversed([int(n) for n in tensor.shape])), _gguf_dtype(tensor),
                       functools.partial(_read_gguf_tensor, path, tensor))
        if name.endswith("attn_q.weight"):
            return w.map(functools.partial(unpermute_rotary, n_heads=cfg.n_heads))
        if name.endswith("attn_k.weight"):
            return w.map(functools.partial(unpermute_rotary, n_heads=cfg.n_kv_heads))
        return w

    params = llama_params(shape_checked_getter(path, read), cfg)
    return cfg.replace(dtype=stored_dtype(params)), params
