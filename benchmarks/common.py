"""Helpers the benchmark scripts share."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def live_state(executor, live: int, context: int):
    """The state with `live` active slots at `context` cached tokens, never finishing."""
    n = executor.num_slots
    return executor.state.replace(
        active=jnp.asarray(np.arange(n) < live), pos=jnp.full((n,), context, jnp.int32),
        remaining=jnp.full((n,), 1 << 30, jnp.int32),
    )


def decode_bytes(cfg, params) -> tuple[int, int]:
    """(weight bytes, KV bytes per cached token) a decode step reads: every weight but the
    embedding table (one row per token), in the config's dtype; params may be abstract."""
    itemsize = np.dtype(cfg.dtype).itemsize
    weights = sum(x.size for x in jax.tree.leaves(params)) - params.embed.size
    return weights * itemsize, 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * itemsize


def median_run(summaries: list[dict]) -> dict:
    """The run of median makespan (the lower middle of an even count), with every run's makespan
    and tokens/s under "repeats" in run order, so a table can show the spread."""
    middle = sorted(summaries, key=lambda s: s["makespan_s"])[(len(summaries) - 1) // 2]
    return middle | {"repeats": {key: [s[key] for s in summaries]
                                 for key in ("makespan_s", "output_tokens_per_s")}}


def merge_results(path: Path, new: dict) -> dict:
    """`new` written over the JSON at `path` (nested dicts merge, anything else is replaced), so a
    run of some experiments keeps the others' figures. Returns what was written."""

    def merge(old, update):
        if not (isinstance(old, dict) and isinstance(update, dict)):
            return update
        return {**old, **{k: merge(old.get(k), v) if k in old else v for k, v in update.items()}}

    merged = merge(json.loads(path.read_text()) if path.exists() else {}, new)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=1))
    return merged
