"""Tensor parallelism over a Mesh: logical axes on every array, one rules object to the mesh.

Every param and state array names its dims with logical axes (`heads`, `kv_heads`,
`mlp`, `vocab`, `slots`); `ShardingRules` maps them to mesh axes ("model" for
tensor parallelism). Megatron's split follows: q/k/v and MLP up/gate split by
columns (heads / features), the attention output and MLP down by rows, the LM
head by vocabulary, the KV cache by KV heads; XLA inserts the all-reduces. The
embedding table stays replicated (a token lookup, not a matmul). Where tp does
not divide the KV heads (or the vocabulary) those arrays are replicated instead.

The mesh is built before any compile, and a mesh that cannot work fails here
with a message naming the numbers.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from models.config import ModelConfig

MODEL, DATA = "model", "data"

# Logical axes of each param leaf, by the leaf's field name (models/layers.py, transformer.py).
PARAM_AXES: dict[str, tuple[str | None, ...]] = {
    "embed": (None, None),
    "pos_embed": (None, None),
    "lm_head": (None, "vocab"),
    "lm_head_bias": ("vocab",),
    "scale": (None,),
    "bias": (None,),
    "wq": (None, "heads", None),
    "wk": (None, "kv_heads", None),
    "wv": (None, "kv_heads", None),
    "wo": ("heads", None, None),
    "bq": ("heads", None),
    "bk": ("kv_heads", None),
    "bv": ("kv_heads", None),
    "bo": (None,),
    "w_in": (None, "mlp"),
    "w_gate": (None, "mlp"),
    "w_out": ("mlp", None),
    "b_in": ("mlp",),
    "b_out": (None,),
    "router": (None, None),
    "expert_gate": (None, "mlp"),  # each expert's; split like a dense MLP
    "expert_in": (None, "mlp"),
    "expert_out": ("mlp", None),
}

# Logical axes of each DecodeState leaf (flover_jax/state.py); sampling fields are per slot.
STATE_AXES: dict[str, tuple[str | None, ...]] = {
    "k": ("slots", "kv_heads", None, None),  # each layer's [slots, kv_heads, max_len, head_dim]
    "v": ("slots", "kv_heads", None, None),
    "seen": ("slots", None),
    "output_counts": ("slots", None),
}
PER_SLOT = ("slots",)


def make_mesh(tp: int = 1, devices: list | None = None) -> Mesh:
    """A (data=1, model=tp) mesh over the first tp devices (of every process)."""
    devices = jax.devices() if devices is None else devices
    if isinstance(tp, bool) or not isinstance(tp, (int, np.integer)) or tp < 1:
        raise ValueError(f"tp={tp!r}: must be an int >= 1")
    if tp > len(devices):
        raise ValueError(f"tp={tp}: more devices asked than exist ({len(devices)} available)")
    grid = np.asarray(devices[:tp]).reshape(1, tp)
    return Mesh(grid, (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto))


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis -> mesh axis (None = replicated)."""

    rules: dict[str, str | None]

    @classmethod
    def for_model(cls, cfg: ModelConfig, mesh: Mesh) -> ShardingRules:
        tp = mesh.shape[MODEL]
        if cfg.n_heads % tp:
            divisors = [d for d in range(1, cfg.n_heads + 1) if cfg.n_heads % d == 0]
            raise ValueError(
                f"tp={tp}: does not divide n_heads={cfg.n_heads}; allowed tp: {divisors}"
            )
        if cfg.d_ff % tp:
            raise ValueError(f"tp={tp}: does not divide the MLP width d_ff={cfg.d_ff}")
        for i, layer in enumerate(cfg.layers):
            if layer.moe is not None and layer.moe.d_ff % tp:
                raise ValueError(f"tp={tp}: does not divide layers[{i}]'s expert MLP width "
                                 f"moe.d_ff={layer.moe.d_ff}")
        return cls({
            "heads": MODEL,
            "kv_heads": MODEL if cfg.n_kv_heads % tp == 0 else None,  # else replicate KV heads
            "mlp": MODEL,
            "vocab": MODEL if cfg.vocab_size % tp == 0 else None,
            "slots": None,
        })

    def spec(self, axes: tuple[str | None, ...]) -> P:
        return P(*(self.rules.get(a) if a else None for a in axes))


def _leaf_name(path) -> str:
    """The innermost field name on the path (`.cache.k[3]` -> "k", `.layers[0].attn.wq` -> "wq")."""
    names = [getattr(p, "name", getattr(p, "key", None)) for p in path]
    return str(next(n for n in reversed(names) if n is not None))


def _param_axes(path, leaf) -> tuple[str | None, ...]:
    """A param's logical axes. A quantized weight's (layers.QuantizedWeight) int8 values split
    as the weight would; its scales [groups, *outputs] as the weight's outputs, every device
    holding every group."""
    name = _leaf_name(path)
    if name not in ("values", "scales"):
        return PARAM_AXES[name]
    axes = PARAM_AXES[_leaf_name(path[:-1])]
    return axes if name == "values" else (None, *axes[len(axes) - len(leaf.shape) + 1:])


def param_shardings(params, cfg: ModelConfig, mesh: Mesh):
    """A Params-shaped pytree of NamedShardings (params may be abstract)."""
    rules = ShardingRules.for_model(cfg, mesh)
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(mesh, rules.spec(_param_axes(path, leaf))), params
    )


def state_shardings(state, cfg: ModelConfig, mesh: Mesh):
    """A DecodeState-shaped pytree of NamedShardings (state may be abstract)."""
    rules = ShardingRules.for_model(cfg, mesh)
    return jax.tree_util.tree_map_with_path(
        lambda path, _: NamedSharding(mesh, rules.spec(STATE_AXES.get(_leaf_name(path), PER_SLOT))),
        state,
    )


def place(x, target: NamedSharding) -> jax.Array:
    """Put a param on its shards. Across processes, a local array goes through the host:
    every process holds the same values and sends only its own shards."""
    if isinstance(x, jax.Array) and x.is_fully_addressable and jax.process_count() > 1:
        x = np.asarray(x)
    return jax.device_put(x, target)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
