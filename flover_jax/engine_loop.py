"""EngineLoop: one thread owns an engine's loop; any thread submits and cancels.

An `Engine` is single-threaded: its scheduler and device state are driven by one caller at a
time. A server answers many clients at once, each on a thread or task of its own, so it hands
requests to one loop thread through an inbox and gets each request's tokens back through that
request's own callback:

    loop = EngineLoop(engine)                        # starts the thread
    handle = loop.submit(prompt, params, on_delta)   # on_delta(StreamDelta), on the loop thread
    loop.cancel(handle)                              # its slot is free within one iteration
    loop.close()                                     # cancels what still runs, joins the thread

The thread sleeps on a condition while nothing waits or runs (no polling), runs one iteration
at a time while anything does, and after each one hands every request's new tokens and text
to its callback. A request's last delta has `finish_reason` set and carries the whole output;
the loop then forgets the request. Every submitted request gets that last delta exactly once:
with its tokens, as cancelled, or with an error (an invalid request at once; every request
still in the loop if an iteration fails, after which the loop refuses new ones).

While the loop runs, nothing else may drive the engine (`generate`, `result`, `run`, `step`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from flover_jax.request import FinishReason, StreamDelta
from flover_jax.sampling_params import SamplingParams
from flover_jax.scheduler import Scheduler

_log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class Handle:
    """One submitted request, as its submitter holds it."""

    on_delta: Callable[[StreamDelta], None]
    request_id: int | None = None  # set by the loop thread once it has submitted the request


class EngineLoop:
    def __init__(self, engine, on_iteration: Callable[[Scheduler], None] | None = None) -> None:
        """on_iteration(scheduler) runs on the loop thread after each iteration (metrics)."""
        self.engine = engine
        self.failed: str | None = None  # why the loop stopped taking requests, if it did
        self._on_iteration = on_iteration
        self._wake = threading.Condition()
        self._inbox: list[tuple[str, Handle, Any]] = []
        self._live: dict[int, Handle] = {}  # loop thread only
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def submit(self, prompt: str | Sequence[int], params: SamplingParams,
               on_delta: Callable[[StreamDelta], None]) -> Handle:
        """Queue a request; `on_delta` hears its deltas on the loop thread (keep it short)."""
        handle = Handle(on_delta)
        self._post("submit", handle, (prompt, params))
        return handle

    def cancel(self, handle: Handle) -> None:
        """End the request as cancelled (a no-op once it has ended)."""
        self._post("cancel", handle, None)

    def close(self, timeout_s: float | None = None) -> None:
        """Cancel what still waits or runs, let every request end, and stop the thread."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout_s)

    def _post(self, kind: str, handle: Handle, args: Any) -> None:
        with self._wake:
            if self._closing or self.failed:
                raise RuntimeError(f"engine loop: not taking requests ({self.failed or 'closed'})")
            self._inbox.append((kind, handle, args))
            self._wake.notify()

    # -- the loop thread ------------------------------------------------------------------------

    def _run(self) -> None:
        scheduler = self.engine.scheduler
        scheduler.on_tokens = lambda: self._deliver(scheduler)
        while True:
            with self._wake:
                while not (self._inbox or self._live or self._closing):
                    self._wake.wait()
                commands, self._inbox = self._inbox, []
                closing = self._closing
            if closing and not commands and not self._live:
                return
            try:
                for kind, handle, args in commands:
                    if kind == "submit":
                        handle.request_id = scheduler.submit(*args)
                        self._live[handle.request_id] = handle
                    elif handle.request_id in self._live:
                        scheduler.cancel(handle.request_id)
                if closing:
                    for request_id in self._live:
                        scheduler.cancel(request_id)
                if scheduler.has_work():
                    scheduler.iteration()
                    if self._on_iteration:
                        self._on_iteration(scheduler)
                self._deliver(scheduler)
            except Exception as e:  # the device state can no longer be trusted
                _log.exception("engine loop: an iteration failed")
                self._fail(f"the engine failed ({type(e).__name__})")
                return

    def _deliver(self, scheduler: Scheduler) -> None:
        for request_id, handle in list(self._live.items()):
            delta = scheduler.request(request_id).take_delta()
            if delta is None:
                continue
            if delta.finish_reason is not None:
                delta.output = scheduler.pop_request(request_id).output()
                del self._live[request_id]
            self._call(handle, delta)

    def _fail(self, why: str) -> None:
        with self._wake:
            self.failed = why
            pending, self._inbox = self._inbox, []
        ended = [*self._live.values(), *(h for kind, h, _ in pending if kind == "submit")]
        self._live.clear()
        for handle in ended:
            self._call(handle, StreamDelta(handle.request_id if handle.request_id is not None else -1,
                                           [], "", FinishReason.ERROR.value, why))

    @staticmethod
    def _call(handle: Handle, delta: StreamDelta) -> None:
        try:
            handle.on_delta(delta)
        except Exception:  # one submitter's callback must not stop everyone's loop
            _log.exception("engine loop: a request's callback failed")
