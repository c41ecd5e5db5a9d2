"""Hand-written kernels for hot paths XLA's generic ops serve poorly, each with a pure-JAX twin.

Both run on XLA:CPU and compute in float32, reading float32 or narrower stored values:
- `cached_attention`: attention of query tokens over their slots' cached K/V (a decode step's
  and a prompt piece's), reading each row's live positions in place and nothing else
  (cached_attention.cc says why); its twin is models/layers.attend. `write_cache` puts the
  new tokens' K/V rows into the caches in place; its twin is a dropping scatter.
- `packed_matmul`: x @ W for a weight packed once into column panels (`pack`), which streams
  the weight and computes at once where XLA's dot does one after the other (packed_matmul.cc
  says why); its twin is the plain matmul in models/layers.dense. The panels may hold
  bfloat16 or int8 weights (with a scale per output column and group of 64 inputs),
  widened as they stream; bfloat16 ones may instead be multiplied on AMX tiles (x rounded to
  bfloat16), where the CPU has them.
The C++ sources are compiled once per machine with the system's C++ compiler into a cache
folder and registered as XLA FFI targets; where no compiler is found, `cpu_kernel_available()`
is False and the engine keeps XLA's ops, which are also the references the tests hold them to.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import logging
import math
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

_SOURCES = tuple(Path(__file__).with_name(name)
                 for name in ("cached_attention.cc", "packed_matmul.cc", "rms_norm.cc"))
_HEADERS = tuple(Path(__file__).with_name(name) for name in ("parallel_for.h", "prefetch.h", "vectors.h"))
_ATTENTION_TARGET = "flover_cached_attention"
_MATMUL_TARGET = "flover_packed_matmul"
_ARGMAX_TARGET = "flover_packed_argmax"
_NORM_TARGET = "flover_rms_norm"
_WRITE_TARGET = "flover_cache_write"
PANEL = 48  # columns per panel, as in packed_matmul.cc
GROUP = 64  # inputs per int8 scale, as in packed_matmul.cc
PAIR_BLOCK = 32  # bfloat16 panels' inputs are padded to a multiple of this, as in packed_matmul.cc


def cache_dir() -> Path:
    """Where the compiled kernels (and what `auto` measured of them) are kept."""
    root = os.environ.get("FLOVER_KERNEL_CACHE") or Path.home() / ".cache" / "flover_jax" / "kernels"
    return Path(root)


def cpu_signature() -> str:
    """What -march=native compiles for: the architecture and the CPU's model and features
    (x86 names them `model name` and `flags`, ARM `CPU implementer`, `CPU part`, `Features`)."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    fields = ("model name", "flags", "CPU implementer", "CPU part", "Features")
    return platform.machine() + "".join(
        next((line for line in info if line.startswith(field)), "") for field in fields)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def source_digest() -> str:
    """The kernels' sources, as one digest."""
    return hashlib.sha256(b"".join(source.read_bytes() for source in (*_SOURCES, *_HEADERS))).hexdigest()


