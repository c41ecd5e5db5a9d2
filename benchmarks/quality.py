"""What narrower weights cost in quality, against float32, on real text that ships with Python
(`pydoc_data.topics`: the pages `help()` shows): teacher-forced top-1 agreement with float32's
next-token prediction, and perplexity, for bfloat16 (weights and KV cache), int8 weights and
both, each computed as an engine on this machine computes it (on CPU: float32 activations).

    .venv/bin/python benchmarks/quality.py --output_json=benchmarks/results/quality.json

Each variant runs the forward pass the engine serves with: on one CPU device the matmul
kernel's packed panels (float32, bfloat16 or int8), as `auto` may pick them (held to XLA's dot
in tests/test_kernels.py); where the CPU has AMX tiles, bfloat16 also on the tiles (`--matmul=amx`:
activations as two bfloat16 parts at each matmul's input).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pydoc_data.topics
from absl import app, flags
from common import cpu_description  # benchmarks/ is on the path

from flover_jax.executor import compute_config
from flover_jax.loader import load_model
from models import kernels, transformer

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m", "Model to measure.")
flags.DEFINE_integer("windows", 16, "Windows of text, each scored on its own.")
flags.DEFINE_integer("window_len", 256, "Tokens per window.")
flags.DEFINE_string("output_json", None, "Where to write the figures.")

# name -> (load_model's options, whether the bfloat16 matmuls run on AMX tiles)
VARIANTS = {"float32": (dict(dtype="float32"), False),
            "bfloat16": (dict(dtype="bfloat16"), False),
            "bfloat16, AMX tiles": (dict(dtype="bfloat16"), True),
            "int8": (dict(dtype="float32", quantize="int8"), False),
            "bfloat16 + int8": (dict(dtype="bfloat16", quantize="int8"), False)}


def text_windows(tokenizer, windows: int, window_len: int) -> np.ndarray:
    """The topics in name order as one text, cut into [windows, window_len] tokens."""
    text = "\n\n".join(pydoc_data.topics.topics[name] for name in sorted(pydoc_data.topics.topics))
    ids = tokenizer.encode(text)
    if len(ids) < windows * window_len:
        raise ValueError(f"--windows={windows} x --window_len={window_len}: the text has only "
                         f"{len(ids)} tokens")
    return np.asarray(ids[: windows * window_len], np.int32).reshape(windows, window_len)


def forward_logits(options: dict, tiles: bool, tokens: np.ndarray) -> np.ndarray:
    """float32 logits [windows, window_len, vocab] of one variant, a window at a time."""
    cfg, params, _ = load_model(FLAGS.model, **options)
    on_cpu = jax.devices()[0].platform == "cpu"
    cfg = compute_config(cfg, on_cpu)  # the activations' dtype an engine here computes in
    if on_cpu and kernels.cpu_kernel_available():
        params = transformer.pack_weights(params, cfg, tiles=tiles)
    forward = jax.jit(transformer.forward, static_argnums=1)
    return np.stack([np.asarray(forward(params, cfg, jnp.asarray(row[None])))[0] for row in tokens])


def main(argv):
    del argv
    _, _, tokenizer = load_model(FLAGS.model)
    tokens = text_windows(tokenizer, FLAGS.windows, FLAGS.window_len)
    targets = tokens[:, 1:]
    results, reference = {}, None
    for name, (options, tiles) in VARIANTS.items():
        if tiles and not kernels.tiles_available():
            continue  # this CPU has no AMX tiles
        start = time.perf_counter()
        logits = forward_logits(options, tiles, tokens)[:, :-1]  # each position predicts the next token
        log_probs = jax.nn.log_softmax(jnp.asarray(logits), axis=-1)
        nll = -np.take_along_axis(np.asarray(log_probs), targets[..., None], axis=-1)[..., 0]
        top1 = logits.argmax(-1)
        if reference is None:
            reference = {"top1": top1, "perplexity": float(np.exp(nll.mean()))}
        perplexity = float(np.exp(nll.mean()))
        results[name] = {
            "perplexity": perplexity,
            "perplexity_vs_float32": perplexity / reference["perplexity"] - 1,
            "top1_agreement": float((top1 == reference["top1"]).mean()),
            "seconds": time.perf_counter() - start,
        }
        print(f"{name}: {results[name]}", file=sys.stderr, flush=True)
    scored = targets.size
    print(f"{FLAGS.model} on `pydoc_data.topics` (Python {sys.version.split()[0]}): "
          f"{FLAGS.windows} windows of {FLAGS.window_len} tokens, {scored} next-token "
          f"predictions; {cpu_description()}; command: `.venv/bin/python benchmarks/quality.py`\n")
    print("| weights | perplexity | vs float32 | top-1 agreement with float32 |")
    print("|---|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['perplexity']:.3f} | {r['perplexity_vs_float32']:+.2%} | "
              f"{r['top1_agreement']:.2%} |")
    if FLAGS.output_json:
        Path(FLAGS.output_json).write_text(json.dumps(
            {"model": FLAGS.model, "cpu": cpu_description(), "windows": FLAGS.windows,
             "window_len": FLAGS.window_len, "python": sys.version.split()[0],
             "variants": results}, indent=1))


if __name__ == "__main__":
    app.run(main)
