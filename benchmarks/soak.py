"""Soak the HTTP server: thousands of requests of every kind, some dropped, some bad.

Starts `main.py --mode=serve` and sends `--requests` requests from `--clients` threads: random
completions and chats, streamed or whole, random lengths, sampling settings, stop strings and
`n`; a share of the streams is dropped after a few chunks, a share of the requests is bad
(a field out of range, an unknown field, JSON cut short, a length past max_len). Then it checks
what the server promises, from the outside:

- every bad request got a 4xx naming its field, every good one a 200 or a 429 (full);
- every request accepted ended exactly once: the server's `flover_requests_finished_total`
  equals the engine requests the accepted calls made (n each), none lost or doubled;
- nothing leaked: no slot in use, nothing running or waiting at the end;
- the server's resident memory grew by under 5% from after the warm-up to the end.

    .venv/bin/python benchmarks/soak.py --requests=2000 --output_json=benchmarks/results/soak.json
"""

from __future__ import annotations

import http.client
import json
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from absl import app, flags
from common import cpu_description, start_server  # benchmarks/ is on the path

REPO = Path(__file__).resolve().parents[1]
flags.DEFINE_string("model", "smollm2-135m", "Model to serve (needs a tokenizer and a chat template).")
flags.DEFINE_integer("requests", 2000, "Requests to send.")
flags.DEFINE_integer("clients", 24, "Client threads sending at once.")
flags.DEFINE_integer("max_slots", 16, "The server's slots.")
flags.DEFINE_integer("max_len", 256, "The server's tokens per slot.")
flags.DEFINE_float("drop_share", 0.10, "Share of requests dropped mid-stream.")
flags.DEFINE_float("bad_share", 0.05, "Share of bad requests.")
flags.DEFINE_integer("seed", 0, "Picks every request.")
flags.DEFINE_string("output_json", None, "Write the record here.")
FLAGS = flags.FLAGS

WORDS = ("the", "cat", "sat", "on", "a", "warm", "mat", "and", "watched", "rain", "fall", "over",
         "quiet", "hills", "far", "away")
BAD = [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"colour": 1}, "colour"),
       ({"max_tokens": 10**6}, "max_tokens"), ({"n": 0}, "n"), ({"seed": -3}, "seed"),
       ({"frequency_penalty": 1.0}, "frequency_penalty"), (None, None)]  # None: JSON cut short


