"""Peak host memory of loading a checkpoint, against the checkpoint's bytes on disk.

Builds a random bfloat16 Hugging Face checkpoint (LLaMA-shaped, a few hundred MB of
safetensors) in a temporary folder, then loads it in a fresh process per case, once in its own
dtype and once as float32 (`dtype="float32"`), and records that process's peak resident memory
(VmHWM, which counts mapped file pages too) minus its resident memory after the imports and
the backend's start. The loader reads one tensor at a time into its device buffer (on CPU, host
memory too), so the peak should be about the model in its load dtype plus a tensor or two.

    .venv/bin/python benchmarks/load_memory.py --output_json=benchmarks/results/load_memory.json
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags
from common import cpu_description  # benchmarks/ is on the path

REPO = Path(__file__).resolve().parents[1]
flags.DEFINE_integer("d_model", 1024, "Hidden size of the random checkpoint.")
flags.DEFINE_integer("layers", 8, "Its layers.")
flags.DEFINE_integer("d_ff", 4096, "Its MLP width.")
flags.DEFINE_integer("vocab", 32000, "Its vocabulary (embedding and untied head).")
flags.DEFINE_string("output_json", None, "Write the record here.")
FLAGS = flags.FLAGS

# Runs in the measured process: imports and starts the backend, then loads.
_CHILD = """
import json, sys, time
import jax
from flover_jax.loader import load_model

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

jax.devices()
before = status("VmRSS")
start = time.perf_counter()
cfg, params, _ = load_model(sys.argv[1], dtype=sys.argv[2] if sys.argv[2] != "own" else None)
jax.block_until_ready(params)
seconds = time.perf_counter() - start
print(json.dumps({"dtype": cfg.dtype, "seconds": seconds, "rss_before": before,
                  "peak": status("VmHWM"), "rss_after": status("VmRSS"),
                  "param_bytes": sum(x.nbytes for x in jax.tree.leaves(params))}))
"""


def write_checkpoint(directory: Path) -> int:
    """A random bf16 LLaMA checkpoint (untied head); returns its safetensors bytes."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=FLAGS.vocab, hidden_size=FLAGS.d_model, intermediate_size=FLAGS.d_ff,
        num_hidden_layers=FLAGS.layers, num_attention_heads=FLAGS.d_model // 64,
        num_key_value_heads=FLAGS.d_model // 256, max_position_embeddings=2048,
        tie_word_embeddings=False, torch_dtype="bfloat16",
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.save_pretrained(directory)
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def measure(directory: Path, dtype: str) -> dict:
    result = subprocess.run([sys.executable, "-c", _CHILD, str(directory), dtype], cwd=REPO,
                            capture_output=True, text=True, check=True,
                            env={"JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO),
                                 "PATH": "/usr/bin:/bin"})
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(_) -> None:
    with tempfile.TemporaryDirectory() as folder:
        directory = Path(folder)
        disk = write_checkpoint(directory)
        cases = {dtype: measure(directory, dtype) for dtype in ("own", "float32")}
    for case in cases.values():
        case["peak_over_baseline"] = case["peak"] - case["rss_before"]
        case["peak_over_disk"] = case["peak_over_baseline"] / disk
    record = {
        "command": "python benchmarks/load_memory.py " + " ".join(sys.argv[1:]),
        "cpu": cpu_description(), "at": time.strftime("%Y-%m-%d"),
        "checkpoint": {"family": "llama", "dtype": "bfloat16", "d_model": FLAGS.d_model,
                       "layers": FLAGS.layers, "d_ff": FLAGS.d_ff, "vocab": FLAGS.vocab,
                       "safetensors_bytes": disk},
        "loads": cases,
    }
    print(json.dumps(record, indent=1))
    if FLAGS.output_json:
        Path(FLAGS.output_json).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    app.run(main)
