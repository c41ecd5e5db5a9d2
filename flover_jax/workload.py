"""Workloads: when requests arrive, what they ask, how long they run.

Arrival processes: `constant` (a fixed gap), `poisson` / gamma (`rate` requests per
second; burstiness 1 = Poisson, < 1 burstier, > 1 smoother, as in vLLM's
benchmark), `burst` (everything at t = 0) and `trace` (a JSONL file: a request a
line with `arrival_s`, `prompt` or `prompt_ids` and any SamplingParams field).
Lengths: fixed, uniform or log-normal (`lengths`); synthetic prompts may share a system
prompt and grow multi-turn conversations (`synthetic`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from flover_jax import files
from flover_jax.engine import TimedRequest
from flover_jax.sampling_params import SamplingParams
from flover_jax.scheduler import MAX_WAIT_S

ARRIVALS = ("constant", "poisson", "burst", "trace")
MAX_REQUESTS = 1_000_000  # a workload is built whole in memory

# Chat questions of the default run: short prompts, answers of varied lengths.
DEMO_QUESTIONS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a GPU is in two sentences.",
    "List three fruits that are red.",
    "What is 12 times 7?",
    "Give me a tip for learning to code.",
    "Describe a cat to someone who has never seen one.",
    "Why is the sky blue?",
    "Name the planets of the solar system.",
    "Write a short greeting for a birthday card.",
    "What does a compiler do?",
    "Suggest a name for a friendly robot.",
)


def _rng(seed: int, stream: int = 0) -> np.random.Generator:
    """A generator for `seed` (validated); output lengths draw from stream 1, the rest from 0."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r}: must be an int >= 0")
    return np.random.default_rng(seed + stream)


def _positive(name: str, value: float) -> None:
    if not (0 < value < math.inf):  # NaN fails too
        raise ValueError(f"{name}={value}: must be > 0 and finite")


