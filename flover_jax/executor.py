"""DeviceExecutor: the device verbs of `step.py` bound to one model, mesh and DecodeState.

It pads prompts and prefill batches to their buckets, and move and release
lists to the capacity, so that the verbs see only a few shapes, and hands back device arrays without waiting
for them: JAX's async dispatch lets the host run ahead of the device.
"""

from __future__ import annotations

import collections
import ctypes
import math
import sys
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from flover_jax import op_choice, sharding, step
from flover_jax.buckets import DEFAULT_PREFILL_BATCH, Buckets, bucket
from flover_jax.chunks import PromptPiece
from flover_jax.sampling import Sampled, SlotSampling
from flover_jax.sampling_params import SamplingParams
from flover_jax.state import DecodeState
from models import kernels, transformer
from models.config import ModelConfig
from models.transformer import Params

KERNEL_CHOICES = {"attention": ("auto", "xla", "cpu_kernel"),
                  "matmul": ("auto", "xla", "cpu_kernel", "amx")}  # amx: the kernel on AMX tiles
STATE_SHARE = 0.9  # of a device's free memory the decode state may take; steps need the rest


HUGE_PAGE = 2 << 20  # x86-64's and most arm64 kernels' transparent huge page
MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25  # Linux's madvise advice values (collapse: 6.1 on)


