"""llama.cpp's `llama-server` as a peer: start it on 127.0.0.1, replay a workload over HTTP with
one thread per request (streamed, so each token is timed as it arrives), stop it.

Standard library only. The workload is the JSON list benchmarks/peers/hf_peer.py takes:
{arrival_s, prompt_ids, max_new_tokens}; EOS is ignored, decoding is greedy, prompt caching off.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import threading
import time
from pathlib import Path

BINARY = Path(".peers/llama.cpp/build/bin/llama-server")  # benchmarks/peers/setup.sh builds it
QUANTIZE = Path(".peers/llama.cpp/build/bin/llama-quantize")


def f32_gguf(q4_gguf: Path, out: Path) -> Path:
    """The same model with every tensor dequantized to float32 (llama.cpp's own dequantizer), so
    the server runs at our precision."""
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(QUANTIZE), "--allow-requantize", str(q4_gguf), str(out), "F32"],
                       check=True, capture_output=True)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(server, name: str, timeout_s: float, poll_s: float) -> None:
    """Block until `server` (a peer server object with process, port, log and __exit__)
    answers GET /health with 200. Raises if its process exits; stops it and raises on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{name} exited with {server.process.returncode}; see {server.log}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=2)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(poll_s)
    server.__exit__(None, None, None)
    raise RuntimeError(f"{name} not healthy within {timeout_s:.0f} s; see {server.log}")


class LlamaServer:
    """`with LlamaServer(gguf, slots, ctx_per_slot) as server:` runs the server for the block."""

    def __init__(self, gguf: Path, slots: int, ctx_per_slot: int, *, threads: int = 2,
                 kv_type: str = "f16", log: Path | None = None):
        self.port = free_port()
        self.command = [
            str(BINARY), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(self.port),
            "-np", str(slots), "-c", str(slots * ctx_per_slot), "-t", str(threads), "-tb", str(threads),
            "--cache-type-k", kv_type, "--cache-type-v", kv_type, "--no-webui", "--cont-batching",
        ]
        self.log = log or Path("/dev/null")

    def __enter__(self) -> LlamaServer:
        self._log_file = self.log.open("w")
        self.process = subprocess.Popen(self.command, stdout=self._log_file, stderr=subprocess.STDOUT)
        wait_until_healthy(self, "llama-server", 120, 0.5)
        return self

    def __exit__(self, *exc):
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log_file.close()

    def complete(self, prompt_ids: list[int], max_new_tokens: int, start: float) -> dict:
        """One streamed greedy completion; times in seconds from `start` (perf_counter)."""
        body = json.dumps({
            "prompt": prompt_ids, "n_predict": max_new_tokens, "ignore_eos": True, "temperature": 0.0,
            "stream": True, "cache_prompt": False, "return_tokens": True,
        })
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=900)
        connection.request("POST", "/completion", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"llama-server: HTTP {response.status}: {response.read()[:300]!r}")
        times = []
        for line in response:
            if not line.startswith(b"data: "):
                continue
            chunk = json.loads(line[len(b"data: "):])
            now = time.perf_counter() - start
            times += [now] * len(chunk.get("tokens", []))
            if chunk.get("stop"):
                break
        connection.close()
        return {"first_token_s": times[0] if times else None, "finished_s": time.perf_counter() - start,
                "token_times_s": times, "finish_reason": "length"}

    def replay(self, work: list[dict]) -> list[dict]:
        """Each request is sent at its arrival time from its own thread."""
        self.complete(work[0]["prompt_ids"], 4, time.perf_counter())  # untimed warm-up
        records: list[dict | None] = [None] * len(work)
        start = time.perf_counter()

        def send(i: int):
            delay = work[i]["arrival_s"] - (time.perf_counter() - start)
            if delay > 0:
                time.sleep(delay)
            try:
                result = self.complete(work[i]["prompt_ids"], work[i]["max_new_tokens"], start)
            except (OSError, RuntimeError, ValueError) as e:
                result = {"first_token_s": None, "finished_s": time.perf_counter() - start,
                          "token_times_s": [], "finish_reason": "error", "error": str(e)}
            records[i] = {"arrival_s": work[i]["arrival_s"], **result}

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(work))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return records

    @staticmethod
    def version() -> str:
        """Where the sources came from (setup.sh writes it; the build itself reports no version)."""
        source = BINARY.parents[2] / "SOURCE"
        return source.read_text().strip() if source.exists() else "unknown source"
