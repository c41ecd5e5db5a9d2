"""flover_jax side by side with the systems a user would pick instead, on the same model, the same
workloads and this machine, in one run. Writes benchmarks/results/peers.json; report.py renders it.

    benchmarks/peers/setup.sh            # once: builds llama-server, makes the HF and vLLM environments
    .venv/bin/python benchmarks/compare_peers.py

Systems (each peer in its own environment under .peers/, never a dependency of flover_jax):
- flover:        this engine, `flover` policy, fp32 weights and KV cache, 32 slots.
- flover_bf16:   the same with `--dtype=bfloat16` (weights, activations and KV cache).
- flover_int8:   the same with `--quantize=int8` (int8 weights, fp32 activations and KV).
- llama_q4_1:    llama.cpp `llama-server -np 32` on the shipped Q4_1 GGUF (f16 KV cache, its default).
- llama_f32:     the same server on an F32 GGUF dequantized from it, f32 KV cache: our precision.
- hf_continuous: transformers' continuous batching manager (what `generate_batch` runs), fp32.
- hf_static:     transformers' batched `generate` over whatever has arrived, fp32.
- vllm_fp32:     vLLM's CPU build, its offline engine (`LLMEngine`, what `LLM.generate` runs) on
                 the same weights in fp32, as many sequences at once as the widest workload.
- vllm_bf16:     the same in bfloat16 (weights, activations and KV cache).

Figures merge into --output: a run of some experiments or systems keeps the others' figures
(unless the file's figures come from another CPU: then it starts afresh).

Workloads (8-token random prompts, EOS ignored, greedy), all systems on identical requests:
- headline:    32 requests of 512 tokens, one every --interval_s (the paper's Fig. 4 workload),
               run --headline_repeats times by every system; the median run is reported.
- concurrency: n requests at once for n in --sizes, --sweep_output_len tokens each.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import jax
from absl import app, flags, logging

sys.path.insert(0, str(Path(__file__).parent))
from common import cpu_description, median_run, merge_results  # noqa: E402
from peers import llama_server, vllm_peer  # noqa: E402

from flover_jax import bench, metrics, workload  # noqa: E402
from flover_jax.engine import Engine, TimedRequest  # noqa: E402
from models.presets import smollm2_gguf_path  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("systems", ["flover", "flover_bf16", "flover_int8", "vllm_fp32", "vllm_bf16",
                              "llama_q4_1", "llama_f32", "hf_continuous", "hf_static"],
                  "Which systems to run.")
flags.DEFINE_list("experiments", ["headline", "concurrency"], "Which workloads to run.")
flags.DEFINE_list("sizes", ["1", "2", "4", "8", "16", "32"], "Concurrent requests (concurrency).")
flags.DEFINE_integer("sweep_output_len", 128, "Output tokens per request (concurrency).")
flags.DEFINE_integer("headline_output_len", 512, "Output tokens per request (headline).")
flags.DEFINE_float("interval_s", 0.5, "Arrival gap (headline).")
flags.DEFINE_integer("headline_repeats", 3, "Runs of the headline per system (median reported).")
flags.DEFINE_string("output", "benchmarks/results/peers.json", "Where the results go.")

PROMPT_LEN, HEADLINE_REQUESTS, VOCAB = 8, 32, 49152
PEERS = Path(".peers")


def workloads() -> dict[str, list[TimedRequest]]:
    """name -> the workload's requests; a repeat of a workload is named `name#k`."""
    specs = {}
    if "headline" in FLAGS.experiments:
        specs["headline"] = ("constant", HEADLINE_REQUESTS, FLAGS.headline_output_len,
                             {"interval_s": FLAGS.interval_s})
    if "concurrency" in FLAGS.experiments:
        for n in FLAGS.sizes:
            specs[f"concurrency/{n}"] = ("burst", int(n), FLAGS.sweep_output_len, {})
    work = {name: workload.synthetic(kind, n, PROMPT_LEN, length, VOCAB, seed=0, **arrivals)
            for name, (kind, n, length, arrivals) in specs.items()}
    if "headline" in work:
        work |= {f"headline#{k}": work["headline"] for k in range(2, FLAGS.headline_repeats + 1)}
    return work


def slots() -> int:
    """Requests each system may run at once: the widest workload."""
    return max(HEADLINE_REQUESTS, *map(int, FLAGS.sizes))


def fold_repeats(runs: dict[str, dict]) -> dict[str, dict]:
    """{"headline": ..., "headline#2": ..., ...} -> {"headline": the median run, with the spread}."""
    groups: dict[str, list[dict]] = {}
    for name, summary in runs.items():
        groups.setdefault(name.split("#")[0], []).append(summary)
    return {name: median_run(summaries) for name, summaries in groups.items()}


def plain(work: dict[str, list[TimedRequest]]) -> dict[str, list[dict]]:
    """The requests as the peers take them: {arrival_s, prompt_ids, max_new_tokens}."""
    return {name: [{"arrival_s": r.arrival_s, "prompt_ids": list(r.prompt),
                    "max_new_tokens": r.params.max_new_tokens} for r in requests]
            for name, requests in work.items()}


