"""Decode-step time against live slots, compaction time against moved slots, and prefill time
per prompt bucket, on the default model (SmolLM2-135M, float32 unless --dtype or --quantize
say otherwise). One command:

    .venv/bin/python benchmarks/step_times.py

Prints Markdown tables: medians of --repeats calls, tokens/s, the bytes each decode step must
read (weights + the live slots' KV) per second, and the step's roofline (reads at the machine's
measured bandwidth or FLOPs at its measured rate, whichever takes longer) as a share of its time.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from common import ENGINE_OPS, decode_bytes, machine_limits, step_roofline  # benchmarks/ on path

from flover_jax import op_choice
from flover_jax.buckets import Buckets, bucket, powers_of_two
from flover_jax.chunks import PromptPiece
from flover_jax.engine import Engine
from flover_jax.sampling_params import SamplingParams
from models import kernels

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m", "Model to time.")
flags.DEFINE_string("dtype", "float32", "Weights' and activations' dtype.")
flags.DEFINE_enum("quantize", None, ["int8"], "Weight-only quantization of the matmul weights.")
flags.DEFINE_integer("max_slots", 64, "Slot capacity (live slots go 1, 2, 4, ... up to it).")
flags.DEFINE_integer("max_len", 1024, "Tokens per slot.")
flags.DEFINE_list("contexts", ["48", "240"], "Cached tokens of every live slot while timing.")
flags.DEFINE_integer("repeats", 9, "Timed calls per point (median reported).")
flags.DEFINE_string("limits_json", "benchmarks/results/machine_limits.json",
                    "Where the machine's measured limits go (roofline.py bounds with them too).")
flags.DEFINE_bool("default_against_paths", False,
                  "Instead of each engine's tables (step, attention kernel, prefill, compaction), "
                  "one table of the default's step time against the fastest of --ops, the "
                  "engines timed in turn.")
flags.DEFINE_list("ops", ["auto", "cpu_kernels", "xla_matmuls", "xla_attention", "xla"],
                  "Engines to time, a table each: auto (the default: what timing the others at "
                  "start-up picked), cpu_kernels (the CPU attention and matmul kernels), "
                  "xla_matmuls (the attention kernel, XLA's matmuls), xla_attention (XLA's "
                  "attention, the matmul kernel), xla (XLA's ops).")


def median_ms(fn, repeats: int) -> float:
    fn()  # compile / warm
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def decode_table(engine: Engine, limits: dict) -> None:
    """The decode step of `engine` at each width and context, against its bytes and roofline."""
    ex, cfg = engine.executor, engine.cfg
    slots = ex.num_slots
    weight_bytes, kv_token = decode_bytes(cfg, ex.params)
    roofline = step_roofline(cfg, ex.params)
    bandwidth, flop_rate = limits["read_gbs"] * 1e9, limits["matmul_gflops"] * 1e9
    contexts = [int(c) for c in FLAGS.contexts]
    print(f"{weight_bytes / 1e6:.0f} MB of weights read per step (embedding table excluded), "
          f"{kv_token / 1e3:.1f} kB of KV per cached token; roofline: the step's reads at "
          f"{limits['read_gbs']:.0f} GB/s or its FLOPs at {limits['matmul_gflops']:.0f} GFLOP/s, "
          f"whichever takes longer ({limits['how']})\n")
    header = " | ".join(f"ctx {c}: ms | tok/s | GB/s | roofline" for c in contexts)
    print(f"| live slots | {header} |")
    print("|---:|" + "---:|---:|---:|---:|" * len(contexts))
    n = 1
    while n <= slots:
        cells = []
        for context in contexts:
            kv_len = bucket(context + FLAGS.repeats + 2, ex.buckets.kv_lengths)
            ex.state = ex.state.busy(n, context)
            ms = median_ms(lambda: ex.read(ex.decode(0, n, kv_len)), FLAGS.repeats)
            rate = (weight_bytes + n * context * kv_token) / (ms / 1e3) / 1e9
            best = roofline(np.full(n, context), bandwidth, flop_rate)
            cells.append(f"{ms:.1f} | {n / ms * 1e3:.0f} | {rate:.1f} | {best / (ms / 1e3):.0%}")
        print(f"| {n} | " + " | ".join(cells) + " |")
        n *= 2
    ex.state = ex.state.replace(active=jnp.zeros((slots,), bool))


def default_against_paths_table() -> None:
    """The default engine's step time against the fastest of the paths it chose among, at
    every width and context: every engine built at once and timed in turn as `auto` times its
    candidates (`op_choice.decode_step_ms`), so a drift of the machine's speed (minutes long on
    shared machines) reaches them all alike."""
    contexts = [int(c) for c in FLAGS.contexts]
    max_len = bucket(max(contexts) + 3, Buckets.for_engine(1, FLAGS.max_len).kv_lengths)
    engines = {name: Engine.from_pretrained(
        FLAGS.model, dtype=FLAGS.dtype, quantize=FLAGS.quantize, max_slots=FLAGS.max_slots,
        max_len=max_len, **ENGINE_OPS[name]).executor for name in FLAGS.ops}
    picked = engines["auto"].op_choice
    for ex in list(engines.values())[1:]:  # they take turns on the first one's state
        ex.state = None
    widths = powers_of_two(1, FLAGS.max_slots)
    step_ms = {context: op_choice.decode_step_ms(engines, widths, context, FLAGS.repeats)
               for context in contexts}
    print(f"The default (`auto`, which picked attention={picked.attention}, "
          f"matmul={picked.matmul}) against the fastest of its paths: the engines timed in turn, "
          f"two steps each (the second timed), median of {FLAGS.repeats} rounds:\n")
    print("| live slots | context | default ms | fastest path | its ms | default / fastest |")
    print("|---:|---:|---:|---|---:|---:|")
    for n in widths:
        for context in contexts:
            ms = {name: by_width[n] for name, by_width in step_ms[context].items()}
            best = min((name for name in ms if name != "auto"), key=ms.get)
            print(f"| {n} | {context} | {ms['auto']:.1f} | {best} | {ms[best]:.1f} | "
                  f"{ms['auto'] / ms[best]:.2f}x |")
    print()


def kernel_table(engine: Engine) -> None:
    """The CPU attention kernel alone: one step's calls (one per layer) on the engine's cache,
    every live slot reading `context` positions, against the live KV bytes they read."""
    ex, cfg = engine.executor, engine.cfg
    _, kv_token = decode_bytes(cfg, ex.params)
    contexts = [int(c) for c in FLAGS.contexts]
    cache = ex.state.cache

    @jax.jit
    def attend_every_layer(q, lengths, cache):
        for k, v in zip(cache.k, cache.v):  # chained, so no call can be skipped or overlapped
            q = kernels.cached_attention(q, k, v, jnp.arange(q.shape[0]), lengths)
        return q

    print("\nThe attention kernel alone, one call per layer (the step's attention):\n")
    print("| live slots | " + " | ".join(f"ctx {c}: ms | GB/s of live KV" for c in contexts) + " |")
    print("|---:|" + "---:|---:|" * len(contexts))
    n = 1
    while n <= ex.num_slots:
        q = jnp.ones((n, cfg.n_kv_heads, cfg.q_per_kv, cfg.head_dim), jnp.float32)
        cells = []
        for context in contexts:
            lengths = jnp.full((n,), context, jnp.int32)
            ms = median_ms(lambda: attend_every_layer(q, lengths, cache).block_until_ready(),
                           FLAGS.repeats)
            cells.append(f"{ms:.2f} | {n * context * kv_token / (ms / 1e3) / 1e9:.1f}")
        print(f"| {n} | " + " | ".join(cells) + " |")
        n *= 2


def compaction_table(engine: Engine) -> None:
    ex = engine.executor
    half = ex.num_slots // 2
    print("\n| moved slots | " + " | ".join(f"compact ms (kv {k})" for k in (256, 1024)) + " |")
    print("|---:|---:|---:|")
    n = 1
    while n <= half:
        moves = [(half + i, i) for i in range(n)]
        cells = []
        for kv_len in (256, 1024):
            def move(kv_len=kv_len):
                ex.compact(moves, kv_len)
                jax.block_until_ready(ex.state)

            cells.append(f"{median_ms(move, FLAGS.repeats):.2f}")
        print(f"| {n} | " + " | ".join(cells) + " |")
        n *= 2


def prefill_table(engine: Engine) -> None:
    ex = engine.executor
    print("\n| prompt bucket | prefill ms (1 prompt) | (8 prompts) |")
    print("|---:|---:|---:|")
    params = SamplingParams(max_new_tokens=1)
    for t in [t for t in ex.buckets.prompt_lengths if t <= 512]:
        prompt = list(range(3, 3 + t))
        one = median_ms(lambda: ex.read(ex.prefill([PromptPiece(0, prompt, 0, True, params)])), 3)
        eight = median_ms(lambda: ex.read(ex.prefill(
            [PromptPiece(slot, prompt, 0, True, params) for slot in range(8)])), 3)
        print(f"| {t} | {one:.1f} | {eight:.1f} |")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax narrates every file at INFO
    weights = FLAGS.dtype + (f", {FLAGS.quantize} weights" if FLAGS.quantize else "")
    print(f"{FLAGS.model}, {weights}, {jax.devices()[0].device_kind}, jax {jax.__version__}; "
          f"command: `.venv/bin/python benchmarks/step_times.py --dtype={FLAGS.dtype}"
          f"{f' --quantize={FLAGS.quantize}' if FLAGS.quantize else ''} --ops={','.join(FLAGS.ops)}"
          f"{' --default_against_paths' if FLAGS.default_against_paths else ''}`\n")
    if FLAGS.default_against_paths:
        if "auto" not in FLAGS.ops or len(FLAGS.ops) < 2:
            raise app.UsageError(f"--ops={','.join(FLAGS.ops)}: --default_against_paths needs "
                                 "auto and at least one other")
        default_against_paths_table()
        return
    limits = machine_limits()  # before any engine holds memory
    Path(FLAGS.limits_json).write_text(json.dumps(limits, indent=1))
    for i, name in enumerate(FLAGS.ops):
        engine = Engine.from_pretrained(
            FLAGS.model, dtype=FLAGS.dtype, quantize=FLAGS.quantize, max_slots=FLAGS.max_slots,
            max_len=FLAGS.max_len, **ENGINE_OPS[name])
        picked = engine.executor.op_choice
        print(f"Decode steps, {', '.join(f'{k}={v}' for k, v in ENGINE_OPS[name].items())}"
              + (f" (picked: attention={picked.attention}, matmul={picked.matmul}, "
                 f"{picked.how})" if name == "auto" else "") + ":\n")
        decode_table(engine, limits)
        if i == 0:  # the first (default) engine's attention kernel and prefill
            if engine.executor.attention_kernel:
                kernel_table(engine)
            prefill_table(engine)
        print()
        del engine
        gc.collect()
    # Twice the slots, so that up to max_slots of them can move into the other half.
    compaction_table(Engine.from_pretrained(
        FLAGS.model, dtype=FLAGS.dtype, max_slots=2 * FLAGS.max_slots, max_len=FLAGS.max_len))


if __name__ == "__main__":
    app.run(main)
