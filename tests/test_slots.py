"""SlotTable bookkeeping and Flover's minimal-move compaction plan (pure host code, no JAX)."""

from __future__ import annotations

import collections
import doctest
import functools
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)

from flover_jax import slots as slots_module
from flover_jax.slots import SlotTable, plan_compaction

MAX_N = 10


def _contiguous(owned) -> bool:
    idx = [i for i, o in enumerate(owned) if o]
    return not idx or idx[-1] - idx[0] + 1 == len(idx)


def _best_window(owned) -> tuple[int, int]:
    """Brute force over every window of width k: (leftmost best start, owned slots inside)."""
    n, k = len(owned), sum(owned)
    scores = [(sum(owned[s : s + k]), -s) for s in range(n - k + 1)]
    inside, neg_start = max(scores)
    return -neg_start, inside


@functools.cache
def _true_min_moves(n: int, k: int) -> dict[int, int]:
    """Fewest owned->free moves from each k-of-n pattern (bitmask) to ANY contiguous pattern.

    Multi-source BFS from the contiguous patterns; a move (owned src -> free dst) is its own
    reverse, so distances in the undirected move graph are the answer. Independent of the
    window argument plan_compaction relies on.
    """
    targets = [sum(1 << i for i in range(s, s + k)) for s in range(n - k + 1)] if k else [0]
    dist = {t: 0 for t in targets}
    queue = collections.deque(targets)
    while queue:
        mask = queue.popleft()
        for src in range(n):
            if not mask >> src & 1:
                continue
            for dst in range(n):
                if mask >> dst & 1:
                    continue
                nxt = mask & ~(1 << src) | (1 << dst)
                if nxt not in dist:
                    dist[nxt] = dist[mask] + 1
                    queue.append(nxt)
    return dist


def _patterns(n: int):
    return itertools.product((False, True), repeat=n)


@pytest.mark.parametrize("n", range(MAX_N + 1))
def test_plan_compaction_exhaustive(n):
    """Every owned-pattern of n slots: minimal, contiguous result, owned->free moves, the
    leftmost best window, sources outside / targets inside it, both taken left to right."""
    for owned in _patterns(n):
        owned = list(owned)
        k = sum(owned)
        moves = plan_compaction(owned)
        if k == 0:
            assert moves == []
            continue
        start, inside = _best_window(owned)
        window = range(start, start + k)
        mask = sum(1 << i for i, o in enumerate(owned) if o)
        # Minimal: equal to the window bound and to the true minimum over all move sequences.
        assert len(moves) == k - inside == _true_min_moves(n, k)[mask], (owned, moves)
        srcs, dsts = [s for s, _ in moves], [d for _, d in moves]
        assert srcs == sorted(srcs) and dsts == sorted(dsts), (owned, moves)
        assert len(set(srcs) | set(dsts)) == 2 * len(moves)  # distinct, no target is a source
        for src, dst in moves:
            assert owned[src] and not owned[dst], (owned, moves)
            assert src not in window and dst in window, (owned, moves)
        # Applying the moves one by one (or all at once: they are disjoint) fills the window.
        after = list(owned)
        for src, dst in moves:
            assert after[src] and not after[dst]
            after[src], after[dst] = False, True
        assert after == [i in window for i in range(n)], (owned, moves)
        assert _contiguous(after)
        if _contiguous(owned):
            assert moves == []


def test_plan_compaction_examples():
    assert plan_compaction([]) == []
    assert plan_compaction([False] * 4) == []
    assert plan_compaction([True] * 4) == []
    assert plan_compaction([True, False, True, False, True]) == [(4, 1)]
    # Tie between windows [0, 2) and [2, 4) (one owned slot each): the leftmost wins.
    assert plan_compaction([True, False, False, True]) == [(3, 1)]
    assert plan_compaction([False, True, False, False, True, True]) == [(1, 3)]
    failures, _ = doctest.testmod(slots_module, verbose=False)
    assert failures == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), min_size=11, max_size=64))
def test_plan_compaction_large_is_minimal_and_contiguous(owned):
    k = sum(owned)
    moves = plan_compaction(owned)
    if not k:
        assert moves == []
        return
    start, inside = _best_window(owned)
    assert len(moves) == k - inside
    after = list(owned)
    for src, dst in moves:
        assert after[src] and not after[dst]
        after[src], after[dst] = False, True
    assert after == [start <= i < start + k for i in range(len(owned))]


# -- SlotTable -------------------------------------------------------------------------------


def test_slot_table_rejects_bad_capacity():
    with pytest.raises(ValueError, match="capacity"):
        SlotTable(0)


def test_allocate_order_and_errors():
    table = SlotTable(4)
    assert table.span() == (0, 0) and table.is_contiguous() and table.num_free == 4
    assert [table.allocate(r) for r in "abcd"] == [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match="no free slot"):
        table.allocate("e")
    with pytest.raises(ValueError, match="already owns"):
        table.allocate("a")
    assert table.release("b") == 1
    assert table.release("a") == 0
    assert table.span() == (2, 4)
    assert table.allocate("x") == 1  # just left of the span (right edge is full)
    assert table.allocate("y") == 0
    table.release("c")  # hole at 2
    assert table.allocate("z") == 2  # the hole first
    with pytest.raises(KeyError):
        table.release("nobody")


