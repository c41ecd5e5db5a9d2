"""Tests for flover_jax.tokenizer against Hugging Face transformers on the real SmolLM2 GGUF.

Known discrepancy (see test_smollm_digits_are_split_like_llama_cpp): transformers' GGUF
loader ignores `tokenizer.ggml.pre == "smollm"` and splits text with the plain GPT-2 regex,
while llama.cpp and SmolLM2's own tokenizer.json first isolate every number character
(`\\p{N}`). Ours follows llama.cpp; the strings where that matters are kept apart in
HF_DIFFERS and checked against HF's tokenizer with the pre-tokenizer corrected.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import gguf
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import pre_tokenizers

from flover_jax.tokenizer import IncrementalDecoder, Tokenizer

# Strings on which HF's GGUF tokenizer is right, so ours must equal it exactly.
STRINGS = [
    "",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "It's what they'll do; we've said I'm sure you'd agree.",
    "Ünïcödé: café, naïve, façade, São Paulo, Đorđe, Ελληνικά, Привет мир",
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "emoji 😀🎉👍🏽 and ZWJ: 👩‍👩‍👧‍👦 👨‍💻 🏳️‍🌈 ❤️‍🔥",
    "def f(x):\n\treturn x  # tab-indented\n\n    if x:\n        pass\n",
    "a    b\n\n\n\nc   \n \t \n",
    "        \n\n\n",
    "12345 3.14159",
    "year 2024, price $19.99, +1-555-0100, 1e-9, 0xFF",
    "x=1;y=22;z=333",
    "<|im_start|>user\nHi<|im_end|>",
    "<|im_start|><|im_end|><|endoftext|><file_sep>",
    "not <|a special|> token, <|im_start incomplete",
    "URL: https://example.com/path?q=1&r=%20#frag",
    "Mixed\r\nline\rendings\n",
    "ALL CAPS and camelCaseIdentifiers_with_underscores",
    "«guillemets» — em dash – en dash … ellipsis “quotes” ‘single’",
    "math: ∑ ∫ √ ≤ ≥ ≠ ∞ π",
    "\u00a0non-breaking\u2003em-space\u200bzero-width",
]

# Whitespace runs before a digit, and a space before a non-ASCII number character: the GPT-2
# regex glues those to the number (" ?\p{N}+", "\s+(?!\S)"), llama.cpp's "smollm" does not.
HF_DIFFERS = [
    "a  1",
    "  42",
    "x\n\n2",
    "foo\n 1",
    "value:    7",
    "list:\n\n1. one\n2. two",
    "²³ ½¾ ①② ٣٤",
    "price 100\t\t200",
]

STREAM_STRINGS = [
    "emoji 😀🎉👍🏽 and ZWJ: 👩‍👩‍👧‍👦 👨‍💻 🏳️‍🌈",
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "mixed café 😀 中文 ∑ 🏳️‍🌈 end",
]

CONVERSATIONS = [
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3? 😀"},
    ],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour.\nJust one."},
    ],
]


@pytest.fixture(scope="module")
def gguf_path():
    from models.presets import smollm2_gguf_path

    return smollm2_gguf_path()


@pytest.fixture(scope="module")
def tok(gguf_path) -> Tokenizer:
    return Tokenizer.from_gguf(gguf_path)


@pytest.fixture(scope="module")
def hf(gguf_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name
    )


@pytest.fixture(scope="module")
def hf_fixed(hf):
    """HF's tokenizer with the pre-tokenizer SmolLM2's tokenizer.json (and llama.cpp) use."""
    backend = copy.deepcopy(hf.backend_tokenizer)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    return backend


def hf_ids(hf, text: str) -> list[int]:
    return hf.encode(text, add_special_tokens=True)


# -- metadata ------------------------------------------------------------------------------


@pytest.mark.smollm2
def test_gguf_metadata(tok: Tokenizer):
    assert tok.vocab_size == 49152
    assert tok.bos_token_id == 1
    assert tok.eos_token_ids == (2,)
    assert tok.token_to_id("<|im_end|>") == 2
    assert tok.token_to_id("<|im_start|>") == 1
    assert tok.token_to_id("no such token") is None
    assert tok.chat_template is not None and "<|im_start|>" in tok.chat_template
    assert tok.encode("<|im_start|>user") == [1, tok.token_to_id("user")]  # no BOS added


# -- ids against transformers --------------------------------------------------------------


@pytest.mark.smollm2
@pytest.mark.parametrize("text", STRINGS)
def test_ids_match_hf(tok: Tokenizer, hf, text: str):
    assert tok.encode(text) == hf_ids(hf, text)


@pytest.mark.smollm2
@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_chat_template_ids_match_hf(tok: Tokenizer, hf, conversation):
    prompt = tok.apply_chat_template(conversation)
    ids = tok.encode(prompt)
    assert ids == hf_ids(hf, prompt)
    assert ids[0] == tok.token_to_id("<|im_start|>")


@pytest.mark.smollm2
@pytest.mark.parametrize("text", STRINGS + HF_DIFFERS)
def test_ids_match_smollm_pre_tokenizer(tok: Tokenizer, hf_fixed, text: str):
    """Everywhere, ours equals HF's vocabulary run through SmolLM2's real pre-tokenizer."""
    assert tok.encode(text) == hf_fixed.encode(text).ids


@pytest.mark.smollm2
def test_smollm_digit_split_by_hand(tok: Tokenizer):
    # llama.cpp: "\p{N}" isolates the digit first, so "  " stays one piece and merges to "ĠĠ".
    pieces = [tok.id_to_token(i) for i in tok.encode("a  1")]
    assert pieces == ["a", "ĠĠ", "1"]
    assert [tok.id_to_token(i) for i in tok.encode("x\n\n2")] == ["x", "ĊĊ", "2"]
    assert [tok.id_to_token(i) for i in tok.encode("12345")] == list("12345")


# -- round trips ---------------------------------------------------------------------------


@pytest.mark.smollm2
@pytest.mark.parametrize("text", STRINGS + HF_DIFFERS)
def test_roundtrip(tok: Tokenizer, text: str):
    assert tok.decode(tok.encode(text)) == text


def _representable(tok: Tokenizer):
    """Characters all of whose UTF-8 bytes have a token.

    SmolLM2's vocabulary lacks the bytes 0x04 0x06 0x13 0x14 0x16 0x1D (and the lead bytes
    0xF1 0xF2 of U+40000..U+BFFFF); llama.cpp and transformers both drop those silently.
    """
    from flover_jax.tokenizer import _bytes_to_unicode

    alphabet = _bytes_to_unicode()
    missing = {b for b in range(256) if tok.token_to_id(alphabet[b]) is None}
    return lambda c: not (set(c.encode("utf-8")) & missing)


@pytest.mark.smollm2
def test_unrepresentable_bytes_are_dropped(tok: Tokenizer, hf):
    text = "a\x04b"
    assert tok.encode(text) == hf_ids(hf, text) == [tok.token_to_id("a"), tok.token_to_id("b")]
    assert tok.decode(tok.encode(text)) == "ab"


@pytest.mark.smollm2
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_roundtrip_property(tok: Tokenizer, data):
    text = data.draw(st.text(alphabet=st.characters(codec="utf-8").filter(_representable(tok))))
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    stream = IncrementalDecoder(tok)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text


# -- chat templates ------------------------------------------------------------------------


@pytest.mark.smollm2
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_apply_chat_template_matches_hf(tok: Tokenizer, hf, conversation, add_generation_prompt):
    ours = tok.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    theirs = hf.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours == theirs
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt


def test_apply_chat_template_without_template_raises():
    tok = _tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_chat_template_is_sandboxed():
    tok = _tiny_tokenizer()
    tok.chat_template = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(Exception, match="unsafe|not safely|access"):
        tok.apply_chat_template([])
    tok.chat_template = "{{ raise_exception('bad role') }}"
    with pytest.raises(Exception, match="bad role"):
        tok.apply_chat_template([])


# -- from_file -----------------------------------------------------------------------------


@pytest.mark.smollm2
def test_from_file_matches_hf(tok: Tokenizer, hf, tmp_path):
    hf.save_pretrained(tmp_path)
    loaded = Tokenizer.from_file(tmp_path)
    # The tokenizer.json transformers writes carries its GPT-2-only pre-tokenizer, so here
    # HF's ids are the reference on every string, HF_DIFFERS included.
    for text in STRINGS + HF_DIFFERS:
        assert loaded.encode(text) == hf_ids(hf, text), text
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.bos_token_id == hf.bos_token_id
    assert loaded.eos_token_ids == (hf.eos_token_id,)
    assert loaded.chat_template == tok.chat_template
    assert loaded.apply_chat_template(CONVERSATIONS[0]) == tok.apply_chat_template(CONVERSATIONS[0])
    by_file = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert by_file.encode(STRINGS[6]) == loaded.encode(STRINGS[6])


def test_from_file_reads_configs_beside_it(tmp_path):
    tiny = _tiny_tokenizer(add_bos=False)
    assert tiny.encode("ab") == [4]
    tiny.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        '{"bos_token": {"content": "<s>"}, "eos_token": "</s>", "add_bos_token": true,'
        ' "chat_template": [{"name": "default", "template": "{{ messages[0].content }}"}]}'
    )
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [3, 2]}')
    loaded = Tokenizer.from_file(tmp_path)
    assert loaded.bos_token_id == 0
    assert loaded.eos_token_ids == (1, 3, 2)  # tokenizer_config first, then generation_config
    assert loaded.encode("ab") == [0, 4]  # add_bos_token in tokenizer_config adds BOS
    assert loaded.apply_chat_template([{"role": "user", "content": "x"}]) == "x"


def test_from_file_missing_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "tokenizer.json")):
        Tokenizer.from_file(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        Tokenizer.from_file(bad)


# -- streaming -----------------------------------------------------------------------------


@pytest.mark.smollm2
@pytest.mark.parametrize("text", STREAM_STRINGS)
def test_incremental_decoder(tok: Tokenizer, text: str):
    ids = tok.encode(text)
    stream = IncrementalDecoder(tok)
    pieces = [stream.push(i) for i in ids]
    tail = stream.flush()
    assert "".join(pieces) + tail == tok.decode(ids) == text
    assert tail == ""
    assert not any("\ufffd" in p for p in pieces)
    # Multi-byte characters span tokens here, so some pushes must have held text back.
    assert "" in pieces


@pytest.mark.smollm2
def test_incremental_decoder_skip_special(tok: Tokenizer):
    ids = tok.encode(tok.apply_chat_template(CONVERSATIONS[1]))
    stream = IncrementalDecoder(tok, skip_special_tokens=True)
    text = "".join(stream.push(i) for i in ids) + stream.flush()
    assert text == tok.decode(ids, skip_special_tokens=True)
    assert "<|im_start|>" not in text


@pytest.mark.smollm2
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_incremental_decoder_arbitrary_ids(tok: Tokenizer, data):
    """Any id sequence, split UTF-8 and invalid bytes included, streams to decode(ids)."""
    from flover_jax.tokenizer import _bytes_to_unicode

    byte_ids = [tok.token_to_id(c) for c in _bytes_to_unicode().values()]
    pool = st.one_of(
        st.sampled_from([i for i in byte_ids if i is not None]),  # lone (partial) bytes
        st.integers(0, tok.vocab_size - 1),
    )
    ids = data.draw(st.lists(pool, max_size=24))
    stream = IncrementalDecoder(tok)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tok.decode(ids)


# -- GGUF errors and other pre-tokenizers --------------------------------------------------


def _write_gguf(path, model: str = "gpt2", pre: str | None = "gpt-2", add_bos: bool = False):
    """A tensor-less GGUF whose tokenizer knows a, b, ab, Ġ, 1, 2, 3 and <s> </s>."""
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(["<s>", "</s>", "a", "b", "ab", "Ġ", "1", "2", "3", "12", "123"])
    writer.add_token_types([3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    writer.add_token_merges(["a b", "1 2", "12 3"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template("{% for m in messages %}{{ bos_token }}{{ m.content }}{% endfor %}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path


def _tiny_tokenizer(add_bos: bool = True) -> Tokenizer:
    with tempfile.TemporaryDirectory() as d:
        return Tokenizer.from_gguf(_write_gguf(Path(d) / "tiny.gguf", add_bos=add_bos))


def test_tiny_gguf(tmp_path):
    tok = Tokenizer.from_gguf(_write_gguf(tmp_path / "tiny.gguf", add_bos=True))
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_ids) == (11, 0, (1,))
    assert tok.encode("ab</s>ab") == [0, 4, 1, 4]  # BOS from add_bos_token, </s> matched whole
    assert tok.decode(tok.encode("ab</s>ab"), skip_special_tokens=True) == "abab"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<s>hi"
    reader = gguf.GGUFReader(str(tmp_path / "tiny.gguf"))
    assert Tokenizer.from_gguf(reader).encode("ab") == [0, 4]


def test_a_rendered_chat_prompt_gets_one_bos(tmp_path):
    """The template writes BOS and the post-processor adds one: encoding keeps one, as
    transformers (which encodes chat prompts without special tokens) and llama.cpp do."""
    tok = Tokenizer.from_gguf(_write_gguf(tmp_path / "tiny.gguf", add_bos=True))
    prompt = tok.apply_chat_template([{"role": "user", "content": "ab"}])
    assert prompt == "<s>ab" and tok.encode(prompt) == [0, 4] == tok.encode("ab")
    assert tok.encode("ab<s>ab") == [0, 4, 0, 4]  # only a leading duplicate goes


def test_chat_template_drops_none_fields_and_renders_generation_blocks(tmp_path):
    tok = Tokenizer(_tiny_tokenizer().backend, bos_token_id=0, chat_template=(
        "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}"
        "{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}"
        "{{ m.tool_calls | default('') }}|{% endfor %}"))
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": None, "tool_calls": "f()"}]
    assert tok.apply_chat_template(messages) == "hi|f()|"  # content None: absent, not "None"


def test_gguf_pre_tokenizers(tmp_path):
    gpt2 = Tokenizer.from_gguf(_write_gguf(tmp_path / "gpt2.gguf", pre="gpt-2"))
    assert gpt2.encode("123") == [10]
    smollm = Tokenizer.from_gguf(_write_gguf(tmp_path / "smollm.gguf", pre="smollm"))
    assert smollm.encode("123") == [6, 7, 8]
    llama3 = Tokenizer.from_gguf(_write_gguf(tmp_path / "llama3.gguf", pre="llama-bpe"))
    split = llama3.backend.pre_tokenizer.pre_tokenize_str("12345")
    assert [piece for piece, _ in split] == ["123", "45"]
    with pytest.warns(UserWarning, match="'mystery'"):
        unknown = Tokenizer.from_gguf(_write_gguf(tmp_path / "unknown.gguf", pre="mystery"))
    assert unknown.encode("123") == [10]  # falls back to the GPT-2 split


def test_gguf_unsupported_model_raises(tmp_path):
    path = _write_gguf(tmp_path / "ugm.gguf", model="t5")
    with pytest.raises(ValueError, match=r"ugm\.gguf.*'t5'; supported: 'gpt2'.*'llama'"):
        Tokenizer.from_gguf(path)


def test_gguf_missing_file_raises(tmp_path):
    path = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        Tokenizer.from_gguf(path)


def test_gguf_not_a_gguf_raises(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"not a gguf file at all" * 4)
    with pytest.raises(ValueError, match="junk.gguf"):
        Tokenizer.from_gguf(path)
