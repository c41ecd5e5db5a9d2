"""Scheduler properties against FakeExecutor (pure numpy device, fake clock, no model).

The fake mirrors step.py's semantics and asserts the device's contract on every call (see
tests/fake_executor.py); these tests check what the scheduler promises on top: every request
ends exactly once, valid requests get exactly their solo tokens, cancels free slots within
one iteration, nothing leaks, each policy keeps its admission / window / compaction rules,
and the stats agree with what the device saw.
"""

from __future__ import annotations

import collections
import dataclasses
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flover_jax.buckets import Buckets, bucket, powers_of_two
from flover_jax.prefix_cache import PrefixCache
from flover_jax.sampling_params import SamplingParams
from flover_jax.scheduler import POLICIES, Scheduler
from tests.fake_executor import (
    DeviceContractError,
    FakeExecutor,
    expected_logprobs,
    expected_tokens,
    whole,
)


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# -- workloads -------------------------------------------------------------------------------

BAD_KINDS = {  # kind -> the text its error message must contain (the field it names)
    "empty_prompt": "prompt",
    "oov_token": "prompt_ids[",
    "negative_token": "prompt_ids[",
    "float_token": "prompt_ids[",
    "text_without_tokenizer": "prompt",
    "too_long": "max_new_tokens",
    "max_new_nonpositive": "max_new_tokens",
    "negative_temperature": "temperature",
    "bad_top_p": "top_p",
    "negative_top_k": "top_k",
}


@dataclasses.dataclass
class Spec:
    index: int
    submit_iter: int  # the iteration before which it is submitted
    arrival_offset: float | None  # arrival_s = now + offset (None: arrival_s not given)
    prompt: object
    params: SamplingParams
    bad: str | None  # a BAD_KINDS key, or None for a valid request


@dataclasses.dataclass
class Scenario:
    num_slots: int
    max_len: int
    vocab: int
    eos_ids: tuple[int, ...]
    buckets: Buckets
    prefix_rows: int
    budget: int
    specs: list[Spec]
    cancels: list[tuple[int, int]]  # (spec index, iteration before which cancel() is called)


@st.composite
def scenarios(draw, busy: bool = False) -> Scenario:
    """busy: many overlapping valid requests of mixed lengths in many slots, so that holes,
    joins and (under flover) compactions are frequent."""
    num_slots = draw(st.integers(4, 8) if busy else st.integers(1, 8))
    max_len = draw(st.integers(12, 40) if busy else st.integers(3, 40))
    vocab = draw(st.integers(30, 60) if busy else st.integers(6, 40))
    eos_ids = tuple(draw(st.sets(st.integers(0, vocab - 1), max_size=2)))
    max_prefill_batch = draw(st.integers(1, 4))
    # Chunked prefill in pieces of a few tokens (0: whole prompts), and a prefix cache of a
    # few rows when chunked: prompts below open with shared tokens, so hits and evictions come.
    chunk = draw(st.sampled_from([0, 0, 2, 3, 4]))
    prefix_rows = draw(st.integers(0, 3)) if chunk else 0
    budget = draw(st.sampled_from([1, max(chunk, 1), 2 * chunk + 1, 9]))  # tokens an iteration
    longest_piece = chunk or max_len
    if draw(st.booleans()):
        buckets = Buckets.for_engine(num_slots, max_len, max_prefill_batch, prefill_chunk=chunk)
    else:  # finer buckets so that kv_len / prompt bucketing matters at small max_len
        buckets = Buckets(
            # Every width, or powers of two (the engine's fine widths lie between the two), or
            # powers of two from 4 rows (as an accelerator's from 8: windows wider than needed).
            windows=draw(st.sampled_from([powers_of_two(1, num_slots), tuple(range(1, num_slots + 1)),
                                          powers_of_two(min(4, num_slots), num_slots)])),
            kv_lengths=powers_of_two(min(draw(st.sampled_from([2, 4, 8])), max_len), max_len),
            prompt_lengths=powers_of_two(min(2, longest_piece), longest_piece),
            max_prefill_batch=max_prefill_batch,
            prefill_chunk=chunk,
            prefill_rows=draw(st.sampled_from([0, 4 * max_prefill_batch])),  # short pieces: more
            kernel_attention=draw(st.booleans()),  # pieces at any position share a call
        )
    openings = [draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=8))
                for _ in range(2)]
    specs = []
    for index in range(draw(st.integers(4, 14) if busy else st.integers(1, 12))):
        # About 1 in 4 requests is bad (1 in 10 when busy).
        bad = draw(st.sampled_from([None] * (90 if busy else 30) + sorted(BAD_KINDS)))
        plen = draw(st.integers(1, min(14, max_len - 1)))
        prompt = draw(st.lists(st.integers(0, vocab - 1), min_size=plen, max_size=plen))
        if draw(st.booleans()):  # a shared opening, then its own tokens
            prompt = (draw(st.sampled_from(openings)) + prompt)[:plen]
        max_new = draw(st.integers(1, min(max_len - plen, 24)))
        fields = dict(
            max_new_tokens=max_new,
            seed=draw(st.integers(0, 3)),
            ignore_eos=draw(st.booleans()),
            stop_token_ids=tuple(draw(st.sets(st.integers(0, vocab - 1), max_size=2))),
            temperature=draw(st.sampled_from([0.0, 0.7, 1.0])),
            top_k=draw(st.sampled_from([0, 5])),
            top_p=draw(st.sampled_from([1.0, 0.9])),
            logprobs=draw(st.booleans()),
        )
        if bad == "empty_prompt":
            prompt = []
        elif bad == "oov_token":
            prompt[draw(st.integers(0, plen - 1))] = vocab + draw(st.integers(0, 3))
        elif bad == "negative_token":
            prompt[draw(st.integers(0, plen - 1))] = -1
        elif bad == "float_token":
            prompt[draw(st.integers(0, plen - 1))] = 1.5
        elif bad == "text_without_tokenizer":
            prompt = "hello"
        elif bad == "too_long":
            fields["max_new_tokens"] = max_len - plen + draw(st.integers(1, 3))
        elif bad == "max_new_nonpositive":
            fields["max_new_tokens"] = draw(st.integers(-3, 0))
        elif bad == "negative_temperature":
            fields["temperature"] = draw(st.sampled_from([-0.5, -1e-3, -math.inf]))
        elif bad == "bad_top_p":
            fields["top_p"] = draw(st.sampled_from([0.0, -0.5, 1.5, math.nan]))
        elif bad == "negative_top_k":
            fields["top_k"] = draw(st.integers(-5, -1))
        specs.append(Spec(
            index=index,
            submit_iter=draw(st.integers(0, 3 if busy else 6)),
            arrival_offset=draw(st.sampled_from([None, 0.0, -1.0, 0.5, 1.0, 2.5, 6.0])),
            prompt=prompt,
            params=SamplingParams(**fields),
            bad=bad,
        ))
    # Cancels at random iterations relative to the request's submission: before its arrival,
    # while queued, while running, after it finished (then a no-op).
    cancels = []
    for _ in range(draw(st.integers(0, 5))):
        index = draw(st.integers(0, len(specs) - 1))
        cancels.append((index, specs[index].submit_iter + draw(st.integers(-1, 14))))
    return Scenario(num_slots, max_len, vocab, eos_ids, buckets, prefix_rows, budget, specs,
                    cancels)


