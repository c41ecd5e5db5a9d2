"""Hand-written kernels for hot paths XLA's generic ops serve poorly, each with a pure-JAX twin.

`decode_attention` (XLA:CPU, float32): a decode step's attention that reads every slot's live
K/V in place and nothing else (decode_attention.cc says why). The C++ source is compiled once
per machine with the system's C++ compiler into a cache folder and registered as an XLA FFI
target; where no compiler is found, `cpu_kernel_available()` is False and the engine keeps the
pure-JAX attention (models/layers.attend), which is also the reference the tests hold it to.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

_SOURCE = Path(__file__).with_name("decode_attention.cc")
_TARGET = "flover_decode_attention"


def _cache_dir() -> Path:
    root = os.environ.get("FLOVER_KERNEL_CACHE") or Path.home() / ".cache" / "flover_jax" / "kernels"
    return Path(root)


def _cpu_signature() -> str:
    """What -march=native compiles for: the CPU's model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return "".join(next((line for line in info if line.startswith(field)), "")
                   for field in ("model name", "flags"))


def _compile() -> Path:
    """The shared library, compiled unless this source, jaxlib and CPU already have one."""
    import jaxlib

    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (set CXX, or install g++)")
    key = hashlib.sha256(
        _SOURCE.read_bytes() + jaxlib.__version__.encode() + _cpu_signature().encode()
    ).hexdigest()[:16]
    library = _cache_dir() / f"decode_attention-{key}.so"
    if library.is_file():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a private name and rename: concurrent processes never load a half-written file.
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        built = Path(scratch) / library.name
        command = [compiler, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC",
                   "-Wno-attributes", f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", str(built)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
        os.replace(built, library)
    return library


@functools.cache
def cpu_kernel_available() -> bool:
    """Whether the CPU decode-attention kernel is compiled and registered (once per process)."""
    try:
        library = ctypes.cdll.LoadLibrary(str(_compile()))
    except (RuntimeError, OSError) as error:
        logging.getLogger(__name__).warning(
            "CPU decode-attention kernel unavailable, using XLA's attention: %s", error)
        return False
    jax.ffi.register_ffi_target(
        _TARGET, jax.ffi.pycapsule(library.FloverDecodeAttention), platform="cpu")
    return True


def decode_attention(
    q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, start: jax.Array, lengths: jax.Array
) -> jax.Array:
    """q [w, kv_heads, group, e] (one token per slot of the window starting at `start`) over
    k_cache, v_cache [slots, kv_heads, max_len, e]; row i reads its slot's first lengths[i]
    positions (0: it reads nothing and gets zeros). Returns [w, kv_heads, group, e], float32."""
    if not cpu_kernel_available():
        raise RuntimeError("the CPU decode-attention kernel is not available (see the log)")
    call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    return call(q, k_cache, v_cache, jnp.asarray(start, jnp.int32).reshape(()),
                lengths.astype(jnp.int32))
