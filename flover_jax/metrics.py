"""Aggregates of a run, with vLLM's definitions:
TTFT = first token - arrival; TPOT = (E2E - TTFT) / (output tokens - 1);
ITL = gaps between a request's consecutive tokens; E2E = finish - arrival."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from flover_jax.engine import RunResult


def distribution(values) -> dict[str, float | None]:
    """Mean, percentiles and maximum; None (JSON null) for each when there are no values."""
    values = np.asarray(list(values), dtype=np.float64)
    if values.size == 0:
        return dict.fromkeys(("mean", "p50", "p90", "p99", "max"))
    return {
        "mean": float(values.mean()),
        "p50": float(np.percentile(values, 50)),
        "p90": float(np.percentile(values, 90)),
        "p99": float(np.percentile(values, 99)),
        "max": float(values.max()),
    }


def latency_figures(records: Sequence[Mapping]) -> dict:
    """Throughput and latency from per-request records of any system (ours or a peer's): dicts
    with arrival_s, first_token_s, finished_s, token_times_s and finish_reason ("error" or not)."""
    done = [r for r in records if r["finish_reason"] != "error"]
    # From the first arrival to the last completion; 0 when nothing completed.
    makespan = (max(r["finished_s"] for r in done) - min(r["arrival_s"] for r in records)
                if done else 0.0)
    tokens = sum(len(r["token_times_s"]) for r in done)
    timed = [r for r in done if r["first_token_s"] is not None]
    tpot = [
        (r["finished_s"] - r["first_token_s"]) / (len(r["token_times_s"]) - 1)
        for r in timed if len(r["token_times_s"]) > 1
    ]
    itl = [b - a for r in done for a, b in zip(r["token_times_s"], r["token_times_s"][1:])]
    return {
        "num_requests": len(records),
        "errors": len(records) - len(done),
        "makespan_s": makespan,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / makespan if makespan > 0 else 0.0,
        "requests_per_s": len(done) / makespan if makespan > 0 else 0.0,
        "ttft_s": distribution(r["first_token_s"] - r["arrival_s"] for r in timed),
        "tpot_s": distribution(tpot),
        "itl_s": distribution(itl),
        "e2e_s": distribution(r["finished_s"] - r["arrival_s"] for r in done),
    }


def summarize(result: RunResult) -> dict:
    """The run's figures as a JSON-ready dict (per-request records included)."""
    records = [
        {
            "index": i, "prompt_len": len(o.prompt_ids), "output_len": len(o.token_ids),
            "arrival_s": o.arrival_s, "admitted_s": o.admitted_s,
            "first_token_s": o.first_token_s, "finished_s": o.finished_s,
            "ttft_s": o.ttft_s, "latency_s": o.latency_s, "finish_reason": o.finish_reason,
            "token_times_s": o.token_times_s,
        }
        for i, o in enumerate(result.outputs)
    ]
    stats = result.stats
    return {"policy": result.policy} | latency_figures(records) | {
        "iterations": stats.iterations,
        "decode_steps": stats.decode_steps,
        "mean_inflight": stats.mean_inflight,
        "joins": stats.joins,
        "compactions": stats.compactions,
        "moves": stats.moves,
        "computed_rows": stats.computed_rows,
        "prompt_pieces": stats.prompt_pieces,
        "prefix_hits": stats.prefix_hits,
        "prefix_hit_rate": stats.prefix_hit_rate,
        "requests": records,
    }


def memory(engine) -> dict[str, int]:
    """KV cache size of the engine and the process's peak resident memory."""
    import resource

    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"kv_cache_bytes": engine.executor.state.cache.nbytes, "peak_rss_bytes": peak_kib * 1024}