# -- checks ----------------------------------------------------------------------------------


def check_consistent(sched: Scheduler, ex: FakeExecutor) -> None:
    """Host table, scheduler maps and device slots agree; nothing double-booked or leaked."""
    table = sched.table
    owners = [table.owner(s) for s in range(table.capacity)]
    live = {o: s for s, o in enumerate(owners) if o is not None}
    assert len(live) == len(table) and table.num_free + len(table) == table.capacity
    for request_id, slot in live.items():
        assert table.slot_of(request_id) == slot
        assert not sched.request(request_id).finished
    assert set(sched._running) == set(live) == set(sched._positions)
    # The device frees exactly what the host frees (the prefix rows are never a request's).
    assert ex.occupied[: ex.num_slots].tolist() == table.owned()
    assert not ex.occupied[ex.num_slots:].any()
    assert not (ex.active & ~ex.occupied).any()


@dataclasses.dataclass
class Run:
    sched: Scheduler
    ex: FakeExecutor
    ids: dict[int, int]  # spec index -> request id
    outputs: dict[int, object]  # request id -> RequestOutput
    cancel_effective: dict[int, float]  # request id -> time of the iteration that cancelled it
    iterations: int
    prefill_iters: list[tuple[int, int]]  # (iteration, table size before it) with a prefill


def run_scenario(sc: Scenario, policy: str) -> Run:
    clock = FakeClock()
    ex = FakeExecutor(sc.num_slots, sc.max_len, sc.vocab, sc.eos_ids, sc.buckets,
                      prefix_rows=sc.prefix_rows)
    cache = PrefixCache(ex.prefix_rows, sc.buckets.prefill_chunk) if sc.prefix_rows else None
    sched = Scheduler(ex, policy, eos_ids=sc.eos_ids, clock=clock, prefix_cache=cache,
                      prefill_budget=sc.budget)
    by_iter = collections.defaultdict(list)
    for spec in sc.specs:
        by_iter[spec.submit_iter].append(spec)
    cancels_at = collections.defaultdict(list)
    for index, when in sc.cancels:
        cancels_at[when].append(index)
    last_event = max([s.submit_iter for s in sc.specs] + [w for _, w in sc.cancels])
    ids: dict[int, int] = {}
    outputs: dict[int, object] = {}
    cancel_effective: dict[int, float] = {}
    prefill_iters = []
    limit = last_event + 20 + sum(max(s.params.max_new_tokens, 0) + 8 for s in sc.specs)
    iterations = 0
    for it in range(limit):
        for spec in by_iter[it]:
            arrival = None if spec.arrival_offset is None else sched.now() + spec.arrival_offset
            ids[spec.index] = sched.submit(spec.prompt, spec.params, arrival_s=arrival)
        for index in cancels_at[it]:
            if index not in ids:
                continue  # not submitted yet
            request_id = ids[index]
            was_finished = request_id in outputs or sched.request(request_id).finished
            sched.cancel(request_id)
            if not was_finished:
                cancel_effective.setdefault(request_id, sched.now())
        if it > last_event and not sched.has_work():
            break
        ex.mark = it
        before_prefills, table_before = ex.calls["prefill"], len(sched.table)
        sched.iteration()
        iterations += 1
        if ex.calls["prefill"] > before_prefills:
            prefill_iters.append((it, table_before))
        check_consistent(sched, ex)
        # A cancel called before this iteration has freed the slot by its end.
        for request_id in cancel_effective:
            assert request_id not in sched._running
            assert request_id in outputs or sched.request(request_id).finished
        for out in sched.pop_finished():
            assert out.request_id not in outputs, f"request {out.request_id} finished twice"
            outputs[out.request_id] = out
        clock.t += 1.0
    else:
        pytest.fail(f"the scheduler did not finish within {limit} iterations")
    assert not sched.has_work()
    assert sched.pop_finished() == []
    return Run(sched, ex, ids, outputs, cancel_effective, iterations, prefill_iters)


