"""GGUF files llama.cpp's converter wrote from tiny Hugging Face checkpoints of each family
(tests/fixtures/make_gguf_fixtures.py): our loader's logits equal the checkpoint's, and equal
transformers' reading the same GGUF's tensors (given the checkpoint's config: its reader of
GGUF metadata drops fields some families need) for every family transformers reads; the
SentencePiece vocabularies encode as sentencepiece itself does."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flover_jax.loader import convert
from models import transformer

FIXTURES = Path(__file__).parent / "fixtures" / "gguf"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())


def our_logits(name: str) -> tuple[np.ndarray, object, object]:
    cfg, params, tokenizer = convert(FIXTURES / f"{name}.gguf")
    tokens = jnp.asarray([MANIFEST[name]["prompt"]])
    logits = jax.jit(transformer.forward, static_argnums=1)(params, cfg, tokens)
    return np.asarray(logits[0]), cfg, tokenizer


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_gguf_logits_match_the_checkpoint_it_was_converted_from(name):
    ours, cfg, _ = our_logits(name)
    assert cfg.family == MANIFEST[name]["family"]
    np.testing.assert_allclose(ours, np.load(FIXTURES / f"{name}.logits.npy"), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(n for n, m in MANIFEST.items() if m["transformers_reads_gguf"]))
def test_gguf_logits_match_transformers_reading_the_same_file(name):
    import torch
    import transformers

    config = json.loads((FIXTURES / f"{name}.config.json").read_text())
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        FIXTURES, gguf_file=f"{name}.gguf", dtype=torch.float32,
        config=transformers.AutoConfig.for_model(config.pop("model_type"), **config))
    with torch.no_grad():
        theirs = hf(torch.tensor([MANIFEST[name]["prompt"]])).logits[0].numpy()
    np.testing.assert_allclose(our_logits(name)[0], theirs, atol=1e-4, rtol=0)


def test_gguf_layouts_are_read_as_the_families_define_them():
    cfgs = {name: convert(FIXTURES / f"{name}.gguf")[0] for name in (
        "mixtral", "qwen3_moe", "llama3_rope", "gemma3", "phi3", "qwen3", "qwen3_yarn", "gpt_neox")}
    assert [layer.moe.n_experts for layer in cfgs["mixtral"].layers] == [4, 4]
    assert cfgs["qwen3_moe"].layers[0].moe.normalize  # llama.cpp always renormalizes
    assert cfgs["llama3_rope"].layers[0].rope.scaling == "factors"
    # Every sixth Gemma 3 layer global, at its own base; the local ones at 10000.
    assert [layer.window for layer in cfgs["gemma3"].layers] == [8] * 5 + [None]
    assert [layer.rope.theta for layer in cfgs["gemma3"].layers] == [10000.0] * 5 + [1e6]
    assert cfgs["phi3"].layers[0].rope.dims == 4 and cfgs["qwen3"].head_dim == 12
    yarn = cfgs["qwen3_yarn"].layers[0].rope
    assert (yarn.scaling, yarn.factor, yarn.original_max_positions) == ("yarn", 4.0, 16)
    neox = cfgs["gpt_neox"].layers[0]
    assert (neox.rope.dims, neox.residual, cfgs["gpt_neox"].norm) == (8, "parallel", "layernorm")


def test_a_byte_level_gguf_tokenizer_is_read():
    _, _, tokenizer = our_logits("qwen2")
    ids = tokenizer.encode("the capital of france is paris")
    assert tokenizer.decode(ids) == "the capital of france is paris" and len(ids) < 30


@pytest.mark.parametrize("name", sorted(n for n, m in MANIFEST.items() if "sentencepiece_ids" in m))
def test_a_sentencepiece_gguf_tokenizer_encodes_as_sentencepiece(name):
    """Phi-3's vocabulary prepends a space, Gemma 2's does not; texts with space runs and
    characters the vocabulary spells as bytes."""
    _, _, tokenizer = our_logits(name)
    for text, ids in MANIFEST[name]["sentencepiece_ids"].items():
        assert tokenizer.encode(text) == ids, text
        assert tokenizer.decode(ids) == text
