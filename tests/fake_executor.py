"""FakeExecutor: the scheduler's `Executor` protocol in pure numpy, with the device's semantics.

It mirrors `step.py` (insert / decode_step / compact / release) slot by slot, with no model:
the token a request samples next is a hash of its seed and of everything in its "KV cache"
(prompt + the tokens fed back so far). So a request's output depends only on its own prompt,
seed and progress, exactly as on the device, and `expected_tokens` tells what a request must
produce when run alone. Because tokens are read back from the per-slot cache, a compaction
that moves too little of the cache (kv_len too small) or that moves the wrong row changes
the tokens and the tests see it.

On top of mirroring the device, every verb CHECKS the contract the real device silently
relies on and raises `DeviceContractError` when the host breaks it:

- decode: the window lies in [0, num_slots), width is a window bucket, kv_len is a kv bucket
  and exceeds the position of every active slot in the window, and (by default) no active
  slot lies outside the window (it would never progress);
- prefill: pieces never target a live slot; a piece that starts past 0 continues exactly
  where its slot's prompt stands (after earlier pieces, also earlier in the same call, or a
  copied prefix); a piece never crosses a chunk boundary and shares its call's shape buckets;
  tokens are in-vocab, params validate;
- copy_prefix: sources hold at least `length` positions of a prompt (a prefix row, or a
  slot whose prompt is that far in), targets are prefix rows or slots not yet begun;
- compact: sources are occupied (inserted, not released, possibly device-finished), targets
  are free, all distinct and no target is a source; kv_len is a kv bucket covering the
  cache of every active moved slot; the list fits the move buckets;
- release: distinct occupied slots; the list fits the move buckets.

"Occupied" = inserted and neither released nor moved away: the slots the host owns. The
device itself only knows `active` (a subset); `occupied` is the fake's bookkeeping.
It counts calls and logs what each verb saw, for the tests' policy and stats checks.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from collections.abc import Sequence

import numpy as np

from flover_jax.buckets import Buckets, bucket
from flover_jax.chunks import PromptPiece
from flover_jax.sampling import Sampled
from flover_jax.sampling_params import MAX_TOP_LOGPROBS, SamplingParams

STALE = -7  # cache cells holding padding / nothing written (never read by a correct host)


class DeviceContractError(AssertionError):
    """The host broke an invariant the real device relies on."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise DeviceContractError(message)


def next_token(seed: int, sequence: Sequence[int], vocab_size: int) -> int:
    """The token a request with this seed samples after `sequence` (prompt + output so far)."""
    data = np.asarray([seed, *sequence], np.int64).tobytes()
    digest = hashlib.blake2b(data, digest_size=8).digest()
    return int.from_bytes(digest, "little") % vocab_size


def token_logprob(seed: int, sequence: Sequence[int]) -> float:
    """The fake log-probability of the token sampled after `sequence` (a float32 value)."""
    data = np.asarray([seed, *sequence, -1], np.int64).tobytes()
    digest = hashlib.blake2b(data, digest_size=8).digest()
    return float(np.float32(-(int.from_bytes(digest, "little") % 1000) / 100 - 0.01))


def expected_logprobs(prompt: Sequence[int], tokens: Sequence[int], seed: int) -> list[float]:
    """The fake log-probabilities of `tokens`, generated after `prompt`."""
    return [token_logprob(seed, [*prompt, *tokens[:i]]) for i in range(len(tokens))]


def expected_tokens(
    prompt: Sequence[int],
    params: SamplingParams,
    eos_ids: Sequence[int],
    max_len: int,
    vocab_size: int,
) -> tuple[list[int], str]:
    """(tokens, finish_reason) that a valid request produces when it runs alone to the end."""
    stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
    sequence, out = list(prompt), []
    while True:
        token = next_token(params.seed, sequence, vocab_size)
        out.append(token)
        sequence.append(token)
        if token in stop_ids:
            return out, "stop"
        if len(out) >= params.max_new_tokens or len(prompt) + len(out) >= max_len:
            return out, "length"


