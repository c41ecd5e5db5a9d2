"""Text <-> token ids, chat templates and streaming detokenization.

Everything runs on the Rust `tokenizers` library; this module only assembles a
`tokenizers.Tokenizer` from what a model ships with and adds what serving needs
on top of it:

* `Tokenizer.from_file(path)`: a Hugging Face `tokenizer.json` (or its folder).
  Special ids and the chat template come from `tokenizer_config.json`,
  `chat_template.jinja`, `config.json` and `generation_config.json` beside it.
* `Tokenizer.from_gguf(path_or_reader)`: the tokenizer described by a GGUF
  file's `tokenizer.*` metadata: byte-level BPE (`tokenizer.ggml.model == "gpt2"`)
  or SentencePiece BPE ("llama": Llama 2, Gemma, Phi-3). The byte-level
  pre-tokenizer follows llama.cpp's `tokenizer.ggml.pre` table (see
  `_PRE_TOKENIZER_SPLITS`); an unknown name falls back to the plain GPT-2 regex
  with a warning, since that is what llama.cpp does for "default" and what most
  byte-level vocabularies were trained with.
* `Tokenizer.apply_chat_template`: the model's Jinja chat template, rendered in
  a sandbox with the same environment and helpers as `transformers`.
* `IncrementalDecoder`: token-by-token text for streaming that never emits half
  a UTF-8 character and whose pieces add up to `Tokenizer.decode` of the whole.
"""

from __future__ import annotations

import functools
import json
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

__all__ = ["IncrementalDecoder", "Tokenizer"]

# llama.cpp token types (`tokenizer.ggml.token_type`).
_TOKEN_TYPE_NORMAL = 1
_TOKEN_TYPE_UNKNOWN = 2
_TOKEN_TYPE_CONTROL = 3  # special tokens such as <|im_start|>: matched whole, skippable in decode
_TOKEN_TYPE_USER_DEFINED = 4  # added tokens that are not special: matched whole, always decoded
_SPACE = "\u2581"  # SentencePiece's spelling of a space

# The GPT-2 split, as the `ByteLevel` pre-tokenizer applies it with `use_regex=True`.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# `tokenizer.ggml.pre` -> how text is split before BPE, after llama.cpp's
# `llama_vocab::impl::load` (llama-vocab.cpp). "digits+gpt2" is llama.cpp's
# {"\p{N}", GPT-2 regex}: every number character alone, then the GPT-2 split,
# which is what the original tokenizer.json files express as
# Sequence[Digits(individual_digits=True), ByteLevel(use_regex=True)].
_DIGITS_THEN_GPT2 = "digits+gpt2"
_PRE_TOKENIZER_SPLITS: dict[str, str] = {
    "default": _GPT2_SPLIT,
    "gpt-2": _GPT2_SPLIT,
    "gpt2": _GPT2_SPLIT,
    "mpt": _GPT2_SPLIT,
    "olmo": _GPT2_SPLIT,
    "jais": _GPT2_SPLIT,
    "smollm": _DIGITS_THEN_GPT2,
    "starcoder": _DIGITS_THEN_GPT2,
    "refact": _DIGITS_THEN_GPT2,
    "command-r": _DIGITS_THEN_GPT2,
    "codeshell": _DIGITS_THEN_GPT2,
    "exaone": _DIGITS_THEN_GPT2,
    "minerva-7b": _DIGITS_THEN_GPT2,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}


class UnsupportedTokenizer(ValueError):
    """A GGUF file carries no tokenizer, or one of a kind we cannot build."""


# The ids llama.cpp stops generating at: end of sequence, of turn, of message.
GGUF_STOP_KEYS = tuple(f"tokenizer.ggml.{kind}_token_id" for kind in ("eos", "eot", "eom"))


