"""orbax round trips, the importers' error messages, and the `convert` CLI mode."""

import json
import re
import shutil
import subprocess
import sys

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flover_jax import checkpoint
from flover_jax.convert.huggingface import load_hf, load_hf_config
from flover_jax.convert.tensors import CheckpointError
from flover_jax.loader import convert, load_model
from flover_jax.tokenizer import Tokenizer
from models import transformer
from models.presets import tiny_config
from models.transformer import init_params
from tests.hf_models import make_hf_model
from tests.test_tokenizer import _write_gguf


def assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(np.asarray(x), np.asarray(y))


# Gemma 3's per-layer windows and ropes and Qwen3-MoE's experts round-trip through config.json.
# int8: the quantized weights (a tied head's too, stored) and the experts' round-trip as int8.
@pytest.mark.parametrize("family, dtype, quantize", [
    *((family, dtype, None) for family in ("llama", "gpt2", "gptj")
      for dtype in ("float32", "bfloat16")),
    ("gemma3", "float32", None), ("qwen3_moe", "float32", None),
    ("llama", "float32", "int8"), ("qwen3_moe", "bfloat16", "int8"),
])
def test_orbax_round_trip_is_bitwise(tmp_path, family, dtype, quantize):
    cfg = tiny_config(family, dtype=dtype, quantize=quantize)
    params = init_params(cfg, jax.random.key(3))
    checkpoint.save(tmp_path / "ck", cfg, params)
    cfg2, params2, tokenizer = checkpoint.restore(tmp_path / "ck")
    assert cfg2 == cfg and tokenizer is None
    assert_bitwise_equal(params, params2)


@pytest.fixture(scope="module")
def hf_llama_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf_llama")
    make_hf_model("llama", directory)
    return directory


def test_hf_directory_converts_to_checkpoint_and_back(hf_llama_dir, tmp_path):
    cfg, params, _ = convert(hf_llama_dir)
    checkpoint.save(tmp_path / "ck", cfg, params)
    cfg2, params2, _ = load_model(tmp_path / "ck")
    assert cfg2 == cfg
    assert_bitwise_equal(jax.tree.map(jnp.asarray, params), params2)


# Gemma 2: its norms' 1 + w and tied head; Mixtral: its experts, an array each.
@pytest.mark.parametrize("family", ["llama", "gemma2", "mixtral"])
def test_a_bfloat16_checkpoint_runs_in_bfloat16_and_matches_transformers(tmp_path, family):
    """Loaded in its own dtype, a bf16 checkpoint stays bf16, and its logits are within 5% of
    the largest logit of transformers' bf16 ones (bf16 rounding leaves 1-3% here, as much as
    between transformers' own bf16 and float32 logits). Mixtral's are not compared in bf16: a
    token whose two best experts score within bf16 rounding of each other routes by the
    order of summation (XLA's fusions against torch's); transformers' own bf16 and float32 runs
    differ by 0.6 at |logit| 2.5 here. Loaded as float32, the same bf16 values give
    transformers' float32 logits exactly (1e-4), Mixtral's too."""
    import torch
    import transformers

    make_hf_model(family, tmp_path / "float32").to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    tokens = np.random.default_rng(0).integers(0, 256, size=(2, 12))

    def reference(dtype):
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=dtype)
        with torch.no_grad():
            return hf(torch.tensor(tokens)).logits.float().numpy()

    forward = jax.jit(transformer.forward, static_argnums=1)
    cfg, params, _ = load_model(tmp_path / "bf16")
    assert cfg.dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    if family != "mixtral":
        theirs = reference(torch.bfloat16)
        ours = np.asarray(forward(params, cfg, jnp.asarray(tokens)))
        assert np.abs(ours - theirs).max() < 0.05 * np.abs(theirs).max()

    cfg, params, _ = load_model(tmp_path / "bf16", dtype="float32")
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    ours = np.asarray(forward(params, cfg, jnp.asarray(tokens)))
    np.testing.assert_allclose(ours, reference(torch.float32), atol=1e-4, rtol=0)


