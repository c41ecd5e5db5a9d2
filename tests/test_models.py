"""Model parity with Hugging Face transformers on tiny random models of every family."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flover_jax.convert.huggingface import load_hf
from models import transformer
from models.config import LayerSpec, Moe, Rope
from models.presets import tiny_config
from models.transformer import KVCache
from tests.hf_models import VOCAB, make_hf_model

FAMILIES = ["gpt2", "gptj", "gpt_neox", "llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3",
            "mixtral", "qwen3_moe"]


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf = make_hf_model(request.param, directory)
    cfg, params = load_hf(directory)
    return request.param, hf, cfg, jax.tree.map(jnp.asarray, params)


def hf_logits(hf, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor(tokens)).logits.float().numpy()


def test_full_sequence_logits_match_hf(family_model):
    _, hf, cfg, params = family_model
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=(3, 17))
    ours = jax.jit(transformer.forward, static_argnums=1)(params, cfg, jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(ours), hf_logits(hf, tokens), atol=1e-4, rtol=0)


def test_llama_shaped_families_are_grouped_query(family_model):
    family, _, cfg, _ = family_model
    if family not in ("gpt2", "gptj", "gpt_neox"):
        assert cfg.n_kv_heads < cfg.n_heads
    if family == "qwen3":
        assert cfg.head_dim == 24 and cfg.layers[0].qk_norm
    if family in ("mixtral", "qwen3_moe"):  # Qwen3-MoE's layer 1 is dense (mlp_only_layers)
        assert [layer.moe and layer.moe.n_experts for layer in cfg.layers] == (
            [16, 16] if family == "mixtral" else [16, None])
    if family.startswith("gemma"):  # sliding layers between global ones, as layer_types says
        assert [layer.window for layer in cfg.layers] == [8, None]
    if family == "gemma3":  # the local layers' own base; the global ones' scaled
        assert [(layer.rope.theta, layer.rope.scaling) for layer in cfg.layers] == [
            (10000.0, "none"), (1_000_000.0, "linear")]
    if family in ("phi3", "gpt_neox"):  # partial rotary
        assert cfg.layers[0].rope.dims == {"phi3": 8, "gpt_neox": 4}[family]


# Each scaling's parameters put some rotary frequencies on each side of its thresholds (head_dim
# 16, base 10000: wavelengths 6.3, 20, 63, 199, ...); the prompts run past the original length.
ROPE_SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    "yarn-mscale": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                    "beta_fast": 16.0, "mscale": 0.8, "mscale_all_dim": 0.5},
}


@pytest.mark.parametrize("scaling", ROPE_SCALINGS)
def test_rope_scaling_logits_match_hf(tmp_path, scaling):
    rope = {"rope_theta": 10000.0, **ROPE_SCALINGS[scaling]}
    hf = make_hf_model("llama", tmp_path, rope_parameters=rope)
    cfg, params = load_hf(tmp_path)
    assert cfg.layers[0].rope.scaling == rope["rope_type"]
    tokens = np.random.default_rng(5).integers(0, VOCAB, size=(2, 80))
    ours = jax.jit(transformer.forward, static_argnums=1)(
        jax.tree.map(jnp.asarray, params), cfg, jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(ours), hf_logits(hf, tokens), atol=1e-4, rtol=0)


def test_qwen2_sliding_window_layers_match_hf(tmp_path):
    """Qwen2 with use_sliding_window: layers from max_window_layers on slide (here layer 1)."""
    hf = make_hf_model("qwen2", tmp_path, use_sliding_window=True, sliding_window=8,
                       max_window_layers=1)
    cfg, params = load_hf(tmp_path)
    assert [layer.window for layer in cfg.layers] == [None, 8]
    tokens = np.random.default_rng(6).integers(0, VOCAB, size=(2, 30))
    ours = jax.jit(transformer.forward, static_argnums=1)(
        jax.tree.map(jnp.asarray, params), cfg, jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(ours), hf_logits(hf, tokens), atol=1e-4, rtol=0)


@pytest.mark.parametrize("make, message", [
    (lambda: LayerSpec(window=8), "attention='global' with window=8: a window is given exactly"),
    (lambda: LayerSpec(attention="sliding"), "attention='sliding' with window=None"),
    (lambda: LayerSpec(post_norms=True, residual="parallel"), "post_norms with residual='parallel'"),
    (lambda: LayerSpec(moe=Moe(4, 2, 8)), "mlp='dense' with moe: experts are gated MLPs"),
    (lambda: Moe(4, 5, 8), "moe top_k=5: must be in [1, n_experts=4]"),
    (lambda: Rope(dims=3), "rope dims=3: must be even"),
    (lambda: Rope(scaling="yarn", factor=4.0), "rope scaling='yarn' needs original_max_positions"),
    (lambda: tiny_config("llama", head_dim=8).replace(layers=(LayerSpec(rope=Rope(dims=16)),)),
     "layers[0].rope.dims=16: must be <= head_dim=8"),
])
def test_layer_specs_refuse_what_the_transformer_does_not_compute(make, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


def test_eos_ids_come_from_generation_config(tmp_path):
    """Llama 3.1 stops at any of several EOS ids, which generation_config.json lists."""
    hf = make_hf_model("llama", tmp_path)
    assert load_hf(tmp_path)[0].eos_token_ids == (2,)  # save_pretrained copied config.json's
    hf.generation_config.eos_token_id = [2, 7, 9]
    hf.generation_config.save_pretrained(tmp_path)
    assert load_hf(tmp_path)[0].eos_token_ids == (2, 7, 9)


@pytest.mark.parametrize(
    "max_len, kv_len, cpu_kernels", [(32, 32, False), (64, 16, False), (64, 16, True)]
)
def test_prefill_then_decode_through_slot_cache_matches_full_forward(
    family_model, max_len, kv_len, cpu_kernels
):
    """Prompts of different lengths go into their slots (not slot 0, not contiguous with
    their batch rows) in two pieces, each piece of every prompt in one padded batch; each
    then decodes token by token.
    The first case attends over the whole cache in place, the second over the window's block,
    the third with the CPU kernels (models/kernels): matmuls on packed weights, and attention
    (the pieces' and the steps') where the kernel computes the model's (Gemma 3's sliding
    windows, not Gemma 2's soft-capping).
    Prompts and steps run past Gemma's windows of 8."""
    _, hf, cfg, params = family_model
    attention_kernel = cpu_kernels and not cfg.attention_kernel_misfit
    if cpu_kernels:
        params = transformer.pack_weights(params, cfg)
    rng = np.random.default_rng(1)
    lengths = np.array([3, 9, 6])
    steps, pad_to, n_slots = 5, 16, 6
    assert transformer.reads_whole_cache(n_slots, max_len, 4, kv_len) == (max_len == 32)
    slots = np.array([4, 1, 2])
    full = rng.integers(0, VOCAB, size=(3, pad_to + steps))
    padded = np.where(np.arange(pad_to)[None] < lengths[:, None], full[:, :pad_to], 0)

    # Noise in every cache cell first: a position no piece or step wrote must never be read.
    cache = KVCache.zeros(cfg, n_slots, max_len)
    cache = KVCache(*(tuple(c + 7.0 for c in layers) for layers in (cache.k, cache.v)))
    # Each prompt goes in two pieces, [0, 4) and the rest, each piece of every prompt in one
    # batch (a prompt of 3 tokens has no second piece: its row is padding, slot S).
    extend = jax.jit(transformer.extend, static_argnums=(1, 7, 8))
    first = np.minimum(lengths, 4)
    rest = lengths - first
    second_slots = np.where(rest > 0, slots, n_slots)
    h1, cache = extend(params, cfg, cache, jnp.asarray(slots), jnp.asarray(padded[:, :4]),
                       jnp.zeros(3, jnp.int32), jnp.asarray(first), max_len, attention_kernel)
    h2, cache = extend(params, cfg, cache, jnp.asarray(second_slots), jnp.asarray(padded[:, 4:]),
                       jnp.full(3, 4, jnp.int32), jnp.asarray(np.maximum(rest, 1)), max_len,
                       attention_kernel)
    prefill_logits = transformer.logits(params, jnp.concatenate([h1, h2], axis=1), cfg)

    decode = jax.jit(transformer.decode, static_argnums=(1, 7, 8))
    reference = [hf_logits(hf, full[i : i + 1, : lengths[i] + steps])[0] for i in range(3)]
    for i in range(3):
        np.testing.assert_allclose(
            np.asarray(prefill_logits[i, : lengths[i]]), reference[i][: lengths[i]], atol=1e-4
        )
    # The window covers slots 1..4; slot 3 is idle (writes=False) in the middle of it.
    start, width = 1, 4
    row_of = {int(s) - start: i for i, s in enumerate(slots)}
    for step in range(steps):
        tokens = np.zeros(width, np.int32)
        positions = np.zeros(width, np.int32)
        writes = np.zeros(width, bool)
        for row, i in row_of.items():
            positions[row] = lengths[i] + step
            tokens[row] = full[i, positions[row]]
            writes[row] = True
        out, cache = decode(params, cfg, cache, jnp.asarray(tokens), jnp.asarray(positions),
                            jnp.asarray(writes), jnp.int32(start), kv_len, attention_kernel)
        for row, i in row_of.items():
            np.testing.assert_allclose(
                np.asarray(out[row]), reference[i][positions[row]], atol=1e-4,
                err_msg=f"request {i}, decode step {step}",
            )


