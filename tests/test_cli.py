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
    ('{"max_new_tokens": 4}', 'line 3: give one of "prompt" (text) or "prompt_ids"'),
    ('{"prompt_ids": []}', "prompt: empty"),
    ('{"prompt_ids": [1, 4096]}', r"prompt_ids[1]=4096: must be in [0, 256)"),
    ('{"prompt_ids": [1, 2], "max_new_tokens": 100}', "max_new_tokens=100"),
    ('{"prompt_ids": [1, 2], "max_new_tokens": -2}', "max_new_tokens=-2"),
    ('{"prompt_ids": [1, 2], "temperature": -1}', "temperature=-1"),
    ('{"prompt_ids": [1, 2], "top_p": 0}', "top_p=0"),
    ('{"prompt_ids": [1, 2], "top_k": -3}', "top_k=-3"),
    ('{"prompt_ids": [1, 2], "colour": "red"}', "colour='red': unknown field"),
    ('{"prompt_ids": [1, 2], "stop_token_ids": [[1]]}',
     "line 12: stop_token_ids=([1],): entries must be ints"),
    ('{"prompt": "text needs a tokenizer"}', "no tokenizer"),
    ('{"prompt_ids": [9, 8], "max_new_tokens": 5, "temperature": 0.7, "seed": 3, '
     '"logprobs": true}', None),
    ('{"prompt_ids": [9, 8], "logprobs": "yes"}', "logprobs='yes': must be a bool"),
]


def test_generate_writes_one_result_per_line_in_order(tmp_path):
    prompts = tmp_path / "in.jsonl"
    prompts.write_text("\n".join(line for line, _ in LINES) + "\n\n")  # blank lines are skipped
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
    assert set(records[0]) >= {"index", "prompt_ids", "token_ids", "text", "logprobs",
                               "finish_reason", "ttft_s", "latency_s"}
    asked = records[-2]
    assert records[0]["logprobs"] is None and len(asked["logprobs"]) == len(asked["token_ids"])
    assert all(logprob <= 0 for logprob in asked["logprobs"])


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
        assert set(summary[key]) == {"mean", "p50", "p90", "p99", "max"}
    assert summary["makespan_s"] > 0 and summary["output_tokens_per_s"] > 0
    assert summary["kv_cache_bytes"] > 0 and summary["peak_rss_bytes"] > 0
    assert len(summary["requests"]) == 12
    for record in summary["requests"]:  # each token's time, from the start
        assert len(record["token_times_s"]) == record["output_len"]
        assert record["token_times_s"] == sorted(record["token_times_s"])
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