def gguf_stop_ids(field: Callable[[str], Any]) -> tuple[int, ...]:
    """The distinct stop ids of a GGUF file, given its metadata reader `field(key)`."""
    ids = (field(key) for key in GGUF_STOP_KEYS)
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the model's special ids and chat template.

    `encode` adds special tokens only where the source asks for them (the
    tokenizer.json post-processor, or a GGUF's `add_bos_token`/`add_eos_token`).
    """

    # What `from_file` reads beside config.json (`save` writes the first three).
    FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
             "chat_template.jinja")

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None = None,
        eos_token_ids: Iterable[int] = (),
        chat_template: str | None = None,
        source: str = "<memory>",
    ) -> None:
        self._tokenizer = tokenizer
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_token_id: int | None = bos_token_id
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(int(i) for i in eos_token_ids))
        self.chat_template: str | None = chat_template
        self.source = source  # named in error messages

    def __repr__(self) -> str:
        return (
            f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, "
            f"bos_token_id={self.bos_token_id}, eos_token_ids={self.eos_token_ids})"
        )

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._tokenizer

    # -- text <-> ids -----------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in the text are matched whole.

        A byte with no token in a byte-level vocabulary (SmolLM2 lacks e.g. 0x04) is
        dropped, as llama.cpp and transformers do. Text that begins with BOS (a chat template
        writes one) gets no second BOS from the post-processor, as llama.cpp does.
        """
        check_unicode("text", text)
        return self._one_bos(self._tokenizer.encode(text).ids, text)

    def _one_bos(self, ids: list[int], text: str) -> list[int]:
        bos = self.bos_token_id
        if bos is not None and ids[:2] == [bos, bos]:
            written = self.id_to_token(bos)  # None for an id the vocabulary lacks
            if written and text.startswith(written):
                return ids[1:]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; an incomplete UTF-8 sequence decodes to U+FFFD."""
        ids = [int(i) for i in ids]  # numpy/jax integers are not accepted by tokenizers
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """The id of a token as the vocabulary spells it (e.g. "<|im_end|>", "Ġthe")."""
        return self._tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tokenizer.id_to_token(token_id)

    # -- chat -------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> str:
        """Render `messages` with the model's chat template, as transformers' tokenize=False.

        Extra keyword arguments reach the template as variables (e.g. `tools`).
        """
        if not self.chat_template:
            raise ValueError(f"{self.source}: this tokenizer has no chat template")
        variables: dict[str, Any] = {"tools": None, "documents": None}
        # transformers passes its special tokens as strings; templates use e.g. {{ bos_token }}.
        for name, token_id in (("bos_token", self.bos_token_id), ("eos_token", self._first_eos())):
            if token_id is not None:
                variables[name] = self.id_to_token(token_id)
        variables.update(template_kwargs)
        # As transformers: a field set to None (an assistant turn's content beside its tool
        # calls) is absent, not the text "None".
        messages = [{key: value for key, value in m.items() if value is not None} for m in messages]
        return _compile_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables
        )

    def _first_eos(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> list[int]:
        """Token ids of `messages` in the chat template, where what the messages say stays text:
        a special token written in a message (`<|im_end|>`, say) is encoded as the characters
        it is made of, so a user cannot end their turn or open a system one; the template's
        own special tokens stay special (as transformers' chat pipeline and vLLM). Messages
        without special tokens in them get `encode(apply_chat_template(...))` exactly.

        How: each special token's text in the messages is swapped for one private-use
        character before rendering; the rendered text is cut at the special tokens left (the
        template's), and the pieces between, swapped back, are encoded with special tokens
        read as text.
        """
        specials = self._special_token_texts()
        if not specials:
            text = self.apply_chat_template(messages, add_generation_prompt, **template_kwargs)
            return self.encode(text)
        strings = list(_strings(messages))
        for i, string in enumerate(strings):
            check_unicode(f"messages string {i}", string)
        base = _placeholder_base(strings, len(specials))
        escape = {text: chr(base + i) for i, text in enumerate(specials)}
        unescape = str.maketrans({chr(base + i): text for i, text in enumerate(specials)})
        matcher = re.compile("|".join(map(re.escape, specials)))  # longest first wins
        escaped = _map_strings(messages, lambda value: matcher.sub(lambda m: escape[m[0]], value))
        text = self.apply_chat_template(escaped, add_generation_prompt, **template_kwargs)
        pieces, start = [], 0
        for match in matcher.finditer(text):
            pieces.append(self._as_text.encode(text[start:match.start()].translate(unescape),
                                               add_special_tokens=False))
            pieces.append(self._tokenizer.encode(match[0], add_special_tokens=False))
            start = match.end()
        pieces.append(self._as_text.encode(text[start:].translate(unescape),
                                           add_special_tokens=False))
        encoding = self._tokenizer.post_process(tokenizers.Encoding.merge(pieces))
        return self._one_bos(encoding.ids, text)

    def _special_token_texts(self) -> list[str]:
        """The special tokens' texts, longest first (so an alternation matches the longest)."""
        added = self._tokenizer.get_added_tokens_decoder().values()
        return sorted({t.content for t in added if t.special and t.content}, key=len, reverse=True)

    @functools.cached_property
    def _as_text(self) -> tokenizers.Tokenizer:
        """A copy that reads special tokens written in text as plain text."""
        copy = tokenizers.Tokenizer.from_str(self._tokenizer.to_str())
        copy.encode_special_tokens = True
        return copy

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and generation_config.json; `from_file`
        reads them back to an identical tokenizer."""
        directory = Path(directory)
        self._tokenizer.save(str(directory / "tokenizer.json"))
        names = {
            "bos_token": self.id_to_token(self.bos_token_id) if self.bos_token_id is not None else None,
            "eos_token": self.id_to_token(self.eos_token_ids[0]) if self.eos_token_ids else None,
            "chat_template": self.chat_template,
        }
        config = {key: value for key, value in names.items() if value is not None}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        ids = {"bos_token_id": self.bos_token_id, "eos_token_id": list(self.eos_token_ids)}
        (directory / "generation_config.json").write_text(json.dumps(ids, indent=2))

    # -- loading ----------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a Hugging Face `tokenizer.json` (the file or the folder holding it)."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no such tokenizer.json")
        try:
            tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust error says what is wrong but not where
            raise ValueError(f"{file}: not a valid tokenizer.json: {e}") from e
        folder = file.parent
        tok_config = _read_json(folder / "tokenizer_config.json")
        model_config = _read_json(folder / "config.json")
        gen_config = _read_json(folder / "generation_config.json")

        def token_id(value: Any) -> int | None:
            # tokenizer_config writes a token as "<s>" or {"content": "<s>", ...}
            if isinstance(value, Mapping):
                value = value.get("content")
            return tok.token_to_id(value) if isinstance(value, str) else None

        bos = token_id(tok_config.get("bos_token"))
        for cfg in (model_config, gen_config):
            if bos is None and isinstance(cfg.get("bos_token_id"), int):
                bos = cfg["bos_token_id"]
        eos: list[int] = []
        if (eos_id := token_id(tok_config.get("eos_token"))) is not None:
            eos.append(eos_id)
        for cfg in (model_config, gen_config):
            value = cfg.get("eos_token_id")
            if isinstance(value, int):
                eos.append(value)
            elif isinstance(value, list):
                eos.extend(v for v in value if isinstance(v, int))

        # An explicit add_bos/add_eos in tokenizer_config wins over tokenizer.json, as in
        # transformers.
        if "add_bos_token" in tok_config or "add_eos_token" in tok_config:
            add_bos = bool(tok_config.get("add_bos_token")) and bos is not None
            eos_first = eos[0] if eos else None
            add_eos = bool(tok_config.get("add_eos_token")) and eos_first is not None
            if add_bos or add_eos or tok.post_processor is not None:
                tok.post_processor = _special_tokens_processor(
                    tok, bos if add_bos else None, eos_first if add_eos else None
                )

        return cls(
            tok,
            bos_token_id=bos,
            eos_token_ids=eos,
            chat_template=_chat_template_beside(folder, tok_config),
            source=str(file),
        )

    @classmethod
    def from_gguf(cls, path_or_reader: str | Path | Any) -> Tokenizer:
        """Build the tokenizer described by a GGUF file's metadata."""
        import gguf  # imported here: only GGUF loading needs it

        if isinstance(path_or_reader, gguf.GGUFReader):
            reader = path_or_reader
            source = str(getattr(reader.data, "filename", None) or "<GGUFReader>")
        else:
            source = str(path_or_reader)
            if not Path(source).is_file():
                raise FileNotFoundError(f"{source}: no such GGUF file")
            try:
                reader = gguf.GGUFReader(source)
            except Exception as e:
                raise ValueError(f"{source}: cannot read as GGUF: {e}") from e

        def field(key: str, default: Any = None) -> Any:
            f = reader.get_field(key)
            return default if f is None else f.contents()

        model_type = field("tokenizer.ggml.model")
        if model_type is None:
            raise UnsupportedTokenizer(
                f"{source}: the GGUF has no tokenizer (no tokenizer.ggml.model)")
        if model_type not in _GGUF_TOKENIZER_MODELS:
            raise UnsupportedTokenizer(
                f"{source}: tokenizer.ggml.model is {model_type!r}; supported: 'gpt2' "
                "(byte-level BPE) and 'llama' (SentencePiece BPE)"
            )
        tokens: list[str] = field("tokenizer.ggml.tokens") or []
        if not tokens:
            raise ValueError(f"{source}: tokenizer.ggml.tokens is missing")
        token_types: list[int] = field("tokenizer.ggml.token_type") or [1] * len(tokens)
        if len(token_types) != len(tokens):
            raise ValueError(
                f"{source}: {len(token_types)} token types for {len(tokens)} tokens"
            )
        tok, vocab = _GGUF_TOKENIZER_MODELS[model_type](field, tokens, token_types, source)
        # Added tokens are matched in raw text before pre-tokenization, as llama.cpp does
        # for CONTROL and USER_DEFINED tokens (so "<|im_start|>" is one id, never pieces).
        tok.add_special_tokens(
            [
                AddedToken(t, special=True, normalized=False)
                for t, ty in zip(tokens, token_types)
                if ty == _TOKEN_TYPE_CONTROL and vocab.get(t) is not None
            ]
        )
        tok.add_tokens(
            [
                AddedToken(t, special=False, normalized=False)
                for t, ty in zip(tokens, token_types)
                if ty == _TOKEN_TYPE_USER_DEFINED and vocab.get(t) is not None
            ]
        )
        if tok.get_vocab_size(with_added_tokens=True) != len(vocab):
            raise ValueError(f"{source}: added tokens changed the vocabulary size")

        bos = field("tokenizer.ggml.bos_token_id")
        eos = field("tokenizer.ggml.eos_token_id")
        for key in ("tokenizer.ggml.bos_token_id", *GGUF_STOP_KEYS):
            if (value := field(key)) is not None and not 0 <= value < len(tokens):
                raise ValueError(f"{source}: {key} {value} is out of range")
        add_bos = bool(field("tokenizer.ggml.add_bos_token", False)) and bos is not None
        add_eos = bool(field("tokenizer.ggml.add_eos_token", False)) and eos is not None
        if add_bos or add_eos:
            tok.post_processor = _special_tokens_processor(
                tok, bos if add_bos else None, eos if add_eos else None
            )

        return cls(
            tok,
            bos_token_id=bos,
            eos_token_ids=gguf_stop_ids(field),
            chat_template=field("tokenizer.chat_template"),
            source=source,
        )


def _gguf_byte_level_bpe(
    field: Callable[..., Any], tokens: list[str], token_types: list[int], source: str
) -> tuple[tokenizers.Tokenizer, dict[str, int]]:
    """`tokenizer.ggml.model == "gpt2"`: byte-level BPE over the file's merges, text split as
    `tokenizer.ggml.pre` says."""
    merges_raw: list[str] = field("tokenizer.ggml.merges") or []
    if not merges_raw:
        raise ValueError(f"{source}: tokenizer.ggml.merges is missing")
    merges: list[tuple[str, str]] = []
    for i, merge in enumerate(merges_raw):
        left, sep, right = merge.partition(" ")
        if not sep or not left or not right or " " in right:
            raise ValueError(f"{source}: merge #{i} {merge!r} is not 'left right'")
        merges.append((left, right))

    # Normal tokens are spelled in the GPT-2 byte alphabet; llama.cpp sometimes stores
    # others as plain text, so re-spell those (a vocabulary key the BPE can produce).
    # Control/user-defined tokens keep their text: added tokens find their id by it.
    alphabet = _bytes_to_unicode()
    spelled = set(alphabet.values())
    vocab: dict[str, int] = {}
    for i, (token, ttype) in enumerate(zip(tokens, token_types, strict=True)):
        added = ttype in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED)
        if not added and not set(token) <= spelled:
            token = "".join(alphabet[b] for b in token.encode("utf-8"))
        # A duplicate keeps its first id; any later copy is unreachable, as in llama.cpp's BPE.
        vocab.setdefault(token, i)

    tok = tokenizers.Tokenizer(
        models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
    )
    tok.pre_tokenizer = _byte_level_pre_tokenizer(field("tokenizer.ggml.pre") or "default", source)
    tok.decoder = decoders.ByteLevel()
    return tok, vocab


def _gguf_sentencepiece_bpe(
    field: Callable[..., Any], tokens: list[str], token_types: list[int], source: str
) -> tuple[tokenizers.Tokenizer, dict[str, int]]:
    """`tokenizer.ggml.model == "llama"`: SentencePiece BPE (Llama 2, Gemma, Phi-3), as
    llama.cpp runs it: spaces written as U+2581, one prepended to each stretch of text between
    special tokens where `add_space_prefix` says so, adjacent pieces merged best score first,
    characters without a piece spelled as <0xXX> byte tokens. The merges are the vocabulary's
    splits ranked by the merged piece's score, as transformers converts these vocabularies."""
    scores: list[float] = field("tokenizer.ggml.scores") or []
    if len(scores) != len(tokens):
        raise ValueError(f"{source}: {len(scores)} tokenizer.ggml.scores for {len(tokens)} tokens")
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    normal = {t: i for t, i in vocab.items() if token_types[i] == _TOKEN_TYPE_NORMAL}
    ranked = []
    for piece, i in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-scores[i], normal[left], normal[right], left, right))
    merges = [(left, right) for *_, left, right in sorted(ranked)]
    unknown = next((t for t, i in vocab.items() if token_types[i] == _TOKEN_TYPE_UNKNOWN), None)
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unknown,
                                          fuse_unk=True, byte_fallback=True))
    prefix = bool(field("tokenizer.ggml.add_space_prefix", True))
    spaces = normalizers.Replace(" ", _SPACE)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(_SPACE), spaces]) if prefix else spaces
    steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] if prefix else steps)
    return tok, vocab


