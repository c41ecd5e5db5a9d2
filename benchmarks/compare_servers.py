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

Workloads (random-token prompts, EOS ignored, greedy; one untimed warm-up run of the burst first,
on every server): `burst`, --requests 8-token prompts at once; `poisson`, the same at --rate a
second; `chat`, --requests turns of conversations (CHAT) arriving at --chat_rate a second, every
one opening with the same system prompt, each turn's prompt the whole conversation so far, so
each server's own prefix caching (on by default in all three) decides much of its TTFT.
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

from flover_jax.workload import prompt_sizes
from models.presets import smollm2_gguf_path

FLAGS = flags.FLAGS
SYSTEMS = ["flover", "flover_xla", "flover_engine", "llama_q4_1", "llama_f32", "vllm_fp32"]
flags.DEFINE_list("systems", SYSTEMS, "Which systems to run, in this order.")
WORKLOADS = ["burst", "poisson", "chat"]
flags.DEFINE_list("workloads", WORKLOADS, "Which workloads to run (the servers' max_len fits them all).")
flags.DEFINE_integer("requests", 32, "Requests per workload (and slots / sequences per server).")
flags.DEFINE_integer("output_len", 128, "Tokens per request.")
flags.DEFINE_float("rate", 2.0, "Requests a second (poisson).")
flags.DEFINE_float("chat_rate", 1.0, "Requests a second (chat).")
flags.DEFINE_string("output", "benchmarks/results/servers.json", "Where the results go.")

REPO = Path(__file__).resolve().parents[1]
PEERS = REPO / ".peers"
PROMPT_LEN = 8
# Chat traffic: a 256-token system prompt, conversations of 4 turns; questions and answers
# log-normal (median, log-space sigma, cap), as `main.py --mode=bench` reads them.
CHAT = {"shared_prefix": 256, "turns": 4, "prompt_len": "lognormal:32:1.0:512",
        "output_len": "lognormal:96:0.7:384"}
FIGURES = ("output_tokens_per_s", "makespan_s", "output_tokens", "errors", "ttft_s", "itl_s", "tpot_s")


def workload_flags(workload: str) -> list[str]:
    """`main.py --mode=bench` flags that draw `workload`'s requests."""
    if workload == "chat":
        return ["--workload=poisson", f"--rate={FLAGS.chat_rate}",
                *(f"--{name}={value}" for name, value in CHAT.items())]
    arrivals = [f"--rate={FLAGS.rate}"] if workload == "poisson" else []
    return [f"--workload={workload}", *arrivals, f"--prompt_len={PROMPT_LEN}",
            f"--output_len={FLAGS.output_len}"]


def workload_description(workload: str) -> str:
    if workload == "chat":
        return (f"{FLAGS.requests} turns of {FLAGS.requests // CHAT['turns']} conversations of "
                f"{CHAT['turns']}, Poisson at {FLAGS.chat_rate:g}/s: a {CHAT['shared_prefix']}-token "
                f"system prompt shared by all, then questions of {CHAT['prompt_len']} tokens and "
                f"answers of {CHAT['output_len']} (a turn's prompt holds every earlier question and a "
                f"stand-in answer of that turn's length); prompts of {min(chat_prompt_sizes())}-"
                f"{max(chat_prompt_sizes())} tokens")
    shape = f"{PROMPT_LEN}-token prompts, {FLAGS.output_len} tokens each"
    if workload == "poisson":
        return f"{FLAGS.requests} requests, Poisson at {FLAGS.rate:g}/s, {shape}"
    return f"{FLAGS.requests} requests at once, {shape}"


def chat_prompt_sizes() -> list[int]:
    return prompt_sizes(FLAGS.requests, CHAT["prompt_len"], CHAT["output_len"],
                        shared_prefix=CHAT["shared_prefix"], turns=CHAT["turns"])


def max_len() -> int:
    """Tokens a slot (sequence) needs for the longest request of the workloads asked for."""
    longest = PROMPT_LEN + FLAGS.output_len
    if "chat" in FLAGS.workloads:
        longest = max(longest, max(chat_prompt_sizes()) + int(CHAT["output_len"].split(":")[-1]))
    return longest + 16


def bench(workload: str, *flags_: str) -> dict:
    """One run of our load generator (or, without --backend=openai, our in-process engine)."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "bench.json"
        run = subprocess.run([sys.executable, str(REPO / "main.py"), "--mode=bench",
                              *workload_flags(workload), f"--num_requests={FLAGS.requests}",
                              "--ignore_eos", "--temperature=0", f"--output_json={out}", *flags_],
                             check=False, capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"bench {workload} {' '.join(flags_)}: exit {run.returncode}: "
                               f"{run.stderr[-2000:]}")
        summary = json.loads(out.read_text())
    return {key: summary[key] for key in FIGURES}


def engine_flags(*extra: str) -> list[str]:
    return ["--model=smollm2-135m", f"--max_slots={FLAGS.requests}",
            f"--max_len={max_len()}", *extra]


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
    with llama_server.LlamaServer(gguf, FLAGS.requests, max_len(),
                                  kv_type="f16" if quantized else "f32",
                                  log=PEERS / f"{name}_server.log") as server:
        yield f"http://127.0.0.1:{server.port}"


@contextlib.contextmanager
def vllm():
    with vllm_peer.VllmServer(PEERS / "smollm2-hf", "float32", FLAGS.requests,
                              max_len(),
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
    for name, asked, allowed in (("systems", FLAGS.systems, SYSTEMS),
                                 ("workloads", FLAGS.workloads, WORKLOADS)):
        if set(asked) - set(allowed):
            raise app.UsageError(f"{name}={sorted(set(asked) - set(allowed))}: allowed {allowed}")
    cpu = cpu_description()
    command = "python benchmarks/compare_servers.py " + " ".join(sys.argv[1:])
    results = {"cpu": cpu, "date": str(date.today()),
               "workloads": {w: workload_description(w) for w in FLAGS.workloads},
               "commands": {w: command for w in FLAGS.workloads},
               "max_len": {w: max_len() for w in FLAGS.workloads},
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
