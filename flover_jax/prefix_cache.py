"""The prefix cache's host index: which rows of the decode state hold which prompt prefixes.

Requests that open with the same tokens (a system prompt, few-shot examples, a conversation
so far) reuse the K/V of that opening instead of computing it again. The cache lives inside
the fixed-capacity decode state, as extra rows beyond the slots ("pinned slots"): a cached
prefix is one row, filled and read by the same block copy that compaction uses, so the
decode step, the attention kernels and compaction stay as they are. A row costs a slot's
memory whatever its prefix's length; in exchange there are no pages, block tables or
gathers in the decode step.

Prefixes are whole pieces of prompts (chunks.py), so a request that reuses one computes
the rest exactly as it would have alone. The index maps every piece boundary of a cached
prefix (the token tuple itself, so a hit is never a hash collision) to its row; lookups
take the longest. A request holds a reference to the row it reused until its prompt is in
its slot; rows without references are evicted least recently used first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


@dataclasses.dataclass
class CachedPrefix:
    row: int
    tokens: tuple[int, ...]
    refs: int = 0
    last_used: int = 0


class PrefixCache:
    """The index over `rows` (row ids of the decode state), for pieces of `chunk` tokens."""

    def __init__(self, rows: Sequence[int], chunk: int) -> None:
        if rows and chunk < 1:
            raise ValueError(f"prefill_chunk={chunk}: the prefix cache reuses whole pieces of "
                             "prompts, so it needs prefill_chunk >= 1 (or no prefix cache)")
        self.chunk = chunk
        self._free = list(rows)
        self._by_prefix: dict[tuple[int, ...], CachedPrefix] = {}
        self._entries: dict[int, CachedPrefix] = {}  # row -> entry
        self._clock = 0
        self.evictions = 0  # over the cache's life

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def capacity(self) -> int:
        return len(self._free) + len(self._entries)

    def _touch(self, entry: CachedPrefix) -> None:
        self._clock += 1
        entry.last_used = self._clock

    def lookup(self, prompt: Sequence[int], usable: int) -> tuple[CachedPrefix, int] | None:
        """(the entry, the length) of the longest cached prefix of `prompt` no longer than
        `usable` tokens, or None. Changes nothing: `ref` the entry to use it."""
        for end in range(usable - usable % self.chunk if self.chunk else 0, 0, -self.chunk):
            entry = self._by_prefix.get(tuple(prompt[:end]))
            if entry is not None:
                return entry, end
        return None

    def ref(self, entry: CachedPrefix) -> None:
        """Hold the entry (it is not evicted until `unref`) and mark it recently used."""
        entry.refs += 1
        self._touch(entry)

    def unref(self, entry: CachedPrefix) -> None:
        if entry.refs < 1:
            raise RuntimeError(f"prefix cache row {entry.row}: unreferenced more than referenced")
        entry.refs -= 1

    def store(self, prefix: Sequence[int]) -> int | None:
        """A row to copy `prefix` into, now indexed under it (the caller copies at once), or
        None if it is cached already or every row is referenced."""
        key = tuple(prefix)
        if key in self._by_prefix or len(key) < self.chunk:
            return None
        if not self._free:
            idle = [e for e in self._entries.values() if e.refs == 0]
            if not idle:
                return None
            self._evict(min(idle, key=lambda e: e.last_used))
        entry = CachedPrefix(self._free.pop(), key)
        self._entries[entry.row] = entry
        for end in range(self.chunk, len(key) + 1, self.chunk):
            self._by_prefix[key[:end]] = entry  # a newer row serves the shorter prefixes too
        self._touch(entry)
        return entry.row

    def clear(self) -> None:
        """Forget every cached prefix (none may be referenced)."""
        if self.referenced:
            raise RuntimeError("prefix cache: cleared while requests still use it")
        for entry in list(self._entries.values()):
            self._evict(entry)

    def _evict(self, entry: CachedPrefix) -> None:
        del self._entries[entry.row]
        for end in range(self.chunk, len(entry.tokens) + 1, self.chunk):
            if self._by_prefix.get(entry.tokens[:end]) is entry:
                del self._by_prefix[entry.tokens[:end]]
        self._free.append(entry.row)
        self.evictions += 1

    def check(self) -> None:
        """Invariants (for tests): every row free or held once, the index points at live
        entries holding the key, no negative references."""
        rows = [*self._free, *self._entries]
        if len(rows) != len(set(rows)):
            raise AssertionError(f"prefix cache: a row is both free and held: {sorted(rows)}")
        for key, entry in self._by_prefix.items():
            if self._entries.get(entry.row) is not entry or entry.tokens[: len(key)] != key:
                raise AssertionError(f"prefix cache: stale index entry of {len(key)} tokens")
        if any(e.refs < 0 for e in self._entries.values()):
            raise AssertionError("prefix cache: negative reference count")

    @property
    def referenced(self) -> int:
        """References held (0 once every request that reused a prefix has its prompt in)."""
        return sum(e.refs for e in self._entries.values())
