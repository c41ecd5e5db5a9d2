"""Helpers the benchmark scripts share."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

# Engine options by name: the default CPU kernels, and the engines without them.
ENGINE_OPS = {"auto": dict(attention="auto", matmul="auto"),  # the default: timed, then picked
              "cpu_kernels": dict(attention="cpu_kernel", matmul="cpu_kernel"),
              "amx_matmuls": dict(attention="cpu_kernel", matmul="amx"),  # bfloat16 weights
              "xla_matmuls": dict(attention="cpu_kernel", matmul="xla"),
              "xla_attention": dict(attention="xla", matmul="cpu_kernel"),
              "xla": dict(attention="xla", matmul="xla")}


def decode_bytes(cfg, params) -> tuple[int, int]:
    """(weight bytes, KV bytes per cached token) a decode step reads: every weight but the
    embedding table (one row per token), as stored (bfloat16, int8 with its scales, a packed
    weight's padding); params may be abstract."""
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    itemsize = np.dtype(cfg.dtype).itemsize
    kv = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * itemsize
    return weights - params.embed.size * params.embed.dtype.itemsize, kv


def step_roofline(cfg, params):
    """A function (contexts of the live slots [n], bandwidth B/s, FLOP rate) -> the roofline
    seconds of one decode step: the larger of its reads (every weight once, every live slot's
    KV) over the bandwidth and its FLOPs over the rate, as if perfectly overlapped."""
    weight_bytes, kv_bytes = decode_bytes(cfg, params)
    # Per slot: every weight once, a multiply and an add.
    matmul_flops = 2 * (sum(x.size for x in jax.tree.leaves(params)) - params.embed.size)
    attention_flops = 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim  # per slot, per cached token

    def cost(contexts: np.ndarray, bandwidth: float, flop_rate: float) -> float:
        read = (weight_bytes + contexts.sum() * kv_bytes) / bandwidth
        compute = (len(contexts) * matmul_flops + contexts.sum() * attention_flops) / flop_rate
        return max(read, compute)

    return cost


def cpu_description() -> str:
    """The host CPU as Linux reports it: model, cores this process may use, L3 size."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
        model = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        model = "unknown CPU"
    l3 = Path("/sys/devices/system/cpu/cpu0/cache/index3/size")  # e.g. "32768K"
    size = l3.read_text().strip() if l3.exists() else ""
    cache = f", {int(size[:-1]) // 1024} MiB L3" if size.endswith("K") and size[:-1].isdigit() else ""
    return f"{model}, {len(os.sched_getaffinity(0))} cores{cache}"


def machine_limits(repeats: int = 7) -> dict:
    """This machine's limits, measured now with XLA on the default device: read bandwidth (a sum
    over 1 GiB of float32, a pure stream) and float32 matmul rate (a 2048 x 2048 by 2048 x 2048
    matmul, big enough to run at the machine's best). A limit is the best the machine can do,
    and other tenants only slow it, so each is the fastest of `repeats` runs."""

    def fastest_s(fn, *args) -> float:
        jax.block_until_ready(fn(*args))  # compile
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - start)
        return min(times)

    stream = jnp.ones((1 << 28,), jnp.float32)
    read_s = fastest_s(jax.jit(jnp.sum), stream)
    read_gbs = stream.nbytes / read_s / 1e9
    del stream
    n = 2048
    square = jnp.ones((n, n), jnp.float32)
    matmul_gflops = 2 * n**3 / fastest_s(jax.jit(jnp.matmul), square, square) / 1e9
    return {"read_gbs": read_gbs, "matmul_gflops": matmul_gflops,
            "how": "read: jnp.sum over 1 GiB of float32; FLOPs: a 2048^3 float32 matmul; "
                   f"fastest of {repeats}, XLA on {jax.devices()[0].device_kind}"
                   + (f" ({cpu_description()})" if jax.default_backend() == "cpu" else "")}


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


def start_server(*flags: str) -> tuple[subprocess.Popen, str]:
    """`main.py --mode=serve` on a free port of 127.0.0.1 with `flags`, once it serves: the
    process and its base URL. Its log is drained on a thread (a full pipe would stall it)."""
    process = subprocess.Popen([sys.executable, str(Path(__file__).resolve().parents[1] / "main.py"),
                                "--mode=serve", "--port=0", *flags],
                               stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        if line.startswith("serving "):
            threading.Thread(target=process.stderr.read, daemon=True).start()
            return process, line.split(" on ")[1].split()[0]
    raise RuntimeError(f"the server did not start (exit {process.wait()})")