@dataclasses.dataclass
class Handle:
    kind: str  # "prefill" / "decode"
    sampled: Sampled
    owner: int  # id() of the executor that issued it
    read: bool = False


@dataclasses.dataclass
class DecodeLog:
    start: int
    width: int
    kv_len: int
    occupied: int  # occupied slots when the step was dispatched
    active: int


@dataclasses.dataclass
class PrefillLog:
    slots: list[int]
    occupied_before: int  # slots occupied since before the current mark (iteration)
    mark: int  # the value of `executor.mark` at the call (tests set it to the iteration)
    new: int  # pieces that begin their prompt (at 0, or right after a copied prefix)
    finals: int  # pieces that end their prompt


@dataclasses.dataclass
class CompactLog:
    moves: list[tuple[int, int]]
    kv_len: int
    span_before: tuple[int, int]
    occupied: int
    contiguous_after: bool


def _span(mask: np.ndarray) -> tuple[int, int]:
    idx = np.flatnonzero(mask)
    return (int(idx[0]), int(idx[-1]) + 1) if idx.size else (0, 0)


def whole(slot: int, prompt: Sequence[int], params: SamplingParams) -> PromptPiece:
    """A prompt as one piece, into `slot` (for tests that drive the fake by hand)."""
    return PromptPiece(slot, list(prompt), 0, True, params)