def run_flover(work: dict[str, list[TimedRequest]], system: str, **weights) -> tuple[dict, dict]:
    engine = Engine.from_pretrained("smollm2-135m", max_slots=slots(),
                                    max_len=PROMPT_LEN + FLAGS.headline_output_len, **weights)
    engine.executor.warmup(prompt_lengths=[PROMPT_LEN])
    results = {}
    for name, requests in work.items():
        summary = bench.run(engine, requests, policy="flover", warmup=False, solo_samples=0)
        summary.pop("requests")
        results[name] = summary
        report(system, name, summary)
    choice = engine.executor.op_choice
    return results, {"jax": jax.__version__, "dtype": engine.cfg.dtype,
                     **({"quantize": engine.cfg.quantize} if engine.cfg.quantize else {}),
                     "ops": f"attention={choice.attention}, matmul={choice.matmul}"}


def run_llama(work: dict[str, list[dict]], quantized: bool) -> tuple[dict, dict]:
    gguf = Path(smollm2_gguf_path())
    kv_type = "f16"
    if not quantized:
        gguf = llama_server.f32_gguf(gguf, PEERS / "models" / "SmolLM2-135M-Instruct.F32.gguf")
        kv_type = "f32"
    name = "llama_q4_1" if quantized else "llama_f32"
    longest = max(r["max_new_tokens"] for requests in work.values() for r in requests)
    server = llama_server.LlamaServer(gguf, slots(), PROMPT_LEN + longest + 16, kv_type=kv_type,
                                      log=PEERS / f"{name}.log")
    results = {}
    with server:
        for workload_name, requests in work.items():
            results[workload_name] = summarize(name, workload_name, server.replay(requests))
    return results, {"source": server.version(), "weights": gguf.name, "kv_cache": kv_type}


def run_hf(work: dict[str, list[dict]], mode: str) -> tuple[dict, dict]:
    name = f"hf_{mode}"
    with tempfile.TemporaryDirectory() as tmp:
        inputs, outputs = Path(tmp) / "work.json", Path(tmp) / "records.json"
        inputs.write_text(json.dumps(work))
        subprocess.run([str(PEERS / "hf/bin/python"), "benchmarks/peers/hf_peer.py", f"--mode={mode}",
                        f"--gguf={smollm2_gguf_path()}", f"--workloads={inputs}", f"--output={outputs}"],
                       check=True)
        out = json.loads(outputs.read_text())
    results = {w: summarize(name, w, records) for w, records in out["records"].items()}
    return results, out["versions"]


def run_vllm(work: dict[str, list[dict]], dtype: str) -> tuple[dict, dict]:
    name = f"vllm_{'fp32' if dtype == 'float32' else 'bf16'}"
    with tempfile.TemporaryDirectory() as tmp:
        inputs, outputs = Path(tmp) / "work.json", Path(tmp) / "records.json"
        inputs.write_text(json.dumps(work))
        subprocess.run([str(vllm_peer.PYTHON), "benchmarks/peers/vllm_peer.py",
                        f"--model={PEERS / 'smollm2-hf'}", f"--dtype={dtype}", f"--workloads={inputs}",
                        f"--output={outputs}"], check=True)
        out = json.loads(outputs.read_text())
    results = {w: summarize(name, w, records) for w, records in out["records"].items()}
    return results, out["versions"]


def summarize(system: str, workload_name: str, records: list[dict]) -> dict:
    summary = metrics.latency_figures(records)
    report(system, workload_name, summary)
    return summary


def report(system: str, workload_name: str, summary: dict):
    print(f"  {system:>14} {workload_name:>16}: makespan {summary['makespan_s']:6.1f} s, "
          f"{summary['output_tokens_per_s']:6.1f} tok/s, errors {summary['errors']}", flush=True)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    work = workloads()
    peer_work = plain(work)
    runners = {
        "flover": lambda: run_flover(work, "flover"),
        "flover_bf16": lambda: run_flover(work, "flover_bf16", dtype="bfloat16"),
        "flover_int8": lambda: run_flover(work, "flover_int8", quantize="int8"),
        "llama_q4_1": lambda: run_llama(peer_work, quantized=True),
        "llama_f32": lambda: run_llama(peer_work, quantized=False),
        "hf_continuous": lambda: run_hf(peer_work, "continuous"),
        "hf_static": lambda: run_hf(peer_work, "static"),
        "vllm_fp32": lambda: run_vllm(peer_work, "float32"),
        "vllm_bf16": lambda: run_vllm(peer_work, "bfloat16"),
    }
    unknown = set(FLAGS.systems) - set(runners)
    if unknown:
        raise app.UsageError(f"systems={sorted(unknown)}: allowed {sorted(runners)}")
    cpu = cpu_description()
    results = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                           "cpu_cores": jax.local_device_count(), "cpu": cpu, "slots": slots()},
               "workloads": {name: {"num_requests": len(r), "output_len": r[0].params.max_new_tokens,
                                    "last_arrival_s": r[-1].arrival_s, "date": str(date.today())}
                             for name, r in work.items() if "#" not in name},
               "systems": {}, "versions": {}}
    path = Path(FLAGS.output)
    # Figures from another machine never share a table with these: replaced, once there are some.
    stale = path.exists() and json.loads(path.read_text())["machine"].get("cpu") != cpu
    for system in FLAGS.systems:
        print(system, flush=True)
        runs, results["versions"][system] = runners[system]()
        results["systems"][system] = fold_repeats(runs)
        if stale:
            path.unlink()
            stale = False
        merge_results(path, results)  # each system's figures kept as soon as it has them
    print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
