"""`auto` for the `attention` and `matmul` options: which op computes decode attention and the
weight matmuls (our CPU kernels, the matmul kernel on AMX tiles, or XLA's ops), chosen by
timing the candidates on the machine at hand, at the engine's own shapes, once per machine and
shape (the choice is cached beside the compiled kernels).

One path per op for every width: a request's rows then come out the same whatever runs beside
it, so fused stays equal to solo. The pick is the pair of paths whose worst width, against the
fastest pair at that width, is least slow.

Prompts may take a path of their own: a prefill call's rows are a prompt's tokens, computed the
same way whatever call they share, and many rows to a weight favour the AMX tiles, which
multiply float32 weights as bfloat16 parts (`models/kernels/packed_matmul.cc`). Where the matmul
kernel computes float32 weights on a CPU with the tiles, the prompts' matmuls are timed both
ways at the rows of a full prefill call and take the faster.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np

from flover_jax.buckets import bucket
from models import kernels, transformer

# "measure" (the default) times the candidates; "rule" takes the CPU kernels wherever they
# apply, without timing: for test suites and throwaway engines, which would spend more on
# timing every new shape than they save.
MODE_ENV = "FLOVER_AUTO_OPS"
MODES = ("measure", "rule")
REPEATS = 5  # timed decode steps per candidate and width (the median counts)
RECIPE = 7  # part of the cache key: a change to how the candidates are timed times them again
PROMPT_ROWS = 512  # rows of a full prefill call: 8 pieces of 64 tokens (the default chunk)


@dataclasses.dataclass(frozen=True)
class OpChoice:
    attention: str  # "cpu_kernel" or "xla"
    matmul: str  # "cpu_kernel", "amx" (the kernel on AMX tiles) or "xla"
    # "measured", "cached" (measured by an earlier run on this machine), "rule" (MODE_ENV) or
    # "asked" (one candidate: an explicit option, or a kernel that does not apply).
    how: str
    # "attention/matmul" -> decode width -> median step time in ms, when timed.
    step_ms: dict[str, dict[int, float]] = dataclasses.field(default_factory=dict)
    # The prompts' (prefill calls') matmuls: as `matmul`, or "amx" where they take the tiles
    # (`choose_prompt_matmul`); with their times in ms, when timed.
    prompt_matmul: str = ""
    prompt_ms: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def attention_kernel(self) -> bool:
        return self.attention == "cpu_kernel"

    @property
    def matmul_kernel(self) -> bool:
        return self.matmul in ("cpu_kernel", "amx")

    @property
    def matmul_tiles(self) -> bool:
        return self.matmul == "amx"

    @property
    def prompt_tiles(self) -> bool:
        return (self.prompt_matmul or self.matmul) == "amx"

    def summary(self) -> dict:
        """What the bench JSON and the run summary say of the choice."""
        return {"attention": self.attention, "matmul": self.matmul, "chosen_by": self.how,
                "step_ms": {pair: {str(w): round(ms, 3) for w, ms in by_width.items()}
                            for pair, by_width in self.step_ms.items()},
                "prompt_matmul": self.prompt_matmul or self.matmul,
                "prompt_ms": {path: round(ms, 3) for path, ms in self.prompt_ms.items()}}


def candidates(asked: str, applies: bool, tiles_apply: bool = False) -> list[str]:
    """The paths `asked` ("auto", "xla", "cpu_kernel" or, for matmuls, "amx") leaves, the
    kernel first; "amx" where `tiles_apply`."""
    if asked == "auto":
        return ["cpu_kernel", *(["amx"] if tiles_apply else []), "xla"] if applies else ["xla"]
    return [asked]


def pick(step_ms: dict[str, dict[int, float]]) -> str:
    """The pair whose slowest width, relative to the fastest pair at that width, is least
    slow (the first listed on a tie)."""
    widths = next(iter(step_ms.values())).keys()
    best = {w: min(by_width[w] for by_width in step_ms.values()) for w in widths}
    return min(step_ms, key=lambda pair: max(step_ms[pair][w] / best[w] for w in widths))


def cache_path(identity: dict) -> Path:
    """Where the choice for `identity` (machine, software, model and shapes) is kept."""
    key = hashlib.sha256(json.dumps({**identity, "recipe": RECIPE, "cpu": kernels.cpu_signature(),
                                     "jax": jax.__version__, "kernels": kernels.source_digest()},
                                    sort_keys=True).encode()).hexdigest()[:16]
    return kernels.cache_dir() / "op_choice" / f"{key}.json"


def choose(
    attention: Sequence[str],
    matmul: Sequence[str],
    build: Callable[[str, str], object],
    identity: dict,
) -> OpChoice:
    """One attention and one matmul path from the candidates. `build(attention, matmul)` makes
    a DeviceExecutor with those paths, to time; `identity` names the model and shapes."""
    if len(attention) * len(matmul) == 1:
        return OpChoice(attention[0], matmul[0], "asked")
    mode = os.environ.get(MODE_ENV, "measure")
    if mode not in MODES:
        raise ValueError(f"{MODE_ENV}={mode!r}: must be one of {MODES}")
    if mode == "rule":
        return OpChoice(attention[0], matmul[0], "rule")
    path = cache_path(identity)
    try:
        cached = json.loads(path.read_text())
        return OpChoice(cached["attention"], cached["matmul"], "cached",
                        {pair: {int(w): ms for w, ms in by_width.items()}
                         for pair, by_width in cached["step_ms"].items()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # none yet, or unreadable: measure (again)
    executors = {}
    for a in attention:
        for m in matmul:
            executors[f"{a}/{m}"] = executor = build(a, m)
            if len(executors) > 1:  # the pairs take turns on the first one's state
                executor.state = None
    step_ms = decode_step_ms(executors)
    del executors
    gc.collect()
    a, m = pick(step_ms).split("/")
    choice = OpChoice(a, m, "measured", step_ms)
    _keep(path, {"attention": a, "matmul": m, "step_ms": step_ms, "identity": identity})
    return choice


def _keep(path: Path, record: dict) -> None:
    """Writes a measured choice's record to `path` whole: concurrent starts never read half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_suffix(f".{os.getpid()}.tmp")
    scratch.write_text(json.dumps(record, indent=1))
    os.replace(scratch, path)