def check_run(sc: Scenario, policy: str, run: Run) -> None:
    sched, ex, stats = run.sched, run.ex, run.sched.stats
    # Each submitted request ended exactly once.
    assert sorted(run.outputs) == sorted(run.ids.values())
    # Nothing leaked: the table is empty, the device has no live slot, and every request was
    # forgotten once its output was handed out (a long-lived server holds no history).
    assert len(sched.table) == 0 and not ex.occupied.any() and not ex.active.any()
    assert not sched._requests and not sched._prefilling and not sched._prefix_refs
    cache = sched.prefix_cache
    if cache is not None:  # no row leaked, every reference returned
        cache.check()
        assert cache.referenced == 0 and cache.capacity == sc.prefix_rows
    hits = [c for c in ex.copies if c[0] in ex.prefix_rows]
    assert stats.prefix_hits == len(hits)
    assert stats.prefix_hit_tokens == sum(length for _, _, length in hits)
    assert stats.prefixes_stored == len(ex.copies) - len(hits)

    admitted = 0
    for spec in sc.specs:
        request_id = run.ids[spec.index]
        out = run.outputs[request_id]
        assert out.finish_reason in {"stop", "length", "cancelled", "error"}
        if spec.bad:
            assert out.finish_reason == "error", (spec, out)
            assert out.error and BAD_KINDS[spec.bad] in out.error, (spec.bad, out.error)
            assert out.token_ids == [] and out.first_token_s is None
            assert out.finished_s >= out.arrival_s
            continue
        assert out.error is None and out.prompt_ids == spec.prompt
        expected, reason = expected_tokens(spec.prompt, spec.params, sc.eos_ids, sc.max_len,
                                           sc.vocab)
        if out.token_ids:
            admitted += 1
        if request_id in run.cancel_effective:
            assert out.finish_reason == "cancelled", (spec, out)
            assert out.finished_s == max(run.cancel_effective[request_id], out.arrival_s)
            assert out.token_ids == expected[: len(out.token_ids)]  # a prefix of its solo run
            assert len(out.token_ids) < len(expected)
        else:
            assert out.finish_reason == reason, (spec, out, expected)
            assert out.token_ids == expected, (spec, out, expected)
        assert out.logprobs == (expected_logprobs(spec.prompt, out.token_ids, spec.params.seed)
                                if spec.params.logprobs else None)
        assert len(out.token_times_s) == len(out.token_ids)
        assert out.token_times_s == sorted(out.token_times_s)
        if out.token_ids:
            assert out.first_token_s == out.token_times_s[0] >= out.arrival_s
            if out.finish_reason != "cancelled":
                assert out.finished_s == out.token_times_s[-1]

    # Stats agree with what the device saw.
    assert stats.iterations == run.iterations
    # A request joins with its prompt's first piece; it has tokens once its last piece is in.
    assert stats.admitted == sum(p.new for p in ex.prefills)
    assert admitted == sum(p.finals for p in ex.prefills) <= stats.admitted
    assert stats.prompt_pieces == sum(len(p.slots) for p in ex.prefills)
    assert stats.prefill_calls == ex.calls["prefill"]
    assert stats.decode_steps == ex.calls["decode"] == len(ex.decodes)
    assert stats.compactions == ex.calls["compact"] == len(ex.compactions)
    assert stats.moves == sum(len(c.moves) for c in ex.compactions)
    assert stats.computed_rows == sum(d.width for d in ex.decodes)
    assert stats.inflight_sum == sum(d.occupied for d in ex.decodes)
    assert stats.windows == collections.Counter(d.width for d in ex.decodes)
    # Joins: the requests admitted by an iteration whose first prefill found live slots.
    by_iteration = collections.defaultdict(list)
    for p in ex.prefills:
        by_iteration[p.mark].append(p)
    assert stats.joins == sum(
        sum(p.new for p in group) for group in by_iteration.values()
        if group[0].occupied_before > 0
    )
    assert 0 <= stats.mid_window_finishes <= stats.admitted
    # Every prefill result is read (once: the fake refuses a second read); a decode result may
    # go unread only when every row in it belongs to a request that has already finished.
    assert ex.calls["read_prefill"] == stats.prefill_calls
    assert ex.calls["read_decode"] <= stats.decode_steps

    # Policy rules.
    windows = sc.buckets.windows
    for d in ex.decodes:
        assert d.occupied >= 1 and d.width >= bucket(d.occupied, windows)
    if policy == "flover":
        for c in ex.compactions:
            assert c.contiguous_after  # compaction made the live slots contiguous
            lo, hi = c.span_before
            assert bucket(hi - lo, windows) > bucket(c.occupied, windows)  # and it paid off
        for d in ex.decodes:  # the window never computes more than the live count needs
            assert d.width == bucket(d.occupied, windows)
    else:
        assert stats.compactions == 0
    if policy == "fused":
        assert all((d.start, d.width) == (0, sc.num_slots) for d in ex.decodes)
    if policy in ("static", "sequential"):
        assert stats.joins == 0
        # Never admits while running: an iteration that admits found no slot occupied.
        assert all(group[0].occupied_before == 0 for group in by_iteration.values()
                   if any(p.new for p in group))
    if policy == "sequential":
        assert all(len(set(p.slots)) == 1 and (p.occupied_before == 0 or not p.new)
                   for p in ex.prefills)
        assert all(d.occupied <= 1 for d in ex.decodes)


@pytest.mark.parametrize("policy", sorted(POLICIES))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sc=scenarios())
def test_scheduler_properties(policy, sc):
    run = run_scenario(sc, policy)
    check_run(sc, policy, run)


@pytest.mark.parametrize("policy", sorted(POLICIES))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sc=scenarios(busy=True))
def test_scheduler_properties_busy(policy, sc):
    run = run_scenario(sc, policy)
    check_run(sc, policy, run)


# -- targeted deterministic tests --------------------------------------------------------------


def _drive(sched: Scheduler, clock: FakeClock, ex: FakeExecutor, max_iters: int = 500) -> dict:
    outputs = {}

    def collect():
        for out in sched.pop_finished():
            assert out.request_id not in outputs
            outputs[out.request_id] = out

    collect()  # what finished before (a stream drives the loop too)
    for _ in range(max_iters):
        if not sched.has_work():
            break
        sched.iteration()
        check_consistent(sched, ex)
        collect()
        clock.t += 1.0
    assert not sched.has_work()
    return outputs


def _solo(prompt, params, ex: FakeExecutor, eos_ids=()):
    return expected_tokens(prompt, params, eos_ids, ex.max_len, ex.vocab_size)


