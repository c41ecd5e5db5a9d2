"""orbax-checkpoint save / restore of a model: params, config and tokenizer in one directory.

Layout of a checkpoint directory:
  .flover_checkpoint  written first: the directory is a checkpoint's, complete or not
  config.json     ModelConfig fields plus a format version, written last
  params/         orbax PyTree checkpoint of `models.transformer.Params`
  tokenizer.json  and tokenizer_config.json, when the model has a tokenizer
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from flover_jax.convert.tensors import CheckpointError
from flover_jax.tokenizer import Tokenizer
from models.config import ModelConfig
from models.transformer import Params, init_params

# 2: layers carry their own specs (ModelConfig.layers) instead of model-wide switches.
FORMAT_VERSION = 2
MARKER = ".flover_checkpoint"


def is_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a flover_jax checkpoint (its config.json, written last, says so)."""
    return _config_fields(Path(path) / "config.json").get("format_version") is not None


def is_current(path: str | Path) -> bool:
    """Whether `path` is a checkpoint of the format this code reads."""
    return _config_fields(Path(path) / "config.json").get("format_version") == FORMAT_VERSION


def _config_fields(path: Path) -> dict:
    """A config.json's fields; {} when it is missing or not a JSON object."""
    try:
        fields = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return fields if isinstance(fields, dict) else {}


def save(
    directory: str | Path, cfg: ModelConfig, params: Params, tokenizer: Tokenizer | None = None
) -> Path:
    """Write a checkpoint (replacing one already at `directory`, and nothing else)."""
    directory = Path(directory).absolute()
    check_writable(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MARKER).write_text("written by flover_jax.checkpoint.save\n")
    # An older checkpoint's marker and tokenizer go first: an interrupted save must not look
    # complete, and a save without a tokenizer must not restore the old one.
    for name in ("config.json", *Tokenizer.FILES):
        (directory / name).unlink(missing_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / "params", _stored(cfg, params), force=True)
    if tokenizer is not None:
        tokenizer.save(directory)
    # config.json last: its presence marks a complete checkpoint.
    config = {"format_version": FORMAT_VERSION, **cfg.to_dict()}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def check_writable(directory: str | Path) -> None:
    """Refuse, before any work, a directory a save may not write into: one that holds anything
    but a checkpoint (a complete one, or one whose save was cut short)."""
    directory = Path(directory).absolute()
    if not _replaceable(directory):
        raise CheckpointError(f"{directory}: exists and is not a flover_jax checkpoint; give a "
                              "new or empty directory (nothing was written)")


def _replaceable(directory: Path) -> bool:
    if not directory.exists():
        return True
    if not directory.is_dir():
        return False
    entries = list(directory.iterdir())
    if not entries or (directory / MARKER).is_file():
        return True
    # A complete checkpoint saved before the marker existed: its own files only.
    return is_checkpoint(directory) and all(
        entry.name == "config.json" or entry.name in Tokenizer.FILES
        or entry.name.startswith("params") for entry in entries)


def load_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / "config.json"
    try:
        fields = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    version = fields.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version={version}, this code reads {FORMAT_VERSION}")
    try:
        return ModelConfig.from_dict(fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def _head_derived(cfg: ModelConfig) -> bool:
    """Whether the LM head is the embedding transposed, so not stored (a quantized one is)."""
    return cfg.tie_embeddings and cfg.quantize is None


def _stored(cfg: ModelConfig, params: Params) -> Params:
    """What goes to disk: all but a derived LM head."""
    return dataclasses.replace(params, lm_head=None) if _head_derived(cfg) else params


def abstract_params(cfg: ModelConfig, shardings=None) -> Params:
    """Shapes and dtypes (and, optionally, target shardings) of `cfg`'s params, no memory."""
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    if shardings is None:
        return shapes
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )


def restore(directory: str | Path, shardings=None) -> tuple[ModelConfig, Params, Tokenizer | None]:
    """Read a checkpoint; with `shardings` (a Params-shaped pytree) each array lands sharded."""
    directory = Path(directory).absolute()
    cfg = load_config(directory)
    if not (directory / "params").is_dir():
        raise CheckpointError(f"{directory / 'params'}: missing; the checkpoint is incomplete")
    target = _stored(cfg, abstract_params(cfg, shardings))
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            params = checkpointer.restore(directory / "params", target)
    except Exception as e:  # orbax's message goes on for pages of storage specs: its gist
        gist = (str(e).strip().splitlines() or [type(e).__name__])[0]
        gist = gist.split(" See full TensorStore details")[0]
        raise CheckpointError(f"{directory / 'params'}: cannot restore ({gist}); the "
                              "checkpoint is damaged") from None
    if _head_derived(cfg):
        params = dataclasses.replace(params, lm_head=params.embed.T)
    tokenizer = Tokenizer.from_file(directory) if (directory / "tokenizer.json").exists() else None
    return cfg, params, tokenizer

