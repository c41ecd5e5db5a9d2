"""The OpenAI-compatible server, driven live on 127.0.0.1 with the official `openai` client.

The model is a tiny random LLaMA with SmolLM2's tokenizer and chat template: real text in and
out, fast steps. Greedy requests are compared with the same request sent alone.
"""

import http.client
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import openai
import pytest
import uvicorn

from flover_jax.engine import Engine
from flover_jax.server.app import ServerState, create_app
from flover_jax.tokenizer import Tokenizer
from models.presets import smollm2_gguf_path, tiny_config
from models.transformer import init_params

REPO = Path(__file__).resolve().parents[1]
KEY = "test-key"
GREEDY = {"temperature": 0.0}


def start_server(state: ServerState, engine: Engine):
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=0,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    state.ready(engine)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_gguf(smollm2_gguf_path())


def tiny_chat_engine(tokenizer, max_slots=4):
    """Prompts go in pieces of 16 tokens, and their openings into a prefix cache of 2 rows:
    every test below runs through chunked prefill and prefix hits."""
    cfg = tiny_config("llama", vocab_size=tokenizer.vocab_size)
    return Engine(cfg, init_params(cfg, jax.random.key(0), scale=0.3), tokenizer,
                  max_slots=max_slots, max_len=128, prefill_chunk=16, prefix_cache_rows=2)


@pytest.fixture(scope="module")
def served(tokenizer):
    state = ServerState("tiny-chat", api_key=KEY, max_waiting=16)
    server, thread, url = start_server(state, tiny_chat_engine(tokenizer))
    yield state, url
    state.loop.close()
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[1] + "/v1", api_key=KEY, max_retries=0)


def call(url, body=None, *, key=KEY, raw=None, method=None):
    """(status, JSON body) of a plain HTTP call."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read() or b"null"), dict(response.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null"), dict(e.headers)


def metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def test_a_shared_system_prompt_is_computed_once(client, served):
    _, url = served
    system = "You are a kind assistant. You answer every question in one short sentence. " * 2
    before = [metric(url, f"flover_prefix_cache_{n}_total") for n in ("queries", "hits")]

    def ask(question):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        return client.chat.completions.create(model="tiny-chat", messages=messages,
                                              max_tokens=6, **GREEDY)

    first, second = ask("Hi"), ask("What is the sea?")
    queries, hits = (metric(url, f"flover_prefix_cache_{n}_total") - b
                     for n, b in zip(("queries", "hits"), before))
    assert queries == first.usage.prompt_tokens + second.usage.prompt_tokens
    assert hits >= 32  # the second reused the system prompt's whole pieces of 16
    assert ask("What is the sea?").choices[0].message == second.choices[0].message  # a full hit


def test_completion_streamed_equals_completion_whole(client):
    whole = client.completions.create(model="tiny-chat", prompt="Once upon a time",
                                      max_tokens=12, **GREEDY)
    (choice,) = whole.choices
    assert whole.usage.completion_tokens == 12 and whole.usage.prompt_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 12
    chunks = list(client.completions.create(model="tiny-chat", prompt="Once upon a time",
                                            max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices


def test_echo_puts_the_prompt_before_the_completion_whole_and_streamed(client):
    """`echo`: the prompt's text opens the answer, whole or streamed (and only where asked)."""
    prompt = "Once upon a time"
    plain = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=6, **GREEDY)
    whole = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=6, echo=True,
                                      **GREEDY)
    assert whole.choices[0].text == prompt + plain.choices[0].text
    assert not plain.choices[0].text.startswith(prompt)
    chunks = list(client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=6,
                                            echo=True, stream=True, **GREEDY))
    assert chunks[0].choices[0].text == prompt
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text


def test_chat_streamed_equals_chat_whole_with_logprobs(client):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=10,
                                           logprobs=True, **GREEDY)
    (choice,) = whole.choices
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert len(choice.logprobs.content) == whole.usage.completion_tokens
    assert all(entry.logprob <= 0 for entry in choice.logprobs.content)
    stream = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=10,
                                            stream=True, **GREEDY)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == choice.message.content
    top = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=10,
                                         logprobs=True, top_logprobs=3, **GREEDY).choices[0]
    for entry, plain in zip(top.logprobs.content, choice.logprobs.content, strict=True):
        assert len(entry.top_logprobs) == 3 and entry.token == plain.token
        best = entry.top_logprobs[0]  # greedy: the token is the likeliest
        assert best.token == entry.token and abs(best.logprob - entry.logprob) < 1e-5
        assert [a.logprob for a in entry.top_logprobs] == sorted(
            (a.logprob for a in entry.top_logprobs), reverse=True)
    completion = client.completions.create(model="tiny-chat", prompt="Hi", max_tokens=4,
                                           logprobs=2, **GREEDY).choices[0]
    assert [len(step) for step in completion.logprobs.top_logprobs] == [2] * 4


