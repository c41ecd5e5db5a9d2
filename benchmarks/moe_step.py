"""Does a mixture-of-experts decode step cost what its active parameters cost?

Times the decode step of a Mixtral-shaped random model (8 experts, 2 per token) against two
dense models with the same attention, embedding and head: one of the same *active* size (MLP
width = top_k x the expert width: what one token computes) and one of the same *total* size
(MLP width = experts x the expert width: every expert read). A step runs only the experts its
tokens chose, each once (`models.layers.experts`), so at 1 live slot the MoE step should cost
about the active-size model's, and as slots grow it should move towards the total-size
model's: n tokens choose about E * (1 - (1 - k/E)^n) distinct experts between them (5.5 of 8
at n = 4).

    .venv/bin/python benchmarks/moe_step.py --output_json=benchmarks/results/moe_step.json
"""

from __future__ import annotations

import dataclasses
import gc
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from common import cpu_description  # benchmarks/ is on the path

from flover_jax.buckets import bucket
from flover_jax.engine import Engine
from models.config import LayerSpec, Moe, Rope
from models.presets import tiny_config
from models.transformer import init_params

flags.DEFINE_integer("d_model", 1024, "Model width (16 heads of 64, 4 KV heads).")
flags.DEFINE_integer("layers", 4, "Layers.")
flags.DEFINE_integer("experts", 8, "Experts per layer.")
flags.DEFINE_integer("top_k", 2, "Experts per token.")
flags.DEFINE_integer("expert_d_ff", 3584, "Each expert's MLP width (Mixtral's ratio to d_model).")
flags.DEFINE_integer("vocab", 4096, "Vocabulary (small: the embedding and head are not the subject).")
flags.DEFINE_list("slots", ["1", "2", "3", "4", "8", "16"], "Live slots timed.")
flags.DEFINE_integer("context", 64, "Cached tokens of every live slot.")
flags.DEFINE_integer("repeats", 15, "Timed steps per point (median reported).")
flags.DEFINE_string("output_json", None, "Write the record here.")
FLAGS = flags.FLAGS


def configs() -> dict:
    swiglu = LayerSpec(rope=Rope(), mlp="gated", activation="silu")
    moe = Moe(FLAGS.experts, FLAGS.top_k, FLAGS.expert_d_ff)
    base = tiny_config(
        "mixtral", n_layers=FLAGS.layers, vocab_size=FLAGS.vocab, d_model=FLAGS.d_model,
        n_heads=FLAGS.d_model // 64, n_kv_heads=FLAGS.d_model // 256, head_dim=64,
        max_positions=512,
    )
    return {
        "moe": base.replace(layers=(dataclasses.replace(swiglu, moe=moe),) * FLAGS.layers),
        "dense_active": base.replace(family="llama", d_ff=FLAGS.top_k * FLAGS.expert_d_ff,
                                     layers=(swiglu,) * FLAGS.layers),
        "dense_total": base.replace(family="llama", d_ff=FLAGS.experts * FLAGS.expert_d_ff,
                                    layers=(swiglu,) * FLAGS.layers),
    }


def step_ms(engine: Engine, live: int) -> float:
    ex = engine.executor
    kv_len = bucket(FLAGS.context + FLAGS.repeats + 2, ex.buckets.kv_lengths)
    ex.state = ex.state.busy(live, FLAGS.context)
    ex.read(ex.decode(0, live, kv_len))  # compile
    times = []
    for _ in range(FLAGS.repeats):
        start = time.perf_counter()
        ex.read(ex.decode(0, live, kv_len))
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def main(_) -> None:
    slots = [int(n) for n in FLAGS.slots]
    record = {
        "command": "python benchmarks/moe_step.py " + " ".join(sys.argv[1:]),
        "cpu": cpu_description(), "at": time.strftime("%Y-%m-%d"), "jax": jax.__version__,
        "shape": {"d_model": FLAGS.d_model, "layers": FLAGS.layers, "experts": FLAGS.experts,
                  "top_k": FLAGS.top_k, "expert_d_ff": FLAGS.expert_d_ff, "vocab": FLAGS.vocab,
                  "context": FLAGS.context, "dtype": "float32"},
        "slots": slots, "models": {},
    }
    for name, cfg in configs().items():
        params = init_params(cfg, jax.random.key(0))
        mlp_bytes = sum(x.nbytes for layer in params.layers for x in jax.tree.leaves(layer.mlp))
        # XLA's matmuls for both: the experts always run there (the CPU matmul kernel packs dense
        # weights only), so the comparison is of one op family.
        engine = Engine(cfg, params, max_slots=max(slots), max_len=512, matmul="xla")
        ms = [step_ms(engine, n) for n in slots]
        record["models"][name] = {"d_ff": cfg.d_ff, "mlp_bytes": mlp_bytes, "step_ms": ms}
        print(name, f"{mlp_bytes / 1e6:.0f} MB of MLP weights", dict(zip(slots, ms)), flush=True)
        del engine, params
        gc.collect()
    print(json.dumps(record, indent=1))
    if FLAGS.output_json:
        Path(FLAGS.output_json).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    app.run(main)
