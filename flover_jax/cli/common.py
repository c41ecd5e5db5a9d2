"""What the modes share: the engine the flags describe, and one request line's parsing."""

from __future__ import annotations

import sys

from flover_jax.cli.flags import FLAGS
from flover_jax.files import Line


class Follower(Exception):
    """Raised on processes other than 0 once they have replayed process 0's run."""


ENGINES = []  # built by `engine()`, closed by `main` whatever happens


def engine():
    """The engine every mode uses. In a multi-process run, processes other than 0 follow
    process 0's device calls here and then leave the mode."""
    import jax

    from flover_jax.engine import Engine

    built = Engine.from_pretrained(
        FLAGS.model, dtype=FLAGS.dtype, quantize=FLAGS.quantize, max_slots=FLAGS.max_slots,
        max_len=FLAGS.max_len, policy=FLAGS.policy, tp=FLAGS.tp, attention=FLAGS.attention,
        matmul=FLAGS.matmul,
        batch_invariant=FLAGS.batch_invariant, prefill_chunk=FLAGS.prefill_chunk,
        prefill_budget=FLAGS.prefill_budget,
        prefix_cache_rows=FLAGS.prefix_cache_rows if FLAGS.prefix_cache else 0,
    )
    if jax.process_index() > 0:
        built.follow()
        raise Follower
    choice = built.executor.op_choice
    if choice.how in ("measured", "cached"):
        print(f"ops: attention={choice.attention}, matmul={choice.matmul} (timed on this machine"
              f"{', earlier' if choice.how == 'cached' else ''})", file=sys.stderr, flush=True)
    ENGINES.append(built)
    return built


def follow_unless_process_0() -> None:
    """Processes other than 0 replay process 0's device calls and leave the mode: the
    inputs and outputs are process 0's alone."""
    import jax

    if jax.process_index() > 0:
        engine()


def parse_line(line: Line, defaults, extra=()):
    """(prompt, SamplingParams, the `extra` keys) of one prompts-file line (see
    workload.parse_request), or raise ValueError naming the line."""
    from flover_jax.workload import parse_request

    try:
        if line.error:
            raise ValueError(line.error)
        return parse_request(line.value, defaults, extra)
    except ValueError as e:
        raise ValueError(f"line {line.number}: {e}") from None
