"""Replay a workload against any OpenAI-compatible server, timing every streamed token.

`--mode=bench --backend=openai --base_url=URL` sends the same timed requests as the in-process
bench (one thread per request, each sent at its arrival time) to `/v1/completions` with
`stream: true`, so our server, vLLM's and llama.cpp's are measured through one client. A token
is timed when the chunk that carries it arrives (TTFT at the first streamed token, as vLLM's
own benchmark does); a chunk counts the tokens its `logprobs.tokens` lists, else one: also a
chunk of empty text (its token's text is held back, an incomplete UTF-8 character), but not a
closing chunk that only gives the finish reason. The request's `usage.completion_tokens`
(asked for with `stream_options.include_usage`) has the last word on how many there were.
Standard library only.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse
from collections.abc import Sequence

from flover_jax.engine import TimedRequest
from flover_jax.sampling_params import SamplingParams

_DEFAULTS = SamplingParams()


class OpenAIServer:
    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 3600) -> None:
        parsed = urllib.parse.urlparse(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"base_url={base_url!r}: expected http://host:port (the server's root "
                             "or its /v1)")
        self.base_url = base_url
        self._https = parsed.scheme == "https"
        self._host, self._port = parsed.hostname, parsed.port
        self._prefix = parsed.path.rstrip("/").removesuffix("/v1")
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._timeout_s = timeout_s
        self.model = self._models()[0]

    def _connection(self) -> http.client.HTTPConnection:
        kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        return kind(self._host, self._port, timeout=self._timeout_s)

    def _models(self) -> list[str]:
        connection = self._connection()
        try:
            connection.request("GET", f"{self._prefix}/v1/models", headers=self._headers)
            response = connection.getresponse()
            body = response.read()
            if response.status != 200:
                raise ValueError(f"base_url={self.base_url!r}: GET /v1/models answered "
                                 f"{response.status}: {body[:200]!r}")
            return [model["id"] for model in json.loads(body)["data"]]
        except OSError as e:
            raise ValueError(f"base_url={self.base_url!r}: cannot reach it ({e})") from None
        finally:
            connection.close()

    def body(self, request: TimedRequest) -> dict:
        """The completion request for one workload request: only what differs from OpenAI's
        defaults besides what every request states, so that any server takes it."""
        p = request.params
        body = {"model": self.model, "prompt": request.prompt, "max_tokens": p.max_new_tokens,
                "temperature": p.temperature, "seed": p.seed, "stream": True,
                "stream_options": {"include_usage": True}}
        for name, default in (("top_p", 1.0), ("top_k", 0), ("presence_penalty", 0.0),
                              ("frequency_penalty", 0.0), ("repetition_penalty", 1.0)):
            if getattr(p, name) != default:
                body[name] = getattr(p, name)
        if p.stop:
            body["stop"] = list(p.stop)
        if p.ignore_eos:
            body["ignore_eos"] = True
        return body

    def complete(self, request: TimedRequest, start: float) -> dict:
        """One streamed completion; times in seconds from `start` (perf_counter)."""
        connection = self._connection()
        try:
            connection.request("POST", f"{self._prefix}/v1/completions",
                               json.dumps(self.body(request)), self._headers)
            response = connection.getresponse()
            if response.status != 200:
                error = response.read()[:500].decode(errors="replace")
                return _failed(start, f"HTTP {response.status}: {error}")
            times, finish, used, partial = [], None, None, b""
            # Whatever has arrived, split into lines here: iterating the response line by line
            # costs several Python calls per line of a chunked body, on the CPUs the server uses.
            while data := response.read1(1 << 16):
                now = time.perf_counter() - start
                *lines, partial = (partial + data).split(b"\n")
                for line in lines:
                    if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                        continue
                    chunk = json.loads(line[len(b"data: "):])
                    if chunk.get("usage"):
                        used = chunk["usage"].get("completion_tokens")
                    for choice in chunk.get("choices") or ():
                        tokens = (choice.get("logprobs") or {}).get("tokens")
                        if tokens or choice.get("text") or not choice.get("finish_reason"):
                            times += [now] * (len(tokens) if tokens else 1)
                        finish = choice.get("finish_reason") or finish
            if used is not None and times:  # usage has the last word on the count
                times = (times + [times[-1]] * used)[:used]
            return {"first_token_s": times[0] if times else None,
                    "finished_s": time.perf_counter() - start, "token_times_s": times,
                    "finish_reason": finish or "length"}
        except (OSError, ValueError, http.client.HTTPException) as e:
            return _failed(start, f"{type(e).__name__}: {e}")
        finally:
            connection.close()

    def replay(self, work: Sequence[TimedRequest]) -> tuple[list[dict], float]:
        """Each request sent at its arrival time from its own thread: the per-request records
        `metrics.latency_figures` reads, and the wall time of the whole replay."""
        records: list[dict | None] = [None] * len(work)
        start = time.perf_counter()

        def send(i: int) -> None:
            delay = work[i].arrival_s - (time.perf_counter() - start)
            if delay > 0:
                time.sleep(delay)
            records[i] = {"arrival_s": work[i].arrival_s, **self.complete(work[i], start)}

        threads = [threading.Thread(target=send, args=(i,), daemon=True) for i in range(len(work))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return records, time.perf_counter() - start


def _failed(start: float, error: str) -> dict:
    return {"first_token_s": None, "finished_s": time.perf_counter() - start, "token_times_s": [],
            "finish_reason": "error", "error": error}