def choose_prompt_matmul(choice: OpChoice, params, tiled: Callable[[object], object],
                         identity: dict) -> OpChoice:
    """`choice` with the prompts' matmul path: "cpu_kernel" (the FMAs, as decode steps) or
    "amx" (float32 weights on the tiles as bfloat16 parts), whichever computes the layers'
    matmuls of a full prefill call (PROMPT_ROWS rows) faster here; `params`: packed for the
    kernel, `tiled(params)`: the same marked for the tiles. Cached as `choose`'s is; MODE_ENV's
    "rule" takes the tiles."""
    mode = os.environ.get(MODE_ENV, "measure")
    if mode == "rule":
        return dataclasses.replace(choice, prompt_matmul="amx")
    path = cache_path({**identity, "prompt_rows": PROMPT_ROWS})
    try:
        prompt_ms = {str(p): float(ms) for p, ms in json.loads(path.read_text())["prompt_ms"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        prompt_ms = prompt_matmul_ms({"cpu_kernel": params, "amx": tiled(params)})
        _keep(path, {"prompt_ms": prompt_ms, "identity": identity})
    return dataclasses.replace(choice, prompt_matmul=min(prompt_ms, key=prompt_ms.get),
                               prompt_ms=prompt_ms)


def prompt_matmul_ms(candidates: dict[str, object], repeats: int = REPEATS) -> dict[str, float]:
    """Median ms of every layer's matmuls (`models.transformer.layer_matmuls`) at PROMPT_ROWS
    rows, for each candidate's params, taking turns."""
    timed = jax.jit(transformer.layer_matmuls, static_argnums=1)
    programs = {name: timed.lower(params, PROMPT_ROWS).compile() for name, params in candidates.items()}
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats + 1):
        for name, program in programs.items():
            start = time.perf_counter()
            jax.block_until_ready(program(candidates[name]))
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t[1:])) * 1e3 for name, t in times.items()}  # the first warms


def timing_widths(num_slots: int, windows: Sequence[int]) -> list[int]:
    """The decode programs of one request alone and of every slot full: the widths where the
    candidates part most (each width timed costs a compile per candidate)."""
    return sorted({bucket(w, windows) for w in (1, num_slots)})


def decode_step_ms(executors: dict[str, object], widths: Sequence[int] | None = None,
                   context: int | None = None, repeats: int = REPEATS) -> dict[str, dict[int, float]]:
    """Median of `repeats` decode-step times of each executor per width (by default the timing
    widths), every row of the window live at `context` cached tokens (by default a quarter of
    max_len, at most 256), as a busy engine's would be. The executors run on the first one's state and
    take turns, so a spell of load from elsewhere on a shared machine slows them all alike;
    each timed step follows one of its own executor's from the same context, as in serving
    (a step right after one of XLA's bfloat16 steps measured 1.7-2x its time:
    benchmarks/NOTES.md), and the order of turns is shuffled every round (seeded), so what
    one executor leaves behind falls on a different one each round and the median sees past
    it."""
    first = next(iter(executors.values()))
    max_len, state = first.max_len, first.state
    if context is None:
        context = max(1, min(256, max_len // 4, max_len - 5))
    kv_len = bucket(context + 3, first.buckets.kv_lengths)

    def step_s(executor, width: int) -> float:
        nonlocal state
        executor.state, state = state, None
        start = time.perf_counter()
        jax.block_until_ready(executor.decode(0, width, kv_len))
        elapsed = time.perf_counter() - start
        state, executor.state = executor.state, None
        return elapsed

    times: dict[str, dict[int, list[float]]] = {pair: {} for pair in executors}
    for width in widths or timing_widths(first.num_slots, first.buckets.windows):
        for executor in executors.values():  # each program compiles
            state = state.busy(width, context)
            step_s(executor, width)
        turns, rng = list(executors.items()), np.random.default_rng(width)
        for _ in range(repeats):
            for i in rng.permutation(len(turns)):
                pair, executor = turns[i]
                state = state.busy(width, context)
                step_s(executor, width)  # pays for what the executor before left behind
                times[pair].setdefault(width, []).append(step_s(executor, width))
    first.state = state  # back where it was found
    return {pair: {w: float(np.median(runs)) * 1e3 for w, runs in by_width.items()}
            for pair, by_width in times.items()}
