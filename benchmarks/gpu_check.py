"""Driven by gpu_check.sh: bf16 vs fp32 greedy tokens, decode-step table, a fused run, per tp."""

from __future__ import annotations

import time

import jax
from absl import app, flags, logging
from step_times import decode_table  # benchmarks/ is on sys.path when run as a script

from flover_jax.engine import Engine, TimedRequest
from flover_jax.sampling import SamplingParams

FLAGS = flags.FLAGS
flags.DEFINE_float("peak_gbs", 0.0, "The card's peak memory bandwidth (0: guess from its name).")
flags.DEFINE_integer("requests", 64, "Requests of the fused run (all at once).")
flags.DEFINE_integer("output_len", 256, "Tokens each request of the fused run generates.")

PEAKS_GBS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0, "L4": 300.0}
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "What is 12 times 7?", "Why is the sky blue?"]


def greedy(engine: Engine) -> list[list[int]]:
    prompts = [engine.chat_prompt(q) for q in QUESTIONS]
    return [o.token_ids for o in engine.generate(prompts, SamplingParams(max_new_tokens=48))]


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax narrates every file at INFO
    kind = jax.devices()[0].device_kind
    peak = FLAGS.peak_gbs or next((v for k, v in PEAKS_GBS.items() if k in kind), 0.0)
    FLAGS.bandwidth_gbs = peak or FLAGS.bandwidth_gbs
    print(f"# {kind} x{jax.device_count()}, jax {jax.__version__}, peak {peak:.0f} GB/s\n")
    reference = greedy(Engine.from_pretrained(FLAGS.model, max_slots=8, max_len=256))
    heads = Engine.from_pretrained(FLAGS.model, max_slots=1, max_len=16).cfg.n_heads
    tps = sorted({1, max(t for t in range(1, jax.device_count() + 1) if heads % t == 0)})
    for tp in tps:
        engine = Engine.from_pretrained(FLAGS.model, dtype="bfloat16", tp=tp,
                                        max_slots=FLAGS.max_slots, max_len=FLAGS.max_len)
        tokens = greedy(engine)
        agree = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
                 for x, y in zip(tokens, reference)]
        print(f"## tp={tp}, bfloat16\n\ngreedy tokens equal to float32 up to position {agree} "
              f"(of {[len(r) for r in reference]})\n")
        decode_table(engine)
        params = SamplingParams(max_new_tokens=FLAGS.output_len, ignore_eos=True)
        work = [TimedRequest([1 + i % 100] * 8, params) for i in range(FLAGS.requests)]
        engine.executor.warmup(kv_lengths=[k for k in engine.executor.buckets.kv_lengths if k <= 512])
        start = time.perf_counter()
        result = engine.run(work)
        wall = time.perf_counter() - start
        tokens_out = sum(len(o.token_ids) for o in result.outputs)
        print(f"\nfused run: {FLAGS.requests} requests x {FLAGS.output_len} tokens in {wall:.2f} s = "
              f"{tokens_out / wall:.0f} tokens/s (mean in flight {result.stats.mean_inflight:.1f})\n")
        if min(agree) < 8:
            raise SystemExit(f"bf16 greedy diverges from fp32 within 8 tokens: {agree}")


if __name__ == "__main__":
    app.run(main)