@pytest.mark.parametrize("cache_rows", [1, 0])
def test_a_turn_arriving_while_its_opening_goes_in_waits_to_reuse_it(cache_rows):
    """A conversation's next turn arrives while the turn before it is still being prefilled:
    it waits in the queue until that prompt's whole pieces are cached, then copies them and
    computes only the rest, instead of computing the shared opening a second time. A request
    that shares nothing with it goes ahead meanwhile. With no prefix cache nobody waits."""
    chunk, budget = 8, 16
    clock = FakeClock()
    buckets = Buckets.for_engine(4, 96, 8, prefill_chunk=chunk)
    ex = FakeExecutor(num_slots=4, max_len=96, vocab_size=50, buckets=buckets, prefix_rows=cache_rows)
    cache = PrefixCache(ex.prefix_rows, chunk) if cache_rows else None
    sched = Scheduler(ex, "flover", clock=clock, prefix_cache=cache, prefill_budget=budget)
    sp = SamplingParams(max_new_tokens=3, ignore_eos=True)
    turn = [(3 * i) % 47 + 1 for i in range(37)]  # 4 whole pieces, then 5 tokens
    next_turn = turn + [9, 8, 7, 6, 5, 4, 3, 2, 1, 2, 3]
    other = [2, 4, 6]
    ids = [sched.submit(prompt, sp) for prompt in (turn, next_turn, other)]
    sched.iteration()
    admitted = {i for i in ids if sched.request(i).admitted_s is not None}
    # The first iteration's 16 prompt tokens: a piece of each of the turns, or (the next one
    # waiting) a piece of the first and the other prompt. The other prompt, one piece, joins
    # beyond the budget either way: nothing is decoding yet.
    assert admitted == ({ids[0], ids[2]} if cache_rows else {ids[0], ids[1], ids[2]})
    outputs = _drive(sched, clock, ex)
    for request_id, prompt in zip(ids, (turn, next_turn, other)):
        assert outputs[request_id].token_ids == _solo(prompt, sp, ex)[0]
    if cache_rows:
        assert sched.stats.prefix_hits == 1 and sched.stats.prefix_hit_tokens == 32
        assert sched.stats.prompt_pieces == 5 + 2 + 1  # the next turn's pieces past 32 only
    else:
        assert sched.stats.prompt_pieces == 5 + 6 + 1


def test_an_idle_engine_takes_every_one_piece_prompt_beyond_the_budget():
    """The prefill budget bounds how long decoders wait. With none decoding, every waiting
    prompt that one piece completes goes in at once; a longer prompt's first piece still
    waits for room in the budget, and once requests decode the budget holds for newcomers."""
    clock = FakeClock()
    chunk, budget = 8, 16
    buckets = Buckets.for_engine(16, 64, 8, prefill_chunk=chunk)
    ex = FakeExecutor(num_slots=16, max_len=64, vocab_size=50, buckets=buckets)
    sched = Scheduler(ex, "flover", clock=clock, prefill_budget=budget)
    sp = SamplingParams(max_new_tokens=4, ignore_eos=True)
    prompts = {}

    def submit(prompt):
        request_id = sched.submit(prompt, sp)
        prompts[request_id] = prompt
        return request_id

    short = [submit([i + 1] * 6) for i in range(5)]  # 30 tokens, one piece each
    long = submit(list(range(1, 21)))  # three pieces
    sched.iteration()
    assert all(sched.request(i).admitted_s is not None for i in short)
    assert sched.request(long).admitted_s is None
    later = [submit([i + 7] * 6) for i in range(4)]
    sched.iteration()  # five decode; the long prompt's piece and one short one fill the 16
    assert sched.request(long).admitted_s is not None
    assert sum(sched.request(i).admitted_s is not None for i in later) == 1
    outputs = _drive(sched, clock, ex)
    assert set(outputs) == set(prompts)
    for request_id, prompt in prompts.items():
        assert outputs[request_id].token_ids == _solo(prompt, sp, ex)[0]


def test_short_pieces_go_more_to_a_prefill_call():
    """A call takes max_prefill_batch pieces of 64 tokens or more, and of shorter ones as many
    as fill the same rows, up to a piece per slot; a burst of 8-token prompts then goes in one
    call where it took several, and every request still gets its solo tokens."""
    buckets = Buckets.for_engine(64, 512, prefill_chunk=64)
    assert [buckets.prefill_batches(t)[-1] for t in buckets.prompt_lengths] == [64, 32, 16, 8]
    assert Buckets.for_engine(32, 512, 2, prefill_chunk=64).prefill_batches(8) == (1, 2, 4, 8, 16)
    assert Buckets.for_engine(20, 512, prefill_chunk=64).prefill_batches(8)[-1] == 20
    clock = FakeClock()
    ex = FakeExecutor(num_slots=32, max_len=64, vocab_size=50,
                      buckets=Buckets.for_engine(32, 64, 4, prefill_chunk=16))
    sched = Scheduler(ex, "flover", clock=clock)
    sp = SamplingParams(max_new_tokens=3, ignore_eos=True)
    prompts = {sched.submit([i % 40 + 1] * (5 + i % 4), sp): [i % 40 + 1] * (5 + i % 4)
               for i in range(24)}
    sched.iteration()
    assert ex.calls["prefill"] == 1  # 24 pieces padded to 8 tokens: 256 rows // 8 a call, not 4
    outputs = _drive(sched, clock, ex)
    for request_id, prompt in prompts.items():
        assert outputs[request_id].token_ids == _solo(prompt, sp, ex)[0]


def test_a_steps_tokens_are_heard_before_the_iteration_waits_for_its_prompt_pieces():
    """on_tokens (how the server's loop streams) hears the previous decode step's tokens
    before the iteration reads the prompt pieces it dispatched, which at long prompts take
    far longer than a step: a decoding request's token is not held back behind them."""
    clock = FakeClock()
    ex = FakeExecutor(num_slots=4, max_len=64, vocab_size=50)
    sched = Scheduler(ex, "flover", clock=clock)
    events = []
    read = ex.read

    def logged_read(handle):
        events.append(f"read {handle.kind}")
        return read(handle)

    ex.read = logged_read
    sp = SamplingParams(max_new_tokens=8, ignore_eos=True)
    decoding = sched.submit([1, 2, 3], sp)
    for _ in range(3):
        sched.iteration()
    sched.on_tokens = lambda: events.append(f"tokens {len(sched.request(decoding).token_ids)}")
    events.clear()
    sched.submit(list(range(1, 30)), sp)  # its prompt goes in while the other decodes
    sched.iteration()
    assert events == ["read decode", "tokens 4", "read prefill"]


