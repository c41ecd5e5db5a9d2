#!/usr/bin/env bash
# Regenerate docs/benchmarks.md and docs/img/ from scratch (about 90 minutes on 2 CPU cores, plus
# about 15 minutes the first time to build llama-server and the peers' environments).
# Run it on an otherwise idle machine: every figure is a timing.
set -euo pipefail
cd "$(dirname "$0")/.."
make setup
PY=.venv/bin/python
"$PY" -m pip install -q -e '.[bench]'
mkdir -p benchmarks/results
benchmarks/peers/setup.sh
"$PY" benchmarks/step_times.py > benchmarks/results/step_times.md
"$PY" benchmarks/step_times.py --dtype=bfloat16 --ops=auto,cpu_kernels,amx_matmuls \
    > benchmarks/results/step_times_bf16.md
"$PY" benchmarks/step_times.py --quantize=int8 --ops=auto \
    > benchmarks/results/step_times_int8.md
# The default against each of its paths, the engines timed in turn (one table per weight type).
"$PY" benchmarks/step_times.py --default_against_paths > benchmarks/results/default_against_paths.md
"$PY" benchmarks/step_times.py --default_against_paths --dtype=bfloat16 \
    --ops=auto,cpu_kernels,amx_matmuls,xla > benchmarks/results/default_against_paths_bf16.md
"$PY" benchmarks/quality.py --output_json=benchmarks/results/quality.json
"$PY" benchmarks/profile_step.py > benchmarks/results/profile.md
"$PY" main.py --mode=bench --workload=constant --num_requests=16 --interval_s=0.5 \
    --output_len=uniform:32:256 --ignore_eos --max_slots=16 --max_len=512 \
    --output_json=benchmarks/results/timeline.json
"$PY" - <<'PYEOF'
import json, pathlib
path = pathlib.Path("benchmarks/results/timeline.json")
summary = json.loads(path.read_text())
summary["command"] = ("python main.py --mode=bench --workload=constant --num_requests=16 "
                      "--interval_s=0.5 --output_len=uniform:32:256 --ignore_eos --max_slots=16")
path.write_text(json.dumps(summary, indent=1))
PYEOF
"$PY" benchmarks/paper.py --gaps_s=0.05,0.5,2.0 --poisson_output_len=128
"$PY" benchmarks/roofline.py
"$PY" benchmarks/compare_peers.py --sizes=1,8,32,64
"$PY" benchmarks/compare_servers.py
"$PY" benchmarks/interrupts.py --tries=50 --output_json=benchmarks/results/interrupts.json
"$PY" benchmarks/server_vs_engine.py --requests=32 --output_len=128 --repeats=3 \
    --output_json=benchmarks/results/server_vs_engine.json
"$PY" benchmarks/soak.py --requests=2000 --output_json=benchmarks/results/soak.json
"$PY" benchmarks/long_prompts.py --output_json=benchmarks/results/long_prompts.json
"$PY" benchmarks/load_memory.py --output_json=benchmarks/results/load_memory.json
"$PY" benchmarks/moe_step.py --output_json=benchmarks/results/moe_step.json
"$PY" benchmarks/report.py
