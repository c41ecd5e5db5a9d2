"""Engine: the public API. A model, a DeviceExecutor and a Scheduler behind a few calls.

    engine = Engine.from_pretrained("smollm2-135m", max_slots=32, max_len=1024)
    out = engine.generate(["Hello", [1, 2, 3]], SamplingParams(max_new_tokens=32))
    out[0].token_ids, out[0].text, out[0].finish_reason

The engine is single-threaded: `generate`, `stream` and `run` drive the loop
on the caller's thread; `submit` and `cancel` only record intent.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import jax
from jax.sharding import Mesh

from flover_jax.distributed import BroadcastExecutor, follow
from flover_jax.executor import DeviceExecutor
from flover_jax.loader import DEFAULT_MODEL, load_model
from flover_jax.prefix_cache import PrefixCache
from flover_jax.request import Request, RequestOutput, StreamDelta
from flover_jax.sampling_params import SamplingParams
from flover_jax.scheduler import DEFAULT_PREFILL_BUDGET, POLICIES, RequestIds, Scheduler, Stats
from flover_jax.sharding import make_mesh
from flover_jax.tokenizer import Tokenizer
from models.config import ModelConfig
from models.transformer import Params

Prompt = str | Sequence[int]
DEFAULT_PREFILL_CHUNK = 64
DEFAULT_PREFIX_CACHE_ROWS = 4


@dataclasses.dataclass
class TimedRequest:
    """One request of a workload: what to generate and when it arrives (seconds from start)."""

    prompt: Prompt
    params: SamplingParams
    arrival_s: float = 0.0


@dataclasses.dataclass
class RunResult:
    outputs: list[RequestOutput]  # in workload order
    stats: Stats
    policy: str
    wall_s: float  # from the run's start to its last completion


class Engine:
    def __init__(
        self,
        cfg: ModelConfig,
        params: Params,
        tokenizer: Tokenizer | None = None,
        *,
        max_slots: int = 32,
        max_len: int = 1024,
        policy: str = "flover",
        max_prefill_batch: int | None = None,
        mesh: Mesh | None = None,
        attention: str = "auto",
        batch_invariant: bool = False,
        matmul: str = "auto",
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        prefix_cache_rows: int = DEFAULT_PREFIX_CACHE_ROWS,
        prefill_budget: int = DEFAULT_PREFILL_BUDGET,
    ) -> None:
        """prefill_chunk: prompts are prefilled in pieces of at most this many tokens, with
        boundaries at its multiples (0: whole prompts at once); it is also the granularity of
        the prefix cache. prefill_budget: prompt tokens an iteration prefills at most, between
        decode steps.
        prefix_cache_rows: rows of the decode state, each as big as a slot, that hold the
        prefixes of earlier prompts for later ones to reuse (0: no prefix cache; it needs
        prefill_chunk >= 1)."""
        if policy not in POLICIES:
            raise ValueError(f"policy={policy!r}: must be one of {sorted(POLICIES)}")
        self.cfg, self.tokenizer, self.policy = cfg, tokenizer, policy
        self.eos_ids = tokenizer.eos_token_ids if tokenizer else cfg.eos_token_ids
        self.prefill_budget = prefill_budget
        self.executor = DeviceExecutor(
            params, cfg, max_slots, max_len, self.eos_ids, max_prefill_batch, mesh, attention,
            batch_invariant, matmul, prefill_chunk, prefix_cache_rows,
        )
        # Kept across this engine's schedulers, as the rows it indexes are.
        self.prefix_cache = (PrefixCache(self.executor.prefix_rows, prefill_chunk)
                             if prefix_cache_rows else None)
        if jax.process_count() > 1 and jax.process_index() == 0:
            # Process 0 schedules for everyone; the others call `follow` (distributed.py).
            self.executor = BroadcastExecutor(self.executor)
        self._request_ids = RequestIds()  # unique across this engine's schedulers
        # Ended on a scheduler that `run` has since replaced, not yet returned.
        self._ended: dict[int, Request] = {}
        self.scheduler = self._new_scheduler(policy)

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path = DEFAULT_MODEL,
        *,
        dtype: str | None = None,
        quantize: str | None = None,
        tp: int = 1,
        **engine_options,
    ) -> Engine:
        """A preset name, Hugging Face directory, .gguf file or orbax checkpoint directory,
        served with tensor parallelism over `tp` devices (of every process); dtype and
        quantize as `load_model` takes them."""
        mesh = make_mesh(tp)
        cfg, params, tokenizer = load_model(source, dtype=dtype, mesh=mesh, quantize=quantize)
        return cls(cfg, params, tokenizer, mesh=mesh, **engine_options)

    def follow(self) -> None:
        """On a process other than 0 of a multi-process run: replay process 0's device calls
        until it calls `close`."""
        follow(self.executor)

    def close(self) -> None:
        """On process 0 of a multi-process run: release the followers (a no-op otherwise)."""
        if isinstance(self.executor, BroadcastExecutor):
            self.executor.close()

    def _new_scheduler(
        self,
        policy: str,
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], None] = time.sleep,
    ) -> Scheduler:
        return Scheduler(
            self.executor, policy, self.tokenizer, self.eos_ids, clock, sleep, self._request_ids,
            self.prefix_cache, self.prefill_budget,
        )

    # -- prompts ------------------------------------------------------------------------------

    def chat_prompt(self, user_message: str) -> list[int]:
        """The token ids of the model's chat template around one user message, ready for
        generation. Special tokens written in the message are text, not control tokens: a
        user cannot close their turn or open a system one."""
        if self.tokenizer is None:
            raise ValueError("chat: this model has no tokenizer")
        if not isinstance(user_message, str):
            raise ValueError(f"user_message={user_message!r}: must be a string")
        messages = [{"role": "user", "content": user_message}]
        return self.tokenizer.encode_chat(messages, add_generation_prompt=True)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prompt prefix (for a benchmark's cold start, say); call it with
        no request in flight."""
        if self.scheduler.has_work():
            raise RuntimeError("reset_prefix_cache: requests are in flight; finish them first")
        if self.prefix_cache is not None:
            self.prefix_cache.clear()

    # -- requests -----------------------------------------------------------------------------

    def submit(self, prompt: Prompt, params: SamplingParams | None = None) -> int:
        """Queue one request; returns its id. Invalid requests end at once with "error"."""
        return self.scheduler.submit(prompt, params)

    def check_request(self, prompt: Prompt, params: SamplingParams) -> list[int]:
        """The prompt's token ids, or ValueError naming what about the request cannot run here
        (`submit` would end it at once with that error): for callers that vet requests before
        they start them. Reads only the tokenizer and the engine's sizes: any thread may call it."""
        return self.scheduler.check_request(prompt, params)

    def cancel(self, request_id: int) -> None:
        self.scheduler.cancel(request_id)

    def stream(self, request_id: int) -> Iterator[StreamDelta]:
        """Drive the loop and yield the request's new tokens and text as they come. The last
        delta (finish_reason set) carries the whole output: a stream read to its end returns
        the request, as `result` does, and the engine keeps nothing of it."""
        ended = self._ended.get(request_id)
        deltas = self.scheduler.stream(request_id) if ended is None else [ended.take_delta()]
        for delta in deltas:
            if delta.finish_reason is not None:
                delta.output = self.poll(request_id)
            yield delta

    def poll(self, request_id: int) -> RequestOutput | None:
        """The output of a finished request, else None (also for an id unknown or already
        returned); never blocks, and never drives the loop: between polls, call `step`. Each
        output is returned once, by `poll`, `result` or the end of `stream`."""
        request = self._ended.pop(request_id, None) or self.scheduler.pop_request(request_id)
        return None if request is None else request.output()

    def step(self) -> None:
        """One iteration of the loop (admit, decode, read tokens) if any request waits or runs:
        for callers that `submit` and `poll` instead of blocking in `result`."""
        if self.scheduler.has_work():
            self.scheduler.iteration()

    def result(
        self, request_id: int, stop: threading.Event | None = None
    ) -> RequestOutput | None:
        """The output of a request, driving the loop until it finishes (returned once), or
        None once `stop` is set (checked between iterations; a signal handler may set it)."""
        while (output := self.poll(request_id)) is None:
            if not self.scheduler.knows(request_id):  # (poll has taken it from _ended)
                raise KeyError(f"request_id={request_id}: unknown or already returned")
            if stop is not None and stop.is_set():
                return None
            self.scheduler.iteration()
        return output

    def generate(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or ids), each with its own or a shared SamplingParams."""
        if isinstance(prompts, (str, bytes)):
            raise ValueError(f"prompts={prompts!r}: expected a list of prompts (text or token ids); "
                             "wrap a single prompt in a list")
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if not isinstance(params, (list, tuple)) or not all(
            isinstance(p, SamplingParams) for p in params
        ):
            raise ValueError(f"params={params!r}: must be a SamplingParams, or a list of one per "
                             "prompt (a dict of settings: SamplingParams(**settings))")
        if len(params) != len(prompts):
            raise ValueError(f"params: {len(params)} given for {len(prompts)} prompts")
        ids = [self.submit(p, sp) for p, sp in zip(prompts, params)]
        return [self.result(i) for i in ids]

    def run(
        self,
        workload: Sequence[TimedRequest],
        policy: str | None = None,
        on_event: Callable[[str, Request], None] | None = None,
        on_iteration: Callable[[Scheduler], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], None] = time.sleep,
        stop: threading.Event | None = None,
    ) -> RunResult:
        """Replay arrival-timed requests through a fresh scheduler (clock starts now).

        on_event(kind, request) hears "added" / "finished"; on_iteration(scheduler)
        runs after each iteration (the live view uses both). Tests pass a fake
        clock and sleep to make arrivals deterministic. Once `stop` is set, the requests
        not yet finished are cancelled and the run returns.
        """
        if self.scheduler.has_work():
            raise RuntimeError("run: the engine still has submitted requests; finish them first")
        self._keep_ended()
        scheduler = self.scheduler = self._new_scheduler(policy or self.policy, clock, sleep)
        scheduler.on_event = on_event
        try:
            ids = [scheduler.submit(r.prompt, r.params, r.arrival_s) for r in workload]
            start = time.perf_counter()
            scheduler.run_until_idle(on_iteration, stop)
            wall = time.perf_counter() - start
            outputs = [scheduler.pop_request(i).output() for i in ids]
        finally:  # later calls get the engine's own policy, clock and no callbacks
            if not scheduler.has_work():
                self._keep_ended()
                self.scheduler = self._new_scheduler(self.policy)
        return RunResult(outputs, scheduler.stats, scheduler.policy.name, wall)

    def _keep_ended(self) -> None:
        """Before the scheduler is replaced: its ended, unreturned requests stay returnable."""
        for request_id in self.scheduler.finished_ids():
            self._ended[request_id] = self.scheduler.pop_request(request_id)