def _compile() -> Path:
    """The shared library, compiled unless this source, compiler command, jaxlib and CPU
    already have one whose bytes match the digest written beside it."""
    import jaxlib

    compiler = shlex.split(os.environ.get("CXX", "")) or [
        found for found in (shutil.which("c++") or shutil.which("g++"),) if found]
    if not compiler:
        raise RuntimeError("no C++ compiler (set CXX, or install g++)")
    # The key leaves out paths (the checkout's, jaxlib's headers'), so checkouts share a build.
    options = [*compiler, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-Wno-attributes"]
    key = hashlib.sha256(
        (source_digest() + " ".join(options) + jaxlib.__version__ + cpu_signature()).encode()
    ).hexdigest()[:16]
    library = cache_dir() / f"flover_kernels-{key}.so"
    digest = library.with_suffix(".sha256")
    # A library cut short (a crash mid-copy) can pass dlopen's checks and then kill the process
    # on first use, so only a library whose bytes match its digest is loaded; others are rebuilt.
    if library.is_file() and digest.is_file() and digest.read_text() == _digest(library):
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    # Build under private names and rename: concurrent processes never load a half-written file.
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        built, built_digest = Path(scratch) / library.name, Path(scratch) / digest.name
        command = [*options, f"-I{jax.ffi.include_dir()}", *map(str, _SOURCES), "-o", str(built)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
        with open(built, "rb") as f:
            os.fsync(f.fileno())
        built_digest.write_text(_digest(built))
        os.replace(built, library)
        os.replace(built_digest, digest)
    return library


@functools.cache
def cpu_kernel_available() -> bool:
    """Whether the CPU kernels are compiled and registered (once per process)."""
    try:
        library = ctypes.cdll.LoadLibrary(str(_compile()))
    except (RuntimeError, OSError) as error:
        logging.getLogger(__name__).warning("CPU kernels unavailable, using XLA's ops: %s", error)
        return False
    for target, symbol in ((_ATTENTION_TARGET, library.FloverCachedAttention),
                           (_MATMUL_TARGET, library.FloverPackedMatmul),
                           (_ARGMAX_TARGET, library.FloverPackedArgmax),
                           (_NORM_TARGET, library.FloverRmsNorm),
                           (_WRITE_TARGET, library.FloverCacheWrite)):
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(symbol), platform="cpu")
    global _tiles
    _tiles = bool(library.FloverTilesAvailable())
    return True


_tiles = False


def tiles_available() -> bool:
    """Whether `packed_matmul` can multiply on AMX tiles here (the CPU has them and Linux
    granted this process their use)."""
    return cpu_kernel_available() and _tiles


def cached_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    slots: jax.Array,
    lengths: jax.Array,
    firsts: jax.Array | None = None,
    scale: float | None = None,
) -> jax.Array:
    """q [w, kv_heads, group, e] (each row one query token: a decode step's token of a slot,
    or one token of a prompt piece) over k_cache, v_cache [slots, kv_heads, max_len, e]
    (float32, or bfloat16 or its bits as uint16); row i reads slot slots[i]'s positions
    [firsts[i], lengths[i]) (firsts: 0 when None; a sliding window starts later; an empty range
    reads nothing and gets zeros), scores scaled by `scale` (None: e ** -0.5).
    Returns [w, kv_heads, group, e], float32."""
    if not cpu_kernel_available():
        raise RuntimeError("the CPU attention kernel is not available (see the log)")
    lengths = lengths.astype(jnp.int32)
    firsts = jnp.zeros_like(lengths) if firsts is None else firsts.astype(jnp.int32)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    call = jax.ffi.ffi_call(_ATTENTION_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    return call(q.astype(jnp.float32), k_cache, v_cache, jnp.asarray(slots, jnp.int32), lengths,
                firsts, scale=np.float32(scale))


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """scale * x / sqrt(mean(x^2) + eps) over x's last dim, float32 [...] (x is taken as
    float32; scale [d], float32 or bfloat16): the RMSNorm of `layers.norm`, each row's sum in
    a fixed order, without XLA:CPU's slow row reduction."""
    if not cpu_kernel_available():
        raise RuntimeError("the CPU RMSNorm kernel is not available (see the log)")
    call = jax.ffi.ffi_call(_NORM_TARGET, jax.ShapeDtypeStruct(x.shape, jnp.float32))
    return call(x.astype(jnp.float32), scale, eps=np.float32(eps))


def write_cache(k_cache: jax.Array, v_cache: jax.Array, slots: jax.Array, positions: jax.Array,
                k_rows: jax.Array, v_rows: jax.Array) -> tuple[jax.Array, jax.Array]:
    """k_rows, v_rows [n, kv_heads, e] into k_cache, v_cache [slots, kv_heads, max_len, e] (of
    their dtype) in place: row i at slot slots[i], position positions[i]; rows whose slot or
    position is out of range write nothing (negative ones count from the end), as with
    `.at[].set(mode="drop")`, this kernel's twin. Returns the written caches: they alias the
    inputs, so XLA copies a cache first only where the old one is read after the write."""
    if not cpu_kernel_available():
        raise RuntimeError("the CPU cache-write kernel is not available (see the log)")
    call = jax.ffi.ffi_call(_WRITE_TARGET, (jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                                            jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)),
                            input_output_aliases={0: 0, 1: 1})
    return call(k_cache, v_cache, jnp.asarray(slots, jnp.int32), jnp.asarray(positions, jnp.int32),
                k_rows, v_rows)


PANEL_DTYPES = (jnp.float32, jnp.bfloat16, jnp.int8)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["panels", "scales"],
                   meta_fields=["shape", "in_dims", "tiles", "parts", "gated"])
