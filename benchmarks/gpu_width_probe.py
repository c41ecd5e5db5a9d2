"""On a GPU: what a decode step costs by window width with one live row, and a request's
latency alone on windows from 1 row against windows from 8 (the engine's choice off CPU).
Random weights of SmolLM2-135M's shape in bfloat16, so nothing needs carrying to the card:

    python benchmarks/gpu_width_probe.py [--tiny] [--output_json=PATH]

Steps are timed read back every call and pipelined (20 dispatched, one read): medians.
"""

from __future__ import annotations

import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from flover_jax.buckets import bucket, powers_of_two
from flover_jax.engine import Engine, TimedRequest
from flover_jax.sampling_params import SamplingParams
from models.presets import tiny_config
from models.transformer import init_params

FLAGS = flags.FLAGS
flags.DEFINE_bool("tiny", False, "A tiny float32 model instead (to try the script on a CPU).")
flags.DEFINE_integer("max_slots", 32, "Slot capacity.")
flags.DEFINE_integer("output_len", 256, "Tokens the request alone makes.")
flags.DEFINE_string("output_json", "gpu_width_probe.json", "Where the figures go.")

# SmolLM2's shapes (its rope base plays no part in the timings of random weights).
SMOLLM2_SHAPE = dict(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                     head_dim=64, d_ff=1536, max_positions=8192)


def main(argv):
    del argv
    shape = {} if FLAGS.tiny else SMOLLM2_SHAPE
    cfg = tiny_config("llama", **shape, dtype="float32" if FLAGS.tiny else "bfloat16")
    max_len = 512 if FLAGS.tiny else 576
    engine = Engine(cfg, init_params(cfg, jax.random.key(0)), None,
                    max_slots=FLAGS.max_slots, max_len=max_len)
    ex = engine.executor
    out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
           "command": "python benchmarks/gpu_width_probe.py", "steps": {}, "solo": {}}
    engine_buckets = ex.buckets
    every = dataclasses.replace(engine_buckets, windows=powers_of_two(1, FLAGS.max_slots))
    ex.buckets = every
    kv_len = ex.buckets.program_kv_len(bucket(241, ex.buckets.kv_lengths))
    ex.state = ex.state.busy(1, 240)
    for width in every.windows:
        for _ in range(3):
            ex.read(ex.decode(0, width, kv_len))
        read_back = []
        for _ in range(20):
            start = time.perf_counter()
            ex.read(ex.decode(0, width, kv_len))
            read_back.append(time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(20):
            tokens = ex.decode(0, width, kv_len)
        ex.read(tokens)
        pipelined = (time.perf_counter() - start) / 20
        out["steps"][width] = {"read_back_ms": float(np.median(read_back)) * 1e3,
                               "pipelined_ms": pipelined * 1e3}
        print(f"1 live row, window {width:2d}: {np.median(read_back) * 1e3:.2f} ms a step read "
              f"back, {pipelined * 1e3:.2f} ms pipelined", flush=True)
    ex.state = ex.state.replace(active=jnp.zeros((ex.num_slots,), bool))
    request = TimedRequest([5] * 8, SamplingParams(max_new_tokens=FLAGS.output_len, ignore_eos=True))
    for name, windows in (("windows from 1", every.windows),
                          ("windows from 8", powers_of_two(min(8, FLAGS.max_slots), FLAGS.max_slots))):
        ex.buckets = dataclasses.replace(engine_buckets, windows=windows)
        # The first run compiles what the request meets; the median of the next three counts.
        latencies = [engine.run([request]).outputs[0].latency_s for _ in range(4)][1:]
        out["solo"][name] = latencies
        print(f"a request alone, 8 + {FLAGS.output_len} tokens, {name}: "
              f"{np.median(latencies):.3f} s (runs {latencies})", flush=True)
    out["engine_windows"] = list(engine_buckets.windows)
    with open(FLAGS.output_json, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    app.run(main)