def test_the_attention_kernel_refuses_what_it_would_compute_otherwise(family_model):
    family, _, cfg, params = family_model
    if not cfg.attention_kernel_misfit:
        assert family != "gemma2"
        return
    cache = KVCache.zeros(cfg, 2, 16)
    one = jnp.zeros(1, jnp.int32)
    with pytest.raises(ValueError, match="attention_kernel=True: it does not soft-cap the "
                                         "scores, .*attention_softcap=5.0"):
        transformer.decode(params, cfg, cache, one, one, one > 0, jnp.int32(0), 16, True)


def test_greedy_continuation_equals_hf_generate(family_model):
    _, hf, cfg, params = family_model
    prompt = np.random.default_rng(2).integers(3, VOCAB - 1, size=(1, 7))
    new_tokens = 12
    with torch.no_grad():
        expected = hf.generate(
            torch.tensor(prompt), max_new_tokens=new_tokens, do_sample=False,
            eos_token_id=None, pad_token_id=0,
        )[0, prompt.shape[1] :].numpy()
    forward = jax.jit(transformer.forward, static_argnums=1)
    # Recompute the whole prefix (independent of the cache path), padded at the end to one
    # length (one compile): causal attention keeps the padding out of the positions read.
    seq = np.zeros(prompt.shape[1] + new_tokens, np.int32)
    seq[: prompt.shape[1]] = prompt[0]
    for n in range(prompt.shape[1], len(seq)):
        seq[n] = int(jnp.argmax(forward(params, cfg, jnp.asarray(seq[None]))[0, n - 1]))
    assert seq[prompt.shape[1] :].tolist() == expected.tolist()


def test_bfloat16_runs_close_to_float32(family_model):
    """The GPU configuration: bf16 weights and activations, float32 softmax, norms and logits."""
    _, _, cfg, params = family_model
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, VOCAB, size=(2, 9)))
    bf16 = cfg.replace(dtype="bfloat16")
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    forward = jax.jit(transformer.forward, static_argnums=1)
    ours16 = forward(params16, bf16, tokens)
    ours32 = forward(params, cfg, tokens)
    assert ours16.dtype == jnp.float32
    scale = float(jnp.abs(ours32).max())
    assert float(jnp.abs(ours16 - ours32).max()) < 0.05 * scale
