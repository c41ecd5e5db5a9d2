"""Helpers the benchmark scripts share."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def live_state(executor, live: int, context: int):
    """The state with `live` active slots at `context` cached tokens, never finishing."""
    n = executor.num_slots
    return executor.state.replace(
        active=jnp.asarray(np.arange(n) < live), pos=jnp.full((n,), context, jnp.int32),
        remaining=jnp.full((n,), 1 << 30, jnp.int32),
    )
