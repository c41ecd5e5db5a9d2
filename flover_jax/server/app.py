"""The OpenAI-compatible HTTP server: thin FastAPI routes over one `EngineLoop`.

Concurrency: uvicorn's event loop runs the routes; the engine's iterations run on the
`EngineLoop` thread. A route checks its request (schema, then `Engine.check_request`, so a
request that can never run is a 400 at once), admits it or answers 429, submits one engine
request per prompt and choice, and then awaits their deltas, which the loop thread hands over
with `call_soon_threadsafe`. A client that goes away cancels its requests: their slots are
free within one iteration. No route reads the scheduler or the device state; /metrics reads
what the loop thread recorded after each iteration.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException

from flover_jax.engine_loop import EngineLoop
from flover_jax.request import RequestOutput, StreamDelta
from flover_jax.sampling_params import MAX_SEED, SamplingParams
from flover_jax.server.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    _Generation,
)

_log = logging.getLogger(__name__)
# The engine's names for what OpenAI calls otherwise, in errors that name a field.
_PARAM_NAMES = {"max_new_tokens": "max_tokens", "prompt_ids": "prompt", "stop_token_ids": "stop"}
_FINISH = {"stop": "stop", "length": "length", "cancelled": "abort", "error": "error"}
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60)


class Metrics:
    """Prometheus figures of one server (its own registry: several apps may share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("flover_requests_running", "Requests holding a slot.", registry=r)
        self.waiting = Gauge("flover_requests_waiting", "Requests queued for a slot.", registry=r)
        self.slots_in_use = Gauge("flover_slots_in_use", "Slots owned by a request.", registry=r)
        self.prompt_tokens = Counter("flover_prompt_tokens", "Prompt tokens of finished "
                                     "requests.", registry=r)
        self.generation_tokens = Counter("flover_generation_tokens", "Generated tokens.", registry=r)
        self.finished = Counter("flover_requests_finished", "Requests ended, by reason.",
                                ["finish_reason"], registry=r)
        # Counters that follow the scheduler's own counts (Stats field -> counter).
        self._counts = {
            "compactions": Counter("flover_compactions", "Compactions (slot moves planned "
                                   "together).", registry=r),
            "prefix_lookup_tokens": Counter("flover_prefix_cache_queries", "Prompt tokens looked "
                                            "up in the prefix cache.", registry=r),
            "prefix_hit_tokens": Counter("flover_prefix_cache_hits", "Prompt tokens copied from "
                                         "the prefix cache instead of computed.", registry=r),
        }
        self.ttft = Histogram("flover_time_to_first_token_seconds", "Arrival to first token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("flover_inter_token_latency_seconds", "Between a request's tokens.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("flover_e2e_request_latency_seconds", "Arrival to last token.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self._seen = dict.fromkeys(self._counts, 0)

    def on_iteration(self, scheduler) -> None:  # the loop thread
        self.running.set(scheduler.num_running)
        self.waiting.set(scheduler.num_waiting)
        self.slots_in_use.set(len(scheduler.table))
        for field, counter in self._counts.items():  # the loop's one scheduler counts on
            count = getattr(scheduler.stats, field)
            counter.inc(count - self._seen[field])
            self._seen[field] = count

    def on_finished(self, output: RequestOutput) -> None:  # the loop thread
        self.finished.labels(output.finish_reason).inc()
        self.prompt_tokens.inc(len(output.prompt_ids))
        self.generation_tokens.inc(len(output.token_ids))
        if output.ttft_s is not None:
            self.ttft.observe(output.ttft_s)
            self.e2e.observe(output.latency_s)
        for before, after in zip(output.token_times_s, output.token_times_s[1:]):
            self.itl.observe(after - before)


class ServerState:
    """What the routes share: the engine loop once the model has loaded, and admission."""

    def __init__(self, model_name: str, *, api_key: str | None = None, max_waiting: int = 64,
                 max_body_bytes: int = 4 << 20, timeout_s: float = 600.0) -> None:
        self.model_name, self.api_key = model_name, api_key
        self.max_waiting, self.max_body_bytes = max_waiting, max_body_bytes
        self.timeout_s = timeout_s  # a call's whole answer, queueing included
        self.metrics = Metrics()
        self.engine = None
        self.loop: EngineLoop | None = None
        self.draining = False  # after SIGTERM: new requests get 503
        self.created = int(time.time())
        self._outstanding = 0  # engine requests submitted and not yet ended
        self._lock = threading.Lock()

    def ready(self, engine) -> None:
        self.engine = engine
        self.loop = EngineLoop(engine, on_iteration=self.metrics.on_iteration)

    @property
    def outstanding(self) -> int:
        return self._outstanding

    def admit(self, count: int) -> None:
        """Reserve room for `count` engine requests, or raise 429: beyond the slots, at most
        max_waiting may queue."""
        room = self.engine.executor.num_slots + self.max_waiting
        with self._lock:
            if self._outstanding + count > room:
                raise ApiError(429, f"the server is full ({self._outstanding} requests in flight, "
                               f"room for {room}); retry shortly", kind="rate_limit_error",
                               code="server_full")
            self._outstanding += count

    def release(self, count: int = 1) -> None:
        with self._lock:
            self._outstanding -= count


# -- one HTTP call's engine requests --------------------------------------------------------------


_EXPIRED = object()  # put on a call's queue at its deadline


class _Calls:
    """The engine requests of one HTTP call: choice i's deltas arrive on `queue` as (i, delta)."""

    def __init__(self, state: ServerState, jobs: Sequence[tuple[list[int], SamplingParams]]) -> None:
        self.state, self.queue = state, asyncio.Queue()
        self.pending = set(range(len(jobs)))
        state.admit(len(jobs))
        aio = asyncio.get_running_loop()
        # One timer for the whole call, not one per delta: at the deadline `next` answers 504.
        self._deadline = aio.call_later(state.timeout_s, self.queue.put_nowait, _EXPIRED)
        self.handles = []
        try:
            for i, (ids, params) in enumerate(jobs):
                self.handles.append(state.loop.submit(ids, params, self._forward(aio, i)))
        except RuntimeError:  # the loop stopped taking requests meanwhile
            state.release(len(jobs) - len(self.handles))
            self.cancel()
            raise ApiError(503, "the server is shutting down", kind="server_error") from None

    def _forward(self, aio: asyncio.AbstractEventLoop, index: int):
        def on_delta(delta: StreamDelta) -> None:  # the loop thread
            if delta.finish_reason is not None:
                self.state.release()
                if delta.output is not None:
                    self.state.metrics.on_finished(delta.output)
            aio.call_soon_threadsafe(self.queue.put_nowait, (index, delta))
        return on_delta

    async def next(self) -> tuple[int, StreamDelta]:
        """The next delta of any choice; past the call's deadline its choices are cancelled and
        this raises a 504."""
        item = await self.queue.get()
        if item is _EXPIRED:
            self.cancel()
            raise ApiError(504, f"no answer within {self.state.timeout_s:g} s (--request_timeout_s)",
                           kind="server_error", code="timeout")
        index, delta = item
        if delta.finish_reason is not None:
            self.pending.discard(index)
            if not self.pending:
                self._deadline.cancel()
        return index, delta

    def cancel(self) -> None:
        """Cancel the choices still running (the client has gone)."""
        self._deadline.cancel()
        for i in self.pending:
            if i < len(self.handles):
                try:
                    self.state.loop.cancel(self.handles[i])
                except RuntimeError:
                    pass  # the loop has stopped: it ended them all already

    async def outputs(self, request: Request) -> list[StreamDelta]:
        """Each choice's last delta (output set), in order; cancels all if the client leaves."""
        last: dict[int, StreamDelta] = {}
        disconnect = asyncio.ensure_future(_disconnected(request))
        try:
            while self.pending:
                getter = asyncio.ensure_future(self.next())
                done, _ = await asyncio.wait({getter, disconnect},
                                             return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    self.cancel()
                    # No one is left to read it: nginx's "client closed request".
                    raise ApiError(499, "the client closed the connection")
                index, delta = getter.result()
                if delta.finish_reason is not None:
                    last[index] = delta
        finally:
            disconnect.cancel()
        return [last[i] for i in sorted(last)]


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away: once the body is read, the next message a request
    receives is its disconnect (no polling)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# -- building engine requests ---------------------------------------------------------------------


def _check(state: ServerState, body: _Generation) -> None:
    if state.loop is None:
        raise ApiError(503, "the model is loading", kind="server_error", code="loading")
    if state.draining or state.loop.failed:
        raise ApiError(503, state.loop.failed or "the server is shutting down", kind="server_error")
    if body.model is not None and body.model != state.model_name:
        raise ApiError(404, f"model={body.model!r}: this server serves {state.model_name!r}",
                       param="model", code="model_not_found")


def _jobs(state: ServerState, body: _Generation, prompts: Sequence[str | list[int]],
          max_tokens: int | None, logprobs: bool, top_logprobs: int,
          ) -> tuple[list[tuple[list[int], SamplingParams]],
                                                           list[list[int]]]:
    """(prompt ids, SamplingParams) of each engine request (prompt i's choice j at i * n + j),
    and each prompt's ids. A request that cannot run is a 400 naming the field."""
    engine = state.engine
    seed = secrets.randbelow(MAX_SEED + 1) if body.seed is None else body.seed
    jobs, prompt_ids = [], []
    for prompt in prompts:
        try:
            ids = engine.check_request(prompt, SamplingParams(max_new_tokens=1))
            length = max_tokens if max_tokens is not None else engine.executor.max_len - len(ids)
            params = [SamplingParams(
                max_new_tokens=length, temperature=body.temperature, top_k=max(body.top_k, 0),
                top_p=body.top_p, repetition_penalty=body.repetition_penalty,
                presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                seed=(seed + j) % (MAX_SEED + 1),
                stop=body.stop_strings(), ignore_eos=body.ignore_eos, logprobs=logprobs,
                top_logprobs=top_logprobs,
            ) for j in range(body.n)]
            engine.check_request(ids, params[0])
        except ValueError as e:
            message = str(e)
            field = message.split("=", 1)[0].split(":", 1)[0].split("[", 1)[0]
            raise ApiError(400, message, param=_PARAM_NAMES.get(field, field)) from None
        prompt_ids.append(ids)
        jobs += [(ids, p) for p in params]
    return jobs, prompt_ids


@dataclasses.dataclass
class _Reply:
    """The envelope of one call's answer: whole, or as stream chunks."""

    prefix: str  # of the id: "cmpl", "chatcmpl"
    kind: str  # the object type of a whole answer
    chunk_kind: str  # and of a stream chunk
    model: str
    ident: str = dataclasses.field(default_factory=lambda: secrets.token_hex(12))
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def whole(self, choices: list[dict], usage: dict) -> dict:
        return {"id": f"{self.prefix}-{self.ident}", "object": self.kind, "created": self.created,
                "model": self.model, "choices": choices, "usage": usage}

    def chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        payload = {"id": f"{self.prefix}-{self.ident}", "object": self.chunk_kind,
                   "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            payload["usage"] = usage
        return _sse(payload)


def _usage(prompt_ids: Sequence[list[int]], n: int, completion_tokens: int) -> dict:
    prompt_tokens = n * sum(len(ids) for ids in prompt_ids)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _token_texts(engine, token_ids: Sequence[int]) -> list[str]:
    return [engine.tokenizer.decode([t]) if engine.tokenizer else str(t) for t in token_ids]


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


# -- the app ---------------------------------------------------------------------------------------


class _BodyLimit:
    """ASGI middleware: a request body past `limit` bytes is a 413, whether its length is
    announced (Content-Length) or streamed in chunks."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        announced = dict(scope["headers"]).get(b"content-length", b"0")
        if not announced.isdigit() or int(announced) > self.limit:
            return await self._refuse(send)
        received, started = 0, False

        async def counted_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise _TooLarge
            return message

        async def noted_send(message):
            nonlocal started
            started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, noted_send)
        except _TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send) -> None:
        body = json.dumps(ApiError(413, f"the request body is larger than {self.limit} bytes",
                                   code="request_too_large").body()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


class _Authenticate:
    """ASGI middleware: every /v1, /tokenize and /detokenize call needs `Authorization: Bearer
    KEY`, compared in constant time; 401 otherwise. (Plain ASGI, as `_BodyLimit`: Starlette's
    BaseHTTPMiddleware would relay every streamed chunk through a task of its own.)"""

    def __init__(self, app, api_key: str) -> None:
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(("/v1", "/tokenize", "/detokenize")):
            given = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
            if not hmac.compare_digest(given, self.expected):
                response = JSONResponse(ApiError(401, "missing or wrong API key (Authorization: "
                                                 "Bearer KEY)", kind="authentication_error",
                                                 code="invalid_api_key").body(), 401)
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="flover_jax", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        error = e.errors()[0]
        location = [str(part) for part in error.get("loc", ()) if part != "body"]
        if error.get("type") == "json_invalid":
            return JSONResponse(ApiError(400, "the body is not valid JSON").body(), 400)
        # A union's errors name the member tried (prompt.str): the field is the first part.
        param = location[0] if location else None
        value = f"={error['input']!r}" if "input" in error and error["type"] != "missing" else ""
        message = f"{param}{value}: {error.get('msg', 'invalid')}" if param else error.get("msg")
        return JSONResponse(ApiError(400, message[:1000], param=param).body(), 400)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> JSONResponse:
        return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), e.status_code)

    @app.exception_handler(Exception)
    async def internal(_: Request, e: Exception) -> JSONResponse:  # never a trace to a client
        _log.exception("server: a request failed")
        return JSONResponse(ApiError(500, "internal error", kind="server_error").body(), 500)

    @app.get("/health")
    async def health() -> Response:
        if state.loop is None:
            return JSONResponse({"status": "loading"}, 503)
        if state.draining or state.loop.failed:
            return JSONResponse({"status": "unavailable"}, 503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict:
        max_len = state.engine.executor.max_len if state.engine else None
        return {"object": "list", "data": [{
            "id": state.model_name, "object": "model", "created": state.created,
            "owned_by": "flover_jax", "max_model_len": max_len}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check(state, body)
        prompts = ([body.prompt] if isinstance(body.prompt, str)
                   or isinstance(body.prompt[0], int) else list(body.prompt))
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        jobs, prompt_ids = _jobs(state, body, prompts, max_tokens, body.logprobs is not None,
                                 body.logprobs or 0)
        calls = _Calls(state, jobs)
        reply = _Reply("cmpl", "text_completion", "text_completion", state.model_name)
        echoed = [state.engine.tokenizer.decode(ids) if state.engine.tokenizer and body.echo
                  else "" for ids in prompt_ids]  # a long prompt's text only where asked for

        def logprobs(item: RequestOutput | StreamDelta | None, start: int) -> dict | None:
            if item is None or item.logprobs is None:
                return None
            texts = _token_texts(state.engine, item.token_ids)
            offsets = [start + sum(len(t) for t in texts[:i]) for i in range(len(texts))]
            top = None if item.top_logprobs is None else [
                dict(zip(_token_texts(state.engine, [t for t, _ in step]), (v for _, v in step)))
                for step in item.top_logprobs]
            return {"tokens": texts, "token_logprobs": item.logprobs, "top_logprobs": top,
                    "text_offset": offsets}

        def choice(i: int, text: str, item, finish, start=0) -> dict:
            return {"index": i, "text": text, "logprobs": logprobs(item, start),
                    "finish_reason": finish}

        if not body.stream:
            finals = await calls.outputs(request)
            _raise_if_failed(finals)
            choices = []
            for i, final in enumerate(finals):
                out = final.output
                prefix = echoed[i // body.n] if body.echo else ""
                choices.append(choice(i, prefix + (out.text or ""), out,
                                      _FINISH[out.finish_reason], len(prefix)))
            used = sum(len(f.output.token_ids) for f in finals)
            return reply.whole(choices, _usage(prompt_ids, body.n, used))

        async def events() -> AsyncIterator[str]:
            used, written = 0, [0] * len(jobs)
            if body.echo:
                for i in range(len(jobs)):
                    yield reply.chunk([choice(i, echoed[i // body.n], None, None)])
                    written[i] = len(echoed[i // body.n])
            async for i, delta in _deltas(calls):
                used += len(delta.token_ids)
                yield reply.chunk([choice(i, delta.text, delta, _FINISH.get(delta.finish_reason),
                                          written[i])])
                written[i] += len(delta.text)
            if body.stream_options and body.stream_options.include_usage:
                yield reply.chunk([], _usage(prompt_ids, body.n, used))
            yield _sse("[DONE]")

        return StreamingResponse(_stream(events()), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        _check(state, body)
        if state.engine.tokenizer is None or not state.engine.tokenizer.chat_template:
            raise ApiError(400, "this model has no chat template; use /v1/completions",
                           param="messages")
        try:
            ids = state.engine.tokenizer.encode_chat(_messages(body.messages))
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from None
        max_tokens = body.max_completion_tokens or body.max_tokens
        jobs, prompt_ids = _jobs(state, body, [ids], max_tokens, body.logprobs,
                                 body.top_logprobs or 0)
        calls = _Calls(state, jobs)
        reply = _Reply("chatcmpl", "chat.completion", "chat.completion.chunk", state.model_name)

        def entry(token: int, value: float) -> dict:
            text = _token_texts(state.engine, [token])[0]
            return {"token": text, "logprob": value, "bytes": list(text.encode())}

        def logprobs(item: RequestOutput | StreamDelta) -> dict | None:
            if item.logprobs is None:
                return None
            tops = item.top_logprobs or [[]] * len(item.token_ids)
            return {"content": [entry(t, v) | {"top_logprobs": [entry(*alt) for alt in top]}
                                for t, v, top in zip(item.token_ids, item.logprobs, tops)]}

        if not body.stream:
            finals = await calls.outputs(request)
            _raise_if_failed(finals)
            choices = [{"index": i, "message": {"role": "assistant", "content": f.output.text},
                        "logprobs": logprobs(f.output),
                        "finish_reason": _FINISH[f.output.finish_reason]}
                       for i, f in enumerate(finals)]
            used = sum(len(f.output.token_ids) for f in finals)
            return reply.whole(choices, _usage(prompt_ids, body.n, used))

        async def events() -> AsyncIterator[str]:
            used = 0
            for i in range(len(jobs)):
                yield reply.chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None, "finish_reason": None}])
            async for i, delta in _deltas(calls):
                used += len(delta.token_ids)
                content = {"content": delta.text} if delta.text else {}
                yield reply.chunk([{"index": i, "delta": content,
                                    "logprobs": logprobs(delta),
                                    "finish_reason": _FINISH.get(delta.finish_reason)}])
            if body.stream_options and body.stream_options.include_usage:
                yield reply.chunk([], _usage(prompt_ids, body.n, used))
            yield _sse("[DONE]")

        return StreamingResponse(_stream(events()), media_type="text/event-stream")

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        if state.engine is None or state.engine.tokenizer is None:
            raise ApiError(400 if state.engine else 503, "no tokenizer")
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give one of prompt or messages", param="prompt")
        tokenizer = state.engine.tokenizer
        try:
            tokens = (tokenizer.encode(body.prompt) if body.prompt is not None else
                      tokenizer.encode_chat(_messages(body.messages), body.add_generation_prompt))
        except ValueError as e:
            raise ApiError(400, str(e), param="prompt" if body.prompt is not None else "messages") from None
        return {"tokens": tokens, "count": len(tokens), "max_model_len": state.engine.executor.max_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        if state.engine is None or state.engine.tokenizer is None:
            raise ApiError(400 if state.engine else 503, "no tokenizer")
        vocab = state.engine.cfg.vocab_size
        if bad := [t for t in body.tokens if not 0 <= t < vocab]:
            raise ApiError(400, f"tokens: {bad[0]} is not a token id; ids must be in [0, {vocab})",
                           param="tokens")
        return {"prompt": state.engine.tokenizer.decode(body.tokens)}

    if state.api_key is not None:
        app.add_middleware(_Authenticate, api_key=state.api_key)
    app.add_middleware(_BodyLimit, limit=state.max_body_bytes)  # added last: runs first
    return app


def _messages(messages) -> list[dict[str, Any]]:
    return [m.model_dump(exclude_none=True) for m in messages]


def _raise_if_failed(finals: Sequence[StreamDelta]) -> None:
    for final in finals:
        if final.finish_reason == "error":
            raise ApiError(500, final.error or "internal error", kind="server_error")


async def _deltas(calls: _Calls) -> AsyncIterator[tuple[int, StreamDelta]]:
    """Every choice's deltas until all have ended; a client that goes away (the response's
    task is cancelled) cancels the choices still running."""
    try:
        while calls.pending:
            yield await calls.next()
    finally:
        if calls.pending:
            calls.cancel()


async def _stream(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """A stream's events; an error once it has begun (a timeout) is its last event, in
    OpenAI's format, since the status line has gone out already."""
    try:
        async for event in events:
            yield event
    except ApiError as e:
        yield _sse(e.body())
