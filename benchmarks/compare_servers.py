"""Servers side by side through one HTTP client: each system's OpenAI-compatible server is started
in turn on 127.0.0.1 and driven by our own load generator (`main.py --mode=bench
--backend=openai`, streamed, one thread per request, in another process), on the same workloads,
so tokens/s, TTFT and ITL are measured the same way for everyone. Our in-process engine runs the
same workloads for reference (no HTTP). Writes benchmarks/results/servers.json; report.py renders it.

    benchmarks/peers/setup.sh            # once: builds llama-server, makes the vLLM environment
    .venv/bin/python benchmarks/compare_servers.py

Systems (each peer in its own environment under .peers/, never a dependency of flover_jax):
- flover:        `main.py --mode=serve`, defaults (fp32), 32 slots.
- flover_xla:    the same with `--matmul=xla --attention=xla` (XLA's ops instead of our kernels).
- flover_engine: the in-process engine, no HTTP (`main.py --mode=bench`), for reference.
- llama_q4_1:    `llama-server -np 32` on the shipped Q4_1 GGUF (f16 KV cache).
- llama_f32:     the same server on the F32 GGUF dequantized from it (f32 KV cache).
- vllm_fp32:     `vllm serve` (CPU build) on the same weights in fp32, 32 sequences at most.

Workloads (8-token random prompts, EOS ignored, greedy; one untimed warm-up run of the burst
first, on every server): `burst`, --requests at once; `poisson`, --requests at --rate a second.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

from absl import app, flags
from common import cpu_description, merge_results, start_server  # benchmarks/ is on the path
from peers import llama_server, vllm_peer

from models.presets import smollm2_gguf_path

FLAGS = flags.FLAGS
SYSTEMS = ["flover", "flover_xla", "flover_engine", "llama_q4_1", "llama_f32", "vllm_fp32"]
flags.DEFINE_list("systems", SYSTEMS, "Which systems to run, in this order.")
flags.DEFINE_list("workloads", ["burst", "poisson"], "Which workloads to run.")
flags.DEFINE_integer("requests", 32, "Requests per workload (and slots / sequences per server).")
flags.DEFINE_integer("output_len", 128, "Tokens per request.")
flags.DEFINE_float("rate", 2.0, "Requests a second (poisson).")
flags.DEFINE_string("output", "benchmarks/results/servers.json", "Where the results go.")

REPO = Path(__file__).resolve().parents[1]
PEERS = REPO / ".peers"
PROMPT_LEN = 8
FIGURES = ("output_tokens_per_s", "makespan_s", "output_tokens", "errors", "ttft_s", "itl_s", "tpot_s")


def bench(workload: str, *flags_: str) -> dict:
    """One run of our load generator (or, without --backend=openai, our in-process engine)."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "bench.json"
        arrivals = [f"--rate={FLAGS.rate}"] if workload == "poisson" else []
        run = subprocess.run([sys.executable, str(REPO / "main.py"), "--mode=bench",
                              f"--workload={workload}", *arrivals, f"--num_requests={FLAGS.requests}",
                              f"--prompt_len={PROMPT_LEN}", f"--output_len={FLAGS.output_len}",
                              "--ignore_eos", "--temperature=0", f"--output_json={out}", *flags_],
                             check=False, capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"bench {workload} {' '.join(flags_)}: exit {run.returncode}: "
                               f"{run.stderr[-2000:]}")
        summary = json.loads(out.read_text())
    return {key: summary[key] for key in FIGURES}


def engine_flags(*extra: str) -> list[str]:
    return ["--model=smollm2-135m", f"--max_slots={FLAGS.requests}",
            f"--max_len={PROMPT_LEN + FLAGS.output_len + 16}", *extra]


@contextlib.contextmanager
def flover_server(*extra: str):
    process, url = start_server(*engine_flags(*extra))
    try:
        yield url
    finally:
        process.terminate()
        process.wait(120)


@contextlib.contextmanager
def llama(quantized: bool):
    gguf = Path(smollm2_gguf_path())
    if not quantized:
        gguf = llama_server.f32_gguf(gguf, PEERS / "models" / "SmolLM2-135M-Instruct.F32.gguf")
    name = "llama_q4_1" if quantized else "llama_f32"
    with llama_server.LlamaServer(gguf, FLAGS.requests, PROMPT_LEN + FLAGS.output_len + 16,
                                  kv_type="f16" if quantized else "f32",
                                  log=PEERS / f"{name}_server.log") as server:
        yield f"http://127.0.0.1:{server.port}"


@contextlib.contextmanager
def vllm():
    with vllm_peer.VllmServer(PEERS / "smollm2-hf", "float32", FLAGS.requests,
                              PROMPT_LEN + FLAGS.output_len + 16,
                              log=PEERS / "vllm_server.log") as server:
        yield server.base_url


def versions() -> dict:
    source = llama_server.LlamaServer.version()
    return {"flover": "this checkout", "flover_xla": "this checkout", "flover_engine": "this checkout",
            "llama_q4_1": source, "llama_f32": source, "vllm_fp32": vllm_peer.version()}


def run_system(system: str) -> dict:
    if system == "flover_engine":  # each bench compiles every bucket before it times
        return {w: bench(w, *engine_flags(), "--solo_samples=0") for w in FLAGS.workloads}
    servers = {"flover": lambda: flover_server(),
               "flover_xla": lambda: flover_server("--matmul=xla", "--attention=xla"),
               "llama_q4_1": lambda: llama(True), "llama_f32": lambda: llama(False),
               "vllm_fp32": vllm}
    with servers[system]() as url:
        client = ("--backend=openai", f"--base_url={url}")
        bench("burst", *client)  # untimed: every server's first requests
        return {w: bench(w, *client) for w in FLAGS.workloads}


def main(argv):
    del argv
    unknown = set(FLAGS.systems) - set(SYSTEMS)
    if unknown:
        raise app.UsageError(f"systems={sorted(unknown)}: allowed {SYSTEMS}")
    cpu = cpu_description()
    results = {"cpu": cpu, "date": str(date.today()),
               "workloads": {"burst": f"{FLAGS.requests} requests at once",
                             "poisson": f"{FLAGS.requests} requests, Poisson at {FLAGS.rate:g}/s"},
               "prompt_len": PROMPT_LEN, "output_len": FLAGS.output_len,
               "command": "python benchmarks/compare_servers.py " + " ".join(sys.argv[1:]),
               "systems": {}, "versions": {}}
    path = Path(FLAGS.output)
    # Figures from another machine never share a table with these: replaced, once there are some.
    stale = path.exists() and json.loads(path.read_text()).get("cpu") != cpu
    for system in FLAGS.systems:
        print(system, flush=True)
        results["systems"][system] = run_system(system)
        results["versions"][system] = versions()[system]
        if stale:
            path.unlink()
            stale = False
        merge_results(path, results)  # each system's figures kept as soon as it has them
        for workload, r in results["systems"][system].items():
            print(f"  {workload:>8}: {r['output_tokens_per_s']:6.1f} tok/s, TTFT p50 "
                  f"{r['ttft_s']['p50'] * 1e3:6.0f} ms p99 {r['ttft_s']['p99'] * 1e3:6.0f} ms, ITL p50 "
                  f"{r['itl_s']['p50'] * 1e3:5.1f} ms p99 {r['itl_s']['p99'] * 1e3:6.1f} ms, "
                  f"errors {r['errors']}", flush=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
