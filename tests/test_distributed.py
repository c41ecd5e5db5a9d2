"""Two processes on 127.0.0.1 (2 fake CPU devices each) run at tp=4 through jax.distributed:
a generation produces the tokens of a single process, and a benchmark reports on process 0."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(tmp_path, args: list[str], output_flag: str, follower_args=()) -> None:
    """main.py with args in two processes at tp=4; process i writes output_flag=out{i}.
    follower_args: process 1's own (later flags win): inputs and outputs are process 0's."""
    address = f"127.0.0.1:{free_port()}"
    xla_flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=" ".join([*xla_flags, "--xla_force_host_platform_device_count=2"]))
    processes = [
        subprocess.Popen(
            [sys.executable, "main.py", *args, "--tp=4", f"{output_flag}={tmp_path / f'out{i}'}",
             f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}",
             *(follower_args if i else ())],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]
    try:
        logs = [p.communicate(timeout=240)[0] for p in processes]
    finally:
        for p in processes:
            p.kill()
    assert [p.returncode for p in processes] == [0, 0], "\n".join(log[-2000:] for log in logs)
    assert not (tmp_path / "out1").exists()  # results are gathered on process 0


def test_two_processes_tp4_equal_one_process(tmp_path):
    prompts = tmp_path / "in.jsonl"
    lines = [{"prompt_ids": [3 + i, 40 + 7 * i, 9], "max_new_tokens": 6 + 3 * i} for i in range(5)]
    prompts.write_text("\n".join(json.dumps(line) for line in lines))
    common = ["--mode=generate", "--model=tiny-llama", "--max_slots=2", "--max_len=64",
              f"--prompts_file={prompts}"]
    # The prompts file exists on process 0's host only.
    run_two_processes(tmp_path, common, "--output", [f"--prompts_file={tmp_path / 'absent'}"])
    two = [json.loads(line) for line in (tmp_path / "out0").read_text().splitlines()]

    single = subprocess.run([sys.executable, "main.py", *common], cwd=REPO, capture_output=True,
                            text=True, timeout=240)
    assert single.returncode == 0, single.stderr[-2000:]
    one = [json.loads(line) for line in single.stdout.splitlines() if line.startswith("{")]
    assert len(two) == len(one) == len(lines)
    assert [r["token_ids"] for r in two] == [r["token_ids"] for r in one]
    assert all(r["finish_reason"] == "length" for r in two)


def test_two_processes_bench_reports_on_process_0(tmp_path):
    run_two_processes(tmp_path, [
        "--mode=bench", "--model=tiny-llama", "--max_slots=2", "--max_len=64", "--workload=burst",
        "--num_requests=3", "--output_len=5", "--ignore_eos", "--solo_samples=0", "--nowarmup",
    ], "--output_json", [f"--output_json={tmp_path / 'absent' / 'out1'}"])
    summary = json.loads((tmp_path / "out0").read_text())
    assert summary["errors"] == 0 and summary["output_tokens"] == 3 * 5
    assert summary["ops"]["attention"] == "xla" and summary["batch_invariant"] is False


def test_broadcast_executor_takes_every_device_call_as_the_executor_does():
    import inspect

    from flover_jax.distributed import BroadcastExecutor
    from flover_jax.executor import DeviceExecutor

    for name in ("prefill", "decode", "compact", "copy_prefix", "release", "warmup", "read"):
        ours, theirs = (inspect.signature(getattr(c, name)) for c in (BroadcastExecutor, DeviceExecutor))
        assert list(ours.parameters) == list(theirs.parameters), name
        assert [p.default for p in ours.parameters.values()] == [
            p.default for p in theirs.parameters.values()], name


def test_a_follower_outlives_a_replayed_call_that_fails(monkeypatch):
    """Process 0 catches what its own call raised and goes on; so must the followers."""
    import pickle

    from flover_jax import distributed

    messages = iter(pickle.dumps(m) for m in [
        ("warmup", (None, None, None)), ("release", ([1],)), (distributed._STOP, ())])
    monkeypatch.setattr(distributed, "_broadcast", lambda payload: next(messages))
    calls = []

    class Executor:
        def warmup(self, *args):
            raise RuntimeError("warmup: slots are decoding")

        def release(self, slots):
            calls.append(slots)

    distributed.follow(Executor())
    assert calls == [[1]]
