"""The best any engine could do on this machine: the headline workload replayed against a step
whose cost is its roofline, to set the measured makespans against the machine's limits.

    .venv/bin/python benchmarks/roofline.py [--bandwidths_gbs=25,50] [--gflops=290]

A decode step over n live slots must read every weight once and every live slot's KV, and
compute 2 FLOPs per weight per slot plus attention. Its roofline cost is the larger of
bytes / bandwidth and FLOPs / FLOP rate: reading and computing perfectly overlapped, no
prefill, no host time. The bandwidth and FLOP rate are this machine's, as step_times.py
measured them (common.machine_limits), unless given. `flover` runs every arrived request in
each step; `sequential` runs one request at a time. Both are lower bounds on what any
implementation can reach at those limits.
Writes benchmarks/results/roofline.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from absl import app, flags
from common import decode_bytes, machine_limits, step_roofline  # benchmarks/ is on the path

from flover_jax import checkpoint
from flover_jax.loader import CHECKPOINT_DIR, load_model
from models.presets import PRESETS

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m", "Model (its weights are only counted).")
flags.DEFINE_list("bandwidths_gbs", [], "More memory bandwidths to bound with, after the measured one.")
flags.DEFINE_string("measured", "benchmarks/results/paper.json",
                    "paper.py's results: adds the bandwidth at which the bound on `sequential` equals "
                    "its measured headline makespan (the rate its one-slot steps stream the weights at).")
flags.DEFINE_float("gflops", 0.0, "fp32 FLOP rate to bound with; 0: the machine's, measured.")
flags.DEFINE_string("limits_json", "benchmarks/results/machine_limits.json",
                    "The machine's limits as step_times.py measured them in the same run (other "
                    "tenants move them, so both scripts use one measurement); measured afresh "
                    "where absent.")
flags.DEFINE_integer("requests", 32, "Requests of the headline workload.")
flags.DEFINE_float("interval_s", 0.5, "Arrival gap of the headline workload.")
flags.DEFINE_integer("prompt_len", 8, "Prompt tokens.")
flags.DEFINE_integer("output_len", 512, "Output tokens per request.")
flags.DEFINE_string("output", "benchmarks/results/roofline.json", "Where the results go.")


def makespan(cost, arrivals: np.ndarray, fused: bool, bandwidth: float, flop_rate: float) -> float:
    """Replay the arrivals: every arrived request per step (fused) or one at a time."""
    prompt, length = FLAGS.prompt_len, FLAGS.output_len
    clock, waiting, live = 0.0, list(arrivals), np.zeros(0, np.int64)
    while waiting or len(live):
        while waiting and waiting[0] <= clock and (fused or not len(live)):
            waiting.pop(0)
            live = np.append(live, prompt)
        if not len(live):
            clock = waiting[0]
            continue
        clock += cost(live, bandwidth, flop_rate)
        live = live + 1
        live = live[live < prompt + length]
    return clock


def main(argv):
    del argv
    source = CHECKPOINT_DIR / FLAGS.model if FLAGS.model in PRESETS else Path(FLAGS.model)
    if checkpoint.is_checkpoint(source):
        cfg = checkpoint.load_config(source)
        params = checkpoint.abstract_params(cfg)
    else:
        cfg, params, _ = load_model(FLAGS.model)
    cost = step_roofline(cfg, params)
    weight_bytes, _ = decode_bytes(cfg, params)
    arrivals = np.arange(FLAGS.requests) * FLAGS.interval_s
    recorded = Path(FLAGS.limits_json)
    limits = json.loads(recorded.read_text()) if recorded.exists() else machine_limits()
    gflops = FLAGS.gflops or limits["matmul_gflops"]
    flop_rate = gflops * 1e9
    bandwidths = [limits["read_gbs"]] + [float(b) for b in FLAGS.bandwidths_gbs]
    measured = Path(FLAGS.measured)
    if measured.exists() and "headline" in (paper := json.loads(measured.read_text())):
        target = paper["headline"]["sequential"]["makespan_s"]
        lo, hi = 1e9, 1e12  # bisect: the sequential bound falls as the bandwidth grows
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if makespan(cost, arrivals, False, mid, flop_rate) < target else (mid, hi)
        bandwidths.append(hi / 1e9)
    rows = []
    for gbs in bandwidths:
        flover = makespan(cost, arrivals, True, gbs * 1e9, flop_rate)
        sequential = makespan(cost, arrivals, False, gbs * 1e9, flop_rate)
        rows.append({"bandwidth_gbs": gbs, "gflops": gflops, "flover_s": flover,
                     "sequential_s": sequential})
        print(f"{gbs:.0f} GB/s, {gflops:.0f} GFLOP/s: flover at least {flover:.1f} s, "
              f"sequential at least {sequential:.1f} s")
    workload = {"requests": FLAGS.requests, "interval_s": FLAGS.interval_s,
                "prompt_len": FLAGS.prompt_len, "output_len": FLAGS.output_len}
    Path(FLAGS.output).write_text(json.dumps(
        {"model": FLAGS.model, "dtype": cfg.dtype, "weight_bytes": weight_bytes,
         "workload": workload, "machine_limits": limits, "bounds": rows}, indent=1))
    print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
