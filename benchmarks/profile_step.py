"""Where a decode step's time goes: a jax.profiler trace of the default model's decode step,
each XLA op attributed to the model's named scopes (projections, attention, mlp, lm_head,
sampling) and to what the op does (matmul, copy, ...). One command:

    .venv/bin/python benchmarks/profile_step.py

Prints a Markdown table per (live slots, context) point: milliseconds per step and share.
"""

from __future__ import annotations

import collections
import re
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
from absl import app, flags, logging

from flover_jax.buckets import bucket
from flover_jax.engine import Engine

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m", "Model to profile.")
flags.DEFINE_list("points", ["1:240", "32:240", "64:48", "64:240"], "live_slots:context pairs.")
flags.DEFINE_string("dtype", "float32", "Weights' and activations' dtype.")
flags.DEFINE_enum("quantize", None, ["int8"], "Weight-only quantization of the matmul weights.")
flags.DEFINE_integer("top_ops", 0, "Also list this many of the costliest ops by name.")
flags.DEFINE_integer("max_slots", 64, "Slot capacity.")
flags.DEFINE_integer("max_len", 512, "Tokens per slot.")
flags.DEFINE_integer("steps", 5, "Traced decode steps per point.")

SCOPES = ("projections", "attention", "mlp", "lm_head", "sampling")
# What an op does, from the name XLA gives it (its thunk's name in the trace).
KINDS = (("matmul", ("ynn", "dot", "gemm", "onednn")), ("copy / transpose", ("copy", "transpose", "slice")),
         ("cache write", ("scatter", "update")), ("CPU kernel", ("ffi_call",)))


def op_scopes(compiled_text: str) -> dict[str, str]:
    """Instruction name (unique in an HLO module, and the name of its thunk) -> named scope.

    Some rewrites drop an op's metadata (batch-1 dots do); those are placed by the weights they
    read, through bitcasts (params_layers_3__mlp_w_out -> mlp)."""
    lines = dict(re.findall(r"%([\w.\-]+) = ([^\n]*)", compiled_text))
    by_weight = (("_mlp_", "mlp"), ("_attn_", "projections"), ("lm_head", "lm_head"))

    def weight_scope(name: str, depth: int = 3) -> str | None:
        line = lines.get(name, "")
        found = next((scope for mark, scope in by_weight if mark in line), None)
        if found or depth == 0:
            return found
        operands = re.findall(r"%([\w.\-]+)", line.split("),")[0])
        return next(filter(None, (weight_scope(o, depth - 1) for o in operands)), None)

    scopes = {}
    for name, line in lines.items():
        op_name = re.search(r'op_name="([^"]*)"', line)
        if op_name:
            scopes[name] = next((s for s in SCOPES if f"/{s}/" in op_name.group(1)), "other")
        else:
            scopes[name] = weight_scope(name) or "other"
    return scopes


def ynn_reductions(compiled_text: str) -> set[str]:
    """XLA:CPU hands reductions to YNNPACK too: the "ynn" fusions made from a reduce (no matmuls)."""
    return set(re.findall(r'%([\w.\-]*ynn[\w.\-]*) = [^\n]*op_name="[^"]*/reduce_', compiled_text))


def kind_of(op: str, reductions: set[str]) -> str:
    if op in reductions:
        return "elementwise / reduce"
    return next((kind for kind, marks in KINDS if any(m in op for m in marks)), "elementwise / reduce")


def profile(executor, width: int, kv_len: int, steps: int) -> dict[str, float]:
    """Milliseconds per step of each traced op, summed over the XLA threads."""
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(steps):
                executor.read(executor.decode(0, width, kv_len))
        (path,) = Path(trace_dir).rglob("*.xplane.pb")
        data = jax.profiler.ProfileData.from_file(str(path))
    per_op = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if line.name == "python":
                continue
            for event in line.events:
                per_op[event.name] += event.duration_ns / 1e6 / steps
    return per_op


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    engine = Engine.from_pretrained(FLAGS.model, dtype=FLAGS.dtype, quantize=FLAGS.quantize,
                                    max_slots=FLAGS.max_slots, max_len=FLAGS.max_len)
    ex = engine.executor
    weights = FLAGS.dtype + (f", {FLAGS.quantize} weights" if FLAGS.quantize else "")
    print(f"{FLAGS.model}, {weights}, {jax.devices()[0].device_kind}, jax {jax.__version__}; "
          "command: `.venv/bin/python benchmarks/profile_step.py`. Op times are summed over "
          "XLA's threads, so they can exceed the step's wall time.\n")
    for point in FLAGS.points:
        live, context = (int(x) for x in point.split(":"))
        width = bucket(live, ex.buckets.windows)
        kv_len = ex.buckets.program_kv_len(bucket(context + 1, ex.buckets.kv_lengths))
        ex.state = ex.state.busy(live, context)
        lowered = ex.verbs.decode_step.lower(ex.params, ex.state, jnp.int32(0), width, kv_len)
        compiled_text = lowered.compile().as_text()
        scopes, reductions = op_scopes(compiled_text), ynn_reductions(compiled_text)
        for _ in range(2):
            ex.read(ex.decode(0, width, kv_len))  # compile, warm
        per_op = profile(ex, width, kv_len, FLAGS.steps)
        table = collections.Counter()
        for op, ms in per_op.items():
            # A conditional's time is its branch's ops', traced on their own.
            if op in scopes and not op.startswith(("cond", "conditional")):
                table[(scopes[op], kind_of(op, reductions))] += ms
        total = sum(table.values())
        print(f"### {live} live slots, {context} tokens of context (window {width}, kv_len {kv_len})\n")
        print("| part of the model | op kind | ms per step | share |\n|---|---|---:|---:|")
        for (scope, kind), ms in table.most_common():
            if ms >= 0.005 * total:
                print(f"| {scope} | {kind} | {ms:.1f} | {100 * ms / total:.0f}% |")
        print(f"| all ops | | {total:.1f} | 100% |\n")
        if FLAGS.top_ops:
            print("| op | part of the model | ms per step |\n|---|---|---:|")
            for op, ms in per_op.most_common(FLAGS.top_ops):
                print(f"| {op} | {scopes.get(op, '?')} | {ms:.2f} |")
            print()
    ex.state = ex.state.replace(active=jnp.zeros((ex.num_slots,), bool))


if __name__ == "__main__":
    app.run(main)