def test_stop_strings_cut_the_text_and_are_never_streamed(client):
    full = client.completions.create(model="tiny-chat", prompt="The", max_tokens=24, **GREEDY)
    text = full.choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip(), text  # a stop string inside the text
    cut = client.completions.create(model="tiny-chat", prompt="The", max_tokens=24, stop=[stop],
                                    **GREEDY)
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny-chat", prompt="The", max_tokens=24, stop=[stop], stream=True, **GREEDY))
    assert streamed == cut.choices[0].text and stop not in streamed


def test_n_choices_and_several_prompts(client):
    out = client.completions.create(model="tiny-chat", prompt=["Hello", "Bye"], n=2,
                                    max_tokens=5, temperature=1.0, seed=7)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.usage.completion_tokens == sum(
        len(client.completions.create(model="tiny-chat", prompt=p, max_tokens=5, temperature=1.0,
                                      seed=7 + j, logprobs=0).choices[0].logprobs.tokens)
        for p in ("Hello", "Bye") for j in range(2))
    assert len({c.text for c in out.choices}) > 1  # each choice its own seed
    again = client.completions.create(model="tiny-chat", prompt=[[1, 2, 3], [4, 5]], n=2,
                                      max_tokens=5, temperature=1.0, seed=7)
    assert [c.index for c in again.choices] == [0, 1, 2, 3]
    again = client.completions.create(model="tiny-chat", prompt=["Hello", "Bye"], n=2,
                                      max_tokens=5, temperature=1.0, seed=7)
    assert [c.text for c in again.choices] == [c.text for c in out.choices]  # seeded


def test_sixteen_concurrent_streams_each_equal_its_solo_run(client):
    words = ["cats", "dogs", "rain", "snow", "sun", "moon", "trees", "rivers", "roads", "ships",
             "bread", "tea", "jazz", "maps", "clocks", "stars"]
    prompts = [f"Tell me about {word}" for word in words]

    def stream(prompt):
        return "".join(c.choices[0].text for c in client.completions.create(
            model="tiny-chat", prompt=prompt, max_tokens=8 + len(prompt) % 7, stream=True,
            **GREEDY))

    solo = [stream(p) for p in prompts]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(stream, prompts))
    assert together == solo


