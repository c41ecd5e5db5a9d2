"""Aggregates of a run, with vLLM's definitions:
TTFT = first token - arrival; TPOT = (E2E - TTFT) / (output tokens - 1);
ITL = gaps between a request's consecutive tokens; E2E = finish - arrival."""

from __future__ import annotations

import numpy as np

from flover_jax.engine import RunResult


def distribution(values) -> dict[str, float]:
    values = np.asarray(list(values), dtype=np.float64)
    if values.size == 0:
        return {"mean": float("nan"), "p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    return {
        "mean": float(values.mean()),
        "p50": float(np.percentile(values, 50)),
        "p90": float(np.percentile(values, 90)),
        "p99": float(np.percentile(values, 99)),
    }


def summarize(result: RunResult) -> dict:
    """The run's figures as a JSON-ready dict (per-request records included)."""
    done = [o for o in result.outputs if o.finish_reason != "error"]
    arrivals = [o.arrival_s for o in result.outputs]
    makespan = max((o.finished_s for o in done), default=0.0) - min(arrivals, default=0.0)
    tokens = sum(len(o.token_ids) for o in done)
    ttft = [o.ttft_s for o in done if o.ttft_s is not None]
    tpot = [
        (o.latency_s - o.ttft_s) / (len(o.token_ids) - 1)
        for o in done if o.ttft_s is not None and len(o.token_ids) > 1
    ]
    itl = [b - a for o in done for a, b in zip(o.token_times_s, o.token_times_s[1:])]
    stats = result.stats
    return {
        "policy": result.policy,
        "num_requests": len(result.outputs),
        "errors": sum(o.finish_reason == "error" for o in result.outputs),
        "makespan_s": makespan,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / makespan if makespan > 0 else 0.0,
        "requests_per_s": len(done) / makespan if makespan > 0 else 0.0,
        "ttft_s": distribution(ttft),
        "tpot_s": distribution(tpot),
        "itl_s": distribution(itl),
        "e2e_s": distribution(o.latency_s for o in done),
        "iterations": stats.iterations,
        "decode_steps": stats.decode_steps,
        "mean_inflight": stats.mean_inflight,
        "joins": stats.joins,
        "compactions": stats.compactions,
        "moves": stats.moves,
        "computed_rows": stats.computed_rows,
        "requests": [
            {
                "index": i, "prompt_len": len(o.prompt_ids), "output_len": len(o.token_ids),
                "arrival_s": o.arrival_s, "admitted_s": o.admitted_s,
                "first_token_s": o.first_token_s, "finished_s": o.finished_s,
                "ttft_s": o.ttft_s, "latency_s": o.latency_s, "finish_reason": o.finish_reason,
            }
            for i, o in enumerate(result.outputs)
        ],
    }


def memory(engine) -> dict[str, int]:
    """KV cache size of the engine and the process's peak resident memory."""
    import resource

    cache = engine.executor.state.cache
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"kv_cache_bytes": int(cache.k.nbytes + cache.v.nbytes), "peak_rss_bytes": peak_kib * 1024}
