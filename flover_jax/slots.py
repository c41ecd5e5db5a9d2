"""The slot table: which request owns which slot, and Flover's minimal-move compaction plan.

Pure host bookkeeping (no JAX, no model). The decode step computes a window of
consecutive slots, so the table tries to keep the owned slots contiguous:
`allocate` fills holes first and otherwise grows the live span at its edges,
and `plan_compaction` closes the holes that finishing requests leave behind
with the fewest possible moves.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence


def plan_compaction(owned: Sequence[bool]) -> list[tuple[int, int]]:
    """Flover's memory shuffle: the fewest (src, dst) moves that make the owned slots contiguous.

    Slide a window as wide as the number k of owned slots; take the leftmost
    window holding the most owned slots. Every owned slot outside it moves into
    a free slot inside it, both taken left to right. The number of moves,
    k - (owned slots in the best window), is the minimum possible. O(n).

    >>> plan_compaction([True, False, True, False, True])  # window [0, 3) holds 2 of 3
    [(4, 1)]
    """
    n, k = len(owned), sum(owned)
    if k == 0:
        return []
    inside = best = sum(owned[:k])
    best_start = 0
    for start in range(1, n - k + 1):
        inside += owned[start + k - 1] - owned[start - 1]
        if inside > best:
            best, best_start = inside, start
    window = range(best_start, best_start + k)
    sources = [s for s in range(n) if owned[s] and s not in window]
    holes = [s for s in window if not owned[s]]
    return list(zip(sources, holes))


class SlotTable:
    """Owner of each of `capacity` slots (None = free)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity={capacity}: must be >= 1")
        self.capacity = capacity
        self._owner: list[Hashable | None] = [None] * capacity
        self._slot_of: dict[Hashable, int] = {}

    def __len__(self) -> int:
        """Owned slots."""
        return len(self._slot_of)

    @property
    def num_free(self) -> int:
        return self.capacity - len(self._slot_of)

    def owner(self, slot: int) -> Hashable | None:
        return self._owner[slot]

    def slot_of(self, request_id: Hashable) -> int:
        return self._slot_of[request_id]

    def owned(self) -> list[bool]:
        return [owner is not None for owner in self._owner]

    def span(self) -> tuple[int, int]:
        """[lo, hi): the smallest range holding every owned slot; (0, 0) when none."""
        owned = [s for s, owner in enumerate(self._owner) if owner is not None]
        return (owned[0], owned[-1] + 1) if owned else (0, 0)

    def is_contiguous(self) -> bool:
        lo, hi = self.span()
        return hi - lo == len(self)

    def allocate(self, request_id: Hashable) -> int:
        """Give `request_id` the free slot that keeps the live span tightest.

        Holes inside the span first (leftmost), then the slot just right of
        the span, then the one just left of it. Raises if the table is full.
        """
        if request_id in self._slot_of:
            raise ValueError(f"request {request_id!r} already owns slot {self._slot_of[request_id]}")
        if not self.num_free:
            raise RuntimeError("no free slot")
        lo, hi = self.span()
        holes = [s for s in range(lo, hi) if self._owner[s] is None]
        if holes:
            slot = holes[0]
        elif hi < self.capacity:
            slot = hi
        else:
            slot = lo - 1
        self._owner[slot] = request_id
        self._slot_of[request_id] = slot
        return slot

    def release(self, request_id: Hashable) -> int:
        """Free the slot of `request_id`; returns it."""
        slot = self._slot_of.pop(request_id)
        self._owner[slot] = None
        return slot

    def apply_moves(self, moves: Sequence[tuple[int, int]]) -> None:
        """Relabel after the device moved slot src to dst for each (src, dst), all at once.

        Like the device's compaction, every move reads the table as it was before
        any move: sources must be distinct owned slots, targets distinct free ones.
        Nothing changes if any move is invalid.
        """
        sources, targets = [src for src, _ in moves], [dst for _, dst in moves]
        for src, dst in moves:
            if not (0 <= src < self.capacity and 0 <= dst < self.capacity):
                raise ValueError(f"move {src} -> {dst}: slots must be in [0, {self.capacity})")
            if self._owner[src] is None or self._owner[dst] is not None:
                raise ValueError(f"move {src} -> {dst}: source must be owned and target free")
        if len(set(sources)) < len(sources) or len(set(targets)) < len(targets):
            raise ValueError(f"moves {list(moves)}: sources and targets must be distinct")
        owners = [self._owner[src] for src in sources]
        for src in sources:
            self._owner[src] = None
        for owner, dst in zip(owners, targets):
            self._owner[dst] = owner
            self._slot_of[owner] = dst
