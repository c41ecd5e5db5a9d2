"""A request's life on the host: its tokens, its streamed text, its stop checks, its timings.

Text is streamed safely: a piece is released only when it can no longer turn
out to be the start of a stop string, and never ends inside a UTF-8 character
(the IncrementalDecoder holds incomplete bytes back).
"""

from __future__ import annotations

import dataclasses
import enum

from flover_jax.sampling import Sampled
from flover_jax.sampling_params import SamplingParams
from flover_jax.tokenizer import IncrementalDecoder, Tokenizer


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_new_tokens or max_len reached
    CANCELLED = "cancelled"
    ERROR = "error"  # invalid request; `error` says why


@dataclasses.dataclass
class RequestOutput:
    """What a caller gets back for one request (also the `--output` JSONL record)."""

    request_id: int
    prompt_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str
    error: str | None
    arrival_s: float  # all times in seconds on the scheduler's clock
    admitted_s: float | None  # prefill dispatched (None: never admitted)
    first_token_s: float | None
    finished_s: float
    token_times_s: list[float]
    logprobs: list[float] | None = None  # per token, when the request asked for them
    # per token, its top_logprobs likeliest alternatives as (token id, log P), when asked
    top_logprobs: list[list[tuple[int, float]]] | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def latency_s(self) -> float:
        return self.finished_s - self.arrival_s


@dataclasses.dataclass
class StreamDelta:
    """New tokens and text of one request since the previous delta."""

    request_id: int
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    error: str | None = None  # why, when finish_reason is "error"
    logprobs: list[float] | None = None  # of token_ids, when the request asked for them
    top_logprobs: list[list[tuple[int, float]]] | None = None  # of token_ids, when asked
    output: RequestOutput | None = None  # on the last delta of `Engine.stream`: the whole output


def check_stop(request: Request, max_len: int) -> FinishReason | None:
    """Whether the request's newest token ends it, and why: the one place that decides (as
    vLLM's `check_stop`). In order: a stop token (EOS unless ignored, or a stop id), a stop
    string in the text, then its length (max_new_tokens, or the slot's max_len). The device
    keeps a copy of the token and length rules only to stop computing a finished row before
    the host has read it; cancels and errors end a request from the scheduler."""
    if request.token_ids[-1] in request.stop_ids:
        return FinishReason.STOP
    if request.push_text():
        return FinishReason.STOP
    generated = len(request.token_ids)
    if generated >= request.params.max_new_tokens or len(request.prompt_ids) + generated >= max_len:
        return FinishReason.LENGTH
    return None


class Request:
    """One generation request as the scheduler tracks it."""

    def __init__(
        self,
        request_id: int,
        prompt_ids: list[int],
        params: SamplingParams,
        arrival_s: float,
        tokenizer: Tokenizer | None = None,
        eos_ids: tuple[int, ...] = (),
    ) -> None:
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.arrival_s = arrival_s
        self.stop_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else frozenset(eos_ids)
        )
        self.token_ids: list[int] = []
        self.logprobs: list[float] | None = [] if params.logprobs else None
        self.top_logprobs: list[list[tuple[int, float]]] | None = (
            [] if params.top_logprobs else None)
        self.token_times_s: list[float] = []
        self.admitted_s: float | None = None
        self.first_token_s: float | None = None
        self.finished_s: float | None = None
        self.finish_reason: FinishReason | None = None
        self.error: str | None = None
        self._decoder = IncrementalDecoder(tokenizer) if tokenizer is not None else None
        self._text = ""  # decoded so far (stop string cut off once found)
        self._streamed_chars = 0
        self._streamed_tokens = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str | None:
        return None if self._decoder is None else self._text

    def add_token(self, sampled: Sampled, now_s: float, max_len: int) -> bool:
        """Record one generated token (a row of a step's `Sampled`: and its log-probabilities,
        if the request asked); returns True when it finishes the request (`check_stop`)."""
        self.token_ids.append(int(sampled.tokens))
        if self.logprobs is not None:
            self.logprobs.append(float(sampled.logprobs))
        if self.top_logprobs is not None:
            wanted = self.params.top_logprobs
            self.top_logprobs.append([(int(t), float(lp)) for t, lp in
                                      zip(sampled.top_ids[:wanted], sampled.top_logprobs[:wanted])])
        self.token_times_s.append(now_s)
        if self.first_token_s is None:
            self.first_token_s = now_s
        reason = check_stop(self, max_len)
        return reason is not None and self.finish(reason, now_s)

    def push_text(self) -> bool:
        """Decode the newest token into the text; True when a stop string now ends it (the text
        is cut there)."""
        if self._decoder is None:
            return False
        checked = len(self._text)
        self._text += self._decoder.push(self.token_ids[-1])
        return self._cut_at_stop_string(checked)

    def _cut_at_stop_string(self, checked: int) -> bool:
        """Cut the text at the first stop string; text[:checked] held none."""
        longest = max((len(s) for s in self.params.stop), default=0)
        if not longest:
            return False
        # A new match must end in the new text, so it starts at most longest - 1 before it.
        begin = max(0, checked - longest + 1)
        hits = [i for s in self.params.stop if (i := self._text.find(s, begin)) >= 0]
        if hits:
            self._text = self._text[: min(hits)]
            return True
        return False

    def finish(self, reason: FinishReason, now_s: float, error: str | None = None) -> bool:
        if self.finish_reason is None:
            if reason in (FinishReason.LENGTH, FinishReason.CANCELLED) and self._decoder:
                self._text += self._decoder.flush()
            self.finish_reason, self.finished_s, self.error = reason, now_s, error
        return True

    def _safe_text_end(self) -> int:
        """End of the text that no stop string can still claim."""
        if self.finished:
            return len(self._text)
        for keep in range(max((len(s) for s in self.params.stop), default=1) - 1, 0, -1):
            tail = self._text[-keep:]
            if any(s.startswith(tail) for s in self.params.stop):
                return len(self._text) - keep
        return len(self._text)

    def take_delta(self) -> StreamDelta | None:
        """Tokens and text not yet streamed; None when there is nothing new."""
        tokens = self.token_ids[self._streamed_tokens :]
        logprobs = None if self.logprobs is None else self.logprobs[self._streamed_tokens :]
        top = None if self.top_logprobs is None else self.top_logprobs[self._streamed_tokens :]
        end = self._safe_text_end() if self._decoder is not None else 0
        text = self._text[self._streamed_chars : end] if end > self._streamed_chars else ""
        if not tokens and not text and not self.finished:
            return None
        self._streamed_tokens = len(self.token_ids)
        self._streamed_chars = max(self._streamed_chars, end)
        reason = self.finish_reason.value if self.finished else None
        return StreamDelta(self.request_id, tokens, text, reason, self.error, logprobs,
                           top_logprobs=top)

    def output(self) -> RequestOutput:
        assert self.finish_reason is not None and self.finished_s is not None
        return RequestOutput(
            request_id=self.request_id,
            prompt_ids=self.prompt_ids,
            token_ids=self.token_ids,
            text=self.text,
            finish_reason=self.finish_reason.value,
            error=self.error,
            arrival_s=self.arrival_s,
            admitted_s=self.admitted_s,
            first_token_s=self.first_token_s,
            finished_s=self.finished_s,
            token_times_s=self.token_times_s,
            logprobs=self.logprobs,
            top_logprobs=self.top_logprobs,
        )
