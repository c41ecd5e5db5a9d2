"""GPT-NeoX (GPTNeoXForCausalLM: Pythia, GPT-NeoX-20B): config and weights.

LayerNorm, biases on every projection, a GELU MLP, rotary over half-split pairs
on a prefix of each head (`rotary_pct`, 0.25 by default), and a parallel
residual with its own norm for the MLP: x + attn(ln1(x)) + mlp(ln2(x)).
The fused `query_key_value` keeps each head's q, k and v side by side.
"""

from __future__ import annotations

from models.config import LayerSpec, ModelConfig
from models.gpt import TensorGetter, _count, _eos_ids, _real
from models.layers import AttentionWeights, MlpWeights, NormWeights
from models.lazy import LazyTensor
from models.llama import hf_rope
from models.transformer import LayerWeights, Params

_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def gpt_neox_config(hf: dict) -> ModelConfig:
    act = hf.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"gpt_neox: hidden_act={act!r} is unsupported "
                         f"(supported: {', '.join(_ACTIVATIONS)})")
    d, heads = _count(hf, "hidden_size"), _count(hf, "num_attention_heads")
    rope = hf_rope(hf, "gpt_neox", d // heads, default_theta=hf.get("rotary_emb_base", 10000.0),
                   default_fraction=hf.get("rotary_pct", 0.25))
    residual = "parallel" if hf.get("use_parallel_residual", True) else "sequential"
    bias = bool(hf.get("attention_bias", True))
    return ModelConfig(
        family="gpt_neox",
        vocab_size=_count(hf, "vocab_size"),
        d_model=d,
        layers=(LayerSpec(rope=rope, residual=residual, activation=_ACTIVATIONS[act]),)
        * _count(hf, "num_hidden_layers"),
        n_heads=heads,
        n_kv_heads=heads,
        head_dim=d // heads,
        d_ff=_count(hf, "intermediate_size"),
        max_positions=_count(hf, "max_position_embeddings", 2048),
        norm="layernorm",
        norm_eps=_real(hf, "layer_norm_eps", 1e-5),
        qkv_bias=bias,
        out_bias=bias,
        mlp_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos_ids(hf),
    )


def gpt_neox_params(get: TensorGetter, cfg: ModelConfig) -> Params:
    d, f, h, e = cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.head_dim

    def layernorm(prefix: str) -> NormWeights:
        return NormWeights(get(f"{prefix}.weight", (d,)), get(f"{prefix}.bias", (d,)))

    def bias(name: str, size: int) -> LazyTensor | None:
        return get(name, (size,)) if cfg.qkv_bias else None

    layers = []
    for i in range(cfg.n_layers):
        p = f"layers.{i}"
        a = f"{p}.attention"
        # Rows of query_key_value are (head, q|k|v, head_dim): transpose to (in, head, 3, e).
        qkv = get(f"{a}.query_key_value.weight", (3 * d, d)).T.reshape(d, h, 3, e)
        qkv_b = bias(f"{a}.query_key_value.bias", 3 * d)
        qkv_b = None if qkv_b is None else qkv_b.reshape(h, 3, e)
        attn = AttentionWeights(
            wq=qkv[:, :, 0], wk=qkv[:, :, 1], wv=qkv[:, :, 2],
            wo=get(f"{a}.dense.weight", (d, d)).T.reshape(h, e, d),
            bq=None if qkv_b is None else qkv_b[:, 0],
            bk=None if qkv_b is None else qkv_b[:, 1],
            bv=None if qkv_b is None else qkv_b[:, 2],
            bo=get(f"{a}.dense.bias", (d,)) if cfg.out_bias else None,
        )
        m = f"{p}.mlp"
        mlp = MlpWeights(
            w_in=get(f"{m}.dense_h_to_4h.weight", (f, d)).T, b_in=get(f"{m}.dense_h_to_4h.bias", (f,)),
            w_out=get(f"{m}.dense_4h_to_h.weight", (d, f)).T, b_out=get(f"{m}.dense_4h_to_h.bias", (d,)),
        )
        layers.append(LayerWeights(
            attn_norm=layernorm(f"{p}.input_layernorm"), attn=attn,
            mlp_norm=layernorm(f"{p}.post_attention_layernorm"), mlp=mlp,
        ))
    embed = get("embed_in.weight", (cfg.vocab_size, d))
    head = embed if cfg.tie_embeddings else get("embed_out.weight", (cfg.vocab_size, d))
    return Params(
        embed=embed,
        layers=layers,
        final_norm=layernorm("final_layer_norm"),
        lm_head=head.T,
    )