_GGUF_TOKENIZER_MODELS = {"gpt2": _gguf_byte_level_bpe, "llama": _gguf_sentencepiece_bpe}


class IncrementalDecoder:
    """Turn a stream of token ids into text pieces, one `push` per token.

    Each push decodes only a short window: the tokens since the last-but-one
    emission (`prefix`) and the new ones. The text the window adds past the
    already-emitted prefix is released once it does not end in U+FFFD, i.e. once
    the last character's UTF-8 bytes are complete. Decoding the prefix too, and
    not just the new tokens, keeps decoders that treat the start of a text
    specially (e.g. sentencepiece's leading-space strip) consistent with
    `decode(all_ids)`; this is the scheme vLLM and TGI use.

    A text that really ends in U+FFFD (invalid bytes, or the character itself) is
    held until the next token or `flush`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # window start: a point where everything before was emitted
        self._read = 0  # tokens up to here have been emitted

    @property
    def token_ids(self) -> list[int]:
        return list(self._ids)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (maybe "")."""
        self._ids.append(int(token_id))
        return self._advance(final=False)

    def flush(self) -> str:
        """Return whatever is held back, incomplete characters included (as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        decode = self._tokenizer.decode
        prefix_text = decode(self._ids[self._prefix : self._read], self._skip)
        new_text = decode(self._ids[self._prefix :], self._skip)
        if not final and (len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd")):
            return ""  # nothing new yet, or the last character is still incomplete
        self._prefix, self._read = self._read, len(self._ids)
        return new_text[len(prefix_text) :]


# -- helpers -------------------------------------------------------------------------------


def check_unicode(name: str, text: str) -> None:
    """Text must be encodable as UTF-8: a lone surrogate (from a JSON "\\ud800", say) is not
    a character."""
    if not isinstance(text, str):
        raise ValueError(f"{name}={text!r}: must be a string")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name}: holds a lone surrogate U+{ord(text[e.start]):04X} at index "
                         f"{e.start}, which is not a character (text must be valid Unicode)") from None


def _strings(value: Any) -> Iterable[str]:
    """Every string inside messages (contents, names, parts of a list content)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


