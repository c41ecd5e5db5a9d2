"""What serving over HTTP costs: the same workload through the in-process engine and through
our server (streamed, the client in another process), back to back, repeated.

    .venv/bin/python benchmarks/server_vs_engine.py --requests=32 --output_len=128 --repeats=3 \
        --output_json=benchmarks/results/server_vs_engine.json
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from absl import app, flags
from common import cpu_description, start_server  # benchmarks/ is on the path

REPO = Path(__file__).resolve().parents[1]
flags.DEFINE_string("model", "smollm2-135m", "Model.")
flags.DEFINE_integer("requests", 32, "Requests, all arriving at once (streams at once).")
flags.DEFINE_integer("prompt_len", 8, "Random prompt tokens.")
flags.DEFINE_integer("output_len", 128, "Tokens each request generates (EOS ignored).")
flags.DEFINE_integer("repeats", 3, "Runs of each, alternating.")
flags.DEFINE_string("output_json", None, "Write the record here.")
FLAGS = flags.FLAGS


def bench(*flags_: str) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "bench.json"
        subprocess.run([sys.executable, str(REPO / "main.py"), "--mode=bench", "--workload=burst",
                        f"--num_requests={FLAGS.requests}", f"--prompt_len={FLAGS.prompt_len}",
                        f"--output_len={FLAGS.output_len}", "--ignore_eos", f"--output_json={out}",
                        *flags_], check=True, capture_output=True, text=True)
        return json.loads(out.read_text())


def main(argv: list[str]) -> None:
    del argv
    engine_flags = [f"--model={FLAGS.model}", f"--max_slots={FLAGS.requests}",
                    f"--max_len={FLAGS.prompt_len + FLAGS.output_len + 16}"]
    process, url = start_server(*engine_flags)
    runs = {"engine": [], "server": []}
    try:
        bench("--backend=openai", f"--base_url={url}")  # untimed: the server's first requests
        for _ in range(FLAGS.repeats):
            runs["engine"].append(bench(*engine_flags, "--solo_samples=0"))
            runs["server"].append(bench("--backend=openai", f"--base_url={url}"))
    finally:
        process.terminate()
        process.wait(120)
    rates = {name: [r["output_tokens_per_s"] for r in results] for name, results in runs.items()}
    record = {
        "command": (f"python benchmarks/server_vs_engine.py --requests={FLAGS.requests} "
                    f"--output_len={FLAGS.output_len} --repeats={FLAGS.repeats}"),
        "cpu": cpu_description(), "model": FLAGS.model, "requests": FLAGS.requests,
        "output_len": FLAGS.output_len, "tokens_per_s": rates,
        "ratio_of_medians": statistics.median(rates["server"]) / statistics.median(rates["engine"]),
        "paired_ratios": [s / e for s, e in zip(rates["server"], rates["engine"])],
        "ttft_p50_s": {name: [r["ttft_s"]["p50"] for r in results] for name, results in runs.items()},
        "itl_p99_s": {name: [r["itl_s"]["p99"] for r in results] for name, results in runs.items()},
    }
    print(json.dumps(record, indent=1))
    if FLAGS.output_json:
        Path(FLAGS.output_json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    app.run(main)
