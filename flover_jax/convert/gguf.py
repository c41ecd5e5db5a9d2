"""Import a GGUF file (llama.cpp's format): float tensors in their own dtype, quantized ones
dequantized to float32.

A GGUF of the architectures llama.cpp writes for the families we run (`llama`, with or without
experts, `qwen2`, `qwen3`, `qwen3moe`, `phi3`, `gemma2`, `gemma3`, `gptneox`) is read by turning its
metadata into the config.json Hugging Face would have and its tensor names into Hugging Face's,
so each family's own config and weight functions (models/*.py), and their checks, load it.
What llama.cpp's converter changes on the way is undone here: q and k rows permuted for its
rotary kernel (`llama` only), Gemma's norm weights stored with their 1 added, experts stacked
in one tensor per projection, Llama 3's rope scaling stored as per-frequency divisors
(`rope_freqs`), GPT-NeoX's fused q|k|v rows grouped by projection instead of by head. Where
a GGUF omits a field, llama.cpp's own default is used, as noted below.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path

import gguf
import ml_dtypes
import numpy as np

from flover_jax.convert.huggingface import ARCHITECTURES
from flover_jax.convert.tensors import CheckpointError, shape_checked_getter, stored_dtype
from flover_jax.tokenizer import gguf_stop_ids
from models.config import ModelConfig
from models.lazy import LazyTensor
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


# general.architecture -> the Hugging Face architecture whose functions load it (`llama` with
# experts is Mixtral).
GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM", "phi3": "Phi3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM", "gptneox": "GPTNeoXForCausalLM",
}
_MISSING = object()


def gguf_hf_config(reader: gguf.GGUFReader, path: Path) -> tuple[str, dict]:
    """(Hugging Face architecture, config.json fields) equivalent to a GGUF's metadata."""
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is unsupported; supported: "
                              f"{', '.join(GGUF_ARCHITECTURES)}")
    tensors = {t.name for t in reader.tensors}

    def meta(key: str, default=_MISSING):
        value = _field(reader, f"{arch}.{key}")
        if value is None and default is _MISSING:
            raise CheckpointError(f"{path}: GGUF metadata {arch}.{key} is missing")
        return default if value is None else value

    def refuse(key: str, value, allowed: str):
        raise CheckpointError(f"{path}: GGUF metadata {arch}.{key}={value!r} is unsupported "
                              f"({allowed})")

    d, heads = meta("embedding_length"), meta("attention.head_count")
    whole_head = d // heads if isinstance(d, int) and isinstance(heads, int) and heads > 0 else None
    head_dim = meta("attention.key_length", whole_head)
    vocab = meta("vocab_size", len(_field(reader, "tokenizer.ggml.tokens", [])) or None)
    if vocab is None:
        raise CheckpointError(f"{path}: neither {arch}.vocab_size nor tokenizer.ggml.tokens gives "
                              "the vocabulary size")
    rope = {"rope_type": "default", "rope_theta": meta("rope.freq_base", 10000.0)}
    scaling = meta("rope.scaling.type", "none")
    if scaling == "linear":
        rope |= {"rope_type": "linear", "factor": meta("rope.scaling.factor")}
    elif scaling == "yarn":  # the fields llama.cpp's converter writes from rope_parameters
        rope |= {"rope_type": "yarn", "factor": meta("rope.scaling.factor"),
                 "original_max_position_embeddings": meta("rope.scaling.original_context_length")}
        for key, hf_key in (("yarn_attn_factor", "attention_factor"), ("yarn_beta_fast", "beta_fast"),
                            ("yarn_beta_slow", "beta_slow")):
            if meta(f"rope.scaling.{key}", None) is not None:
                rope[hf_key] = meta(f"rope.scaling.{key}")
        # Extrapolation mixes fully outside the ramp in YaRN as transformers computes it; -1 is
        # llama.cpp's "unset".
        if meta("rope.scaling.yarn_ext_factor", 1.0) not in (1.0, -1.0):
            refuse("rope.scaling.yarn_ext_factor", meta("rope.scaling.yarn_ext_factor"),
                   "1.0, as transformers' YaRN computes")
        if meta("rope.scaling.yarn_log_multiplier", 0.0):
            refuse("rope.scaling.yarn_log_multiplier", meta("rope.scaling.yarn_log_multiplier"),
                   "0: no mscale_all_dim")
    elif scaling != "none":
        refuse("rope.scaling.type", scaling, "none, linear or yarn")
    elif meta("rope.scaling.factor", 1.0) != 1.0:
        refuse("rope.scaling.factor", meta("rope.scaling.factor"), "1.0 without a scaling type")
    rotary_dims = meta("rope.dimension_count", head_dim)
    if rotary_dims != head_dim:
        rope["partial_rotary_factor"] = rotary_dims / head_dim
    for name in ("rope_factors_long.weight", "rope_factors_short.weight"):
        if name in tensors:  # Phi-3's LongRoPE: its frequencies depend on the sequence's length
            raise CheckpointError(f"{path}: tensor {name} (LongRoPE scaling) is unsupported")
    if meta("expert_shared_count", 0):
        refuse("expert_shared_count", meta("expert_shared_count"), "0: no shared experts")
    if meta("expert_gating_func", gguf.ExpertGatingFuncType.SOFTMAX) != gguf.ExpertGatingFuncType.SOFTMAX:
        refuse("expert_gating_func", meta("expert_gating_func"),
               f"{gguf.ExpertGatingFuncType.SOFTMAX.value}: softmax")
    hf = dict(
        hidden_size=d, num_hidden_layers=meta("block_count"), num_attention_heads=heads,
        num_key_value_heads=meta("attention.head_count_kv", heads), head_dim=head_dim,
        intermediate_size=meta("feed_forward_length"),
        max_position_embeddings=meta("context_length", 2048),
        vocab_size=vocab,
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"), rope_parameters=rope,
    )
    if arch == "gptneox":  # LayerNorm; the activation is not stored: Pythia's, exact GELU
        hf |= dict(layer_norm_eps=meta("attention.layer_norm_epsilon"), hidden_act="gelu",
                   use_parallel_residual=meta("use_parallel_residual", True),
                   attention_bias="blk.0.attn_qkv.bias" in tensors,
                   rotary_pct=rotary_dims / head_dim if whole_head else None)
    else:
        hf["rms_norm_eps"] = meta("attention.layer_norm_rms_epsilon")
    architecture = GGUF_ARCHITECTURES[arch]
    if arch == "llama" and meta("expert_count", 0):
        architecture = "MixtralForCausalLM"
        hf |= dict(num_local_experts=meta("expert_count"), num_experts_per_tok=meta("expert_used_count"))
    elif arch == "qwen3moe":
        n_layers = hf["num_hidden_layers"]
        hf |= dict(
            num_experts=meta("expert_count"), num_experts_per_tok=meta("expert_used_count"),
            moe_intermediate_size=meta("expert_feed_forward_length"),
            # llama.cpp renormalizes Qwen3-MoE's top k always (transformers reads its GGUFs so).
            norm_topk_prob=True,
            mlp_only_layers=[i for i in range(n_layers if isinstance(n_layers, int) else 0)
                             if f"blk.{i}.ffn_gate_inp.weight" not in tensors],
        )
    elif arch == "phi3":
        hf["sliding_window"] = meta("attention.sliding_window", 0) or None  # 0: none
    elif arch in ("gemma2", "gemma3"):
        # Not in a GGUF: llama.cpp scales scores by head_dim ** -0.5, except for the 27B
        # models (46 and 62 layers), whose query_pre_attn_scalar is d_model / heads.
        big = hf["num_hidden_layers"] == {"gemma2": 46, "gemma3": 62}[arch]
        hf |= dict(query_pre_attn_scalar=d // heads if big else head_dim,
                   final_logit_softcapping=meta("final_logit_softcapping", None))
        if arch == "gemma2":
            hf |= dict(attn_logit_softcapping=meta("attn_logit_softcapping", None),
                       sliding_window=meta("attention.sliding_window"))
        else:
            window = meta("attention.sliding_window", None)
            # Every sixth layer global (llama.cpp's pattern for Gemma 3), local ones at base
            # 10000 unless the file says otherwise; no window: every layer global.
            local = {"rope_type": "default", "rope_theta": meta("rope.freq_base_swa", 10000.0)}
            hf |= dict(sliding_window=window, rope_parameters={
                "full_attention": rope, "sliding_attention": local})
            if window is None:
                hf["layer_types"] = ["full_attention"] * hf["num_hidden_layers"]
    return architecture, hf


