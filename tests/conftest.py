"""Shared fixtures. Tests run on CPU in float32; sharding tests fake 8 CPU devices."""

import os

# The suite compiles far more than it runs, and XLA's LLVM backend at -O0 compiles about a third
# faster (benchmarks/NOTES.md). The same properties hold at the default level, which is what
# users run: test_optimized_build.py checks fused equals solo there, in a process of its own.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                                   "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The CPU attention kernel compiles into the checkout, not the home folder (models/kernels).
os.environ.setdefault(
    "FLOVER_KERNEL_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache", "kernels")
)

# `auto` ops by the rule (kernels where they apply), not timed for every engine shape the tests
# build; tests/test_op_choice.py times them.
os.environ.setdefault("FLOVER_AUTO_OPS", "rule")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)
# Many tests build engines of the same shapes, each with jitted functions of its own: programs
# compiled once are read back from this cache instead (as main.py's runs do from .cache/jax).
jax.config.update("jax_compilation_cache_dir",
                  os.path.join(os.path.dirname(__file__), "..", ".cache", "jax-tests"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

import contextlib  # noqa: E402

import pytest  # noqa: E402
from jax import monitoring  # noqa: E402

_BACKEND_COMPILES: list[str] = []
monitoring.register_event_duration_secs_listener(
    lambda name, *_args, **_kwargs: _BACKEND_COMPILES.append(name)
    if name == "/jax/core/compile/backend_compile_duration" else None
)
# A program read back from the compilation cache was not compiled in this process, but it was
# still a new program for the engine asking: `compiles` counts it too.
monitoring.register_event_listener(
    lambda name, *_args, **_kwargs: _BACKEND_COMPILES.append(name)
    if name == "/jax/compilation_cache/cache_hits" else None
)


@pytest.fixture
def compiles():
    """`with compiles() as n: ...` then `n()` is the number of XLA compiles (or programs read
    from the compilation cache) inside the block."""

    @contextlib.contextmanager
    def counting():
        start = len(_BACKEND_COMPILES)
        end = []
        yield lambda: (end[0] if end else len(_BACKEND_COMPILES)) - start
        end.append(len(_BACKEND_COMPILES))

    return counting
