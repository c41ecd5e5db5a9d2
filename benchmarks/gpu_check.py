"""Driven by gpu_check.sh: the GPU proof in one process, on one set of loaded weights.

1. greedy tokens of the bfloat16 engine against float32 (matmuls at "highest" precision,
   so no TF32), on chat prompts;
2. compile time of every bucket (unless --nowarmup), then decode-step time against live
   slots (bf16);
3. batch invariance: chat requests arriving staggered through the fused engine against
   each one alone, token for token (bf16);
4. the paper's headline on this card: 32 requests x 512 tokens at a constant interval,
   flover / fused / sequential. The interval keeps the paper's ratio of interval to a
   request's solo latency (0.5 s / 7.2 s on GPT-J), since a 135M model on a GPU finishes a
   request in about a second;
5. 64 requests x 256 tokens all at once: tokens/s of the fused engine.

Every section appends to --output_json as it ends, so a run cut short still reports.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from common import machine_limits  # benchmarks/ is on sys.path when run as a script
from jax import monitoring
from step_times import decode_table

from flover_jax import bench, workload
from flover_jax.engine import Engine, TimedRequest
from flover_jax.loader import load_model
from flover_jax.sampling_params import SamplingParams

FLAGS = flags.FLAGS
flags.DEFINE_float("peak_gbs", 0.0, "The card's peak memory bandwidth (0: guess from its name).")
flags.DEFINE_list("sections", ["greedy", "steps", "invariance", "headline", "burst"], "What to run.")
flags.DEFINE_integer("invariance_requests", 16, "Staggered chat requests checked against solo.")
flags.DEFINE_integer("burst_requests", 64, "Requests of the all-at-once run.")
flags.DEFINE_integer("burst_output_len", 256, "Tokens each request of the all-at-once run makes.")
flags.DEFINE_integer("headline_output_len", 512, "Tokens each headline request makes.")
flags.DEFINE_float("interval_ratio", 0.5 / (231.0 / 32),
                   "Headline interval as a fraction of one request's solo latency (paper's).")
flags.DEFINE_bool("batch_invariant", False, "Build the engine with batch_invariant=True (one "
                  "decode program, prompts prefilled alone).")
flags.DEFINE_bool("warmup", True, "Compile every bucket first and time it (off: sections compile "
                  "what they meet).")
flags.DEFINE_string("output_json", "gpu_check.json", "Where the figures go.")

PEAKS_GBS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0, "L4": 300.0}
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "What is 12 times 7?", "Why is the sky blue?"]


def greedy(engine: Engine, n_tokens: int = 48) -> list[list[int]]:
    prompts = [engine.chat_prompt(q) for q in QUESTIONS]
    return [o.token_ids for o in engine.generate(prompts, SamplingParams(max_new_tokens=n_tokens))]


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax narrates every file at INFO
    results: dict = {}
    out = Path(FLAGS.output_json)

    def record(name, value):
        results[name] = value
        out.write_text(json.dumps(results, indent=1))

    kind = jax.devices()[0].device_kind
    peak = FLAGS.peak_gbs or next((v for k, v in PEAKS_GBS.items() if k in kind), 0.0)
    # The card's data-sheet bandwidth (measured when unknown); a step here is bound by bytes
    # and launches, so FLOPs are left unbounded.
    limits = {"read_gbs": peak, "matmul_gflops": float("inf"),
              "how": f"{kind}'s data-sheet bandwidth, FLOPs unbounded"} if peak else machine_limits()
    record("machine", {"device": kind, "devices": jax.device_count(), "jax": jax.__version__,
                       "python": platform.python_version(), "peak_gbs": peak, "model": FLAGS.model})
    record("command", " ".join(["benchmarks/gpu_check.sh", *sys.argv[1:]]))
    print(f"# {kind} x{jax.device_count()}, jax {jax.__version__}, peak {peak:.0f} GB/s", flush=True)

    start = time.perf_counter()
    cfg, params, tokenizer = load_model(FLAGS.model)
    print(f"loaded {FLAGS.model} ({cfg.dtype}) in {time.perf_counter() - start:.1f} s", flush=True)
    bf16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    engine = Engine(cfg.replace(dtype="bfloat16"), bf16, tokenizer,
                    max_slots=FLAGS.max_slots, max_len=FLAGS.max_len,
                    batch_invariant=FLAGS.batch_invariant)
    record("engine", {"dtype": "bfloat16", "max_slots": FLAGS.max_slots, "max_len": FLAGS.max_len,
                      "batch_invariant": FLAGS.batch_invariant,
                      "windows": engine.executor.buckets.windows})

    if "greedy" in FLAGS.sections:
        with jax.default_matmul_precision("highest"):
            reference = greedy(Engine(cfg, params, tokenizer, max_slots=8, max_len=256))
        tokens = greedy(engine)
        agree = [first_difference(x, y) for x, y in zip(tokens, reference)]
        texts = [tokenizer.decode(t) for t in tokens] if tokenizer else []
        record("greedy", {"agree_up_to": agree, "lengths": [len(r) for r in reference],
                          "bf16_texts": texts})
        print(f"\n## bf16 greedy tokens equal fp32 up to position {agree} "
              f"(of {[len(r) for r in reference]})", flush=True)
        for text in texts:
            print("  ", repr(text[:120]), flush=True)

    compiles = []
    monitoring.register_event_duration_secs_listener(
        lambda name, *_, **__: compiles.append(name)
        if name == "/jax/core/compile/backend_compile_duration" else None)
    if FLAGS.warmup:
        start = time.perf_counter()
        engine.executor.warmup(prompt_lengths=[16, 32])
        record("compile_s", time.perf_counter() - start)
        record("executables", len(compiles))
        print(f"\ncompiled every bucket ({len(compiles)} executables) in "
              f"{results['compile_s']:.1f} s", flush=True)

    if "steps" in FLAGS.sections:
        print("\n## decode step, bfloat16\n", flush=True)
        decode_table(engine, limits)

    if "invariance" in FLAGS.sections:
        n = FLAGS.invariance_requests
        staggered = workload.demo(engine.chat_prompt, n=n, rate=50.0)
        fused = engine.run(staggered).outputs
        alone = [engine.run([TimedRequest(r.prompt, r.params)]).outputs[0] for r in staggered]
        same = [a.token_ids == b.token_ids for a, b in zip(fused, alone)]
        diverge = [first_difference(a.token_ids, b.token_ids) for a, b in zip(fused, alone)]
        record("invariance", {"requests": n, "identical": sum(same), "first_difference": diverge,
                              "lengths": [len(a.token_ids) for a in alone]})
        print(f"\n## batch invariance: {sum(same)}/{n} staggered requests equal their solo "
              f"runs token for token (first differences {diverge})", flush=True)

    if "headline" in FLAGS.sections:
        params_512 = SamplingParams(max_new_tokens=FLAGS.headline_output_len, ignore_eos=True)
        # The first run after warm-up pays one-time host costs; the median of the next two counts.
        solo = float(np.median([engine.run([TimedRequest([5] * 8, params_512)]).outputs[0].latency_s
                                for _ in range(3)][1:]))
        interval = FLAGS.interval_ratio * solo
        work = workload.synthetic("constant", 32, 8, FLAGS.headline_output_len, cfg.vocab_size,
                                  interval_s=interval)
        figures = {"solo_latency_s": solo, "interval_s": interval}
        print(f"\n## headline: 32 x {FLAGS.headline_output_len} tokens, one every {interval * 1e3:.0f} ms "
              f"(solo latency {solo:.2f} s)", flush=True)
        for policy in ("flover", "fused", "sequential"):
            summary = bench.run(engine, work, policy=policy, warmup=False, solo_samples=0)
            summary.pop("requests")
            figures[policy] = summary
            record("headline", figures)
            print(f"  {policy:>10}: makespan {summary['makespan_s']:.2f} s, "
                  f"{summary['output_tokens_per_s']:.0f} tok/s, mean in flight "
                  f"{summary['mean_inflight']:.1f}", flush=True)
        speedup = figures["sequential"]["makespan_s"] / figures["flover"]["makespan_s"]
        figures["flover_vs_sequential"] = speedup
        record("headline", figures)
        print(f"  flover is {speedup:.1f}x sequential", flush=True)

    if "burst" in FLAGS.sections:
        work = workload.synthetic("burst", FLAGS.burst_requests, 8, FLAGS.burst_output_len,
                                  cfg.vocab_size)
        summary = bench.run(engine, work, policy="flover", warmup=False, solo_samples=0)
        summary.pop("requests")
        record("burst", summary)
        print(f"\n## burst: {FLAGS.burst_requests} x {FLAGS.burst_output_len} tokens at once: "
              f"makespan {summary['makespan_s']:.2f} s, {summary['output_tokens_per_s']:.0f} tok/s",
              flush=True)


if __name__ == "__main__":
    app.run(main)
