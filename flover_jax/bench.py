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

    Measured on `samples` requests of the workload (shortest, longest and between),
    each run alone on an idle engine after one untimed solo run (compiles);
    medians, since one request's decode steps cost nearly the same at any context.
    """
    by_length = sorted(requests, key=lambda r: r.params.max_new_tokens)
    picks = [by_length[round(i * (len(by_length) - 1) / max(samples - 1, 1))] for i in range(samples)]
    ttft, tpot = [], []
    for request in [picks[0], *picks]:
        (output,) = engine.run([TimedRequest(request.prompt, request.params, 0.0)]).outputs
        ttft.append(output.ttft_s)
        if len(output.token_ids) > 1:
            tpot.append((output.latency_s - output.ttft_s) / (len(output.token_ids) - 1))
    return float(np.median(ttft[1:])), float(np.median(tpot[1:] if len(tpot) > 1 else tpot or [0.0]))


def run(
    engine: Engine, requests: Sequence[TimedRequest], *, policy: str | None = None,
    warmup: bool = True, solo_samples: int = 3,
) -> dict:
    """Run the workload and return its summary (metrics.summarize plus compile, memory, the
    attention and matmuls the steps ran, whether batch invariant, solo latency)."""
    start = time.perf_counter()
    if warmup:
        engine.executor.warmup()
    compile_s = time.perf_counter() - start
    result = engine.run(requests, policy)
    summary = metrics.summarize(result) | {"compile_s": compile_s} | metrics.memory(engine)
    summary["attention"] = "cpu_kernel" if engine.executor.attention_kernel else "xla"
    summary["matmul"] = "cpu_kernel" if engine.executor.matmul_kernel else "xla"
    summary["batch_invariant"] = engine.executor.batch_invariant
    if solo_samples:
        ttft, tpot = solo_latency_fit(engine, requests, solo_samples)
        done = [o for o in result.outputs if o.finish_reason != "error"]
        ratios = [o.latency_s / (ttft + tpot * (len(o.token_ids) - 1)) for o in done]
        summary["latency_vs_solo"] = float(np.mean(ratios)) if ratios else float("nan")
        summary["solo"] = {"ttft_s": ttft, "tpot_s": tpot}
    return summary