def test_fine_windows_add_a_width_every_eighth_of_the_slots():
    assert Buckets.for_engine(32, 512).windows == (1, 2, 4, 8, 16, 32)
    assert Buckets.for_engine(32, 512, fine_windows=True).windows == (1, 2, 4, 8, 12, 16, 20, 24, 28, 32)
    assert Buckets.for_engine(64, 512, fine_windows=True).windows == (
        1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64)
    assert Buckets.for_engine(6, 512, fine_windows=True).windows == (1, 2, 4, 6)


def test_min_window_drops_the_narrower_widths():
    assert Buckets.for_engine(32, 512, min_window=8).windows == (8, 16, 32)
    assert Buckets.for_engine(6, 512, min_window=8).windows == (6,)
    assert Buckets.for_engine(32, 512, fine_windows=True, min_window=8).windows == (
        8, 12, 16, 20, 24, 28, 32)


def test_batch_invariant_buckets_leave_one_shape_to_share():
    fixed = Buckets.for_engine(32, 512, fine_windows=True, min_window=8, batch_invariant=True)
    assert (fixed.windows, fixed.kv_lengths) == ((32,), (512,))
    assert {fixed.prefill_batches(t) for t in fixed.prompt_lengths} == {(1,)}
    assert fixed.prompt_lengths == Buckets.for_engine(32, 512).prompt_lengths  # a request's own


def test_mid_window_finish_then_compaction_narrows_window():
    clock = FakeClock()
    ex = FakeExecutor(num_slots=8, max_len=32, vocab_size=50)
    sched = Scheduler(ex, "flover", clock=clock)
    long = SamplingParams(max_new_tokens=10, ignore_eos=True)
    short = SamplingParams(max_new_tokens=2, ignore_eos=True)
    params = [long, short, short, long, long]
    prompts = [[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 1, 1], [2, 2, 2]]
    ids = [sched.submit(p, sp) for p, sp in zip(prompts, params)]
    sched.iteration()
    assert [sched.table.slot_of(i) for i in ids] == [0, 1, 2, 3, 4]
    assert (ex.decodes[0].start, ex.decodes[0].width) == (0, 8)
    outputs = _drive(sched, clock, ex)
    stats = sched.stats
    assert stats.mid_window_finishes == 2  # slots 1 and 2 finish inside the span [0, 5)
    # owned [T, F, F, T, T]: the best 3-window is [2, 5); one move 0 -> 2 closes the holes.
    assert [c.moves for c in ex.compactions] == [[(0, 2)]]
    assert stats.compactions == 1 and stats.moves == 1
    widths = [(d.start, d.width) for d in ex.decodes]
    first_narrow = widths.index((2, 4))
    assert all(w == (0, 8) for w in widths[:first_narrow]) and widths[first_narrow:]
    for request_id, prompt, sp in zip(ids, prompts, params):
        assert outputs[request_id].token_ids == _solo(prompt, sp, ex)[0]
        assert outputs[request_id].finish_reason == "length"


def test_logprobs_follow_their_request_through_compaction():
    clock = FakeClock()
    ex = FakeExecutor(num_slots=8, max_len=32, vocab_size=50)
    sched = Scheduler(ex, "flover", clock=clock)
    asks = SamplingParams(max_new_tokens=10, ignore_eos=True, logprobs=True)
    short = SamplingParams(max_new_tokens=2, ignore_eos=True, logprobs=True)
    quiet = SamplingParams(max_new_tokens=10, ignore_eos=True, seed=3)
    params = [asks, short, short, quiet, asks]
    prompts = [[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 1, 1], [2, 2, 2]]
    ids = [sched.submit(p, sp) for p, sp in zip(prompts, params)]
    outputs = _drive(sched, clock, ex)
    assert [c.moves for c in ex.compactions] == [[(0, 2)]]  # the first request moved
    for request_id, prompt, sp in zip(ids, prompts, params):
        out = outputs[request_id]
        assert out.token_ids == _solo(prompt, sp, ex)[0]
        expected = expected_logprobs(prompt, out.token_ids, sp.seed) if sp.logprobs else None
        assert out.logprobs == expected


def test_compaction_copies_only_what_the_moved_slots_hold():
    clock = FakeClock()
    ex = FakeExecutor(num_slots=8, max_len=128, vocab_size=50)
    sched = Scheduler(ex, "flover", clock=clock)
    long = SamplingParams(max_new_tokens=10, ignore_eos=True)
    short = SamplingParams(max_new_tokens=2, ignore_eos=True)
    # Slot 0 (a 3-token prompt) moves to 2; slots 3 and 4 hold 70-token prompts and stay.
    prompts = [[1, 2, 3], [4, 5, 6], [7, 8, 9], [1] * 70, [2] * 70]
    ids = [sched.submit(p, sp) for p, sp in zip(prompts, [long, short, short, long, long])]
    outputs = _drive(sched, clock, ex)
    (log,) = ex.compactions
    assert log.moves == [(0, 2)]
    assert log.kv_len == bucket(3 + 3, ex.buckets.kv_lengths) < 128  # 3 prompt + 2 decoded + 1
    for request_id, prompt in zip(ids, prompts):
        sp = long if len(outputs[request_id].token_ids) == 10 else short
        assert outputs[request_id].token_ids == _solo(prompt, sp, ex)[0]


@pytest.mark.parametrize("policy", ["fused", "static"])
def test_no_compaction_without_flover(policy):
    clock = FakeClock()
    ex = FakeExecutor(num_slots=8, max_len=32, vocab_size=50)
    sched = Scheduler(ex, policy, clock=clock)
    for n, prompt in zip([10, 2, 2, 10, 10], [[1], [2], [3], [4], [5]]):
        sched.submit(prompt, SamplingParams(max_new_tokens=n, ignore_eos=True))
    _drive(sched, clock, ex)
    assert sched.stats.mid_window_finishes == 2
    assert sched.stats.compactions == 0 and ex.calls["compact"] == 0
    assert {d.width for d in ex.decodes} == {8}


