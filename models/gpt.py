"""GPT-2 and GPT-J: their configs and weights, from Hugging Face names into `Params`.

The compute is the shared transformer (`models/transformer.py`); what makes a
family is its layers' `LayerSpec`s and where its checkpoint keeps each weight.
`get(name, shape)` returns a tensor (`models.lazy.LazyTensor`, read when the loader
places it) in the checkpoint's own layout and raises if it is missing or has another shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from models.config import LayerSpec, ModelConfig, Rope
from models.layers import AttentionWeights, MlpWeights, NormWeights
from models.lazy import LazyTensor
from models.transformer import LayerWeights, Params

# get(name, shape): a checkpoint tensor in Hugging Face's layout and names, read only when the
# loader places it (models/lazy.py).
TensorGetter = Callable[[str, tuple[int, ...]], LazyTensor]


def _count(hf: dict, key: str, default: int | None = None) -> int:
    """A positive int field of config.json (KeyError if it is missing and has no default)."""
    value = hf[key] if default is None else (hf.get(key) or default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key}={value!r}: must be a positive int")
    return value


def _real(hf: dict, key: str, default: float) -> float:
    """A positive, finite number field of config.json (absent or null: `default`)."""
    value = default if hf.get(key) is None else hf[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{key}={value!r}: must be a positive, finite number")
    return float(value)


def _eos_ids(hf: dict) -> tuple[int, ...]:
    """eos_token_id of config.json or generation_config.json: absent, one id or a list."""
    eos = hf.get("eos_token_id")
    ids = [] if eos is None else eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"eos_token_id={eos!r}: must be a token id or a list of token ids")
    return tuple(ids)


def _check_activation(hf: dict, family: str) -> None:
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"{family}: activation_function={act!r} is unsupported (gelu_new only)")


def _gpt_fields(hf: dict, family: str, layer: LayerSpec) -> dict:
    """What GPT-2 and GPT-J share: LayerNorm, GELU (tanh), MLP biases, multi-head attention."""
    _check_activation(hf, family)
    d, heads = _count(hf, "n_embd"), _count(hf, "n_head")
    return dict(
        family=family,
        vocab_size=_count(hf, "vocab_size"),
        d_model=d,
        layers=(layer,) * _count(hf, "n_layer"),
        n_heads=heads,
        n_kv_heads=heads,
        head_dim=d // heads,
        d_ff=_count(hf, "n_inner", 4 * d),
        max_positions=_count(hf, "n_positions"),
        norm="layernorm",
        norm_eps=_real(hf, "layer_norm_epsilon", 1e-5),
        mlp_bias=True,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos_ids(hf),
    )


def gpt2_config(hf: dict) -> ModelConfig:
    """Learned positions, biases everywhere, LM head tied to the embedding (by default)."""
    # Attention scaled by 1 / sqrt(head_dim) only: the variants HF offers are refused, not
    # silently computed another way.
    for key, supported in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
        if hf.get(key, supported) != supported:
            raise ValueError(f"gpt2: {key}={hf[key]!r} is unsupported ({supported} only)")
    return ModelConfig(
        **_gpt_fields(hf, "gpt2", LayerSpec(activation="gelu_tanh")),
        learned_positions=True, qkv_bias=True, out_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def gptj_config(hf: dict) -> ModelConfig:
    """Rotary on the first rotary_dim dims (interleaved), parallel residual, untied biased head."""
    rope = Rope(dims=hf.get("rotary_dim") or None, interleaved=True)
    layer = LayerSpec(rope=rope, residual="parallel_shared_norm", activation="gelu_tanh")
    return ModelConfig(
        **_gpt_fields(hf, "gptj", layer),
        lm_head_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def _layernorm(get: TensorGetter, prefix: str, d: int) -> NormWeights:
    return NormWeights(scale=get(f"{prefix}.weight", (d,)), bias=get(f"{prefix}.bias", (d,)))


def gpt2_params(get: TensorGetter, cfg: ModelConfig) -> Params:
    d, f, h, e = cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.head_dim
    layers = []
    for i in range(cfg.n_layers):
        p = f"h.{i}"
        # GPT-2's Conv1D already stores (in, out); c_attn packs q, k, v along out.
        qkv_w = get(f"{p}.attn.c_attn.weight", (d, 3 * d)).reshape(d, 3, h, e)
        qkv_b = get(f"{p}.attn.c_attn.bias", (3 * d,)).reshape(3, h, e)
        attn = AttentionWeights(
            wq=qkv_w[:, 0], wk=qkv_w[:, 1], wv=qkv_w[:, 2],
            wo=get(f"{p}.attn.c_proj.weight", (d, d)).reshape(h, e, d),
            bq=qkv_b[0], bk=qkv_b[1], bv=qkv_b[2],
            bo=get(f"{p}.attn.c_proj.bias", (d,)),
        )
        mlp = MlpWeights(
            w_in=get(f"{p}.mlp.c_fc.weight", (d, f)), b_in=get(f"{p}.mlp.c_fc.bias", (f,)),
            w_out=get(f"{p}.mlp.c_proj.weight", (f, d)), b_out=get(f"{p}.mlp.c_proj.bias", (d,)),
        )
        layers.append(LayerWeights(
            attn_norm=_layernorm(get, f"{p}.ln_1", d), attn=attn,
            mlp_norm=_layernorm(get, f"{p}.ln_2", d), mlp=mlp,
        ))
    embed = get("wte.weight", (cfg.vocab_size, d))
    head = embed if cfg.tie_embeddings else get("lm_head.weight", (cfg.vocab_size, d))
    return Params(
        embed=embed,
        pos_embed=get("wpe.weight", (cfg.max_positions, d)),
        layers=layers,
        final_norm=_layernorm(get, "ln_f", d),
        lm_head=head.T,
    )


def gptj_params(get: TensorGetter, cfg: ModelConfig) -> Params:
    d, f, h, e = cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.head_dim
    layers = []
    for i in range(cfg.n_layers):
        p = f"h.{i}"
        # torch Linear stores (out, in): transpose to (in, out).
        attn = AttentionWeights(
            wq=get(f"{p}.attn.q_proj.weight", (d, d)).T.reshape(d, h, e),
            wk=get(f"{p}.attn.k_proj.weight", (d, d)).T.reshape(d, h, e),
            wv=get(f"{p}.attn.v_proj.weight", (d, d)).T.reshape(d, h, e),
            wo=get(f"{p}.attn.out_proj.weight", (d, d)).T.reshape(h, e, d),
        )
        mlp = MlpWeights(
            w_in=get(f"{p}.mlp.fc_in.weight", (f, d)).T, b_in=get(f"{p}.mlp.fc_in.bias", (f,)),
            w_out=get(f"{p}.mlp.fc_out.weight", (d, f)).T, b_out=get(f"{p}.mlp.fc_out.bias", (d,)),
        )
        layers.append(LayerWeights(attn_norm=_layernorm(get, f"{p}.ln_1", d), attn=attn, mlp=mlp))
    embed = get("wte.weight", (cfg.vocab_size, d))
    head = embed if cfg.tie_embeddings else get("lm_head.weight", (cfg.vocab_size, d))
    return Params(
        embed=embed,
        layers=layers,
        final_norm=_layernorm(get, "ln_f", d),
        lm_head=head.T,
        lm_head_bias=get("lm_head.bias", (cfg.vocab_size,)),
    )