def huge_page_span(start: int, nbytes: int) -> tuple[int, int] | None:
    """The whole huge pages inside the buffer [start, start + nbytes): (first, end), or None."""
    first, end = -(-start // HUGE_PAGE) * HUGE_PAGE, (start + nbytes) // HUGE_PAGE * HUGE_PAGE
    return (first, end) if end > first else None


def _back_with_huge_pages(tree) -> None:
    """Asks Linux to back the whole huge pages inside the CPU buffers of `tree` with huge pages,
    now (MADV_COLLAPSE) and should they move (MADV_HUGEPAGE). A decode step streams every
    weight: on 4 KiB pages each page costs a TLB walk and the hardware prefetchers stop at each
    page's end (benchmarks/NOTES.md has what this saved). Best effort: a kernel without the
    advice, or with huge pages off, leaves the buffers as they are."""
    if sys.platform != "linux":
        return
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            if shard.device.platform != "cpu":
                continue
            span = huge_page_span(shard.data.unsafe_buffer_pointer(), shard.data.nbytes)
            if span:
                for advice in (MADV_HUGEPAGE, MADV_COLLAPSE):
                    madvise(span[0], span[1] - span[0], advice)


def _free_bytes(pool: jax.Device | str) -> int | None:
    """Memory an accelerator (or "host", the CPU devices' RAM) has free; None where it cannot
    tell (a CPU host other than Linux, a device without memory stats)."""
    if pool == "host":
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None
    stats = pool.memory_stats() or {}
    if "bytes_limit" not in stats:
        return None
    return stats["bytes_limit"] - stats.get("bytes_in_use", 0)


def state_bytes(state, shardings) -> dict[jax.Device | str, int]:
    """Bytes an (abstract) decode state takes where it lives: per accelerator, and on "host"
    for this process's CPU devices, which share its memory."""
    needed: dict[jax.Device | str, int] = collections.defaultdict(int)
    for leaf, where in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
        shard = math.prod(where.shard_shape(leaf.shape)) * leaf.dtype.itemsize
        for device in where.addressable_devices:
            needed["host" if device.platform == "cpu" else device] += shard
    return dict(needed)


def _check_state_fits(state, shardings, num_slots: int, prefix_rows: int, max_len: int) -> None:
    """Refuse a decode state too big for memory before allocating it: on CPU an oversized one
    gets the process killed by the OOM killer, with no message."""
    for pool, needed in state_bytes(state, shardings).items():
        free = _free_bytes(pool)
        if free is None or needed <= STATE_SHARE * free:
            continue
        fit = int(STATE_SHARE * free // (needed / (num_slots + prefix_rows))) - prefix_rows
        where = "the host" if pool == "host" else pool
        cached = f" beside the prefix cache's {prefix_rows} rows" if prefix_rows else ""
        raise ValueError(
            f"max_slots={num_slots}, max_len={max_len}: the decode state (KV cache and per-slot "
            f"arrays) needs {needed / 2**30:.2f} GiB on {where}, which has {free / 2**30:.2f} GiB "
            f"free; at most {max(fit, 0)} slots of max_len={max_len} fit{cached} in "
            f"{STATE_SHARE:.0%} of that (lower max_slots, max_len or the prefix cache's rows)")


def _check_count(name: str, value, least: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        raise ValueError(f"{name}={value!r}: must be an int >= {least}")


def _check_finite(params: Params) -> None:
    """Refuse weights holding NaN or infinity (a damaged checkpoint): they would decode some
    token every step all the same, token 0 for all-NaN logits, with no sign of trouble."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    finite = jax.jit(lambda leaves: [jnp.all(jnp.isfinite(x)) for x in leaves])(
        [leaf for _, leaf in flat])
    for (path, _), ok in zip(flat, finite):
        if not ok:
            raise ValueError(f"params{jax.tree_util.keystr(path)}: holds NaN or infinite values; "
                             "the weights are damaged")


def compute_config(cfg: ModelConfig, on_cpu: bool) -> ModelConfig:
    """cfg as an engine computes it: on CPU, bfloat16 weights and KV cache with float32
    activations (unless cfg names its activations). The CPU kernels widen bfloat16 to float32
    and sum in float32 anyway, XLA:CPU computes bfloat16 elementwise ops by converting them, and
    rounding every activation to bfloat16 cost a point of next-token agreement with float32
    (benchmarks/quality.py)."""
    if on_cpu and cfg.dtype == "bfloat16" and cfg.activations is None:
        return cfg.replace(activations="float32")
    return cfg


def _tiles_misfit(cfg: ModelConfig, float32: bool = False) -> str | None:
    """Why the matmul kernel cannot run this model on AMX tiles (None: it can); `float32`: the
    float32 weights, as bfloat16 parts (prompts' matmuls), instead of bfloat16 ones."""
    dtype = "float32" if float32 else "bfloat16"
    if cfg.dtype != dtype or cfg.quantize:
        return f"AMX tiles multiply {dtype} weights, this model's are {cfg.quantize or cfg.dtype}"
    if not kernels.tiles_available():
        return "this CPU (or this process) has no AMX tiles"
    return None


def _kernel_applies(option: str, choice: str, cfg: ModelConfig, mesh: Mesh, on_cpu: bool) -> bool:
    """Whether our CPU kernel can compute the `attention` or `matmul` option: one CPU device
    (the kernels are not partitioned across a mesh), a C++ compiler found, float32 or bfloat16
    activations, weights (or int8 ones) and KV cache, and for attention a model whose attention
    the kernel computes (no soft-capping: `ModelConfig.attention_kernel_misfit`); for "amx",
    bfloat16 weights and a CPU with AMX tiles. Asked for by name where it cannot: an error."""
    if choice not in KERNEL_CHOICES[option]:
        raise ValueError(f"{option}={choice!r}: must be one of {KERNEL_CHOICES[option]}")
    if choice == "xla":
        return False
    reasons = [why for bad, why in (
        (mesh.size != 1, f"it runs on one device, the mesh has {mesh.size}"),
        (not on_cpu, "it runs on CPU only"),
        (cfg.dtype not in ("float32", "bfloat16"),
         f"it computes float32 or bfloat16 models, this one is {cfg.dtype}"),
        (option == "attention" and bool(cfg.attention_kernel_misfit), cfg.attention_kernel_misfit),
    ) if bad]
    if not reasons and not kernels.cpu_kernel_available():
        reasons.append("it could not be compiled (see the log)")
    if not reasons and choice == "amx" and (misfit := _tiles_misfit(cfg)):
        reasons.append(misfit)
    if reasons and choice != "auto":
        raise ValueError(f"{option}={choice!r} cannot be used: {'; '.join(reasons)}")
    return not reasons


class DeviceExecutor:
    def __init__(
        self,
        params: Params,
        cfg: ModelConfig,
        num_slots: int,
        max_len: int,
        eos_ids: Sequence[int] = (),
        max_prefill_batch: int | None = None,
        mesh: Mesh | None = None,
        attention: str = "auto",
        batch_invariant: bool = False,
        matmul: str = "auto",
        prefill_chunk: int = 0,
        prefix_rows: int = 0,
    ) -> None:
        """max_prefill_batch: prompt pieces per prefill call at most, and more of pieces shorter
        than 64 tokens, as many as fill the same rows (`Buckets.prefill_batches`); 8 unless
        batch_invariant, which prefills one prompt at a time and so allows only 1.
        attention, matmul: "auto", "xla" or "cpu_kernel" (matmul also "amx": the kernel on AMX
        tiles, bfloat16 weights), which ops compute decode attention and the weight matmuls
        ("auto": the fastest of those that apply, as `op_choice` measures).
        prefill_chunk: the longest piece of a prompt one prefill computes (0: whole prompts).
        prefix_rows: rows of the decode state beyond the slots, which hold cached prefixes."""
        _check_count("max_slots", num_slots)
        _check_count("prefill_chunk", prefill_chunk, 0)
        _check_count("prefix_rows", prefix_rows, 0)
        _check_count("max_len", max_len, 2)
        if max_prefill_batch is None:
            max_prefill_batch = 1 if batch_invariant else DEFAULT_PREFILL_BATCH
        if batch_invariant and max_prefill_batch != 1:
            raise ValueError(f"max_prefill_batch={max_prefill_batch}: must be 1 (or unset) with "
                             "batch_invariant=True, which prefills prompts one at a time")
        _check_count("max_prefill_batch", max_prefill_batch)
        if not 2 <= max_len <= cfg.max_positions:
            raise ValueError(
                f"max_len={max_len}: must be in [2, {cfg.max_positions}] (the model's positions)"
            )
        self.mesh = mesh if mesh is not None else sharding.make_mesh(1)
        on_cpu = all(d.platform == "cpu" for d in self.mesh.devices.flat)
        self.cfg = cfg = compute_config(cfg, on_cpu)
        # The capacity check comes first, on shapes alone: nothing proportional to max_slots or
        # max_len is allocated before it (a billion slots once grew to 23 GB before any word).
        self.num_rows = num_slots + prefix_rows  # the slots, then the prefix cache's rows
        empty = partial(DecodeState.empty, cfg, self.num_rows, max_len)
        abstract_state = jax.eval_shape(empty)
        state_sharding = sharding.state_shardings(abstract_state, cfg, self.mesh)
        _check_state_fits(abstract_state, state_sharding, num_slots, prefix_rows, max_len)
        _check_finite(params)
        self.num_slots, self.max_len, self.vocab_size = num_slots, max_len, cfg.vocab_size
        self.prefix_rows = range(num_slots, self.num_rows)
        self.eos_ids = tuple(int(e) for e in eos_ids)
        # Before this engine's own state exists: "auto" may build (and drop) one engine per
        # pair of paths to time them, the kernel's ones sharing one packed copy of the weights.
        kernel_applies = _kernel_applies("matmul", matmul, cfg, self.mesh, on_cpu)
        matmuls = op_choice.candidates(matmul, kernel_applies,
                                       kernel_applies and _tiles_misfit(cfg) is None)
        if transformer.is_packed(params):  # packed by a kernel engine: only the kernel reads them
            matmuls = [m for m in matmuls if m != "xla"] or matmuls  # "xla" asked: refused below
        weights = {"xla": params, "kernel": params}  # the kernel's paths share one packed copy

        def candidate(a: str, m: str) -> DeviceExecutor:
            which = "xla" if m == "xla" else "kernel"
            built = DeviceExecutor(weights[which], cfg, num_slots, max_len, eos_ids,
                                   max_prefill_batch, mesh, a, batch_invariant, m, prefill_chunk)
            weights[which] = built.params
            return built

        identity = {"model": repr(cfg), "num_slots": num_slots, "max_len": max_len,
                    "batch_invariant": batch_invariant}
        self.op_choice = op_choice.choose(
            op_choice.candidates(attention, _kernel_applies("attention", attention, cfg, self.mesh, on_cpu)),
            matmuls, candidate, identity)
        weights.clear()  # the candidates' packed copy goes before this engine packs its own
        self.attention_kernel = self.op_choice.attention_kernel
        self.matmul_kernel = self.op_choice.matmul_kernel
        self.batch_invariant = batch_invariant
        # A CPU step costs by the rows it computes, so windows start at one row, and the kernel
        # (one program per width) affords finer ones. An accelerator's step costs about the same
        # up to dozens of rows and its one-row program is the slowest, so windows start at 8.
        self.buckets = Buckets.for_engine(
            num_slots, max_len, max_prefill_batch,
            fine_windows=self.attention_kernel, min_window=1 if on_cpu else 8,
            batch_invariant=batch_invariant, prefill_chunk=prefill_chunk,
            kernel_attention=self.attention_kernel,
        )
        if self.matmul_kernel:  # on its one device every packed weight is whole
            params = transformer.pack_weights(params, self.cfg, tiles=self.op_choice.matmul_tiles)
            params_sharding = jax.tree.map(lambda _: sharding.replicated(self.mesh), params)
        elif transformer.is_packed(params):
            raise ValueError("params: packed for the CPU matmul kernel, which this engine does not "
                             "run; pass the params as loaded")
        else:
            params_sharding = sharding.param_shardings(params, cfg, self.mesh)
        self.params = jax.tree.map(sharding.place, params, params_sharding)
        # The prompts' matmuls may take the AMX tiles where decode steps take the FMAs
        # (`op_choice.choose_prompt_matmul`): the same arrays, marked for the tiles.
        self.prompt_params, prompt_sharding = self.params, None
        if matmul == "auto" and self.op_choice.matmul == "cpu_kernel" and _tiles_misfit(
                cfg, float32=True) is None:
            self.op_choice = op_choice.choose_prompt_matmul(
                self.op_choice, self.params, transformer.prompt_tiles, identity)
            if self.op_choice.prompt_tiles:
                self.prompt_params = transformer.prompt_tiles(self.params)
                prompt_sharding = jax.tree.map(lambda _: sharding.replicated(self.mesh),
                                               self.prompt_params)
        self.state = jax.jit(empty, out_shardings=state_sharding)()
        if on_cpu:
            _back_with_huge_pages((self.params, self.state))
        self.verbs = step.Verbs(
            cfg, self.eos_ids, params_sharding, state_sharding, sharding.replicated(self.mesh),
            self.attention_kernel, step.CPU_COMPACT_PIECE_BYTES if on_cpu else None,
            prompt_sharding,
        )

    def _pad_slots(self, slots: Sequence[int], size: int) -> np.ndarray:
        """Slot ids padded with the out-of-range row, which every scatter drops."""
        out = np.full(size, self.num_rows, np.int32)
        out[: len(slots)] = slots
        return out

    def prefill(self, pieces: Sequence[PromptPiece]) -> Sampled:
        """Pieces whose lengths share a prompt-length bucket and whose ends share a kv_len
        bucket (the scheduler groups them so: a piece's shapes are its own, whoever it
        shares the call with). A slot's consecutive pieces may share a call, in order."""
        t = bucket(max(len(p.tokens) for p in pieces), self.buckets.prompt_lengths)
        b = bucket(len(pieces), self.buckets.prefill_batches(t))
        kv_len = self.buckets.prefill_kv_len(max(p.end for p in pieces))
        tokens = np.zeros((b, t), np.int32)
        starts, lengths = np.zeros(b, np.int32), np.ones(b, np.int32)
        finals, ignore_eos = np.zeros(b, bool), np.zeros(b, bool)
        max_new = np.ones(b, np.int32)
        for i, piece in enumerate(pieces):
            tokens[i, : len(piece.tokens)] = piece.tokens
            starts[i], lengths[i], finals[i] = piece.start, len(piece.tokens), piece.final
            max_new[i], ignore_eos[i] = piece.params.max_new_tokens, piece.params.ignore_eos
        return self._prefill(self._pad_slots([p.slot for p in pieces], b), tokens, starts,
                             lengths, finals, max_new, ignore_eos, [p.params for p in pieces],
                             kv_len)

    def _prefill(self, slots, tokens, starts, lengths, finals, max_new, ignore_eos,
                 params: Sequence[SamplingParams], kv_len: int) -> Sampled:
        sampling = SlotSampling.from_params(list(params), len(slots))
        self.state, first = self.verbs.prefill(
            self.prompt_params, self.state, slots, tokens, starts, lengths, finals, max_new,
            ignore_eos, sampling, kv_len)
        return first

    def decode(self, start: int, width: int, kv_len: int) -> Sampled:
        self.state, sampled = self.verbs.decode_step(
            self.params, self.state, np.int32(start), width, self.buckets.program_kv_len(kv_len)
        )
        return sampled

    # Move and release lists are padded to the capacity: one shape, one compile per kv_len.
    def compact(self, moves: Sequence[tuple[int, int]], kv_len: int) -> None:
        src = self._pad_slots([s for s, _ in moves], self.num_slots)
        dst = self._pad_slots([d for _, d in moves], self.num_slots)
        self.state = self.verbs.compact(self.state, src, dst, kv_len)

    def copy_prefix(self, copies: Sequence[tuple[int, int, Sequence[int]]]) -> None:
        """For each (src, dst, tokens): copy the first len(tokens) cache positions of row src
        to row dst (slots and prefix rows alike), and make dst's prompt marks those of
        `tokens`. The lengths share a kv_len bucket, which is what is copied: positions past
        an opening are never read."""
        n = self.num_slots
        kv_len = bucket(max((len(t) for _, _, t in copies), default=1), self.buckets.kv_lengths)
        tokens, lengths = np.zeros((n, kv_len), np.int32), np.zeros(n, np.int32)
        for i, (_, _, opening) in enumerate(copies):
            tokens[i, : len(opening)], lengths[i] = opening, len(opening)
        self.state = self.verbs.copy_prefix(
            self.state, self._pad_slots([s for s, _, _ in copies], n),
            self._pad_slots([d for _, d, _ in copies], n), tokens, lengths, kv_len)

    def release(self, slots: Sequence[int]) -> None:
        self.state = self.verbs.release(self.state, self._pad_slots(slots, self.num_slots))

    def read(self, handle):
        """A device array, or a pytree of them (a `Sampled`), on the host."""
        # Outputs are replicated: this process's copy is the whole array, even across hosts.
        return jax.tree.map(lambda array: np.asarray(array.addressable_data(0)), handle)

    def warmup(
        self,
        windows: Sequence[int] | None = None,
        kv_lengths: Sequence[int] | None = None,
        prompt_lengths: Sequence[int] | None = None,
    ) -> None:
        """Compile the buckets that hold the given sizes (all buckets by default) by running
        every verb on padding rows only, on an idle engine (a decode step would advance live
        slots). A size is rounded up to its bucket, the shape a request of that size will run
        with; a prompt length stands for the shapes of all its pieces."""
        if np.any(self.read(self.state.active)):
            raise RuntimeError("warmup: slots are decoding; warm up before submitting requests")
        b = self.buckets

        def buckets_of(sizes, all_sizes):
            return sorted({bucket(n, all_sizes) for n in sizes}) if sizes else all_sizes

        kv_lengths = buckets_of(kv_lengths, b.kv_lengths)
        for t, kv_len in sorted(b.prefill_shapes(prompt_lengths)):
            for size in b.prefill_batches(t):
                nothing = np.zeros(size, np.int32)
                self._prefill(self._pad_slots([], size), np.zeros((size, t), np.int32), nothing,
                              nothing + 1, nothing.astype(bool), nothing + 1,
                              nothing.astype(bool), [], kv_len)
        for width in buckets_of(windows, b.windows):
            for kv_len in kv_lengths:
                self.decode(0, width, kv_len)
        no_copies = self._pad_slots([], self.num_slots)
        for kv_len in kv_lengths:
            self.compact([], kv_len)
            if self.prefix_rows:
                self.state = self.verbs.copy_prefix(
                    self.state, no_copies, no_copies, np.zeros((self.num_slots, kv_len), np.int32),
                    np.zeros(self.num_slots, np.int32), kv_len)
        self.release([])
        jax.block_until_ready(self.state)