def test_cancel_frees_slot_within_one_iteration():
    clock = FakeClock()
    ex = FakeExecutor(num_slots=4, max_len=32, vocab_size=50)
    sched = Scheduler(ex, "flover", clock=clock)
    sp = SamplingParams(max_new_tokens=12, ignore_eos=True)
    ids = [sched.submit([i + 1, i + 2], sp) for i in range(3)]
    for _ in range(3):
        sched.iteration()
        clock.t += 1
    victim = ids[1]
    slot = sched.table.slot_of(victim)
    assert ex.occupied[slot] and ex.active[slot]
    sched.cancel(victim)
    assert not sched.request(victim).finished  # only recorded until the next iteration
    sched.iteration()
    with pytest.raises(KeyError):
        sched.table.slot_of(victim)
    # Its slot was freed in the intake, then flover closed the hole by moving slot 2 into it.
    assert [c.moves for c in ex.compactions] == [[(2, 1)]]
    assert sched.table.owner(slot) == ids[2] and sched.table.owned() == [True, True, False, False]
    assert ex.occupied.tolist() == sched.table.owned()
    done = {o.request_id: o for o in sched.pop_finished()}
    assert list(done) == [victim] and done[victim].finish_reason == "cancelled"
    expected = _solo([2, 3], sp, ex)[0]
    got = done[victim].token_ids
    assert 1 <= len(got) < len(expected) and got == expected[: len(got)]
    sched.cancel(victim)  # cancelling a finished request is a no-op
    clock.t += 1
    outputs = _drive(sched, clock, ex)
    assert victim not in outputs  # not reported twice
    for i, request_id in enumerate(ids):
        if request_id != victim:
            assert outputs[request_id].token_ids == _solo([i + 1, i + 2], sp, ex)[0]


def test_cancel_queued_and_unknown():
    clock = FakeClock()
    ex = FakeExecutor(num_slots=1, max_len=16, vocab_size=50)
    sched = Scheduler(ex, "static", clock=clock)
    sp = SamplingParams(max_new_tokens=5, ignore_eos=True)
    first, queued = sched.submit([1], sp), sched.submit([2], sp)
    sched.iteration()  # `first` takes the only slot; `queued` waits in the queue
    sched.cancel(queued)
    clock.t += 1
    sched.iteration()
    out = {o.request_id: o for o in sched.pop_finished()}
    assert out[queued].finish_reason == "cancelled" and out[queued].token_ids == []
    assert sched.stats.admitted == 1
    with pytest.raises(KeyError):
        sched.cancel(99)
    outputs = _drive(sched, clock, ex)
    assert outputs[first].token_ids == _solo([1], sp, ex)[0]


def test_cancel_before_arrival_never_admits():
    clock = FakeClock()
    ex = FakeExecutor(num_slots=2, max_len=16, vocab_size=50)
    sched = Scheduler(ex, "flover", clock=clock)
    request_id = sched.submit([1, 2], SamplingParams(max_new_tokens=3), arrival_s=5.0)
    sched.iteration()
    sched.cancel(request_id)
    clock.t += 1
    sched.iteration()
    (out,) = sched.pop_finished()
    assert out.finish_reason == "cancelled" and out.token_ids == []
    assert not sched.has_work() and ex.calls["prefill"] == 0 and sched.stats.admitted == 0


def test_cancel_before_arrival_has_nonnegative_latency():
    clock = FakeClock()
    ex = FakeExecutor(num_slots=2, max_len=16, vocab_size=50)
    sched = Scheduler(ex, "flover", clock=clock)
    request_id = sched.submit([1, 2], SamplingParams(max_new_tokens=3), arrival_s=5.0)
    sched.cancel(request_id)
    sched.iteration()
    (out,) = sched.pop_finished()
    assert out.finished_s >= out.arrival_s and out.latency_s >= 0


def test_nan_arrival_is_rejected_or_ends():
    clock = FakeClock()
    ex = FakeExecutor(num_slots=2, max_len=16, vocab_size=50)
    sched = Scheduler(ex, "flover", clock=clock)
    try:
        request_id = sched.submit([1, 2], SamplingParams(max_new_tokens=3), arrival_s=math.nan)
    except ValueError:
        return
    for _ in range(10):
        sched.iteration()
        clock.t += 1
    assert sched.request(request_id).finished and not sched.has_work()


@pytest.mark.parametrize(
    "prompt, params, field",
    [
        ([], SamplingParams(), "prompt"),
        ("text", SamplingParams(), "prompt"),
        ([1, 50], SamplingParams(), "prompt_ids[1]"),
        ([1, -1], SamplingParams(), "prompt_ids[1]"),
        ([True], SamplingParams(), "prompt_ids[0]"),
        ([1.0], SamplingParams(), "prompt_ids[0]"),
        ([1] * 10, SamplingParams(max_new_tokens=7), "max_new_tokens=7: must be <= 6"),
        ([1] * 16, SamplingParams(max_new_tokens=1), "prompt: 16 tokens; must be shorter than"),
        ([1], SamplingParams(max_new_tokens=0), "max_new_tokens"),
        ([1], SamplingParams(max_new_tokens=-2), "max_new_tokens"),
        ([1], SamplingParams(temperature=-0.1), "temperature"),
        ([1], SamplingParams(top_p=0.0), "top_p"),
        ([1], SamplingParams(top_p=1.01), "top_p"),
        ([1], SamplingParams(top_k=-1), "top_k"),
        ([1], SamplingParams(seed=-1), "seed"),
        ([1], SamplingParams(stop_token_ids=(-3,)), "stop_token_ids"),
        ([1], SamplingParams(stop_token_ids=None), "stop_token_ids"),
        ([1], SamplingParams(stop_token_ids=([1],)), "stop_token_ids"),
        ([1], SamplingParams(top_k=2**31), "top_k"),  # would overflow the int32 device array
        ([1], SamplingParams(temperature=1e39), "temperature"),  # inf in float32
        ([1], SamplingParams(stop=("x",)), "stop"),  # stop strings need a tokenizer
        ([1], {"max_new_tokens": 3}, "params"),
        (5, SamplingParams(), "prompt"),
        (b"hi", SamplingParams(), "prompt"),
    ],
)
def test_bad_request_ends_with_error_naming_field(prompt, params, field):
    clock = FakeClock()
    ex = FakeExecutor(num_slots=2, max_len=16, vocab_size=50)
    sched = Scheduler(ex, "flover", clock=clock)
    future = sched.submit(prompt, params, arrival_s=3.0)
    now = sched.submit(prompt, params)
    outs = {o.request_id: o for o in sched.pop_finished()}  # ended at submit, no iteration
    for request_id in (future, now):
        out = outs[request_id]
        assert out.finish_reason == "error" and field in out.error and out.token_ids == []
        assert out.finished_s >= out.arrival_s
    assert outs[future].finished_s == 3.0
    sched.cancel(now)  # no-op on a finished request
    assert not sched.has_work() and sched.pop_finished() == []
    assert sum(ex.calls.values()) == 0


