"""Interrupt main.py at random moments, many times: every stop must be clean.

Each try starts one mode (run, generate, bench or convert; tiny models where they do, the
default model where a mode needs a tokenizer or a file), sends SIGINT (or SIGTERM) after a
random delay that falls in the load, the warm-up or the run, and records the exit code and
whether stderr holds a traceback or a fatal error. A clean stop exits 130 (143 for SIGTERM)
with neither; a try whose process ended before the signal is counted apart.

    .venv/bin/python benchmarks/interrupts.py --tries=50 --output_json=benchmarks/results/interrupts.json
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags
from common import cpu_description  # benchmarks/ is on the path

REPO = Path(__file__).resolve().parents[1]
flags.DEFINE_integer("tries", 50, "Interrupted runs.")
flags.DEFINE_integer("seed", 0, "Picks the modes, signals and delays.")
flags.DEFINE_string("output_json", None, "Write every try and the totals here.")
FLAGS = flags.FLAGS

EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


def commands(folder: Path) -> dict[str, tuple[list[str], float]]:
    """mode -> (arguments, the longest delay worth trying: about the run's length)."""
    prompts = folder / "in.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt_ids": [5, i % 200 + 3], "max_new_tokens": 300,
                                             "ignore_eos": True}) for i in range(16)))
    tiny = ["--model=tiny-llama", "--max_slots=4", "--max_len=512"]
    return {
        "generate": (["--mode=generate", *tiny, f"--prompts_file={prompts}",
                      f"--output={folder / 'out.jsonl'}"], 12.0),
        "bench": (["--mode=bench", *tiny, "--workload=poisson", "--rate=20", "--num_requests=32",
                   "--output_len=uniform:50:200", "--ignore_eos", "--solo_samples=1",
                   f"--output_json={folder / 'bench.json'}"], 15.0),
        "run": (["--mode=run", "--num_requests=8", "--rate=8"], 20.0),
        "convert": (["--mode=convert", "--src=smollm2-135m", f"--dst={folder / 'ck'}"], 10.0),
    }


def one_try(args: list[str], signum: signal.Signals, delay_s: float) -> dict:
    process = subprocess.Popen([sys.executable, str(REPO / "main.py"), *args], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(delay_s)
    ended_first = process.poll() is not None
    if not ended_first:
        process.send_signal(signum)
    try:
        _, err = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # a hang: recorded as such
        process.kill()
        _, err = process.communicate()
        return {"hung": True, "returncode": None, "traceback": False, "fatal": False}
    return {
        "hung": False,
        "ended_before_signal": ended_first,
        "returncode": process.returncode,
        "traceback": "Traceback" in err,
        "fatal": "Fatal Python error" in err or process.returncode in (-11, 139, -6, 134),
    }


def main(argv: list[str]) -> None:
    del argv
    rng = random.Random(FLAGS.seed)
    tries = []
    with tempfile.TemporaryDirectory() as folder:
        table = commands(Path(folder))
        for i in range(FLAGS.tries):
            mode = rng.choice(sorted(table))
            args, longest = table[mode]
            signum = signal.SIGTERM if rng.random() < 0.2 else signal.SIGINT
            delay = rng.uniform(0.0, longest)
            record = {"mode": mode, "signal": signum.name, "delay_s": round(delay, 2)}
            record |= one_try(args, signum, delay)
            record["clean"] = (not record["hung"] and not record["traceback"] and not record["fatal"]
                               and (record["ended_before_signal"]
                                    or record["returncode"] == EXIT_CODES[signum.name]))
            tries.append(record)
            print(f"{i + 1:3d} {mode:9s} {signum.name:8s} after {delay:5.2f} s: "
                  f"rc={record['returncode']} {'clean' if record['clean'] else 'NOT CLEAN'}"
                  f"{' (ended first)' if record.get('ended_before_signal') else ''}", flush=True)
    totals = {
        "tries": len(tries),
        "clean": sum(t["clean"] for t in tries),
        "interrupted": sum(not t.get("ended_before_signal") for t in tries),
        "crashes": sum(t["fatal"] for t in tries),
        "tracebacks": sum(t["traceback"] for t in tries),
        "hangs": sum(t["hung"] for t in tries),
    }
    print(json.dumps(totals))
    if FLAGS.output_json:
        command = "python benchmarks/interrupts.py " + " ".join(
            f"--{name}={FLAGS[name].value}" for name in ("tries", "seed"))
        record = {"command": command, "cpu": cpu_description(), "totals": totals, "tries": tries}
        Path(FLAGS.output_json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    app.run(main)