def _rope_freqs(reader: gguf.GGUFReader, path: Path, cfg: ModelConfig) -> ModelConfig:
    """Llama 3's rope scaling as llama.cpp stores it: each inverse frequency's divisor in the
    tensor rope_freqs.weight, applied to every layer's rotary embedding."""
    tensor = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if tensor is None:
        return cfg
    factors = tuple(float(x) for x in _read_gguf_tensor(path, tensor).reshape(-1))
    if any(layer.rope is None or layer.rope.scaling != "none" for layer in cfg.layers):
        raise CheckpointError(f"{path}: rope_freqs.weight with another rope scaling is "
                              "unsupported")
    try:
        return cfg.replace(layers=tuple(dataclasses.replace(layer, rope=dataclasses.replace(
            layer.rope, scaling="factors", freq_factors=factors)) for layer in cfg.layers))
    except ValueError as e:
        raise CheckpointError(f"{path}: rope_freqs.weight: {e}") from None


# Hugging Face name in a layer (after "model.layers.{i}.") -> GGUF name (after "blk.{i}.").
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.qkv_proj.weight": "attn_qkv.weight",  # Phi-3
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.gate_up_proj.weight": "ffn_up.weight",  # Phi-3: gate and up, fused
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",  # routers
    "block_sparse_moe.gate.weight": "ffn_gate_inp.weight",
}
# Gemma's norms: LLaMA's post_attention_layernorm is its pre-MLP norm; its own norms after
# attention and MLP are GGUF's post_attention_norm and post_ffw_norm.
_GEMMA_NAMES = _LAYER_NAMES | {
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
}
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
# One expert's projection -> (its stacked GGUF tensor, after "blk.{i}.").
# GPT-NeoX's names (after the "gpt_neox." prefix its params leave out), weights and biases.
_GPTNEOX_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "attention.query_key_value": "attn_qkv",
    "attention.dense": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.dense_h_to_4h": "ffn_up", "mlp.dense_4h_to_h": "ffn_down",
}
_GPTNEOX_GLOBAL_NAMES = {"embed_in.weight": "token_embd.weight", "embed_out.weight": "output.weight",
                         "final_layer_norm.weight": "output_norm.weight",
                         "final_layer_norm.bias": "output_norm.bias"}