class Server:
    def __init__(self) -> None:
        self.process, url = start_server(f"--model={FLAGS.model}", f"--max_slots={FLAGS.max_slots}",
                                         f"--max_len={FLAGS.max_len}", "--max_waiting=1000")
        self.host, port = url.removeprefix("http://").split(":")
        self.port = int(port)

    def call(self, path: str, body: bytes | None, method: str = "POST") -> tuple[int, bytes]:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=600)
        try:
            connection.request(method, path, body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def stream(self, path: str, body: bytes, drop_after: int | None) -> tuple[int, bool]:
        """(status, whether the stream ended with [DONE]); drop_after: chunks read before the
        connection is closed mid-stream."""
        connection = http.client.HTTPConnection(self.host, self.port, timeout=600)
        try:
            connection.request("POST", path, body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            if response.status != 200:
                response.read()
                return response.status, False
            chunks = 0
            for line in response:
                if line.startswith(b"data: [DONE]"):
                    return 200, True
                if line.startswith(b"data: "):
                    chunks += 1
                    if drop_after is not None and chunks >= drop_after:
                        return 200, False  # closing now drops the stream
            return 200, False
        finally:
            connection.close()

    def metrics(self) -> dict[str, float]:
        _, text = self.call("/metrics", None, "GET")
        values: dict[str, float] = {}
        for line in text.decode().splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    def rss_bytes(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024


def one_request(server: Server, rng: random.Random) -> dict:
    chat = rng.random() < 0.5
    text = " ".join(rng.choices(WORDS, k=rng.randint(1, 24)))
    body: dict = {"max_tokens": rng.randint(1, 48), "temperature": rng.choice([0.0, 0.7, 1.0]),
                  "seed": rng.randint(0, 1000), "n": rng.choice([1, 1, 1, 2])}
    if rng.random() < 0.3:
        body["top_p"] = rng.uniform(0.5, 1.0)
    if rng.random() < 0.3:
        body["top_k"] = rng.randint(1, 50)
    if rng.random() < 0.2:
        body["stop"] = [rng.choice(WORDS)]
    body |= {"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text}
    path = "/v1/chat/completions" if chat else "/v1/completions"
    kind = rng.random()
    if kind < FLAGS.bad_share:
        change, param = rng.choice(BAD)
        raw = json.dumps(body).encode()[:-3] if change is None else json.dumps(body | change).encode()
        status, answer = server.call(path, raw)
        named = change is None or json.loads(answer)["error"]["param"] == param
        return {"kind": "bad", "status": status, "ok": 400 <= status < 500 and named}
    if kind < FLAGS.bad_share + FLAGS.drop_share:
        status, done = server.stream(path, json.dumps(body | {"stream": True}).encode(),
                                     rng.randint(1, 3))
        return {"kind": "dropped", "status": status, "n": body["n"], "ok": status in (200, 429)}
    if rng.random() < 0.5:
        status, done = server.stream(path, json.dumps(body | {"stream": True}).encode(), None)
        return {"kind": "stream", "status": status, "n": body["n"],
                "ok": status == 429 or (status == 200 and done)}
    status, answer = server.call(path, json.dumps(body).encode())
    ok = status == 429 or (status == 200 and len(json.loads(answer)["choices"]) == body["n"])
    return {"kind": "whole", "status": status, "n": body["n"], "ok": ok}


def main(argv: list[str]) -> None:
    del argv
    rng = random.Random(FLAGS.seed)
    seeds = [rng.randrange(2**32) for _ in range(FLAGS.requests)]
    server = Server()
    try:
        warm = min(200, FLAGS.requests // 10)
        with ThreadPoolExecutor(FLAGS.clients) as pool:
            results = list(pool.map(lambda s: one_request(server, random.Random(s)), seeds[:warm]))
            rss_after_warmup = server.rss_bytes()
            start = time.perf_counter()
            results += list(pool.map(lambda s: one_request(server, random.Random(s)), seeds[warm:]))
            elapsed = time.perf_counter() - start
        deadline = time.monotonic() + 60  # dropped streams end within an iteration or two
        while (m := server.metrics())["flover_slots_in_use"] and time.monotonic() < deadline:
            time.sleep(0.1)
        rss_end = server.rss_bytes()
    finally:
        server.process.terminate()
        server.process.wait(120)
    accepted = sum(r["n"] for r in results if r["kind"] != "bad" and r["status"] == 200)
    finished = sum(v for k, v in m.items() if k.startswith("flover_requests_finished_total"))
    record = {
        "command": f"python benchmarks/soak.py --requests={FLAGS.requests} --clients={FLAGS.clients}",
        "cpu": cpu_description(), "model": FLAGS.model, "max_slots": FLAGS.max_slots,
        "requests": len(results),
        "by_kind": {kind: sum(r["kind"] == kind for r in results)
                    for kind in ("whole", "stream", "dropped", "bad")},
        "statuses": {str(s): sum(r["status"] == s for r in results)
                     for s in sorted({r["status"] for r in results})},
        "as_promised": sum(r["ok"] for r in results),
        "engine_requests_accepted": accepted,
        "engine_requests_finished": finished,
        "finished_by_reason": {k.split('"')[1]: v for k, v in m.items()
                               if k.startswith("flover_requests_finished_total")},
        "slots_in_use_at_end": m["flover_slots_in_use"],
        "running_at_end": m["flover_requests_running"], "waiting_at_end": m["flover_requests_waiting"],
        "rss_after_warmup_bytes": rss_after_warmup, "rss_end_bytes": rss_end,
        "rss_growth": rss_end / rss_after_warmup - 1, "seconds_after_warmup": elapsed,
    }
    record["passed"] = (record["as_promised"] == len(results) and finished == accepted
                        and not record["slots_in_use_at_end"] and not record["running_at_end"]
                        and not record["waiting_at_end"] and record["rss_growth"] < 0.05)
    print(json.dumps(record, indent=1))
    if FLAGS.output_json:
        Path(FLAGS.output_json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    app.run(main)
