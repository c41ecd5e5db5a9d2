"""Hugging Face transformers as a peer: replay a workload through static batched `generate` or
through its continuous batching manager (what `generate_batch` runs), in fp32 on the CPU.

Runs in the peers' own environment (benchmarks/peers/setup.sh), never in flover_jax's:

    .peers/hf/bin/python benchmarks/peers/hf_peer.py --mode=continuous \
        --gguf=PATH --workloads=work.json --output=records.json

The input maps workload names to lists of {arrival_s, prompt_ids, max_new_tokens}; EOS is
ignored, decoding is greedy. The output maps the same names to one record per request (times in
seconds from the first arrival), the format benchmarks/compare_peers.py summarizes for every system.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, GenerationConfig, LogitsProcessor, LogitsProcessorList

NO_EOS = -1  # an id no token has: generation only stops at max_new_tokens


def load(gguf: Path):
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model.eval()


def record(arrival_s, token_times_s, finished_s):
    return {"arrival_s": arrival_s, "first_token_s": token_times_s[0] if token_times_s else None,
            "finished_s": finished_s, "token_times_s": token_times_s, "finish_reason": "length"}


class StepClock(LogitsProcessor):
    """Stamps each decoding step of `generate`: step i produces token i of every row."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def run_static(model, work: list[dict], max_batch: int) -> list[dict]:
    """One `generate` call at a time over every request that has arrived (up to max_batch): the
    batch's outputs are ready when the call returns, as with the `static` policy."""
    records: list[dict | None] = [None] * len(work)
    pending = sorted(range(len(work)), key=lambda i: work[i]["arrival_s"])
    start = time.perf_counter()
    while pending:
        now = time.perf_counter() - start
        if work[pending[0]]["arrival_s"] > now:
            time.sleep(work[pending[0]]["arrival_s"] - now)
            now = time.perf_counter() - start
        batch = [i for i in pending if work[i]["arrival_s"] <= now][:max_batch]
        pending = [i for i in pending if i not in batch]
        prompts = [work[i]["prompt_ids"] for i in batch]
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        new_tokens = max(work[i]["max_new_tokens"] for i in batch)
        clock = StepClock()
        config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  eos_token_id=None, pad_token_id=0)
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                           logits_processor=LogitsProcessorList([clock]))
        done = time.perf_counter() - start
        for i in batch:
            times = [t - start for t in clock.times[: work[i]["max_new_tokens"]]]
            records[i] = record(work[i]["arrival_s"], times, done)
    return records


def run_continuous(model, work: list[dict]) -> list[dict]:
    """Requests join the continuous batching manager at their arrival times."""
    from transformers.generation.continuous_batching.continuous_api import WorkloadHints

    config = GenerationConfig(do_sample=False, max_new_tokens=max(w["max_new_tokens"] for w in work),
                              eos_token_id=NO_EOS)
    hints = WorkloadHints(max_prompt_length=max(len(w["prompt_ids"]) for w in work),
                          max_generated_length=config.max_new_tokens, num_requests=len(work))
    manager = model.init_continuous_batching(generation_config=config, workload_hints=hints)
    manager.start()
    try:
        # Untimed warm-up request: first-call costs are not the workload's.
        manager.add_request(work[0]["prompt_ids"], request_id="warmup", max_new_tokens=4, eos_token_id=NO_EOS)
        while (out := manager.get_result(timeout=60)) is None or not out.is_finished():
            pass
        records: list[dict | None] = [None] * len(work)
        start = time.perf_counter()

        def collect():
            for _ in work:
                out = manager.get_result(timeout=600)
                if out is None:
                    raise RuntimeError("continuous batching: no result within 600 s")
                i = int(out.request_id)
                times = [t - start for t in out.timestamps]
                records[i] = record(work[i]["arrival_s"], times, out.lifespan[1] - start)
                if out.error:
                    records[i]["finish_reason"] = "error"

        collector = threading.Thread(target=collect)
        collector.start()
        for i in sorted(range(len(work)), key=lambda i: work[i]["arrival_s"]):
            delay = work[i]["arrival_s"] - (time.perf_counter() - start)
            if delay > 0:
                time.sleep(delay)
            manager.add_request(work[i]["prompt_ids"], request_id=str(i),
                                max_new_tokens=work[i]["max_new_tokens"], record_timestamps=True,
                                eos_token_id=NO_EOS)
        collector.join()
    finally:
        manager.stop(block=True)
    return records


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("static", "continuous"), required=True)
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--workloads", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--max_batch", type=int, default=32, help="Largest static batch.")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load(args.gguf)
    workloads = json.loads(args.workloads.read_text())
    results = {}
    for name, work in workloads.items():
        print(f"hf {args.mode}: {name}", flush=True)
        if args.mode == "static":
            run_static(model, [dict(work[0], arrival_s=0.0, max_new_tokens=4)], 1)  # untimed warm-up
            results[name] = run_static(model, work, args.max_batch)
        else:
            results[name] = run_continuous(model, work)
    args.output.write_text(json.dumps({"records": results, "versions": {
        "transformers": transformers.__version__, "torch": torch.__version__,
        "threads": torch.get_num_threads()}}))


if __name__ == "__main__":
    main()