def test_a_dropped_stream_frees_its_slot(served, client):
    state, url = served
    cancelled = metric(url, 'flover_requests_finished_total{finish_reason="cancelled"}')
    stream = client.completions.create(model="tiny-chat", prompt="A long story", max_tokens=100,
                                       stream=True, extra_body={"ignore_eos": True}, **GREEDY)
    for _, _ in zip(range(3), stream):
        pass
    stream.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 30
    while metric(url, 'flover_requests_finished_total{finish_reason="cancelled"}') == cancelled:
        assert time.monotonic() < deadline, "the dropped request was never cancelled"
        time.sleep(0.05)
    deadline = time.monotonic() + 30
    while state.outstanding or metric(url, "flover_slots_in_use") != 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # A whole answer's client that leaves is noticed too.
    cancelled = metric(url, 'flover_requests_finished_total{finish_reason="cancelled"}')
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("POST", "/v1/completions", json.dumps(  # 16 choices: most still queue
        {"prompt": "A long story", "max_tokens": 100, "n": 16, "ignore_eos": True, **GREEDY}),
        {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    while metric(url, "flover_slots_in_use") == 0:
        time.sleep(0.01)
    connection.close()
    deadline = time.monotonic() + 30
    while metric(url, 'flover_requests_finished_total{finish_reason="cancelled"}') == cancelled:
        assert time.monotonic() < deadline, "the whole answer's request was never cancelled"
        time.sleep(0.05)


def test_bad_requests_get_4xx_naming_the_field(served):
    _, url = served
    completions = url + "/v1/completions"
    ok = {"model": "tiny-chat", "prompt": "hi", "max_tokens": 2}
    assert call(completions, ok, key=None)[0] == 401
    assert call(completions, ok, key="wrong")[0] == 401
    status, body, _ = call(completions, raw=b'{"prompt": "hi",')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.putrequest("POST", "/v1/completions")  # announces 5 MiB, sends none of it
    connection.putheader("Content-Length", str(5 << 20))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413
    assert json.loads(response.read())["error"]["code"] == "request_too_large"
    for change, param in [({"temperature": -1}, "temperature"), ({"top_p": 2}, "top_p"),
                          ({"max_tokens": 1000}, "max_tokens"), ({"colour": "red"}, "colour"),
                          ({"max_tokens": "2"}, "max_tokens"), ({"prompt": [[1, 999999]]}, "prompt"),
                          ({"frequency_penalty": 2.5}, "frequency_penalty"), ({"n": 0}, "n"),
                          ({"logprobs": 21}, "logprobs")]:
        status, body, _ = call(completions, ok | change)
        assert status == 400 and body["error"]["param"] == param, (change, body)
        assert set(body["error"]) == {"message", "type", "param", "code"}
    status, body, _ = call(completions, ok | {"model": "other"})
    assert status == 404 and body["error"]["code"] == "model_not_found"
    status, body, _ = call(url + "/v1/chat/completions", {"messages": []})
    assert status == 400 and body["error"]["param"] == "messages"
    assert "Traceback" not in json.dumps(body) and "/work" not in json.dumps(body)


def test_health_models_tokenize_and_detokenize(served, tokenizer):
    _, url = served
    assert call(url + "/health", key=None)[:2] == (200, {"status": "ok"})
    status, body, _ = call(url + "/v1/models")
    assert status == 200 and body["data"][0]["id"] == "tiny-chat"
    status, body, _ = call(url + "/tokenize", {"prompt": "Hello world"})
    assert body["tokens"] == tokenizer.encode("Hello world") and body["count"] == len(body["tokens"])
    messages = [{"role": "user", "content": "hi<|im_end|>"}]
    status, body, _ = call(url + "/tokenize", {"messages": messages})
    assert body["tokens"] == tokenizer.encode_chat(messages)
    status, body, _ = call(url + "/detokenize", {"tokens": tokenizer.encode("Hello world")})
    assert body == {"prompt": "Hello world"}


def test_a_full_server_answers_429_with_retry_after(tokenizer):
    state = ServerState("tiny-chat", max_waiting=0)
    server, thread, url = start_server(state, tiny_chat_engine(tokenizer, max_slots=2))
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        long = [client.completions.create(model="tiny-chat", prompt="Go", max_tokens=100, stream=True,
                                          extra_body={"ignore_eos": True}, **GREEDY)
                for _ in range(2)]
        next(iter(long[0]))
        status, body, headers = call(url + "/v1/completions",
                                     {"prompt": "Also", "max_tokens": 2}, key=None)
        assert status == 429 and headers.get("retry-after") == "1"
        assert body["error"]["type"] == "rate_limit_error"
        for stream in long:
            stream.close()
    finally:
        state.loop.close()
        server.should_exit = True
        thread.join(10)


def test_a_call_past_its_timeout_is_cancelled_and_answered_504(tokenizer):
    state = ServerState("tiny-chat", timeout_s=0.05)
    server, thread, url = start_server(state, tiny_chat_engine(tokenizer, max_slots=2))
    try:
        long = {"prompt": "Go", "max_tokens": 120, "ignore_eos": True, **GREEDY}
        status, body, _ = call(url + "/v1/completions", long, key=None)
        assert status == 504 and body["error"]["code"] == "timeout"
        request = urllib.request.Request(url + "/v1/completions", json.dumps(long | {"stream": True})
                                         .encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            events = [line for line in response.read().decode().splitlines() if line]
        assert json.loads(events[-1].removeprefix("data: "))["error"]["code"] == "timeout"
        deadline = time.monotonic() + 30
        while state.outstanding:  # both were cancelled: nothing left in the engine
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        state.loop.close()
        server.should_exit = True
        thread.join(10)


def test_sigterm_drains_the_requests_in_flight_and_exits_0():
    process = subprocess.Popen(
        [sys.executable, str(REPO / "main.py"), "--mode=serve", "--model=tiny-llama", "--port=0",
         "--max_slots=2", "--max_len=256", "--drain_s=60"],
        cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stderr:
            if line.startswith("serving "):
                url = line.split(" on ")[1].split()[0]
                break
        result = {}

        def long_request():
            result["answer"] = call(url + "/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 240,
                                                              "ignore_eos": True, **GREEDY})

        worker = threading.Thread(target=long_request)
        worker.start()
        while metric(url, "flover_slots_in_use") == 0:  # until it decodes
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        while call(url + "/health", key=None)[0] == 200:
            time.sleep(0.01)
        assert worker.is_alive()  # draining: no new work, the request in flight goes on
        worker.join(120)
        status, body, _ = result["answer"]
        assert status == 200 and body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 240
        assert process.wait(60) == 0
    finally:
        process.kill()


def test_bench_through_http_times_every_streamed_token(served, tmp_path):
    _, url = served
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "main.py", "--mode=bench", "--backend=openai", f"--base_url={url}",
         f"--api_key={KEY}", "--workload=burst", "--num_requests=6", "--prompt_len=5",
         "--output_len=7", "--ignore_eos", f"--output_json={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["backend"] == "openai" and summary["model"] == "tiny-chat"
    assert summary["errors"] == 0 and summary["output_tokens"] == 6 * 7
    assert summary["ttft_s"]["p50"] > 0 and summary["itl_s"]["p50"] > 0
    assert summary["output_tokens_per_s"] > 0 and len(summary["requests"]) == 6
    result = subprocess.run([sys.executable, "main.py", "--mode=bench", "--backend=openai",
                             f"--base_url={url}", "--max_slots=4"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "--max_slots has no effect with --backend=openai" in result.stderr