def strict_json(text):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def test_bench_stops_before_it_starts_on_a_trace_line_that_cannot_run(tmp_path):
    # Line 2 asks for more than max_len allows: the bench refuses to start, naming it, rather
    # than timing a workload with a request missing.
    trace = tmp_path / "trace.jsonl"
    lines = [{"arrival_s": 0.0, "prompt_ids": [5, 6], "max_new_tokens": 6},
             {"arrival_s": 0.01, "prompt_ids": [7], "max_new_tokens": 200},
             {"arrival_s": 0.02, "prompt_ids": [8, 9, 10], "max_new_tokens": 1}]
    trace.write_text("\n".join(json.dumps(line) for line in lines))
    out = tmp_path / "bench.json"
    result = run_main("--mode=bench", "--model=tiny-llama", "--workload=trace", f"--trace={trace}",
                      "--max_slots=2", "--max_len=64", "--ignore_eos", "--nowarmup",
                      f"--output_json={out}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"error: {trace}:2: max_new_tokens=200: must be <= 63" in result.stderr
    assert not out.exists()


def test_bench_summary_of_runs_with_failed_requests_is_valid_json():
    # Through the API a request may still fail (here: too long): the summary counts it, the
    # solo reference is fitted on those that finished, and undefined figures are null.
    from flover_jax import bench
    from flover_jax.engine import Engine, TimedRequest
    from flover_jax.sampling_params import SamplingParams

    engine = Engine.from_pretrained("tiny-llama", max_slots=2, max_len=64)
    requests = [TimedRequest([5, 6], SamplingParams(max_new_tokens=6, ignore_eos=True)),
                TimedRequest([7], SamplingParams(max_new_tokens=200), 0.01),
                TimedRequest([8, 9, 10], SamplingParams(max_new_tokens=1), 0.02)]
    summary = strict_json(json.dumps(bench.run(engine, requests, warmup=False), allow_nan=False))
    assert summary["errors"] == 1 and summary["output_tokens"] == 7
    assert summary["latency_vs_solo"] > 0 and summary["solo"]["tpot_s"] > 0
    summary = strict_json(json.dumps(bench.run(engine, requests[1:2], warmup=False),
                                     allow_nan=False))
    assert summary["errors"] == 1 and summary["makespan_s"] == 0.0
    assert summary["latency_vs_solo"] is None and summary["tpot_s"]["p50"] is None


@pytest.mark.parametrize("args, message", [
    (["--mode=generate", "--prompt=x", "--output_len=5"], "--output_len has no effect with --mode=generate"),
    (["--mode=run", "--temperature=0.5"], "--temperature has no effect with --mode=run"),
    (["--mode=convert", "--src=a", "--dst=b", "--max_slots=4"],
     "--max_slots has no effect with --mode=convert"),
    (["--mode=bench", "--max_new_tokens=5"], "--max_new_tokens has no effect in bench: --output_len"),
    (["--mode=bench", "--workload=trace", "--trace=t.jsonl", "--num_requests=3"],
     "--num_requests has no effect with --workload=trace"),
    (["--mode=bench", "--trace=t.jsonl"], "--trace needs --workload=trace"),
    (["--mode=bench", "--rate=nan"], "rate=nan: must be > 0 and finite"),
    (["--mode=bench", "--workload=constant", "--rate=2"],
     "--rate has no effect with --workload=constant"),
    (["--mode=bench", "--num_requests=0"], "num_requests=0: must be >= 1"),
    (["--mode=bench", "--workload=trace"], "--workload=trace needs --trace=FILE"),
    (["--mode=generate", "--prompt=x", "--num_processes=0"], "--num_processes=0: must be >= 1"),
    (["--mode=generate", "--prompt=x", "--process_id=7"], "--process_id=7: must be in [0, 1)"),
    (["--mode=generate", "--prompt=x", "--coordinator_address=localhost:1"],
     "--coordinator_address has no effect with --num_processes=1"),
    (["--mode=run"], "model='tiny-llama': run mode sends chat prompts"),
    (["--mode=convert", "--src=tiny-llama", "--dst=/nonexistent/x"],
     "tiny-llama: a preset of random weights"),
    (["--mode=bench", "--seed=-1"], "seed=-1: must be an int in"),
    (["--mode=bench", "--temperature=-5"], "temperature=-5.0: must be >= 0"),
    (["--mode=bench", "--output_json=/nonexistent/dir/r.json"],
     "output_json='/nonexistent/dir/r.json': directory '/nonexistent/dir' does not exist"),
    (["--mode=generate", "--prompts_file=/nonexistent.jsonl"],
     "prompts_file='/nonexistent.jsonl': No such file"),
])
def test_flags_that_do_not_apply_or_hold_bad_values_fail_before_work(args, message):
    model = [] if "--mode=convert" in args else ["--model=tiny-llama"]  # loads at once
    result = run_main(*args, *model)
    assert result.returncode == 2 and f"error: {message}" in result.stderr, result.stderr[-2000:]


def test_every_flag_belongs_to_a_mode():
    import re

    from flover_jax.cli import flags

    source = (REPO / "flover_jax" / "cli" / "flags.py").read_text()
    ours = set(re.findall(r'flags\.DEFINE_\w+\(\s*"(\w+)"', source))
    assert len(ours) > 30 and ours == set().union(*flags.MODE_FLAGS.values()) | {"mode"}
