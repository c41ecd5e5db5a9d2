"""Small sets of static shapes. Every jitted verb is compiled once per bucket it meets, so
the number of compiles is bounded by these sets and never by traffic."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


def powers_of_two(lo: int, hi: int) -> tuple[int, ...]:
    """lo, 2lo, 4lo, ... below hi, then hi itself: (4, 16) -> (4, 8, 16); (4, 12) -> (4, 8, 12)."""
    sizes, size = [], lo
    while size < hi:
        sizes.append(size)
        size *= 2
    return (*sizes, hi)


def bucket(n: int, sizes: tuple[int, ...]) -> int:
    """The smallest size >= n."""
    for size in sizes:
        if size >= n:
            return size
    raise ValueError(f"{n} exceeds the largest bucket {sizes[-1]}")


DEFAULT_PREFILL_BATCH = 8  # pieces per prefill call (more of short ones), unless the engine says otherwise
SHORT_PIECE = 64  # a call of shorter pieces takes more of them, up to the rows of a full call of these


@dataclasses.dataclass(frozen=True)
class Buckets:
    """The shape buckets of one engine (max_slots slots of max_len tokens)."""

    windows: tuple[int, ...]  # decode-step widths (slots computed)
    kv_lengths: tuple[int, ...]  # cache positions the decode step reads
    prompt_lengths: tuple[int, ...]  # padded lengths of a prompt's pieces
    max_prefill_batch: int  # pieces per prefill call (more of short ones: `prefill_batches`)
    prefill_chunk: int = 0  # the longest piece (0: whole prompts; see chunks.py)
    # The attention kernel reads each row's live positions in place, whatever kv_len says:
    # then every program runs at the longest kv_len (one decode program per width, and pieces
    # at any position share a prefill call).
    kernel_attention: bool = False
    prefill_rows: int = 0  # padded rows a call of short pieces may fill (0: no more pieces)

    def prefill_batches(self, piece_len: int) -> tuple[int, ...]:
        """Pieces per prefill call, for pieces padded to `piece_len` tokens: up to
        max_prefill_batch, or where more fit `prefill_rows` rows, that many (no more than there
        are slots). A call costs about its padded rows, and one call of many short pieces less than
        several calls of a few (benchmarks/NOTES.md)."""
        most = max(self.max_prefill_batch, self.prefill_rows // piece_len)
        return powers_of_two(1, min(most, self.windows[-1]))

    def program_kv_len(self, kv_len: int) -> int:
        """The kv_len a decode step or prefill for `kv_len` is compiled for."""
        return self.kv_lengths[-1] if self.kernel_attention else kv_len

    def prefill_kv_len(self, end: int) -> int:
        """The kv_len of the prefill program a piece ending at `end` runs with."""
        return self.program_kv_len(bucket(end, self.kv_lengths))

    @classmethod
    def for_engine(
        cls,
        max_slots: int,
        max_len: int,
        max_prefill_batch: int = DEFAULT_PREFILL_BATCH,
        fine_windows: bool = False,
        min_window: int = 1,
        batch_invariant: bool = False,
        prefill_chunk: int = 0,
        kernel_attention: bool = False,
    ) -> Buckets:
        """fine_windows: widths every max_slots / 8 (at least 4) besides the powers of two, for
        steps whose cost grows with the rows computed (XLA:CPU, compute-bound at many slots);
        a coarse set suits steps that cost the same at any width (GPUs).
        min_window: the narrowest window, where a program of fewer rows is no cheaper (on an
        H200 a one-row step costs twice an eight-row one: benchmarks/NOTES.md).
        batch_invariant: one decode program (every slot, every position) and prompts prefilled
        one at a time. XLA picks a matmul's or reduction's kernel, and so its rounding, by
        shape; with these buckets the shapes a request runs through depend on its own prompt
        length only, never on who shares the device, and rows of one program are computed alike
        wherever they sit, so its tokens are the ones it gets alone (checked in bfloat16 on
        XLA:CPU and an H200, where the default buckets are not). The price: every step computes
        every slot.
        prefill_chunk: pieces of prompts are at most this long (0: whole prompts).
        kernel_attention: the engine attends with the CPU kernel (see `prefill_kv_len`)."""
        longest_piece = min(prefill_chunk, max_len) if prefill_chunk else max_len
        # From 8: a prefill costs its padded rows, and short prompts are common.
        prompt_lengths = powers_of_two(min(8, longest_piece), longest_piece)
        if batch_invariant:
            return cls(windows=(max_slots,), kv_lengths=(max_len,),
                       prompt_lengths=prompt_lengths, max_prefill_batch=1,
                       prefill_chunk=prefill_chunk, kernel_attention=kernel_attention)
        windows = powers_of_two(min(min_window, max_slots), max_slots)
        if fine_windows:
            step = max(4, max_slots // 8)
            finer = range(step, max_slots, step)
            windows = tuple(sorted({*windows, *(w for w in finer if w > windows[0])}))
        return cls(
            windows=windows,
            kv_lengths=powers_of_two(min(64, max_len), max_len),
            prompt_lengths=prompt_lengths,
            max_prefill_batch=max_prefill_batch,
            prefill_chunk=prefill_chunk,
            kernel_attention=kernel_attention,
            prefill_rows=max_prefill_batch * SHORT_PIECE,
        )

    def prefill_shapes(self, prompt_lens: Sequence[int] | None = None) -> set[tuple[int, int]]:
        """(padded piece length, kv_len) of every prefill the pieces of prompts of these
        lengths run with (of every prompt length up to the longest, by default)."""
        chunk, max_len = self.prefill_chunk, self.kv_lengths[-1]
        if prompt_lens is None:
            pieces = ((s, r) for s in range(0, max_len, chunk or max_len)
                      for r in range(1, min(chunk or max_len, max_len - 1 - s) + 1))
        else:
            pieces = ((s, min(n, s + chunk) - s if chunk else n) for n in prompt_lens
                      for s in range(0, n, chunk or max(n, 1)))
        return {(bucket(r, self.prompt_lengths), self.prefill_kv_len(s + r)) for s, r in pieces}
