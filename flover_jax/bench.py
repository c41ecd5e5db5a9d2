"""One benchmark run: warm-up, the timed workload, a solo reference, the summary.

Used by `main.py --mode=bench` and by the scripts in benchmarks/.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from flover_jax import metrics
from flover_jax.engine import Engine, TimedRequest


def solo_latency_fit(engine: Engine, requests: Sequence[TimedRequest], samples: int = 3):
    """(ttft_s, tpot_s) of a request running alone: its latency is ttft + (tokens - 1) * tpot.

    Measured on `samples` requests of the workload (shortest, longest and between; at most
    all of them),
    each run alone on an idle engine after one untimed solo run (compiles);
    medians, since one request's decode steps cost nearly the same at any context.
    tpot_s is 0 when no sample generated more than one token.
    """
    if not requests or samples < 1:
        raise ValueError(f"solo_latency_fit: needs requests and samples >= 1, got "
                         f"{len(requests)} and {samples}")
    samples = min(samples, len(requests))
    by_length = sorted(requests, key=lambda r: r.params.max_new_tokens)
    picks = [by_length[round(i * (len(by_length) - 1) / max(samples - 1, 1))] for i in range(samples)]

    def alone(request: TimedRequest):
        (output,) = engine.run([TimedRequest(request.prompt, request.params, 0.0)]).outputs
        return output

    alone(picks[0])  # untimed
    ttft, tpot = [], []
    for output in map(alone, picks):
        ttft.append(output.ttft_s)
        if len(output.token_ids) > 1:
            tpot.append((output.latency_s - output.ttft_s) / (len(output.token_ids) - 1))
    return float(np.median(ttft)), float(np.median(tpot)) if tpot else 0.0


def run(
    engine: Engine, requests: Sequence[TimedRequest], *, policy: str | None = None,
    warmup: bool = True, solo_samples: int = 3,
) -> dict:
    """Run the workload and return its summary (metrics.summarize plus compile, memory, the
    attention and matmuls the steps ran, whether batch invariant, solo latency).

    latency_vs_solo: the mean over requests that finished without error of latency over the
    latency alone, fitted on `solo_samples` of them (0: skip); null when none finished."""
    if solo_samples < 0:
        raise ValueError(f"solo_samples={solo_samples}: must be >= 0 (0 skips the solo runs)")
    start = time.perf_counter()
    if warmup:
        engine.executor.warmup()
    compile_s = time.perf_counter() - start
    result = engine.run(requests, policy)
    summary = metrics.summarize(result) | {"compile_s": compile_s} | metrics.memory(engine)
    summary["ops"] = engine.executor.op_choice.summary()
    summary["batch_invariant"] = engine.executor.batch_invariant
    summary["prefill_chunk"] = engine.executor.buckets.prefill_chunk
    summary["prefix_cache_rows"] = len(engine.executor.prefix_rows)
    done = [(r, o) for r, o in zip(requests, result.outputs) if o.finish_reason != "error"]
    if solo_samples and done:
        ttft, tpot = solo_latency_fit(engine, [r for r, _ in done], solo_samples)
        ratios = [o.latency_s / (ttft + tpot * (len(o.token_ids) - 1)) for _, o in done]
        summary["latency_vs_solo"] = float(np.mean(ratios))
        summary["solo"] = {"ttft_s": ttft, "tpot_s": tpot}
    elif solo_samples:
        summary["latency_vs_solo"] = summary["solo"] = None
    return summary