class FakeExecutor:
    def __init__(
        self,
        num_slots: int,
        max_len: int,
        vocab_size: int = 32,
        eos_ids: Sequence[int] = (),
        buckets: Buckets | None = None,
        max_prefill_batch: int = 8,
        require_window_covers_active: bool = True,
        prefix_rows: int = 0,
    ) -> None:
        self.num_slots, self.max_len, self.vocab_size = num_slots, max_len, vocab_size
        self.eos_ids = tuple(int(e) for e in eos_ids)
        self.buckets = buckets or Buckets.for_engine(num_slots, max_len, max_prefill_batch)
        self.require_window_covers_active = require_window_covers_active
        self.prefix_rows = range(num_slots, num_slots + prefix_rows)
        s = num_slots + prefix_rows
        self.cache = np.full((s, max_len), STALE, np.int64)  # token id at each cache position
        self.filled = np.zeros(s, np.int64)  # prompt positions in the cache (kept as it decodes)
        self.since = np.zeros(s, np.int64)  # the mark at which the slot's request came in
        self.copied_in = np.zeros(s, bool)  # holds a copied prefix and no piece yet
        self.tokens = np.zeros(s, np.int64)  # last sampled token = next step's input
        self.pos = np.zeros(s, np.int64)  # tokens in the cache
        self.active = np.zeros(s, bool)
        self.occupied = np.zeros(s, bool)
        self.remaining = np.zeros(s, np.int64)
        self.generated = np.zeros(s, np.int64)
        self.ignore_eos = np.zeros(s, bool)
        self.seed = np.zeros(s, np.int64)
        self.logprobs = np.zeros(s, bool)  # the request asked for log-probabilities
        self.calls: collections.Counter[str] = collections.Counter()
        self.decodes: list[DecodeLog] = []
        self.prefills: list[PrefillLog] = []
        self.compactions: list[CompactLog] = []
        self.releases: list[list[int]] = []
        self.copies: list[tuple[int, int, int]] = []  # (src, dst, length) of copy_prefix
        self.mark = 0  # free for tests: e.g. the iteration number, recorded by prefill

    _ROW_FIELDS = ("tokens", "pos", "active", "occupied", "remaining", "generated",
                   "ignore_eos", "seed", "logprobs", "filled", "since", "copied_in")

    # -- helpers ------------------------------------------------------------------------------

    def _slot_ok(self, slot) -> bool:
        return isinstance(slot, (int, np.integer)) and not isinstance(slot, bool) and (
            0 <= slot < self.num_slots
        )

    def _handle(self, kind: str, tokens: np.ndarray, logprobs: np.ndarray) -> Handle:
        # No alternatives: the fake model's distribution is a point mass.
        top = (len(tokens), MAX_TOP_LOGPROBS)
        return Handle(kind, Sampled(tokens, logprobs, np.zeros(top, np.int32),
                                    np.zeros(top, np.float32)), id(self))

    def _check_invariants(self) -> None:
        _check(not np.any(self.active & ~self.occupied), "an active slot is not occupied")

    def occupied_slots(self) -> list[int]:
        return [int(s) for s in np.flatnonzero(self.occupied)]

    def active_slots(self) -> list[int]:
        return [int(s) for s in np.flatnonzero(self.active)]

    # -- the Executor protocol ----------------------------------------------------------------

    def prefill(self, pieces: Sequence[PromptPiece]) -> Handle:
        self.calls["prefill"] += 1
        _check(len(pieces) >= 1, "prefill: no pieces")
        b = self.buckets
        piece_len = bucket(max(len(p.tokens) for p in pieces), b.prompt_lengths)
        bucket(len(pieces), b.prefill_batches(piece_len))  # raises like the real executor
        shapes = {(bucket(len(p.tokens), b.prompt_lengths), b.prefill_kv_len(p.end)) for p in pieces}
        _check(len(shapes) == 1, f"prefill: pieces of several shapes {sorted(shapes)} in one call")
        slots = [p.slot for p in pieces]
        stands: dict[int, int] = {}  # where each slot's prompt stands after its pieces so far
        for p in pieces:
            slot = p.slot
            _check(self._slot_ok(slot), f"prefill: slot {slot!r} out of range")
            _check(not self.active[slot], f"prefill: slot {slot} is active (a live request)")
            if slot in stands:  # a later piece of the same prompt, in the same call
                _check(p.start == stands[slot] and p.start > 0,
                       f"prefill: slot {slot}'s pieces in one call do not follow each other")
            else:
                _check(p.start == 0 or (self.filled[slot] == p.start and self.occupied[slot]
                                        and not self.generated[slot]),
                       f"prefill: a piece at {p.start} into slot {slot}, whose prompt stands at "
                       f"{self.filled[slot] if self.occupied[slot] else 'nothing'}")
            stands[slot] = -1 if p.final else p.end  # nothing follows a prompt's last piece
            chunk = b.prefill_chunk
            _check(not chunk or (len(p.tokens) <= chunk and p.start // chunk == (p.end - 1) // chunk),
                   f"prefill: piece [{p.start}, {p.end}) crosses a boundary of chunk {chunk}")
            p.params.validate()
            _check(1 <= len(p.tokens) and p.end < self.max_len,
                   f"prefill: piece [{p.start}, {p.end})")
            _check(all(0 <= t < self.vocab_size for t in p.tokens), f"prefill: bad ids {p.tokens}")
        before = int((self.occupied & (self.since < self.mark)).sum())
        new = sum(p.start == 0 or bool(self.copied_in[p.slot])
                  for p in {p.slot: p for p in reversed(pieces)}.values())  # each slot's first
        self.prefills.append(PrefillLog([int(s) for s in slots], before, self.mark, new,
                                        sum(p.final for p in pieces)))
        first = np.full(len(pieces), -1, np.int64)
        first_logprobs = np.zeros(len(pieces), np.float32)
        for i, p in enumerate(pieces):
            slot, length = p.slot, p.end
            self.cache[slot, p.start : length] = p.tokens
            padded = p.start + bucket(len(p.tokens), b.prompt_lengths)
            self.cache[slot, length:padded] = STALE  # the padding's K/V: garbage
            if p.start == 0:
                self.since[slot], self.generated[slot] = self.mark, 0
            self.occupied[slot], self.filled[slot], self.copied_in[slot] = True, length, False
            if not p.final:
                continue
            prompt = self.cache[slot, :length].tolist()
            token = next_token(p.params.seed, prompt, self.vocab_size)
            first[i] = token
            first_logprobs[i] = token_logprob(p.params.seed, prompt) if p.params.logprobs else 0.0
            done = (
                p.params.max_new_tokens <= 1
                or (token in self.eos_ids and not p.params.ignore_eos)
                or length >= self.max_len
            )
            self.tokens[slot], self.pos[slot] = token, length
            self.active[slot] = not done
            self.remaining[slot], self.generated[slot] = p.params.max_new_tokens - 1, 1
            self.ignore_eos[slot], self.seed[slot] = p.params.ignore_eos, p.params.seed
            self.logprobs[slot] = p.params.logprobs
        self._check_invariants()
        return self._handle("prefill", first, first_logprobs)

    def copy_prefix(self, copies: Sequence[tuple[int, int, Sequence[int]]]) -> None:
        self.calls["copy_prefix"] += 1
        for src, _, tokens in copies:  # the opening's own tokens, as the source holds them
            _check(list(self.cache[int(src), : len(tokens)]) == list(tokens),
                   f"copy_prefix: row {src} does not hold the tokens given")
        copies = [(int(a), int(b), len(t)) for a, b, t in copies]
        _check(len(copies) <= self.num_slots, f"copy_prefix: {len(copies)} copies > capacity")
        kv = {bucket(n, self.buckets.kv_lengths) for _, _, n in copies}
        _check(len(kv) == 1, f"copy_prefix: lengths of several kv buckets {sorted(kv)} in one call")
        for src, dst, length in copies:
            rows = len(self.cache)
            _check(0 <= src < rows and 0 <= dst < rows and src != dst,
                   f"copy_prefix: {src}->{dst} out of range")
            _check(1 <= length < self.max_len, f"copy_prefix: length {length}")
            if src in self.prefix_rows:
                _check(self.filled[src] >= length, f"copy_prefix: prefix row {src} holds "
                                                   f"{self.filled[src]} < {length} positions")
                _check(dst not in self.prefix_rows and not self.occupied[dst],
                       f"copy_prefix: target slot {dst} is in use")
            else:
                _check(self.occupied[src] and self.filled[src] >= length,
                       f"copy_prefix: source slot {src} holds no prompt of {length} positions")
                _check(dst in self.prefix_rows, f"copy_prefix: {src}->{dst}: slot to slot")
        for src, dst, length in copies:
            self.copies.append((src, dst, length))
            # The device copies the whole kv bucket; positions past `length` are garbage.
            self.cache[dst, :length] = self.cache[src, :length]
            self.cache[dst, length:bucket(length, self.buckets.kv_lengths)] = STALE
            self.filled[dst] = length
            if dst not in self.prefix_rows:
                self.occupied[dst], self.copied_in[dst], self.since[dst] = True, True, self.mark
                self.generated[dst] = 0

    def decode(self, start: int, width: int, kv_len: int) -> Handle:
        self.calls["decode"] += 1
        _check(width in self.buckets.windows,
               f"decode: width {width} not in {self.buckets.windows}")
        _check(kv_len in self.buckets.kv_lengths,
               f"decode: kv_len {kv_len} not in {self.buckets.kv_lengths}")
        _check(0 <= start and start + width <= self.num_slots,
               f"decode: window [{start}, {start + width}) outside [0, {self.num_slots})")
        window = range(start, start + width)
        if self.require_window_covers_active:
            outside = [s for s in self.active_slots() if s not in window]
            _check(not outside, f"decode: active slots {outside} outside window "
                                f"[{start}, {start + width}) would never progress")
        for s in window:
            if self.active[s]:
                _check(kv_len > self.pos[s],
                       f"decode: kv_len {kv_len} <= position {self.pos[s]} of slot {s}")
        self.decodes.append(DecodeLog(start, width, kv_len, int(self.occupied.sum()),
                                      int(self.active.sum())))
        out = np.full(width, -1, np.int64)
        out_logprobs = np.zeros(width, np.float32)
        for row, s in enumerate(window):
            if not self.active[s]:
                continue
            p = self.pos[s]
            self.cache[s, p] = self.tokens[s]  # the input token's K/V lands at position p
            context = self.cache[s, : p + 1].tolist()
            new = next_token(int(self.seed[s]), context, self.vocab_size)
            if self.logprobs[s]:
                out_logprobs[row] = token_logprob(int(self.seed[s]), context)
            self.remaining[s] -= 1
            stop = (
                self.remaining[s] <= 0
                or (new in self.eos_ids and not self.ignore_eos[s])
                or p + 1 >= self.max_len
            )
            self.tokens[s], self.pos[s] = new, p + 1
            self.generated[s] += 1
            self.active[s] = not stop
            out[row] = new
        return self._handle("decode", out, out_logprobs)

    def compact(self, moves: Sequence[tuple[int, int]], kv_len: int) -> None:
        self.calls["compact"] += 1
        moves = [(int(a), int(b)) for a, b in moves]
        _check(len(moves) <= self.num_slots, f"compact: {len(moves)} moves > capacity")
        _check(kv_len in self.buckets.kv_lengths,
               f"compact: kv_len {kv_len} not in {self.buckets.kv_lengths}")
        srcs, dsts = [a for a, _ in moves], [b for _, b in moves]
        _check(len(set(srcs)) == len(srcs), f"compact: repeated source in {moves}")
        _check(len(set(dsts)) == len(dsts), f"compact: repeated target in {moves}")
        _check(not set(srcs) & set(dsts), f"compact: a target is also a source in {moves}")
        for src, dst in moves:
            _check(self._slot_ok(src) and self._slot_ok(dst), f"compact: {src}->{dst} out of range")
            _check(self.occupied[src], f"compact: source {src} is not occupied")
            _check(not self.occupied[dst] and not self.active[dst],
                   f"compact: target {dst} is live (would be overwritten)")
            if self.active[src]:
                _check(kv_len >= self.pos[src],
                       f"compact: kv_len {kv_len} < position {self.pos[src]} of slot {src}")
            _check(kv_len >= self.filled[src],
                   f"compact: kv_len {kv_len} < the {self.filled[src]} prompt positions of {src}")
        span_before = _span(self.occupied)
        # Simultaneous gather/scatter like the device: read every source, then write.
        rows = {f: getattr(self, f)[srcs].copy() for f in self._ROW_FIELDS}
        kv = self.cache[srcs, :kv_len].copy()
        for f in self._ROW_FIELDS:
            getattr(self, f)[dsts] = rows[f]
        self.cache[dsts, :kv_len] = kv  # beyond kv_len the target keeps its stale cache
        self.active[srcs] = False
        self.occupied[srcs] = False
        self._check_invariants()
        lo, hi = _span(self.occupied)
        n = int(self.occupied.sum())
        self.compactions.append(CompactLog(moves, kv_len, span_before, n, hi - lo == n))

    def release(self, slots: Sequence[int]) -> None:
        self.calls["release"] += 1
        slots = [int(s) for s in slots]
        _check(len(slots) <= self.num_slots, f"release: {len(slots)} slots > capacity")
        _check(len(set(slots)) == len(slots), f"release: repeated slot in {slots}")
        for s in slots:
            _check(self._slot_ok(s), f"release: slot {s} out of range")
            _check(self.occupied[s], f"release: slot {s} is not occupied (double release?)")
        self.releases.append(slots)
        self.active[slots] = False
        self.occupied[slots] = False

    def read(self, handle: Handle) -> Sampled:
        self.calls["read"] += 1
        _check(isinstance(handle, Handle) and handle.owner == id(self),
               f"read: bad handle {handle!r}")
        _check(not handle.read, f"read: {handle.kind} result read twice (tokens added twice?)")
        handle.read = True
        self.calls[f"read_{handle.kind}"] += 1
        return Sampled(*(field.copy() for field in handle.sampled))
