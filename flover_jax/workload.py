"""Workloads: when requests arrive, what they ask, how long they run.

Arrival processes: `constant` (a fixed gap), `poisson` / gamma (`rate` requests per
second; burstiness 1 = Poisson, < 1 burstier, > 1 smoother, as in vLLM's
benchmark), `burst` (everything at t = 0) and `trace` (a JSONL file with
`arrival_s`, `prompt` or `prompt_ids`, `max_new_tokens`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from flover_jax.engine import TimedRequest
from flover_jax.sampling import SamplingParams

ARRIVALS = ("constant", "poisson", "burst", "trace")

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


def arrival_times(
    kind: str, n: int, *, interval_s: float = 0.5, rate: float = 1.0, burstiness: float = 1.0,
    seed: int = 0,
) -> np.ndarray:
    """Arrival offsets in seconds of n requests, the first at 0."""
    if n < 1:
        raise ValueError(f"num_requests={n}: must be >= 1")
    if kind == "constant":
        if interval_s < 0:
            raise ValueError(f"interval_s={interval_s}: must be >= 0")
        return np.arange(n) * interval_s
    if kind == "burst":
        return np.zeros(n)
    if kind == "poisson":
        if rate <= 0 or burstiness <= 0:
            raise ValueError(f"rate={rate}, burstiness={burstiness}: both must be > 0")
        gaps = np.random.default_rng(seed).gamma(burstiness, 1.0 / (rate * burstiness), n - 1)
        return np.concatenate([[0.0], np.cumsum(gaps)])
    raise ValueError(f"workload={kind!r}: must be one of {ARRIVALS}")


def output_lengths(spec: str | int, n: int, seed: int = 0) -> np.ndarray:
    """`N` or `uniform:LO:HI` (inclusive) -> n output lengths."""
    text = str(spec)
    if text.startswith("uniform:"):
        try:
            lo, hi = (int(x) for x in text.split(":")[1:])
        except ValueError:
            raise ValueError(f"output_len={text!r}: expected N or uniform:LO:HI") from None
        if not 1 <= lo <= hi:
            raise ValueError(f"output_len={text!r}: need 1 <= LO <= HI")
        return np.random.default_rng(seed + 1).integers(lo, hi + 1, n)
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"output_len={text!r}: expected N or uniform:LO:HI") from None
    if value < 1:
        raise ValueError(f"output_len={value}: must be >= 1")
    return np.full(n, value)


def with_prompts(
    prompts: list, kind: str, n: int, output_len: str | int, *, ignore_eos: bool = False,
    seed: int = 0, **arrival_options,
) -> list[TimedRequest]:
    """n requests cycling through the given prompts (text or ids), arrivals and lengths as asked."""
    if not prompts:
        raise ValueError("prompts_file: no prompts")
    arrivals = arrival_times(kind, n, seed=seed, **arrival_options)
    lengths = output_lengths(output_len, n, seed)
    return [
        TimedRequest(prompts[i % len(prompts)],
                     SamplingParams(max_new_tokens=int(m), ignore_eos=ignore_eos), float(t))
        for i, (t, m) in enumerate(zip(arrivals, lengths))
    ]


def synthetic(
    kind: str, n: int, prompt_len: int, output_len: str | int, vocab_size: int, *,
    ignore_eos: bool = True, seed: int = 0, **arrival_options,
) -> list[TimedRequest]:
    """Random-token prompts (the paper's 8-token prompts), lengths and arrivals as asked."""
    if prompt_len < 1:
        raise ValueError(f"prompt_len={prompt_len}: must be >= 1")
    rng = np.random.default_rng(seed)
    arrivals = arrival_times(kind, n, seed=seed, **arrival_options)
    lengths = output_lengths(output_len, n, seed)
    return [
        TimedRequest(
            prompt=rng.integers(3, vocab_size, prompt_len).tolist(),
            params=SamplingParams(max_new_tokens=int(m), ignore_eos=ignore_eos),
            arrival_s=float(t),
        )
        for t, m in zip(arrivals, lengths)
    ]


def demo(chat_prompt, n: int = 24, rate: float = 4.0, seed: int = 0) -> list[TimedRequest]:
    """The default run: chat questions arriving as a Poisson process, answers of varied length."""
    arrivals = arrival_times("poisson", n, rate=rate, seed=seed)
    lengths = output_lengths("uniform:24:96", n, seed)
    return [
        TimedRequest(
            chat_prompt(DEMO_QUESTIONS[i % len(DEMO_QUESTIONS)]),
            SamplingParams(max_new_tokens=int(m)),
            float(t),
        )
        for i, (t, m) in enumerate(zip(arrivals, lengths))
    ]


def read_trace(path: str | Path) -> list[TimedRequest]:
    """A JSONL trace: one request a line with arrival_s, prompt or prompt_ids, max_new_tokens."""
    requests = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            prompt = record["prompt"] if "prompt" in record else record["prompt_ids"]
            requests.append(TimedRequest(
                prompt, SamplingParams(max_new_tokens=int(record.get("max_new_tokens", 16)),
                                       ignore_eos=bool(record.get("ignore_eos", False))),
                float(record.get("arrival_s", 0.0)),
            ))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}:{number}: bad trace line ({e})") from None
    return requests
