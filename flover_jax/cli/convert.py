"""--mode=convert: a .gguf file or Hugging Face directory into an orbax checkpoint."""

from __future__ import annotations

import time

from flover_jax.cli.flags import FLAGS
from flover_jax.cli.interrupts import Interrupts


def convert_mode(interrupts: Interrupts) -> int:
    """A signal ends it at once; a save cut short is recognised and may be written over."""
    from flover_jax import checkpoint
    from flover_jax.loader import convert

    if not FLAGS.src or not FLAGS.dst:
        raise ValueError("convert: --src and --dst are required")
    checkpoint.check_writable(FLAGS.dst)  # before the minutes a large import takes
    start = time.perf_counter()
    cfg, params, tokenizer = convert(FLAGS.src, FLAGS.dtype, quantize=FLAGS.quantize)
    path = checkpoint.save(FLAGS.dst, cfg, params, tokenizer)
    print(f"converted {FLAGS.src} -> {path} in {time.perf_counter() - start:.1f} s")
    return 0
