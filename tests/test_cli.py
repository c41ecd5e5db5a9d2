"""main.py end to end on the tiny preset: generate with good and bad lines, Ctrl-C, bench JSON."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_main(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "main.py", *args], cwd=REPO, capture_output=True, text=True,
        timeout=timeout,
    )


LINES = [
    ('{"prompt_ids": [5, 6, 7], "max_new_tokens": 6}', None),
    ("not json at all", "line 2: not JSON"),
    ('{"max_new_tokens": 4}', 'line 3: no "prompt" or "prompt_ids"'),
    ('{"prompt_ids": []}', "prompt: empty"),
    ('{"prompt_ids": [1, 4096]}', r"prompt_ids[1]=4096: must be in [0, 256)"),
    ('{"prompt_ids": [1, 2], "max_new_tokens": 100}', "max_new_tokens=100"),
    ('{"prompt_ids": [1, 2], "max_new_tokens": -2}', "max_new_tokens=-2"),
    ('{"prompt_ids": [1, 2], "temperature": -1}', "temperature=-1"),
    ('{"prompt_ids": [1, 2], "top_p": 0}', "top_p=0"),
    ('{"prompt_ids": [1, 2], "top_k": -3}', "top_k=-3"),
    ('{"prompt_ids": [1, 2], "colour": "red"}', "colour='red': unknown field"),
    ('{"prompt": "text needs a tokenizer"}', "no tokenizer"),
    ('{"prompt_ids": [9, 8], "max_new_tokens": 5, "temperature": 0.7, "seed": 3}', None),
]


def test_generate_writes_one_result_per_line_in_order(tmp_path):
    prompts = tmp_path / "in.jsonl"
    prompts.write_text("\n".join(line for line, _ in LINES) + "\n")
    out = tmp_path / "out.jsonl"
    result = run_main("--mode=generate", "--model=tiny-llama", f"--prompts_file={prompts}",
                      f"--output={out}", "--max_slots=4", "--max_len=64", "--max_new_tokens=8")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(len(LINES)))
    for record, (_, error) in zip(records, LINES):
        if error is None:
            assert record["finish_reason"] in ("stop", "length") and record["token_ids"]
            assert record["latency_s"] >= record["ttft_s"] > 0
        else:
            assert record["finish_reason"] == "error" and error in record["error"], record
    assert len(records[0]["token_ids"]) <= 6
    assert set(records[0]) >= {"index", "prompt_ids", "token_ids", "text", "finish_reason",
                               "ttft_s", "latency_s"}


def test_ctrl_c_stops_cleanly_and_writes_what_finished(tmp_path):
    prompts = tmp_path / "in.jsonl"
    # Short requests first, then long ones: interrupt once a few have finished.
    lines = [{"prompt_ids": [3, 4, i % 200 + 3], "max_new_tokens": 4} for i in range(4)]
    lines += [{"prompt_ids": [5, i % 200 + 3], "max_new_tokens": 500, "ignore_eos": True}
              for i in range(64)]
    prompts.write_text("\n".join(json.dumps(line) for line in lines))
    out = tmp_path / "out.jsonl"
    process = subprocess.Popen(
        [sys.executable, "main.py", "--mode=generate", "--model=tiny-llama",
         f"--prompts_file={prompts}", f"--output={out}", "--max_slots=2", "--max_len=512"],
        cwd=REPO, stderr=subprocess.PIPE, text=True,
    )
    finished = 0
    for line in process.stderr:
        if " finished: " in line:
            finished += 1
            if finished == 4:
                process.send_signal(signal.SIGINT)
                break
    process.stderr.read()
    assert process.wait(timeout=120) == 130
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert 4 <= len(records) < len(lines)
    assert [r["index"] for r in records] == sorted(r["index"] for r in records)
    assert all(r["finish_reason"] in ("stop", "length") for r in records)


def test_generate_single_prompt_to_stdout():
    result = run_main("--mode=generate", "--model=tiny-llama", "--prompt=ignored",
                      "--max_new_tokens=4")
    assert result.returncode == 0, result.stderr[-2000:]
    (record,) = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert record["finish_reason"] == "error" and "no tokenizer" in record["error"]


@pytest.mark.parametrize("policy, flag", [("flover", "--warmup"), ("sequential", "--nowarmup"),
                                          ("flover", "--batch_invariant")])
def test_bench_mode_writes_valid_json(tmp_path, policy, flag):
    out = tmp_path / "bench.json"
    result = run_main("--mode=bench", "--model=tiny-llama", "--workload=poisson", "--rate=50",
                      "--num_requests=12", "--output_len=uniform:4:24", "--ignore_eos",
                      f"--policy={policy}", "--max_slots=4", "--max_len=64", flag,
                      f"--output_json={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["policy"] == policy and summary["num_requests"] == 12
    assert summary["errors"] == 0
    assert 12 * 4 <= summary["output_tokens"] <= 12 * 24
    for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        assert set(summary[key]) == {"mean", "p50", "p90", "p99"}
    assert summary["makespan_s"] > 0 and summary["output_tokens_per_s"] > 0
    assert summary["kv_cache_bytes"] > 0 and summary["peak_rss_bytes"] > 0
    assert len(summary["requests"]) == 12
    assert summary["compile_s"] >= 0 and summary["iterations"] >= summary["decode_steps"] > 0
    assert summary["latency_vs_solo"] > 0.5 and summary["solo"]["tpot_s"] > 0
    if flag != "--nowarmup":  # otherwise the run's latencies include compiles
        assert summary["latency_vs_solo"] < 50
    if policy == "sequential":
        assert summary["mean_inflight"] == 1.0
    assert summary["batch_invariant"] == (flag == "--batch_invariant")
    if summary["batch_invariant"]:  # one program: every step computes all 4 slots
        assert summary["computed_rows"] == 4 * summary["decode_steps"]


def test_bad_flags_fail_before_work():
    result = run_main("--mode=generate", "--model=tiny-llama")
    assert result.returncode != 0 and "exactly one of --prompt or --prompts_file" in result.stderr
    env_result = run_main("--mode=bench", "--model=tiny-llama", "--output_len=uniform:9:3",
                          "--num_requests=2")
    assert env_result.returncode == 2 and "output_len='uniform:9:3'" in env_result.stderr
