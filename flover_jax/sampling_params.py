"""SamplingParams: what a request asks of the sampler, as its caller states it (host side).

The device sampler that carries these settings out, a row per slot, is `flover_jax.sampling`;
this module holds only the public, validated settings.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import numpy as np

_MAX_INT32 = 2**31 - 1
MAX_SEED = _MAX_INT32  # seeds live in an int32 device array
MAX_TOP_LOGPROBS = 20  # alternatives a token may report (OpenAI's most); a static device size
_MAX_FLOAT32 = float(np.finfo(np.float32).max)  # settings live in float32 device arrays


def _is_int(value: Any) -> bool:
    # bool is an int subclass but `top_k=True` is a bug, not a setting.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Public per-request sampling settings (host side, hashable).

    `repetition_penalty` follows HF: logits of tokens seen in the prompt or the
    output are divided by it when positive and multiplied when negative.
    `presence_penalty` and `frequency_penalty` follow OpenAI / vLLM: the logit of a token
    already generated k times loses presence_penalty + k * frequency_penalty (output only,
    not the prompt).
    """

    max_new_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off
    presence_penalty: float = 0.0  # 0 = off
    frequency_penalty: float = 0.0  # 0 = off
    seed: int = 0
    stop: tuple[str, ...] = ()  # stop strings
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False  # return each token's log-probability under the model
    top_logprobs: int = 0  # and this many most likely alternatives at each step

    def __post_init__(self) -> None:
        # Accept lists (e.g. from JSON) but store tuples: frozen + hashable.
        for name in ("stop", "stop_token_ids"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))

    def validate(self) -> None:
        """Raise ValueError naming the field, its bad value and what is allowed."""

        def bad(name: str, value: Any, allowed: str) -> ValueError:
            return ValueError(f"{name}={value!r}: {allowed}")

        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", self.max_new_tokens, "must be an int >= 1")
        # `not (x >= 0)` also rejects NaN; values must also fit the device arrays.
        if not _is_real(self.temperature) or not (0 <= self.temperature <= _MAX_FLOAT32):
            raise bad("temperature", self.temperature,
                      "must be >= 0 and finite in float32 (0 = greedy)")
        if not _is_int(self.top_k) or not (0 <= self.top_k <= _MAX_INT32):
            raise bad("top_k", self.top_k, f"must be an int in [0, {_MAX_INT32}] (0 disables)")
        if not _is_real(self.top_p) or not (0 < self.top_p <= 1):
            raise bad("top_p", self.top_p, "must be in (0, 1] (1 disables)")
        if not _is_real(self.repetition_penalty) or not (
            0 < self.repetition_penalty <= _MAX_FLOAT32
        ):
            raise bad("repetition_penalty", self.repetition_penalty,
                      "must be > 0 and finite in float32 (1 disables)")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_real(value) or not abs(value) <= _MAX_FLOAT32:
                raise bad(name, value, "must be a number finite in float32")
        if not _is_int(self.seed) or not (0 <= self.seed <= MAX_SEED):
            raise bad("seed", self.seed, f"must be an int in [0, {MAX_SEED}]")
        if not isinstance(self.stop, tuple):
            raise bad("stop", self.stop, "must be a tuple or list of strings")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise bad("stop", self.stop, f"entries must be non-empty strings, got {s!r}")
        if not isinstance(self.stop_token_ids, tuple):
            raise bad("stop_token_ids", self.stop_token_ids, "must be a tuple or list of ints")
        for t in self.stop_token_ids:
            if not _is_int(t) or t < 0:
                raise bad(
                    "stop_token_ids", self.stop_token_ids, f"entries must be ints >= 0, got {t!r}"
                )
        if not _is_int(self.top_logprobs) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise bad("top_logprobs", self.top_logprobs,
                      f"must be an int in [0, {MAX_TOP_LOGPROBS}] (0: none)")
        for name in ("ignore_eos", "logprobs"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, getattr(self, name), "must be a bool")
