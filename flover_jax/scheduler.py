"""The host loop: queue -> admit -> decode -> read one step late -> evict -> compact.

Single-threaded and model-agnostic: it drives an `Executor` (the device verbs
bound to a model and a DecodeState, or a fake in tests) and never imports a
model. One call to `iteration()` is one Flover iteration:

1. intake: requests whose arrival time has come join the queue; cancels apply.
2. prefill: pieces of the prompts already in slots, then queued requests join free
   slots with their first pieces (any number may join), up to the iteration's token
   budget (`prefill_budget`; pieces: chunks.py), several pieces per call; a prompt's cached
   opening is copied into its slot instead of computed, and a prompt's own opening
   stored for later ones (prefix_cache.py). A prompt's last piece samples its first token.
3. compact: when holes left by finished requests make the decode window wider
   than the live count needs, Flover's plan moves the fewest slots.
4. dispatch one decode step over the window of live slots.
5. read the previous step's tokens (and this iteration's first tokens) while the
   step just dispatched runs: the device never waits for the host.
6. stop checks; finished requests free their slots for the next iteration.

The same loop runs four policies that differ only in when requests may join,
which slots are computed and whether slots are compacted.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import math
import numbers
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from flover_jax.buckets import Buckets, bucket
from flover_jax.chunks import PromptPiece, cacheable_len, piece_end, shared_len
from flover_jax.prefix_cache import CachedPrefix, PrefixCache
from flover_jax.request import FinishReason, Request, RequestOutput, StreamDelta
from flover_jax.sampling import Sampled
from flover_jax.sampling_params import SamplingParams
from flover_jax.slots import SlotTable, plan_compaction
from flover_jax.tokenizer import Tokenizer, check_unicode


class Executor(Protocol):
    """The device side as the scheduler sees it. Calls dispatch work and return at once;
    `read` blocks until a dispatched result is ready."""

    num_slots: int
    prefix_rows: range  # rows of the decode state past the slots, for the prefix cache
    max_len: int
    vocab_size: int
    buckets: Buckets

    def prefill(self, pieces: Sequence[PromptPiece]) -> Any: ...  # -> handle of a Sampled [b]

    def copy_prefix(self, copies: Sequence[tuple[int, int, list[int]]]) -> None: ...  # src, dst, tokens

    def decode(self, start: int, width: int, kv_len: int) -> Any: ...  # -> of a Sampled [width]

    def compact(self, moves: Sequence[tuple[int, int]], kv_len: int) -> None: ...

    def release(self, slots: Sequence[int]) -> None: ...

    def read(self, handle: Any) -> Sampled: ...  # numpy arrays


@dataclasses.dataclass(frozen=True)
class Policy:
    name: str
    admit_while_running: bool  # False: a batch runs until all its members finish
    compact: bool  # Flover's memory shuffle
    full_window: bool  # compute every slot, live or not (JetStream-style)
    max_batch: int | None = None  # requests in flight at once (None: all slots)


POLICIES = {
    "flover": Policy("flover", admit_while_running=True, compact=True, full_window=False),
    "fused": Policy("fused", admit_while_running=True, compact=False, full_window=True),
    "static": Policy("static", admit_while_running=False, compact=False, full_window=False),
    "sequential": Policy(
        "sequential", admit_while_running=False, compact=False, full_window=False, max_batch=1
    ),
}


@dataclasses.dataclass
class Stats:
    """Counters of one run (the fused-equals-solo tests assert that each event happened)."""

    iterations: int = 0
    decode_steps: int = 0
    prefill_calls: int = 0
    prompt_pieces: int = 0
    admitted: int = 0
    joins: int = 0  # requests admitted while others were decoding
    mid_window_finishes: int = 0  # finishes strictly inside the live span (leave a hole)
    compactions: int = 0
    moves: int = 0
    inflight_sum: int = 0  # sum over decode steps of live requests (mean = / decode_steps)
    computed_rows: int = 0  # sum over decode steps of the window width
    windows: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    prefix_lookup_tokens: int = 0  # prompt tokens of the prompts the prefix cache looked up
    prefix_hit_tokens: int = 0  # of those, copied from the cache instead of computed
    prefix_hits: int = 0
    prefixes_stored: int = 0

    @property
    def mean_inflight(self) -> float:
        return self.inflight_sum / self.decode_steps if self.decode_steps else 0.0

    @property
    def prefix_hit_rate(self) -> float:
        """Share of the looked-up prompt tokens that came from the prefix cache."""
        return self.prefix_hit_tokens / self.prefix_lookup_tokens if self.prefix_lookup_tokens else 0.0


@dataclasses.dataclass
class _DecodeInFlight:
    handle: Any
    rows: list[Request | None]  # the owner of each window row when the step was dispatched


# Prompt tokens one iteration prefills at most (when prompts go in pieces): a few pieces, so
# that a burst of short prompts joins at once while a long one never stalls the decoders long.
DEFAULT_PREFILL_BUDGET = 256

# Arrivals further ahead than this are refused: a trace of Unix timestamps, or a rate of one
# request a year, would otherwise wait silently until killed.
MAX_WAIT_S = 24 * 3600.0


def _valid(params: SamplingParams) -> bool:
    try:
        params.validate()
    except ValueError:
        return False
    return True


class RequestIds:
    """Request ids, unique across the schedulers that share one (an engine's)."""

    def __init__(self) -> None:
        self.newest = -1  # ids up to this one were issued

    def next(self) -> int:
        self.newest += 1
        return self.newest


class Scheduler:
    def __init__(
        self,
        executor: Executor,
        policy: str | Policy = "flover",
        tokenizer: Tokenizer | None = None,
        eos_ids: Sequence[int] = (),
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], None] = time.sleep,
        request_ids: RequestIds | None = None,
        prefix_cache: PrefixCache | None = None,
        prefill_budget: int = DEFAULT_PREFILL_BUDGET,
    ) -> None:
        """prefix_cache: the index of the executor's prefix rows (kept across the schedulers
        of one engine); None: no prefix caching. prefill_budget: prompt tokens one iteration
        prefills at most, in pieces (the executor's prefill_chunk) between decode steps."""
        if isinstance(prefill_budget, bool) or not isinstance(prefill_budget, int) or prefill_budget < 1:
            raise ValueError(f"prefill_budget={prefill_budget!r}: must be an int >= 1")
        self.executor = executor
        self.prefix_cache = prefix_cache
        self.prefill_budget = prefill_budget
        self.policy = POLICIES[policy] if isinstance(policy, str) else policy
        self.tokenizer = tokenizer
        self.eos_ids = tuple(eos_ids)
        self._clock, self._sleep = clock, sleep
        self._t0 = clock()
        self.table = SlotTable(executor.num_slots)
        self.stats = Stats()
        self._ids = request_ids if request_ids is not None else RequestIds()
        self._arrivals: list[tuple[float, int, Request]] = []  # heap by arrival time
        self._queue: collections.deque[Request] = collections.deque()
        self._running: dict[int, Request] = {}  # request_id -> request (owns a slot)
        self._positions: dict[int, int] = {}  # request_id -> next cache position (upper bound)
        # request_id -> where its prompt's next piece starts, while the prompt is not all in
        # (in admission order: pieces are scheduled first come, first served)
        self._prefilling: dict[int, int] = {}
        self._prefix_refs: dict[int, CachedPrefix] = {}  # request_id -> the prefix it reused
        self._cancels: set[int] = set()
        self._requests: dict[int, Request] = {}  # until the request is handed out, finished
        self._finished: dict[int, Request] = {}  # finished, not yet handed out (in order)
        self._in_flight: _DecodeInFlight | None = None
        # "added" when admitted, "finished" once for every request (one refused at submit too).
        self.on_event: Callable[[str, Request], None] | None = None
        # Heard on the host thread once a decode step's tokens are in their requests, before
        # the iteration waits for its prompt pieces (hundreds of ms at long prompts): a front
        # end streams those tokens then rather than after the pieces.
        self.on_tokens: Callable[[], None] | None = None

    # -- time ---------------------------------------------------------------------------------

    def now(self) -> float:
        """Seconds since the scheduler started (arrival times use the same clock)."""
        return self._clock() - self._t0

    # -- requests in ------------------------------------------------------------------------

    def submit(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        arrival_s: float | None = None,
    ) -> int:
        """Queue a request; returns its id. An invalid request ends at once with "error"."""
        request_id = self._ids.next()
        now = self.now()
        arrival = now if arrival_s is None else arrival_s
        valid_arrival = (isinstance(arrival, numbers.Real) and not isinstance(arrival, bool)
                         and math.isfinite(arrival))
        params = SamplingParams() if params is None else params
        # The request is built before it is checked, so that an invalid one still ends as a
        # request (with its error); a valid stand-in for bad params lets it be built.
        usable = isinstance(params, SamplingParams) and _valid(params)
        request = Request(request_id, [], params if usable else SamplingParams(),
                          float(arrival) if valid_arrival else now, self.tokenizer, self.eos_ids)
        self._requests[request_id] = request
        try:
            if not valid_arrival or not arrival - now <= MAX_WAIT_S:
                raise ValueError(f"arrival_s={arrival!r}: must be a finite number of seconds, at "
                                 f"most {MAX_WAIT_S:.0f} s ahead of now ({now:.3f} s)")
            request.prompt_ids = self.check_request(prompt, params)
        except (ValueError, TypeError) as e:
            request.finish(FinishReason.ERROR, max(request.arrival_s, now), error=str(e))
            self._finished[request.request_id] = request
            if self.on_event:
                self.on_event("finished", request)
            return request_id
        heapq.heappush(self._arrivals, (arrival, request_id, request))
        return request_id

    def check_request(self, prompt: str | Sequence[int], params: SamplingParams) -> list[int]:
        """The prompt's token ids, or ValueError naming what about the request cannot run."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params={params!r}: must be a SamplingParams")
        params.validate()
        ids = self._prompt_ids(prompt)
        vocab = self.executor.vocab_size
        if bad := [t for t in params.stop_token_ids if t >= vocab]:
            raise ValueError(f"stop_token_ids={params.stop_token_ids!r}: {bad[0]} is not a token "
                             f"id; ids must be in [0, {vocab})")
        if params.stop and self.tokenizer is None:
            raise ValueError(f"stop={params.stop!r}: stop strings need a tokenizer; this model "
                             "has none (use stop_token_ids)")
        prompt_len, max_len = len(ids), self.executor.max_len
        if prompt_len >= max_len:
            raise ValueError(f"prompt: {prompt_len} tokens; must be shorter than max_len={max_len}")
        if prompt_len + params.max_new_tokens > max_len:
            raise ValueError(
                f"max_new_tokens={params.max_new_tokens}: must be <= {max_len - prompt_len} "
                f"(max_len={max_len} minus the prompt's {prompt_len} tokens)"
            )
        return ids

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: text given but this model has no tokenizer; pass token "
                                 "ids (prompt_ids in a prompts file)")
            check_unicode("prompt", prompt)
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (Sequence, np.ndarray)) and not isinstance(prompt, (bytes, bytearray)):
            ids = list(prompt)
        else:
            raise ValueError(f"prompt={prompt!r}: must be text or a list of token ids")
        if not ids:
            raise ValueError("prompt: empty; at least one token is required")
        vocab = self.executor.vocab_size
        for i, token in enumerate(ids):
            if isinstance(token, bool) or not isinstance(token, (int, np.integer)):
                raise ValueError(f"prompt_ids[{i}]={token!r}: must be an int token id")
            if not 0 <= token < vocab:
                raise ValueError(f"prompt_ids[{i}]={token}: must be in [0, {vocab})")
        return [int(t) for t in ids]

    def cancel(self, request_id: int) -> None:
        """Cancel a request; its slot is free by the end of the next iteration. A request
        that has already ended is left as it ended."""
        if isinstance(request_id, bool) or not isinstance(request_id, (int, np.integer)):
            raise ValueError(f"request_id={request_id!r}: must be an int, as submit returns")
        request = self._requests.get(request_id)
        if request is None and not 0 <= request_id <= self._ids.newest:
            raise KeyError(f"request_id={request_id}: no such request")
        if request is not None and not request.finished:
            self._cancels.add(request_id)

    # -- results out ------------------------------------------------------------------------

    def request(self, request_id: int) -> Request:
        return self._requests[request_id]

    def knows(self, request_id: int) -> bool:
        """Whether the request was submitted to this scheduler and not yet handed out."""
        return request_id in self._requests

    def finished_ids(self) -> list[int]:
        """Requests finished and not yet handed out, in the order they finished."""
        return list(self._finished)

    def pop_request(self, request_id: int) -> Request | None:
        """Hand out a finished request, which the scheduler then forgets (so a long-lived
        engine holds only requests not yet returned); None while it runs, or if unknown or
        handed out already."""
        request = self._finished.pop(request_id, None)
        if request is not None:
            del self._requests[request_id]
        return request

    def pop_finished(self) -> list[RequestOutput]:
        """Outputs of the requests finished since the last call (each exactly once)."""
        return [self.pop_request(i).output() for i in self.finished_ids()]

    def has_work(self) -> bool:
        return bool(self._arrivals or self._queue or self._running or self._in_flight)

    def next_arrival_s(self) -> float | None:
        return self._arrivals[0][0] if self._arrivals else None

    # -- the loop ---------------------------------------------------------------------------

    def iteration(self) -> None:
        """One Flover iteration (see the module docstring)."""
        self.stats.iterations += 1
        self._intake()
        first_tokens = self._prefill()
        self._compact()
        previous, self._in_flight = self._in_flight, self._dispatch_decode()
        released: list[int] = []
        if previous is not None:
            sampled = self.executor.read(previous.handle)
            now = self.now()
            for request, *row in zip(previous.rows, *sampled):
                if request is not None and not request.finished and row[0] >= 0:
                    self._add_token(request, Sampled(*row), now, released)
            if self.on_tokens:
                self.on_tokens()
        for handle, requests in first_tokens:
            sampled = self.executor.read(handle)
            now = self.now()
            for request, *row in zip(requests, *sampled):
                if request is not None:  # else a piece that did not end its prompt
                    self._add_token(request, Sampled(*row), now, released)
        if released:
            self.executor.release(released)
        if not self._running:
            self._in_flight = None  # its rows all belong to finished requests

    def run_until_idle(
        self,
        on_iteration: Callable[[Scheduler], None] | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        """Iterate until every submitted request has finished, waiting for future arrivals.
        Once `stop` is set, the requests still waiting or running are cancelled: they end
        (as "cancelled") within an iteration."""
        stopping = False
        while self.has_work():
            if stop is not None and stop.is_set() and not stopping:
                stopping = True
                for request_id, request in list(self._requests.items()):
                    if not request.finished:
                        self.cancel(request_id)
            self._wait_for_arrival()
            self.iteration()
            if on_iteration:
                on_iteration(self)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        """Requests that have arrived and wait for a slot."""
        return len(self._queue)

    def stream(self, request_id: int) -> Iterator[StreamDelta]:
        """Drive the loop and yield the request's new tokens and text as they come."""
        request = self._requests.get(request_id)
        if request is None:
            raise KeyError(f"request_id={request_id}: unknown or already returned")
        while True:
            delta = request.take_delta()
            if delta is not None:
                yield delta
                if delta.finish_reason is not None:
                    return
            elif request.finished:
                return
            else:
                self._wait_for_arrival()
                self.iteration()

    def _wait_for_arrival(self) -> None:
        """When nothing runs or waits, sleep until the next request arrives."""
        if self._arrivals and not (self._queue or self._running or self._in_flight or self._cancels):
            self._sleep(max(0.0, self.next_arrival_s() - self.now()))

    # -- steps of an iteration --------------------------------------------------------------

    def _intake(self) -> None:
        now = self.now()
        while self._arrivals and self._arrivals[0][0] <= now:
            self._queue.append(heapq.heappop(self._arrivals)[2])
        # A handler of the "finished" events below may cancel more: those apply next iteration.
        cancels, self._cancels = self._cancels, set()
        for request_id in cancels:
            request = self._requests.get(request_id)  # gone: it ended and was returned since
            if request is None or request.finished:
                continue
            if request_id in self._running:
                self.executor.release([self._free_slot(request)])
            elif request in self._queue:
                self._queue.remove(request)
            else:  # not arrived yet
                self._arrivals = [a for a in self._arrivals if a[2] is not request]
                heapq.heapify(self._arrivals)
            request.finish(FinishReason.CANCELLED, max(now, request.arrival_s))
            self._finished[request.request_id] = request
            if self.on_event:
                self.on_event("finished", request)

    def _prefill(self) -> list[tuple[Any, list[Request | None]]]:
        """Admit queued requests into free slots and dispatch this iteration's prompt pieces,
        up to `prefill_budget` tokens (with none decoding, pieces that complete their prompts
        go in beyond it): in passes of at most one piece per prompt, first the prompts already
        in slots, then (in the first pass) new ones, first come first served. A piece that
        does not fit leaves room for shorter ones behind it; a request joins only when its
        first piece is dispatched. The passes' pieces then go out together, several per call:
        a lone long prompt's pieces share a call as readily as different prompts' do.
        Returns (handle, the request whose prompt each row's piece ends, else None) per call."""
        chunk = self.executor.buckets.prefill_chunk
        budget = self.prefill_budget if chunk else math.inf
        others_running = bool(self._running)
        room = self.table.num_free if self.policy.admit_while_running or not others_running else 0
        if self.policy.max_batch is not None:
            room = min(room, self.policy.max_batch - len(self._running))
        hits: dict[int, list[tuple[int, int, list[int]]]] = collections.defaultdict(list)
        groups: dict[tuple[int, int], list] = collections.defaultdict(list)  # by shape
        used = 0

        def dispatch(request: Request, cached: tuple[CachedPrefix, int] | None = None) -> bool:
            nonlocal used
            begin = self._prefilling.get(request.request_id, cached[1] if cached else 0)
            prompt = request.prompt_ids
            end = piece_end(begin, len(prompt), chunk)
            # The budget bounds how long decoders wait for their next token. With none
            # decoding, a prompt that this piece completes goes in beyond it: it delays
            # nobody, and decodes from the next step with the others.
            beyond_budget_ok = end == len(prompt) and not others_running
            if used and used + end - begin > budget and not beyond_budget_ok:
                return False
            used += end - begin
            if request.request_id not in self._running:
                self._join(request, others_running)
                self._reuse_prefix(request, cached, hits)
            slot = self.table.slot_of(request.request_id)
            piece = PromptPiece(slot, prompt[begin:end], begin, end == len(prompt),
                                request.params)
            buckets = self.executor.buckets
            groups[bucket(end - begin, buckets.prompt_lengths),
                   buckets.prefill_kv_len(end)].append((piece, request))
            self._prefilling[request.request_id] = self._positions[request.request_id] = end
            return True

        first_pass = True
        while used < budget:
            used_before = used
            for request_id, position in list(self._prefilling.items()):
                request = self._running[request_id]
                if position < len(request.prompt_ids):  # else its last piece is out already
                    dispatch(request)
            for request in list(self._queue) if first_pass else ():
                if room <= 0 or (used >= budget and others_running):
                    break
                cached = self._cached_prefix(request)
                if self._awaits_prefix(request, cached):
                    continue
                if dispatch(request, cached):
                    self._queue.remove(request)
                    room -= 1
            if used == used_before:
                break
            first_pass = False
        return self._dispatch_pieces(hits, groups)

    def _dispatch_pieces(self, hits, groups) -> list[tuple[Any, list[Request | None]]]:
        """The iteration's device work, in order: cached openings into their slots, the pieces
        (several per call), then the openings their pieces completed into the prefix cache.
        A prompt's pieces must go in in order, and a call computes its pieces' K/V before any
        attends, so a slot's consecutive pieces may share a call. Only a prompt's last piece
        can be shorter than a chunk, and a later piece never ends in a smaller kv_len bucket:
        calls of the longest pieces first, then by kv_len, keep every prompt's order."""
        for copies in hits.values():
            self.executor.copy_prefix(copies)
        calls, stored = [], collections.defaultdict(list)
        for (piece_len, _), group in sorted(groups.items(), key=lambda g: (-g[0][0], g[0][1])):
            most = self.executor.buckets.prefill_batches(piece_len)[-1]
            for i in range(0, len(group), most):
                # A request whose earlier piece's call failed has ended: its later pieces go too.
                batch = [(p, r) for p, r in group[i : i + most] if not r.finished]
                if not batch:
                    continue
                try:
                    handle = self.executor.prefill([piece for piece, _ in batch])
                except Exception as e:  # a bad batch ends with the error; the others go on
                    firsts = {}  # each slot's first piece here (a slot may have several)
                    for piece, request in batch:
                        firsts.setdefault(piece.slot, (piece, request))
                    self._fail([r for _, r in firsts.values()],
                               f"prefill failed: {type(e).__name__}: {e}")
                    begun = [slot for slot, (piece, _) in firsts.items() if piece.start > 0]
                    if begun:  # earlier pieces or a copied prefix are in those slots
                        self.executor.release(begun)
                    continue
                self.stats.prefill_calls += 1
                self.stats.prompt_pieces += len(batch)
                for piece, request in batch:
                    self._store_prefix(request, piece, stored)
                    if piece.final:
                        self._end_prefill(request.request_id)
                calls.append((handle, [r if piece.final else None for piece, r in batch]))
        for copies in stored.values():
            self.executor.copy_prefix(copies)
        return calls

    def _join(self, request: Request, others_running: bool) -> None:
        """The request takes a slot, as its first piece (or cached prefix) goes in."""
        self.table.allocate(request.request_id)
        request.admitted_s = self.now()
        self._running[request.request_id] = request
        self._positions[request.request_id] = 0
        self.stats.admitted += 1
        self.stats.joins += others_running
        if self.on_event:
            self.on_event("added", request)

    def _cached_prefix(self, request: Request) -> tuple[CachedPrefix, int] | None:
        """The prefix cache's longest usable prefix of the request's prompt, if any."""
        usable = cacheable_len(len(request.prompt_ids), self.executor.buckets.prefill_chunk)
        if self.prefix_cache is None or not usable:
            return None
        return self.prefix_cache.lookup(request.prompt_ids, usable)

    def _awaits_prefix(self, request: Request, cached: tuple[CachedPrefix, int] | None) -> bool:
        """Whether a request being prefilled is computing a longer opening of this prompt than
        the cache holds (the next turn of a conversation arriving while this one's prompt is
        still going in): the request then waits in the queue for that opening to be cached,
        and computes only the rest, rather than compute the opening a second time."""
        if self.prefix_cache is None:
            return False
        chunk = self.executor.buckets.prefill_chunk
        prompt, have = request.prompt_ids, cached[1] if cached else 0
        usable = cacheable_len(len(prompt), chunk)
        for request_id in self._prefilling:
            other = self._running[request_id].prompt_ids
            limit = min(usable, cacheable_len(len(other), chunk))
            if limit > have and shared_len(prompt, other, chunk, limit) > have:
                return True
        return False

    def _reuse_prefix(self, request: Request, cached: tuple[CachedPrefix, int] | None,
                      hits: dict[int, list[tuple[int, int, list[int]]]]) -> None:
        """As a request joins: count its lookup and, on a hit, hold the entry and queue the
        copy of the cached prefix into the request's slot."""
        if self.prefix_cache is None or not cacheable_len(len(request.prompt_ids),
                                                          self.executor.buckets.prefill_chunk):
            return
        self.stats.prefix_lookup_tokens += len(request.prompt_ids)
        if cached is None:
            return
        entry, length = cached
        self.prefix_cache.ref(entry)
        self._prefix_refs[request.request_id] = entry
        slot = self.table.slot_of(request.request_id)
        hits[bucket(length, self.executor.buckets.kv_lengths)].append(
            (entry.row, slot, request.prompt_ids[:length]))
        self.stats.prefix_hits += 1
        self.stats.prefix_hit_tokens += length

    def _store_prefix(self, request: Request, piece: PromptPiece,
                      stored: dict[int, list[tuple[int, int, list[int]]]]) -> None:
        """After the piece that completes the prompt's cacheable prefix: queue its copy into a
        row of the prefix cache (unless cached already or every row is in use)."""
        prompt = request.prompt_ids
        length = cacheable_len(len(prompt), self.executor.buckets.prefill_chunk)
        if self.prefix_cache is None or not length or piece.end != length:
            return
        row = self.prefix_cache.store(prompt[:length])
        if row is not None:
            stored[bucket(length, self.executor.buckets.kv_lengths)].append(
                (piece.slot, row, prompt[:length]))
            self.stats.prefixes_stored += 1

    def _fail(self, requests: Sequence[Request], error: str) -> None:
        """End admitted requests whose prefill failed (not decoding on the device, so nothing
        to release there) with an error, and free their slots."""
        now = self.now()
        for request in requests:
            self._free_slot(request)
            request.finish(FinishReason.ERROR, now, error=error)
            self._finished[request.request_id] = request
            if self.on_event:
                self.on_event("finished", request)

    def _window(self, live: int) -> tuple[int, int]:
        """(start, width) of the decode window for the current slot table."""
        capacity = self.table.capacity
        if self.policy.full_window:
            return 0, capacity
        lo, hi = self.table.span()
        width = bucket(max(hi - lo, live), self.executor.buckets.windows)
        return min(lo, capacity - width), width

    def _kv_len(self, requests: Sequence[Request]) -> int:
        longest = max((self._positions[r.request_id] for r in requests), default=0)
        return bucket(min(longest + 1, self.executor.max_len), self.executor.buckets.kv_lengths)

    def _compact(self) -> None:
        live = len(self.table)
        if not self.policy.compact or not live or self.table.is_contiguous():
            return
        lo, hi = self.table.span()
        windows = self.executor.buckets.windows
        # Moving costs copies; do it only when it narrows the computed window.
        if bucket(hi - lo, windows) == bucket(live, windows):
            return
        moves = plan_compaction(self.table.owned())
        moved = [self._running[self.table.owner(src)] for src, _ in moves]
        self.executor.compact(moves, self._kv_len(moved))  # copy only what the moved slots hold
        self.table.apply_moves(moves)
        self.stats.compactions += 1
        self.stats.moves += len(moves)

    def _dispatch_decode(self) -> _DecodeInFlight | None:
        if not self._running:
            return None
        live = len(self.table)
        start, width = self._window(live)
        rows = [self._running.get(self.table.owner(s)) for s in range(start, start + width)]
        # A slot whose prompt is not all in holds its place in the window, undecoded.
        rows = [None if r is None or r.request_id in self._prefilling else r for r in rows]
        decoding = [r for r in rows if r is not None]
        if not decoding:
            return None
        handle = self.executor.decode(start, width, self._kv_len(decoding))
        for request in decoding:
            self._positions[request.request_id] += 1
        self.stats.decode_steps += 1
        self.stats.inflight_sum += live
        self.stats.computed_rows += width
        self.stats.windows[width] += 1
        return _DecodeInFlight(handle, rows)

    def _add_token(self, request: Request, sampled: Sampled, now: float,
                   released: list[int]) -> None:
        if request.add_token(sampled, now, self.executor.max_len):
            lo, hi = self.table.span()
            slot = self._free_slot(request)
            if lo < slot < hi - 1:
                self.stats.mid_window_finishes += 1
            released.append(slot)
            self._finished[request.request_id] = request
            if self.on_event:
                self.on_event("finished", request)

    def _free_slot(self, request: Request) -> int:
        del self._running[request.request_id]
        del self._positions[request.request_id]
        self._end_prefill(request.request_id)
        return self.table.release(request.request_id)

    def _end_prefill(self, request_id: int) -> None:
        """The request's prompt is all in its slot, or the request has ended."""
        self._prefilling.pop(request_id, None)
        if (entry := self._prefix_refs.pop(request_id, None)) is not None:
            self.prefix_cache.unref(entry)
