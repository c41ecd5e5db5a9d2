"""Flover's experiments (FLOVER.md), scaled to this machine and the default model, on all four
policies. Writes benchmarks/results/paper.json; benchmarks/report.py turns it into docs.

    .venv/bin/python benchmarks/paper.py [--experiments=constant,headline,poisson,ablation]

- constant: one request every --interval_s, n = 1..32, 8-token prompts, outputs uniform in
  [128, 512], EOS ignored: makespan and tokens/s per policy (the paper's Fig. 4).
- headline: 32 requests of exactly 512 tokens at the same interval: flover vs sequential (and
  flover with XLA's matmuls instead of the CPU matmul kernel, and with XLA's ops only).
- poisson: 32 requests, Poisson arrivals over a sweep of mean gaps: speedup over sequential,
  iterations, mean in-flight requests (Fig. 8).
- ablation: outputs uniform in [128, L] for L = 256, 512, 1024, flover (compaction) vs fused
  (every slot computed).
"""

from __future__ import annotations

import gc
import platform
import sys
import time
from pathlib import Path

import jax
from absl import app, flags, logging
from common import ENGINE_OPS, cpu_description, median_run, merge_results  # benchmarks/ is on the path

from flover_jax import bench, workload
from flover_jax.engine import Engine

FLAGS = flags.FLAGS
flags.DEFINE_list("experiments", ["constant", "headline", "poisson", "ablation"], "Which to run.")
flags.DEFINE_string("model", "smollm2-135m", "Model.")
flags.DEFINE_list("sizes", ["1", "2", "4", "8", "16", "32"], "Request counts (constant).")
flags.DEFINE_list("gaps_s", ["0.02", "0.1", "0.5", "2.0"], "Mean Poisson gaps (poisson).")
flags.DEFINE_list("tails", ["256", "512", "1024"],
                  "L of uniform:128:L (ablation; the paper swept L = 512..2048).")
flags.DEFINE_float("interval_s", 0.5, "Constant arrival interval.")
flags.DEFINE_integer("headline_repeats", 3, "Runs of the headline per policy (median reported).")
flags.DEFINE_integer("ablation_repeats", 5, "Runs of each ablation workload per policy (median "
                     "reported): single runs of its gain vary by several percent on a shared machine.")
flags.DEFINE_integer("poisson_output_len", 256, "Output tokens per request (poisson).")
flags.DEFINE_string("output", "benchmarks/results/paper.json", "Where the results go.")

flags.DEFINE_integer("max_output", 512, "Longest output (outputs are uniform in [128, this]).")

POLICIES = ("flover", "fused", "static", "sequential")
PROMPT_LEN, SLOTS = 8, 32
# The headline's flover again on engines without the CPU kernels (models/kernels).
OTHER_OPS = {"flover, XLA matmuls": ENGINE_OPS["xla_matmuls"], "flover, XLA ops": ENGINE_OPS["xla"]}


def measure(engine, requests, policies, repeats: int = 1) -> dict[str, dict]:
    """The workload run `repeats` times under each policy: per policy, the median run with every
    makespan. The policies take turns (a, b, a, b, ...), so a slow spell of this shared machine
    slows both sides of a ratio rather than one."""
    runs = {policy: [] for policy in policies}
    for _ in range(repeats):
        for policy in policies:
            runs[policy].append(bench.run(engine, requests, policy=policy, warmup=False, solo_samples=0))
            runs[policy][-1].pop("requests")
    summaries = {}
    for policy in policies:
        summary = summaries[policy] = median_run(runs[policy])
        makespans = ", ".join(f"{m:.1f}" for m in summary["repeats"]["makespan_s"])
        spread = "" if repeats == 1 else f" (runs: {makespans} s)"
        print(f"  {policy:>10}: {summary['num_requests']} requests, makespan "
              f"{summary['makespan_s']:.1f} s{spread}, {summary['output_tokens_per_s']:.0f} tok/s, "
              f"mean in flight {summary['mean_inflight']:.1f}", flush=True)
    return summaries


def synthetic(engine, kind, n, output_len, **arrivals):
    return workload.synthetic(kind, n, PROMPT_LEN, output_len, engine.cfg.vocab_size,
                              seed=0, **arrivals)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax narrates every file at INFO
    tails = [int(t) for t in FLAGS.tails] if "ablation" in FLAGS.experiments else []
    engine = Engine.from_pretrained(FLAGS.model, max_slots=SLOTS,
                                    max_len=PROMPT_LEN + max([FLAGS.max_output, *tails]))
    start = time.perf_counter()
    engine.executor.warmup(prompt_lengths=[16])
    compile_s = time.perf_counter() - start
    # The first timed run after compiling paid one-time host costs (a one-request flover run
    # took 5.9 s, then 4.9-5.0 s run again), so every policy runs once untimed first.
    for policy in POLICIES:
        bench.run(engine, synthetic(engine, "constant", 2, 64, interval_s=0.1), policy=policy,
                  warmup=False, solo_samples=0)
    ran = {"at": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(["benchmarks/paper.py", *sys.argv[1:]])}
    results = {
        "ran": {name: ran for name in FLAGS.experiments},  # which run each experiment's figures are from
        "machine": {"cpu_cores": jax.local_device_count(), "cpu": cpu_description(),
                    "platform": platform.platform(),
                    "python": platform.python_version(), "jax": jax.__version__,
                    "device": jax.devices()[0].device_kind},
        "model": FLAGS.model, "dtype": engine.cfg.dtype, "max_slots": SLOTS,
        "compile_s": compile_s,
    }
    if "constant" in FLAGS.experiments:
        print("constant interval", flush=True)
        results["constant"] = {
            n: measure(engine, synthetic(engine, "constant", int(n), f"uniform:128:{FLAGS.max_output}",
                                         interval_s=FLAGS.interval_s), POLICIES)
            for n in FLAGS.sizes
        }
    if "headline" in FLAGS.experiments:
        print("headline: 32 x 512 tokens", flush=True)
        work = synthetic(engine, "constant", 32, FLAGS.max_output, interval_s=FLAGS.interval_s)
        results["headline"] = measure(engine, work, ("flover", "sequential"), FLAGS.headline_repeats)
        ex = engine.executor
        if ex.attention_kernel and ex.matmul_kernel:  # what the CPU kernels gain, same run
            for label, ops in OTHER_OPS.items():
                other = Engine.from_pretrained(FLAGS.model, max_slots=SLOTS, max_len=ex.max_len, **ops)
                other.executor.warmup(prompt_lengths=[16])
                results["headline"][label] = measure(
                    other, work, ("flover",), FLAGS.headline_repeats)["flover"]
                del other
                gc.collect()
    if "poisson" in FLAGS.experiments:
        print("poisson sweep", flush=True)
        results["poisson"] = {
            gap: measure(engine, synthetic(engine, "poisson", 32, FLAGS.poisson_output_len,
                                           rate=1.0 / float(gap)), ("flover", "sequential"))
            for gap in FLAGS.gaps_s
        }
    if "ablation" in FLAGS.experiments:
        print("compaction ablation", flush=True)
        results["ablation"] = {
            tail: measure(engine, synthetic(engine, "constant", 32, f"uniform:128:{tail}",
                                            interval_s=0.1), ("flover", "fused"), FLAGS.ablation_repeats)
            for tail in FLAGS.tails
        }
    merge_results(Path(FLAGS.output), results)
    print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