def _map_strings(value: Any, f: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return f(value)
    if isinstance(value, Mapping):
        return {key: _map_strings(item, f) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_map_strings(item, f) for item in value]
    return value


# Private-use planes 15 and 16: characters no tokenizer gives a meaning of its own.
_PRIVATE_USE = ((0xF0000, 0xFFFFD), (0x100000, 0x10FFFD))


def _placeholder_base(strings: Sequence[str], count: int) -> int:
    """The first of `count` private-use characters in a row that none of `strings` holds."""
    used = {ord(c) for s in strings for c in s if ord(c) >= _PRIVATE_USE[0][0]}
    for low, high in _PRIVATE_USE:
        base = low
        while base + count - 1 <= high:
            clash = [c for c in used if base <= c < base + count]
            if not clash:
                return base
            base = max(clash) + 1
    raise ValueError("messages: use so many private-use characters that none is left to mark "
                     "special tokens with")


def _byte_level_pre_tokenizer(pre: str, source: str) -> pre_tokenizers.PreTokenizer:
    split = _PRE_TOKENIZER_SPLITS.get(pre)
    if split is None:
        warnings.warn(
            f"{source}: tokenizer.ggml.pre {pre!r} is not known here; splitting text with the "
            "GPT-2 regex, which may tokenize some text differently from llama.cpp",
            stacklevel=3,
        )
        split = _GPT2_SPLIT
    if split == _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if split == _GPT2_SPLIT:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _special_tokens_processor(
    tok: tokenizers.Tokenizer, bos: int | None, eos: int | None
) -> processors.TemplateProcessing:
    """Post-processor that puts BOS before and/or EOS after each encoded text."""
    bos_text = tok.id_to_token(bos) if bos is not None else None
    eos_text = tok.id_to_token(eos) if eos is not None else None

    for text in (bos_text, eos_text):
        if text is not None and ":" in text:  # the template syntax is "piece:type_id"
            raise ValueError(f"cannot add special token {text!r} automatically: it contains ':'")

    def template(seq: str, type_id: int) -> list[str]:
        return [f"{t}:{type_id}" for t in (bos_text, seq, eos_text) if t is not None]

    specials = {t: i for t, i in ((bos_text, bos), (eos_text, eos)) if t is not None}
    return processors.TemplateProcessing(
        single=template("$A", 0),
        pair=template("$A", 0) + template("$B", 1),
        special_tokens=list(specials.items()),
    )


@functools.lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the alphabet byte-level vocabularies use)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _chat_template_beside(folder: Path, tok_config: Mapping[str, Any]) -> str | None:
    """The chat template saved with a tokenizer.

    transformers >= 4.47 writes it to chat_template.jinja; older versions put it in
    tokenizer_config.json, either as a string or as [{"name", "template"}, ...].
    """
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = tok_config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    return template if isinstance(template, str) else None


@functools.lru_cache(maxsize=16)
def _compile_template(source: str) -> Any:
    """Compile a chat template in the same sandboxed environment transformers uses."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        # Unlike jinja's own |tojson, this does not HTML-escape (as transformers).
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    class Generation(jinja2.ext.Extension):
        """{% generation %}...{% endgeneration %} marks an assistant's tokens for training
        (transformers); to serve, it renders its body as is."""

        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, Generation]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"chat template does not compile: {e}") from e