_EXPERT = re.compile(r"(?:mlp\.experts\.(\d+)\.(gate|up|down)_proj|"
                     r"block_sparse_moe\.experts\.(\d+)\.(w1|w3|w2))\.weight")
_MIXTRAL_PROJECTIONS = {"w1": "gate", "w3": "up", "w2": "down"}


def gguf_name(hf_name: str, arch: str) -> tuple[str, int | None] | None:
    """(GGUF tensor, index into its leading axis or None) holding a Hugging Face tensor."""
    if arch == "gptneox":
        if hf_name in _GPTNEOX_GLOBAL_NAMES:
            return _GPTNEOX_GLOBAL_NAMES[hf_name], None
        match = re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", hf_name)
        if match is None or match[2] not in _GPTNEOX_LAYER_NAMES:
            return None
        return f"blk.{match[1]}.{_GPTNEOX_LAYER_NAMES[match[2]]}.{match[3]}", None
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name], None
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
    if match is None:
        return None
    layer, rest = match.groups()
    names = _GEMMA_NAMES if arch.startswith("gemma") else _LAYER_NAMES
    if rest in names:
        return f"blk.{layer}.{names[rest]}", None
    expert = _EXPERT.fullmatch(rest)
    if expert is None:
        return None
    j, projection = (expert[1], expert[2]) if expert[1] else (
        expert[3], _MIXTRAL_PROJECTIONS[expert[4]])
    return f"blk.{layer}.ffn_{projection}_exps.weight", int(j)


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: w [n_heads * head_dim, in]."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def regroup_qkv(w: np.ndarray, n_heads: int) -> np.ndarray:
    """GPT-NeoX's fused q|k|v rows (or bias) from llama.cpp's order (projection, head, dim) back
    to Hugging Face's (head, projection, dim)."""
    rows = w.reshape(3, n_heads, -1, *w.shape[1:])
    return rows.swapaxes(0, 1).reshape(w.shape)


def _numpy_shape(tensor) -> tuple[int, ...]:
    return tuple(reversed([int(n) for n in tensor.shape]))  # GGUF lists dims innermost first


def _read_gguf_tensor(path: Path, tensor, index: int | None = None) -> np.ndarray:
    """A GGUF tensor (or its row `index` of the leading axis: one expert of a stack, read alone
    from the memory-mapped file) in numpy's shape: float tensors in their own dtype, quantized
    ones dequantized to float32."""
    shape = _numpy_shape(tensor)
    data = tensor.data
    if index is not None:
        shape, data = shape[1:], data[index]
    try:
        if tensor.tensor_type == gguf.GGMLQuantizationType.BF16:
            return np.ascontiguousarray(data).view(ml_dtypes.bfloat16).reshape(shape)
        if tensor.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            return np.array(data).reshape(shape)
        return gguf.quants.dequantize(data, tensor.tensor_type).reshape(shape)
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
    architecture, hf = gguf_hf_config(reader, path)
    make_config, make_params, _ = ARCHITECTURES[architecture]
    try:
        cfg = make_config(hf)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: GGUF metadata (read as Hugging Face's config): {e}") from None
    cfg = _rope_freqs(reader, path, cfg.replace(
        eos_token_ids=gguf_stop_ids(lambda key: _field(reader, key))))
    arch = _field(reader, "general.architecture")
    by_name = {t.name: t for t in reader.tensors}

    def read(hf_name: str) -> LazyTensor | None:
        found = gguf_name(hf_name, arch)
        tensor = by_name.get(found[0]) if found else None
        if tensor is None:
            return None
        name, index = found
        shape = _numpy_shape(tensor)
        w = LazyTensor(shape if index is None else shape[1:], _gguf_dtype(tensor),
                       functools.partial(_read_gguf_tensor, path, tensor, index))
        if arch == "llama" and name.endswith("attn_q.weight"):
            return w.map(functools.partial(unpermute_rotary, n_heads=cfg.n_heads))
        if arch == "llama" and name.endswith("attn_k.weight"):
            return w.map(functools.partial(unpermute_rotary, n_heads=cfg.n_kv_heads))
        if arch == "gptneox" and ".attn_qkv." in name:
            return w.map(functools.partial(regroup_qkv, n_heads=cfg.n_heads))
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            return w + -1.0  # the family adds Gemma's 1 back, as transformers computes it
        return w

    params = make_params(shape_checked_getter(path, read), cfg)
    return cfg.replace(dtype=stored_dtype(params)), params