def arrival_times(
    kind: str, n: int, *, interval_s: float = 0.5, rate: float = 1.0, burstiness: float = 1.0,
    seed: int = 0,
) -> np.ndarray:
    """Arrival offsets in seconds of n requests, the first at 0, the last within MAX_WAIT_S."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_requests={n!r}: must be >= 1")
    if n > MAX_REQUESTS:
        raise ValueError(f"num_requests={n}: at most {MAX_REQUESTS}")
    rng = _rng(seed)
    if kind == "constant":
        if not (0 <= interval_s < math.inf):
            raise ValueError(f"interval_s={interval_s}: must be >= 0 and finite")
        arrivals, name = np.arange(n) * interval_s, f"interval_s={interval_s}"
    elif kind == "burst":
        return np.zeros(n)
    elif kind == "poisson":
        _positive("rate", rate)
        _positive("burstiness", burstiness)
        gaps = rng.gamma(burstiness, 1.0 / (rate * burstiness), n - 1)
        arrivals, name = np.concatenate([[0.0], np.cumsum(gaps)]), f"rate={rate}"
    else:
        raise ValueError(f"workload={kind!r}: must be one of {ARRIVALS}")
    if not arrivals[-1] <= MAX_WAIT_S:
        raise ValueError(f"{name}: the last of {n} requests would arrive after "
                         f"{arrivals[-1]:.3g} s, past the {MAX_WAIT_S:.0f} s a workload may span")
    return arrivals


LENGTH_FORMS = "N, uniform:LO:HI or lognormal:MEDIAN:SIGMA:MAX"


def lengths(name: str, spec: str | int, n: int, seed: int = 0, stream: int = 1) -> np.ndarray:
    """n token counts drawn as `spec` says: `N`; `uniform:LO:HI` (inclusive); or
    `lognormal:MEDIAN:SIGMA:MAX`, a log-normal of that median and log-space sigma, rounded
    and clipped to [1, MAX] (chat traffic's lengths: docs/benchmarks.md). name: the flag, for
    errors; stream: which random stream the draws take (one per kind of length)."""
    text = str(spec)
    kind, *args = text.split(":")
    bad = ValueError(f"{name}={text!r}: expected {LENGTH_FORMS}")
    try:
        numbers = [float(x) if kind == "lognormal" and i == 1 else int(x)
                   for i, x in enumerate(args)]
    except ValueError:
        raise bad from None
    rng = _rng(seed, stream)
    if kind == "uniform" and len(numbers) == 2:
        lo, hi = numbers
        if not 1 <= lo <= hi:
            raise ValueError(f"{name}={text!r}: need 1 <= LO <= HI")
        return rng.integers(lo, hi + 1, n)
    if kind == "lognormal" and len(numbers) == 3:
        median, sigma, most = numbers
        if not (median >= 1 and 0 <= sigma < math.inf and most >= 1):
            raise ValueError(f"{name}={text!r}: need MEDIAN >= 1, SIGMA >= 0, MAX >= 1")
        drawn = np.rint(median * np.exp(sigma * rng.standard_normal(n)))
        return np.clip(drawn, 1, most).astype(np.int64)
    if args:
        raise bad
    try:
        value = int(text)
    except ValueError:
        raise bad from None
    if value < 1:
        raise ValueError(f"{name}={value}: must be >= 1")
    return np.full(n, value)


def parse_request(
    record: object, defaults: SamplingParams, extra: Sequence[str] = ()
) -> tuple[str | list, SamplingParams, dict]:
    """One request as a JSON object: its prompt ("prompt" text or "prompt_ids"), its
    SamplingParams (any field of it, over `defaults`, validated) and the keys named in
    `extra` (returned as they are). Raises ValueError naming the field and its value."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    record = dict(record)
    if ("prompt" in record) == ("prompt_ids" in record):
        raise ValueError('give one of "prompt" (text) or "prompt_ids" (a list of ints)')
    if "prompt" in record:
        prompt = record.pop("prompt")
        if not isinstance(prompt, str):
            raise ValueError(f"prompt={prompt!r}: must be a string")
    else:
        prompt = record.pop("prompt_ids")
        if not isinstance(prompt, list):
            raise ValueError(f"prompt_ids={prompt!r}: must be a list of ints")
    others = {key: record.pop(key) for key in extra if key in record}
    fields = [f.name for f in dataclasses.fields(SamplingParams)]
    for key, value in record.items():
        if key not in fields:
            allowed = sorted({"prompt", "prompt_ids", *fields, *extra})
            raise ValueError(f"{key}={value!r}: unknown field; allowed: {allowed}")
    params = dataclasses.replace(defaults, **record)
    params.validate()
    return prompt, params, others


def with_prompts(
    prompts: Sequence[tuple[str | list, SamplingParams]], kind: str, n: int,
    output_len: str | int, *, seed: int = 0, **arrival_options,
) -> list[TimedRequest]:
    """n requests cycling through the given (prompt, params) pairs, arrivals and output
    lengths (max_new_tokens) as asked."""
    if not prompts:
        raise ValueError("prompts_file: no prompts")
    arrivals = arrival_times(kind, n, seed=seed, **arrival_options)
    outputs = lengths("output_len", output_len, n, seed)
    requests = []
    for i, (t, m) in enumerate(zip(arrivals, outputs)):
        prompt, params = prompts[i % len(prompts)]
        requests.append(
            TimedRequest(prompt, dataclasses.replace(params, max_new_tokens=int(m)), float(t))
        )
    return requests


def synthetic(
    kind: str, n: int, prompt_len: str | int, output_len: str | int, vocab_size: int, *,
    params: SamplingParams | None = None, seed: int = 0, shared_prefix: int = 0, turns: int = 1,
    **arrival_options,
) -> list[TimedRequest]:
    """Random-token prompts of `prompt_len` tokens (a length spec: `lengths`), arrivals and
    output lengths (max_new_tokens over `params`) as asked.

    shared_prefix: every prompt opens with the same random tokens (a system prompt), then its
    own `prompt_len`. turns: requests form conversations of this many turns, request i being
    turn i % turns of conversation i // turns: its prompt is the conversation so far (the
    shared prefix, each earlier turn's question and a stand-in answer of that turn's output
    length, then its own question). The answers are random tokens, not the model's: a turn's
    prompt does not wait for the answer before it, so arrivals stay as `kind` draws them."""
    params = SamplingParams(ignore_eos=True) if params is None else params
    rng = _rng(seed)
    sizes = prompt_sizes(n, prompt_len, output_len, seed, shared_prefix, turns)

    def tokens(count: int) -> list[int]:
        return rng.integers(3, vocab_size, int(count)).tolist()

    system = tokens(shared_prefix)
    prompts, conversation = [], []
    for i, size in enumerate(sizes):
        if i % turns == 0:
            conversation = list(system)
        conversation += tokens(size - len(conversation))  # an answer and a question
        prompts.append((list(conversation), params))
    return with_prompts(prompts, kind, n, output_len, seed=seed, **arrival_options)


def prompt_sizes(n: int, prompt_len: str | int, output_len: str | int, seed: int = 0,
                 shared_prefix: int = 0, turns: int = 1) -> list[int]:
    """The prompt lengths of `synthetic`'s requests (checked before any is built)."""
    for name, value, least in (("shared_prefix", shared_prefix, 0), ("turns", turns, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name}={value!r}: must be an int >= {least}")
    questions = lengths("prompt_len", prompt_len, n, seed, stream=2)
    answers = lengths("output_len", output_len, n, seed)  # as with_prompts draws them
    sizes = []
    for i in range(n):
        earlier = shared_prefix if i % turns == 0 else sizes[-1] + int(answers[i - 1])
        sizes.append(earlier + int(questions[i]))
    return sizes


def demo(chat_prompt, n: int = 24, rate: float = 4.0, seed: int = 0) -> list[TimedRequest]:
    """The default run: chat questions arriving as a Poisson process, answers of varied length."""
    prompts = [(chat_prompt(q), SamplingParams()) for q in DEMO_QUESTIONS]
    return with_prompts(prompts, "poisson", n, "uniform:24:96", seed=seed, rate=rate)


def read_trace(
    path: str | Path,
    defaults: SamplingParams = SamplingParams(),
    check: Callable[[str | list, SamplingParams], None] | None = None,
) -> list[TimedRequest]:
    """A JSONL trace: a request a line, `arrival_s` (seconds from the start, >= 0, at most
    MAX_WAIT_S) and what `parse_request` reads; fields a line leaves out take `defaults`.
    `check(prompt, params)` may refuse a line's request too (`Engine.check_request`). Any
    bad line raises ValueError naming it; blank lines are skipped."""
    requests = []
    for line in files.read_jsonl("trace", path):
        try:
            if line.error:
                raise ValueError(line.error)
            prompt, params, others = parse_request(line.value, defaults, ("arrival_s",))
            arrival = others.get("arrival_s", 0.0)
            if isinstance(arrival, bool) or not isinstance(arrival, (int, float)) or not (
                0 <= arrival <= MAX_WAIT_S
            ):
                raise ValueError(f"arrival_s={arrival!r}: must be a number of seconds >= 0 and "
                                 f"<= {MAX_WAIT_S:.0f}, from the start (not a timestamp)")
            if check is not None:
                check(prompt, params)
        except ValueError as e:
            raise ValueError(f"{path}:{line.number}: {e}") from None
        requests.append(TimedRequest(prompt, params, float(arrival)))
    if not requests:
        raise ValueError(f"trace={str(path)!r}: no requests")
    return requests
