"""orbax round trips, the importers' error messages, and the `convert` CLI mode."""

import json
import shutil
import subprocess
import sys

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flover_jax import checkpoint
from flover_jax.convert.huggingface import load_hf
from flover_jax.convert.tensors import CheckpointError
from flover_jax.loader import convert, load_model
from models.presets import tiny_config
from models.transformer import init_params
from tests.hf_models import make_hf_model


def assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gptj"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_orbax_round_trip_is_bitwise(tmp_path, family, dtype):
    cfg = tiny_config(family, dtype=dtype)
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


def test_convert_cli_mode(hf_llama_dir, tmp_path):
    dst = tmp_path / "converted"
    result = subprocess.run(
        [sys.executable, "main.py", "--mode=convert", f"--src={hf_llama_dir}", f"--dst={dst}"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert checkpoint.is_checkpoint(dst)
    _, params, _ = checkpoint.restore(dst)
    _, reference = load_hf(hf_llama_dir)
    assert_bitwise_equal(jax.tree.map(jnp.asarray, reference), params)
