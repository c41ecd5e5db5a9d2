"""The load generator's reading of a stream (`flover_jax.openai_client`), against a stand-in
server that streams what OpenAI-compatible servers send."""

from __future__ import annotations

import http.server
import json
import threading

import pytest

from flover_jax.engine import TimedRequest
from flover_jax.openai_client import OpenAIServer
from flover_jax.sampling_params import SamplingParams


def _chunk(text: str, finish: str | None = None) -> dict:
    return {"choices": [{"index": 0, "text": text, "finish_reason": finish}]}


# A token whose text is held back (half of a character), the token completing it, one more,
# and the closing chunk that only gives the finish reason, as vLLM's server streams them.
STREAM = [_chunk(""), _chunk("é"), _chunk(" a"), _chunk("", "length")]


@pytest.fixture(scope="module")
def stand_in(request):
    usage = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # /v1/models
            self._send(json.dumps({"data": [{"id": "stand-in"}]}).encode())

        def do_POST(self):  # /v1/completions, streamed
            self.rfile.read(int(self.headers["Content-Length"]))
            events = [*STREAM, *([{"choices": [], "usage": usage["value"]}] if usage else [])]
            self._send(b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
                       + b"data: [DONE]\n\n")

        def _send(self, body: bytes):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", usage
    server.shutdown()


@pytest.mark.parametrize("completion_tokens", [None, 3, 2])
def test_every_token_chunk_counts_even_with_its_text_held_back(stand_in, completion_tokens):
    """A chunk of empty text carries a token (its text comes with the next), so the first
    token is timed at it; the closing chunk carries none. Where the server reports usage, its
    count has the last word."""
    url, usage = stand_in
    usage.clear()
    if completion_tokens is not None:
        usage["value"] = {"completion_tokens": completion_tokens}
    client = OpenAIServer(url)
    request = TimedRequest([1, 2, 3], SamplingParams(max_new_tokens=3, ignore_eos=True))
    record = client.complete(request, start=0.0)
    assert record["finish_reason"] == "length"
    assert len(record["token_times_s"]) == (completion_tokens or 3)
    assert record["first_token_s"] == record["token_times_s"][0] > 0