@dataclasses.dataclass(frozen=True)
class PackedWeight:
    """A weight of `shape` (its first `in_dims` dims are the inputs) as column panels
    [ceil(n / 48), k, 48] for `packed_matmul`, k and n being the inputs' and outputs' sizes;
    columns past n are zeros. bfloat16 panels hold the inputs in pairs, [ceil(n / 48),
    ceil(k / 32) * 16, 96] (inputs 2i and 2i + 1 of a column side by side, zeros past k): the
    layout AMX tiles read. int8 panels come with `scales` [ceil(n / 48), ceil(k / 64), 48],
    one per column and group of 64 inputs (the weight is panels * scales); other panels with
    None (not an empty array: a step dispatches every array it takes, some 120 of them would
    be empty). `tiles`: panels multiplied on AMX tiles (`packed_matmul`): bfloat16 ones as they
    are, float32 ones as three bfloat16 parts each, x too (six products: float32's precision,
    worth it where many rows share a weight, `models.transformer.prompt_tiles`).
    `parts`: for weights packed side by side (`pack_side_by_side`), each one's output shape.
    `gated`: a gated MLP's gate and up weights, each 48 columns of the one then of the other
    (`pack_gated`), so that `packed_matmul` gives silu(x @ gate) * (x @ up) of `shape`."""

    panels: jax.Array  # float32, bfloat16 or int8
    scales: jax.Array | None  # float32
    shape: tuple[int, ...]
    in_dims: int
    tiles: bool = False
    parts: tuple[tuple[int, ...], ...] = ()
    gated: bool = False