def test_sharded_safetensors_with_index(hf_llama_dir, tmp_path):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_llama_dir)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    _, sharded = load_hf(tmp_path)
    _, single = load_hf(hf_llama_dir)
    assert_bitwise_equal(sharded, single)


def test_missing_directory_and_file(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere"):
        convert(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=r"missing\.gguf.*not found"):
        convert(tmp_path / "missing.gguf")


def test_missing_safetensors(hf_llama_dir, tmp_path):
    shutil.copy(hf_llama_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_hf(tmp_path)


def test_truncated_safetensors(hf_llama_dir, tmp_path):
    shutil.copy(hf_llama_dir / "config.json", tmp_path / "config.json")
    data = (hf_llama_dir / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*not a readable safetensors"):
        load_hf(tmp_path)


def test_unsupported_architecture(hf_llama_dir, tmp_path):
    shutil.copy(hf_llama_dir / "model.safetensors", tmp_path / "model.safetensors")
    config = json.loads((hf_llama_dir / "config.json").read_text())
    config["architectures"] = ["BertForMaskedLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json.*'BertForMaskedLM' is unsupported"):
        load_hf(tmp_path)


def test_config_disagreeing_with_weights(hf_llama_dir, tmp_path):
    shutil.copy(hf_llama_dir / "model.safetensors", tmp_path / "model.safetensors")
    config = json.loads((hf_llama_dir / "config.json").read_text())
    config["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(config))
    expected = r"model\.safetensors.*gate_proj.*shape \(128, 64\).*\(96, 64\)"
    with pytest.raises(CheckpointError, match=expected):
        load_hf(tmp_path)


def test_truncated_gguf(tmp_path):
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    with pytest.raises(CheckpointError, match=r"tiny\.gguf.*not a readable GGUF"):
        convert(path)


def test_gguf_unsupported_architecture(tmp_path):
    path = tmp_path / "falcon.gguf"
    writer = gguf.GGUFWriter(str(path), "falcon")
    writer.add_tensor("token_embd.weight", np.ones((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"falcon\.gguf.*'falcon' is unsupported"):
        convert(path)


def test_corrupt_checkpoint_config(tmp_path):
    cfg = tiny_config("llama")
    checkpoint.save(tmp_path / "ck", cfg, init_params(cfg, jax.random.key(0)))
    (tmp_path / "ck" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json.*not valid JSON"):
        checkpoint.restore(tmp_path / "ck")


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_convert_cli_mode(hf_llama_dir, tmp_path, quantize):
    """--mode=convert writes the weights as read, or quantized (and they stay quantized)."""
    dst = tmp_path / "converted"
    result = subprocess.run(
        [sys.executable, "main.py", "--mode=convert", f"--src={hf_llama_dir}", f"--dst={dst}",
         *([f"--quantize={quantize}"] if quantize else [])],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert checkpoint.is_checkpoint(dst)
    cfg, params, _ = load_model(dst)
    _, reference = load_hf(hf_llama_dir)
    reference = jax.tree.map(jnp.asarray, reference)
    assert cfg.quantize == quantize
    if quantize:
        reference = transformer.quantize_weights(reference)
        assert params.layers[0].mlp.w_in.values.dtype == jnp.int8
    assert_bitwise_equal(reference, params)


def test_a_save_writes_over_nothing_but_a_checkpoint(hf_llama_dir, tmp_path):
    cfg = tiny_config("llama")
    params = init_params(cfg, jax.random.key(0))
    before = {f.name: f.read_bytes() for f in hf_llama_dir.iterdir()}
    with pytest.raises(CheckpointError, match="exists and is not a flover_jax checkpoint"):
        checkpoint.save(hf_llama_dir, cfg, params)  # convert --dst=<the source>, say
    assert {f.name: f.read_bytes() for f in hf_llama_dir.iterdir()} == before
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not a flover_jax checkpoint"):
        checkpoint.save(tmp_path, cfg, params)
    cut_short = tmp_path / "ck"  # a save interrupted after params/: no config.json yet
    checkpoint.save(cut_short, cfg, params)
    (cut_short / "config.json").unlink()
    assert not checkpoint.is_checkpoint(cut_short)
    checkpoint.save(cut_short, cfg, params)
    assert_bitwise_equal(params, checkpoint.restore(cut_short)[1])


def test_a_damaged_checkpoint_is_named(tmp_path):
    cfg = tiny_config("llama")
    checkpoint.save(tmp_path / "ck", cfg, init_params(cfg, jax.random.key(0)))
    data = max((tmp_path / "ck" / "params").rglob("d/*"), key=lambda f: f.stat().st_size)
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"params: cannot restore \([^\n]*\); the "
                       "checkpoint is damaged$"):
        load_model(tmp_path / "ck")
    shutil.rmtree(tmp_path / "ck" / "params")
    with pytest.raises(CheckpointError, match="params: missing; the checkpoint is incomplete"):
        load_model(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="tiny-llama: a preset of random weights"):
        convert("tiny-llama")


# -- configs that would load but compute other logits are refused -------------------------------

LLAMA = {"architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 64,
         "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 128}
GPT2 = {"architectures": ["GPT2LMHeadModel"], "vocab_size": 256, "n_embd": 64, "n_layer": 2,
        "n_head": 4, "n_positions": 128}


@pytest.mark.parametrize("config, message", [
    (LLAMA | {"hidden_act": "gelu"}, "hidden_act='gelu' is unsupported"),
    (LLAMA | {"hidden_size": "64"}, "hidden_size='64': must be a positive int"),
    (LLAMA | {"num_hidden_layers": 0}, "num_hidden_layers=0: must be a positive int"),
    (GPT2 | {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True"),
    (GPT2 | {"scale_attn_weights": False}, "scale_attn_weights=False is unsupported"),
    (["not", "an", "object"], "expected a JSON object, got list"),
    (LLAMA | {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
     "rope_type='dynamic' is unsupported: its frequencies depend on the longest sequence"),
    (LLAMA | {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}},
     "rope_type='longrope' is unsupported"),
    (LLAMA | {"rope_parameters": {"rope_type": "su", "rope_theta": 1e4}},
     "rope_type='su' is unsupported (supported: default, linear, llama3, yarn)"),
    (LLAMA | {"rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}},
     "rope_type='llama3' needs high_freq_factor"),
    (LLAMA | {"rope_scaling": {"rope_type": "linear"}}, "rope_type='linear' needs factor"),
    (LLAMA | {"architectures": ["Qwen3ForCausalLM"], "layer_types": ["full_attention"]},
     "qwen3: layer_types=['full_attention']: must list num_hidden_layers=2 of"),
    (LLAMA | {"architectures": ["Gemma2ForCausalLM"], "use_bidirectional_attention": True},
     "gemma2: use_bidirectional_attention=True is unsupported"),
    (LLAMA | {"architectures": ["Gemma3ForCausalLM"], "hidden_activation": "gelu"},
     "gemma3: hidden_activation='gelu' is unsupported"),
    (LLAMA | {"architectures": ["Gemma2ForCausalLM"], "attn_logit_softcapping": "50"},
     "attn_logit_softcapping='50': must be a positive number or null"),
    (LLAMA | {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                               "original_max_position_embeddings": 0}},
     "original_max_position_embeddings=0: must be a positive int"),
])
def test_configs_we_would_compute_differently_are_refused(tmp_path, config, message):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json: .*" + re.escape(message)):
        load_hf_config(tmp_path)


def test_mistral_sliding_window_caps_the_sequence_length(tmp_path):
    config = LLAMA | {"architectures": ["MistralForCausalLM"], "sliding_window": 32}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert load_hf_config(tmp_path)[1].max_positions == 32  # every key within the window
    (tmp_path / "config.json").write_text(json.dumps(config | {"sliding_window": None}))
    assert load_hf_config(tmp_path)[1].max_positions == 128


def test_untied_gpt2_head_matches_hf(tmp_path):
    import torch

    hf = make_hf_model("gpt2", tmp_path, tie_word_embeddings=False)
    cfg, params = load_hf(tmp_path)
    assert not cfg.tie_embeddings
    tokens = np.random.default_rng(0).integers(0, 256, size=(2, 9))
    ours = transformer.forward(jax.tree.map(jnp.asarray, params), cfg, jnp.asarray(tokens))
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=0)


def test_a_bad_shard_index_is_named(hf_llama_dir, tmp_path):
    shutil.copy(hf_llama_dir / "config.json", tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["x"]}))
    with pytest.raises(CheckpointError, match="index.json: weight_map must map tensor names"):
        load_hf(tmp_path)


def test_resaving_without_a_tokenizer_drops_the_old_one(tmp_path):
    cfg = tiny_config("llama")
    params = init_params(cfg, jax.random.key(0))
    tokenizer = Tokenizer.from_gguf(_write_gguf(tmp_path / "tok.gguf"))
    checkpoint.save(tmp_path / "ck", cfg, params, tokenizer)
    assert checkpoint.restore(tmp_path / "ck")[2] is not None
    checkpoint.save(tmp_path / "ck", cfg, params)
    assert checkpoint.restore(tmp_path / "ck")[2] is None


# -- GGUF metadata -------------------------------------------------------------------------------


def write_llama_gguf(path, tokenizer: str | None = None, tensors=(), **metadata):
    """A GGUF of tiny_config("llama")'s shapes (random weights) with extra metadata."""
    cfg = tiny_config("llama")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_eos_token_id(1)
    if tokenizer is not None:
        writer.add_tokenizer_model(tokenizer)
    for key, value in metadata.items():
        writer.add_key_value(key, value, gguf.GGUFValueType.get_type(value))
    rng = np.random.default_rng(0)
    d, q, kv = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = {"token_embd.weight": (cfg.vocab_size, d), "output_norm.weight": (d,)}
    for i in range(cfg.n_layers):
        shapes |= {f"blk.{i}.{name}": shape for name, shape in (
            ("attn_norm.weight", (d,)), ("attn_q.weight", (q, d)), ("attn_k.weight", (kv, d)),
            ("attn_v.weight", (kv, d)), ("attn_output.weight", (d, q)),
            ("ffn_norm.weight", (d,)), ("ffn_gate.weight", (cfg.d_ff, d)),
            ("ffn_up.weight", (cfg.d_ff, d)), ("ffn_down.weight", (d, cfg.d_ff)))}
    for name, shape in [*shapes.items(), *tensors]:
        writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("metadata, tensors, message", [
    ({"llama.rope.scaling.type": "longrope"}, (), "llama.rope.scaling.type='longrope' is unsupported"),
    ({"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
      "llama.rope.scaling.original_context_length": 16, "llama.rope.scaling.yarn_ext_factor": 0.5},
     (), "llama.rope.scaling.yarn_ext_factor=0.5 is unsupported"),
    ({"llama.rope.scaling.factor": 4.0}, (), "llama.rope.scaling.factor=4.0 is unsupported"),
    ({}, [("rope_factors_long.weight", (4,))], "rope_factors_long.weight (LongRoPE scaling) is "
                                                "unsupported"),
    # Divisors of the frequencies: positive (these are random normals), one per pair of dims.
    ({}, [("rope_freqs.weight", (4,))], "rope_freqs.weight: rope freq_factors=("),
    ({"llama.expert_count": 4, "llama.expert_used_count": 2, "llama.expert_gating_func": 2},
     (), "llama.expert_gating_func=2 is unsupported (1: softmax)"),
])
def test_gguf_rotary_and_routing_it_would_not_compute_are_refused(tmp_path, metadata, tensors,
                                                                 message):
    path = write_llama_gguf(tmp_path / "m.gguf", tensors=tensors, **metadata)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        convert(path)


def test_gguf_stops_at_end_of_turn_and_loads_without_a_tokenizer_it_cannot_build(tmp_path):
    path = write_llama_gguf(tmp_path / "m.gguf", tokenizer="t5",
                            **{"tokenizer.ggml.eot_token_id": 5})
    with pytest.warns(UserWarning, match="tokenizer.ggml.model is 't5'.*prompts must be token"):
        cfg, params, tokenizer = convert(path)
    assert tokenizer is None and cfg.eos_token_ids == (1, 5)
    assert params.embed.shape == (cfg.vocab_size, cfg.d_model)