def test_apply_moves_relabels_and_rejects_invalid():
    table = SlotTable(5)
    for r in "abc":
        table.allocate(r)
    table.release("b")  # a . c . .
    table.apply_moves([(2, 1)])
    assert [table.owner(s) for s in range(5)] == ["a", "c", None, None, None]
    assert table.slot_of("c") == 1 and table.is_contiguous()
    before = [table.owner(s) for s in range(5)]
    for bad in ([(3, 4)], [(0, 1)], [(0, 0)]):  # free source / live target / onto itself
        with pytest.raises(ValueError, match="source must be owned and target free"):
            table.apply_moves(bad)
        assert [table.owner(s) for s in range(5)] == before
    with pytest.raises(ValueError, match=r"must be in \[0, 5\)"):
        table.apply_moves([(0, 5)])
    assert [table.owner(s) for s in range(5)] == before


def test_apply_moves_rejects_negative_slots():
    table = SlotTable(3)
    table.allocate("a")
    with pytest.raises(ValueError, match="must be in"):
        table.apply_moves([(0, -1)])
    assert table.slot_of("a") == 0 and table.owner(0) == "a"


class SlotTableMachine(RuleBasedStateMachine):
    """Random allocate / release / compact / move sequences against a dict model."""

    ids = Bundle("ids")

    def __init__(self) -> None:
        super().__init__()
        self.table: SlotTable | None = None
        self.model: dict[int, int] = {}  # request id -> slot
        self.next_id = 0

    @initialize(capacity=st.integers(1, 12))
    def init(self, capacity):
        self.table = SlotTable(capacity)

    def _owners(self):
        return [self.table.owner(s) for s in range(self.table.capacity)]

    @precondition(lambda self: self.table is not None and self.table.num_free > 0)
    @rule(target=ids)
    def allocate(self):
        table = self.table
        lo, hi = table.span()
        was_contiguous = table.is_contiguous()
        holes = [s for s in range(lo, hi) if table.owner(s) is None]
        request_id = self.next_id
        self.next_id += 1
        slot = table.allocate(request_id)
        assert slot not in self.model.values()  # never double-booked
        if holes:
            assert slot == holes[0]
        elif hi < table.capacity:
            assert slot == hi
        else:
            assert slot == lo - 1
        if was_contiguous:
            assert table.is_contiguous()
        self.model[request_id] = slot
        return request_id

    @precondition(lambda self: self.table is not None and self.table.num_free == 0)
    @rule()
    def allocate_full(self):
        before = self._owners()
        with pytest.raises(RuntimeError):
            self.table.allocate(self.next_id)
        assert self._owners() == before

    @rule(request_id=ids)
    def allocate_twice(self, request_id):
        if request_id not in self.model:
            return
        before = self._owners()
        with pytest.raises(ValueError):
            self.table.allocate(request_id)
        assert self._owners() == before

    @rule(request_id=consumes(ids))
    def release(self, request_id):
        if request_id not in self.model:
            return
        assert self.table.release(request_id) == self.model.pop(request_id)

    @precondition(lambda self: self.table is not None)
    @rule(request_id=st.integers(-2, 200))
    def release_unknown(self, request_id):
        if request_id in self.model:
            return
        with pytest.raises(KeyError):
            self.table.release(request_id)

    @precondition(lambda self: self.table is not None)
    @rule()
    def compact(self):
        moves = plan_compaction(self.table.owned())
        before = self._owners()
        self.table.apply_moves(moves)
        for src, dst in moves:
            self.model[before[src]] = dst
        assert self.table.is_contiguous()

    @precondition(lambda self: self.table is not None)
    @rule(data=st.data())
    def move(self, data):
        capacity = self.table.capacity
        src = data.draw(st.integers(0, capacity - 1))
        dst = data.draw(st.integers(0, capacity - 1))
        before = self._owners()
        if before[src] is not None and before[dst] is None:
            self.table.apply_moves([(src, dst)])
            self.model[before[src]] = dst
        else:
            with pytest.raises(ValueError):
                self.table.apply_moves([(src, dst)])
            assert self._owners() == before

    @invariant()
    def consistent(self):
        table = self.table
        if table is None:
            return
        owners = self._owners()
        owned_slots = [s for s, o in enumerate(owners) if o is not None]
        # The model and the table agree, slot by slot, in both directions.
        assert {o: s for s, o in enumerate(owners) if o is not None} == self.model
        for request_id, slot in self.model.items():
            assert table.slot_of(request_id) == slot
        assert len(set(self.model.values())) == len(self.model)  # no double booking
        assert len(table) == len(self.model) and table.num_free + len(table) == table.capacity
        assert table.owned() == [o is not None for o in owners]
        lo, hi = table.span()
        assert (lo, hi) == ((owned_slots[0], owned_slots[-1] + 1) if owned_slots else (0, 0))
        assert table.is_contiguous() == _contiguous(table.owned())


TestSlotTableMachine = SlotTableMachine.TestCase
TestSlotTableMachine.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