def test_numpy_arrival_times_are_accepted():
    clock = FakeClock()
    ex = FakeExecutor(num_slots=2, max_len=16, vocab_size=50)
    sched = Scheduler(ex, "flover", clock=clock)
    sp = SamplingParams(max_new_tokens=3)
    ids = [sched.submit([1, 2], sp, arrival_s=t) for t in (np.float32(0.5), np.int64(1))]
    outputs = _drive(sched, clock, ex)
    assert [outputs[i].finish_reason for i in ids] == ["length", "length"]
    assert [outputs[i].arrival_s for i in ids] == [0.5, 1.0]


class FailingPrefill(FakeExecutor):
    """Fails the prefill of any batch holding a prompt that starts with 13."""

    def prefill(self, pieces):
        if any(p.start == 0 and p.tokens[0] == 13 for p in pieces):
            raise RuntimeError("boom")
        return super().prefill(pieces)


def test_a_failed_prefill_ends_its_requests_and_spares_the_others():
    clock = FakeClock()
    ex = FailingPrefill(num_slots=4, max_len=16, vocab_size=50)
    sched = Scheduler(ex, "flover", clock=clock)
    sp = SamplingParams(max_new_tokens=4, ignore_eos=True)
    good = sched.submit([1, 2], sp)
    outputs = {}
    sched.iteration()
    outputs.update((o.request_id, o) for o in sched.pop_finished())
    bad = [sched.submit([13, i], sp) for i in range(2)]  # one prefill batch
    sched.iteration()
    later = sched.submit([3, 4], sp)  # takes a slot the failed ones left
    outputs.update(_drive(sched, clock, ex))
    for request_id in bad:
        assert outputs[request_id].finish_reason == "error"
        assert outputs[request_id].error == "prefill failed: RuntimeError: boom"
    for request_id, prompt in ((good, [1, 2]), (later, [3, 4])):
        assert outputs[request_id].token_ids == _solo(prompt, sp, ex)[0]
    assert len(sched.table) == 0 and not ex.occupied.any()


def test_a_failed_call_of_a_prompts_consecutive_pieces_ends_it_once():
    """A prompt's first pieces share a call that fails: the request ends once, with the error;
    its last piece (a shorter one, in a later call) is never sent; the slot is free again."""
    clock = FakeClock()
    buckets = Buckets.for_engine(4, 64, prefill_chunk=16)
    ex = FailingPrefill(num_slots=4, max_len=64, vocab_size=50, buckets=buckets)
    sched = Scheduler(ex, "flover", clock=clock, prefill_budget=64)
    sp = SamplingParams(max_new_tokens=4, ignore_eos=True)
    ends = []
    sched.on_event = lambda kind, request: ends.append(request.request_id) if kind == "finished" else None
    bad = sched.submit([13, *range(1, 40)], sp)  # pieces [0, 16), [16, 32) and [32, 40)
    sched.iteration()
    assert ends == [bad] and ex.calls["prefill"] == 0
    good = sched.submit([1, 2, 3, 4, 5, 6], sp)
    outputs = _drive(sched, clock, ex)
    assert outputs[good].token_ids == _solo([1, 2, 3, 4, 5, 6], sp, ex)[0]
    assert ends.count(bad) == 1 and len(sched.table) == 0 and not ex.occupied.any()


def test_cancel_from_a_finished_handler_applies_next_iteration():
    clock = FakeClock()
    ex = FakeExecutor(num_slots=4, max_len=32, vocab_size=50)
    sched = Scheduler(ex, "flover", clock=clock)
    sp = SamplingParams(max_new_tokens=20, ignore_eos=True)
    group = [sched.submit([1, i], sp) for i in range(3)]

    def cancel_the_group(kind, request):
        if kind == "finished":
            for request_id in group:
                sched.cancel(request_id)

    sched.iteration()
    sched.on_event = cancel_the_group
    sched.cancel(group[0])
    outputs = _drive(sched, clock, ex, max_iters=5)
    assert [outputs[i].finish_reason for i in group] == ["cancelled"] * 3
    assert len(sched.table) == 0


def test_exact_fit_and_stop_tokens():
    """prompt + max_new_tokens == max_len fits; a stop id the device ignores ends it on the host."""
    clock = FakeClock()
    ex = FakeExecutor(num_slots=3, max_len=8, vocab_size=50, eos_ids=(7,))
    sched = Scheduler(ex, "flover", eos_ids=(7,), clock=clock)
    fit = SamplingParams(max_new_tokens=5, ignore_eos=True)
    base = SamplingParams(max_new_tokens=6, ignore_eos=True)
    solo, _ = _solo([3, 4], base, ex)
    # Stop on the third token the request produces alone (host-side stop id).
    stopper = dataclasses.replace(base, stop_token_ids=(solo[2],))
    a = sched.submit([1, 2, 3], fit)
    b = sched.submit([3, 4], stopper)
    outputs = _drive(sched, clock, ex)
    assert outputs[a].token_ids == _solo([1, 2, 3], fit, ex, (7,))[0]
    assert len(outputs[a].token_ids) == 5 and outputs[a].finish_reason == "length"
    assert outputs[b].token_ids == solo[: solo.index(solo[2]) + 1]
    assert outputs[b].finish_reason == "stop"