def pack(w: jax.Array, in_dims: int = 1, scales: jax.Array | None = None,
         tiles: bool = False) -> PackedWeight:
    """Lay a weight [*inputs, *outputs] out as column panels (once, at load time): float32 or
    bfloat16 as it is, or int8 with `scales` [ceil(k / 64), *outputs] (`layers.quantize`).
    `tiles`: a bfloat16 weight to multiply on AMX tiles."""
    if w.dtype not in PANEL_DTYPES or (w.dtype == jnp.int8) != (scales is not None):
        raise ValueError(f"pack: a {w.dtype} weight with{'out' if scales is None else ''} scales; "
                         "panels are float32 or bfloat16, or int8 with scales")
    if tiles and w.dtype != jnp.bfloat16:
        raise ValueError(f"pack: tiles=True for a {w.dtype} weight; AMX tiles multiply bfloat16 ones")
    k, n = math.prod(w.shape[:in_dims]), math.prod(w.shape[in_dims:])
    panels = -(-n // PANEL)
    if w.dtype == jnp.bfloat16:  # inputs in pairs, side by side: [p, k_pad / 2, 2 * PANEL]
        k_pad = -(-k // PAIR_BLOCK) * PAIR_BLOCK
        flat = jnp.pad(w.reshape(k, n), ((0, k_pad - k), (0, panels * PANEL - n)))
        pairs = flat.reshape(k_pad // 2, 2, panels, PANEL).transpose(2, 0, 3, 1)
        return PackedWeight(pairs.reshape(panels, k_pad // 2, 2 * PANEL), None,
                            tuple(w.shape), in_dims, tiles)
    flat = jnp.pad(w.reshape(k, n), ((0, 0), (0, panels * PANEL - n)))
    if scales is None:
        panel_scales = None
    else:
        groups = -(-k // GROUP)
        padded = jnp.pad(scales.reshape(groups, n).astype(jnp.float32), ((0, 0), (0, panels * PANEL - n)))
        panel_scales = padded.reshape(groups, panels, PANEL).transpose(1, 0, 2)
    return PackedWeight(flat.reshape(k, panels, PANEL).transpose(1, 0, 2), panel_scales,
                        tuple(w.shape), in_dims)


def pack_side_by_side(ws: Sequence[jax.Array], scales: Sequence[jax.Array] | None = None) -> PackedWeight:
    """Weights [k, *outputs] that multiply the same x (a layer's q, k and v projections; a gated
    MLP's gate and up) as one packed weight, their outputs side by side (`packed_matmul_parts`
    splits them again): one kernel call instead of several. At decode shapes a call costs more
    than its panels (its first panels are not prefetched, its threads start and finish unevenly),
    and a column's sum is the same whatever panel it lands in, so only the call count changes.
    int8 weights come with their `scales` [ceil(k / 64), *outputs] (`pack`)."""
    k = ws[0].shape[0]
    flat = jnp.concatenate([w.reshape(k, -1) for w in ws], axis=1)
    flat_scales = None if scales is None else jnp.concatenate(
        [s.reshape(s.shape[0], -1) for s in scales], axis=1)
    return dataclasses.replace(pack(flat, 1, flat_scales),
                               parts=tuple(tuple(w.shape[1:]) for w in ws))


def pack_gated(ws: Sequence[jax.Array], scales: Sequence[jax.Array] | None = None) -> PackedWeight:
    """A gated MLP's gate and up weights (`ws`, each [k, f]) packed pair by pair, 48 columns of
    the gate then the same columns of up: `packed_matmul` gives silu(x @ gate) * (x @ up)
    [..., f] in one call, the activation applied as each pair's sums are written (else XLA
    writes both products, reads them back and splits them: ops of their own every layer).
    int8 weights come with their `scales` (`pack`)."""
    gate, up = (pack(w, 1, None if scales is None else s)
                for w, s in zip(ws, scales or (None, None)))

    def pairs(a: jax.Array | None, b: jax.Array | None) -> jax.Array | None:
        return None if a is None else jnp.stack([a, b], axis=1).reshape(-1, *a.shape[1:])

    return dataclasses.replace(gate, panels=pairs(gate.panels, up.panels),
                               scales=pairs(gate.scales, up.scales), gated=True)


def _kernel_operands(x: jax.Array, w: PackedWeight) -> tuple[int, int, tuple, bool]:
    """The rows and outputs (n) of x @ w, the kernel's operands (x as float32 [rows, k], the
    panels, the scales) and whether it multiplies on AMX tiles (panels packed for them, where
    this process has them; the kernel splits x into bfloat16 parts then)."""
    if not cpu_kernel_available():
        raise RuntimeError("the CPU matmul kernel is not available (see the log)")
    lead = x.shape[: x.ndim - w.in_dims]
    rows, k, n = math.prod(lead), math.prod(w.shape[: w.in_dims]), math.prod(w.shape[w.in_dims :])
    scales = np.zeros(0, np.float32) if w.scales is None else w.scales  # a constant: the kernel's [0]
    operands = (x.reshape(rows, k).astype(jnp.float32), w.panels, scales)
    return rows, n, operands, w.tiles and tiles_available()


def packed_matmul(x: jax.Array, w: PackedWeight) -> jax.Array:
    """x [..., *inputs] @ w -> [..., *outputs], float32 (x is taken as float32); for `gated`
    panels silu(x @ gate) * (x @ up). Panels packed with `tiles` are multiplied on AMX tiles
    where this process has them (x split into two bfloat16 parts for bfloat16 panels, into three
    for float32 ones: packed_matmul.cc says why), on the FMAs elsewhere."""
    rows, n, operands, tiles = _kernel_operands(x, w)
    call = jax.ffi.ffi_call(_MATMUL_TARGET, jax.ShapeDtypeStruct((rows, n), jnp.float32))
    y = call(*operands, gated=w.gated, tiles=tiles)
    return y.reshape(*x.shape[: x.ndim - w.in_dims], *w.shape[w.in_dims :])


def packed_argmax(x: jax.Array, w: PackedWeight) -> jax.Array:
    """jnp.argmax(packed_matmul(x, w), axis=-1) for x [..., *inputs] (the first index of each
    row's largest output, of the first NaN if any): int32 [...], the outputs never written out
    (a greedy step's LM head: [rows, vocab] floats it would write and read back)."""
    if w.gated:
        raise ValueError("packed_argmax: gated panels; it takes a plain weight (an LM head)")
    rows, n, operands, tiles = _kernel_operands(x, w)
    call = jax.ffi.ffi_call(_ARGMAX_TARGET, jax.ShapeDtypeStruct((rows,), jnp.int32))
    return call(*operands, tiles=tiles, n=np.int64(n)).reshape(x.shape[: x.ndim - w.in_dims])


def packed_matmul_parts(x: jax.Array, w: PackedWeight) -> list[jax.Array]:
    """x [..., k] @ each of the weights packed side by side in `w` (`pack_side_by_side`):
    [..., *part] for each part, float32."""
    y = packed_matmul(x, w)
    lead = y.shape[:-1]
    ends = np.cumsum([math.prod(part) for part in w.parts])
    return [piece.reshape(*lead, *part)
            for piece, part in zip(jnp.split(y, ends[:-1], axis=-1), w.parts)]