def test_run_until_idle_with_fake_clock():
    clock = FakeClock(0.0)
    ex = FakeExecutor(num_slots=2, max_len=16, vocab_size=40, eos_ids=(3,))
    sleeps = []

    def sleep(seconds):
        sleeps.append(seconds)
        clock.t += seconds

    sched = Scheduler(ex, "flover", eos_ids=(3,), clock=clock, sleep=sleep)

    specs = [([1, 2], 0.0), ([5], 4.0), ([6, 7, 8], 4.0), ([9], 20.0)]
    sp = SamplingParams(max_new_tokens=6)
    ids = [sched.submit(p, sp, arrival_s=t) for p, t in specs]
    sched.run_until_idle()
    outs = {o.request_id: o for o in sched.pop_finished()}
    for request_id, (prompt, arrival) in zip(ids, specs):
        assert outs[request_id].token_ids == _solo(prompt, sp, ex, (3,))[0]
        assert outs[request_id].first_token_s >= arrival
    assert sleeps and all(s >= 0 for s in sleeps)
    assert len(sched.table) == 0 and not ex.occupied.any()


def test_stream_yields_every_token_once():
    clock = FakeClock()
    ex = FakeExecutor(num_slots=2, max_len=16, vocab_size=40)
    sched = Scheduler(ex, "flover", clock=clock)
    sp = SamplingParams(max_new_tokens=6, ignore_eos=True)
    other = sched.submit([4, 4], sp)
    request_id = sched.submit([1, 2], sp)
    deltas = list(sched.stream(request_id))
    assert sum((d.token_ids for d in deltas), []) == _solo([1, 2], sp, ex)[0]
    assert deltas[-1].finish_reason == "length"
    assert all(d.finish_reason is None for d in deltas[:-1])
    outputs = _drive(sched, clock, ex)
    assert outputs[other].token_ids == _solo([4, 4], sp, ex)[0]


# -- the fake's own teeth: it catches the contract violations the scheduler must avoid ---------


def test_fake_executor_enforces_device_contract():
    ex = FakeExecutor(num_slots=4, max_len=16, vocab_size=20,
                      buckets=Buckets(windows=(1, 2, 4), kv_lengths=(4, 8, 16),
                                      prompt_lengths=(4, 8, 16), max_prefill_batch=2))
    sp = SamplingParams(max_new_tokens=8, ignore_eos=True)
    handle = ex.prefill([whole(1, [1, 2, 3], sp), whole(2, [4], sp)])
    first = ex.read(handle).tokens
    assert first.tolist() == [expected_tokens(p, sp, (), 16, 20)[0][0] for p in ([1, 2, 3], [4])]
    with pytest.raises(DeviceContractError, match="active"):
        ex.prefill([whole(2, [1], sp)])  # onto a live slot
    with pytest.raises(DeviceContractError, match="width"):
        ex.decode(0, 3, 8)  # width not a bucket
    with pytest.raises(DeviceContractError, match="outside"):
        ex.decode(3, 2, 8)  # window past the end
    with pytest.raises(DeviceContractError, match="outside window"):
        ex.decode(2, 1, 8)  # slot 1 active outside the window
    ex.decode(0, 4, 4)  # positions 3 and 1 < 4: fine
    ex.decode(0, 4, 8)  # now 5 and 3 (positions 4 and 2 before this step)
    with pytest.raises(DeviceContractError, match="kv_len 4 <= position 5 of slot 1"):
        ex.decode(0, 4, 4)
    with pytest.raises(DeviceContractError, match="live"):
        ex.compact([(1, 2)], 8)  # onto a live slot
    with pytest.raises(DeviceContractError, match="not occupied"):
        ex.compact([(0, 3)], 8)  # from a free slot
    with pytest.raises(DeviceContractError, match="kv_len 4 < position 5"):
        ex.compact([(1, 0)], 4)  # would drop cache rows
    with pytest.raises(DeviceContractError, match="a target is also a source"):
        ex.compact([(1, 0), (2, 1)], 8)
    ex.compact([(2, 0)], 8)
    assert ex.occupied_slots() == [0, 1] and ex.active_slots() == [0, 1]
    with pytest.raises(DeviceContractError, match="double release"):
        ex.release([2])
    ex.release([0])
    assert ex.occupied_slots() == [1]


def test_fake_compaction_that_drops_cache_changes_tokens():
    """Sanity: the fake reads tokens back from its cache, so a too-short copy is visible."""
    sp = SamplingParams(max_new_tokens=12, ignore_eos=True)
    prompt = [1, 2, 3, 4, 5, 6]
    good = FakeExecutor(num_slots=2, max_len=16, vocab_size=97)
    bad = FakeExecutor(num_slots=2, max_len=16, vocab_size=97)
    for ex in (good, bad):
        ex.prefill([whole(1, prompt, sp)])
        ex.decode(0, 2, 16)
    good.compact([(1, 0)], 16)
    # A broken compaction that copies only 4 of the 7 cache positions in use.
    bad.cache[0, :4] = bad.cache[1, :4]
    for f in FakeExecutor._ROW_FIELDS:
        getattr(bad, f)[0] = getattr(bad, f)[1]
    bad.active[1] = bad.occupied[1] = False
    steps_good = [good.read(good.decode(0, 1, 16)).tokens[0] for _ in range(4)]
    steps_bad = [bad.read(bad.decode(0, 1, 16)).tokens[0] for _ in range(4)]
    assert steps_good == expected_tokens(prompt, sp, (), 16, 97)[0][2:6]
    assert steps_bad != steps_good


def test_a_cancel_of_a_request_returned_before_the_cancel_applies_is_dropped():
    clock = FakeClock()
    ex = FakeExecutor(num_slots=2, max_len=16, vocab_size=50)
    sched = Scheduler(ex, "flover", clock=clock)
    sp = SamplingParams(max_new_tokens=2, ignore_eos=True)
    first, second = sched.submit([1, 2], sp), sched.submit([3], sp)  # end in one iteration
    # When `first` ends, a handler cancels `second`, whose last token comes next in the loop.
    def cancel_second(kind, request):
        if kind == "finished" and request.request_id == first:
            sched.cancel(second)

    sched.on_event = cancel_second
    ended = []
    while len(ended) < 2:
        sched.iteration()
        ended += sched.pop_finished()  # both returned: the engine forgets them
    sched.iteration()  # the cancel would apply now, to a request that is gone
    assert [o.finish_reason for o in ended] == ["length", "length"] and not sched.has_work()
