"""The command line (`main.py`): one flag table, a module per mode, clean stops on signals.

  python main.py                                   # a Flover workload on the default model
  python main.py --mode=generate --prompt="Hi" --chat --max_new_tokens=32
  python main.py --mode=generate --prompts_file=in.jsonl --output=out.jsonl
  python main.py --mode=bench --workload=constant --num_requests=32 --output_json=r.json
  python main.py --mode=convert --src=model.gguf --dst=checkpoints/name
  python main.py --mode=serve --model=smollm2-135m --port=8000
"""

from __future__ import annotations

import sys
from pathlib import Path

from flover_jax.cli import common
from flover_jax.cli.bench import bench_mode
from flover_jax.cli.convert import convert_mode
from flover_jax.cli.flags import FLAGS, check_flags
from flover_jax.cli.generate import generate_mode
from flover_jax.cli.interrupts import Interrupts
from flover_jax.cli.run import run_mode
from flover_jax.cli.serve import serve_mode

MODES = {"run": run_mode, "generate": generate_mode, "bench": bench_mode, "convert": convert_mode,
         "serve": serve_mode}
REPO = Path(__file__).resolve().parents[2]


def main(argv: list[str]) -> int:
    interrupts = Interrupts()
    interrupts.install()
    import jax
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax narrates every file it opens at INFO
    # Compiled programs persist across runs (all of them: many take under the default 1 s).
    jax.config.update("jax_compilation_cache_dir", str(REPO / ".cache" / "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    try:
        check_flags(argv)
        if FLAGS.num_processes > 1:
            from flover_jax import distributed

            distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        return MODES[FLAGS.mode](interrupts)
    except common.Follower:
        return 0
    except (ValueError, OSError) as e:  # bad flags, files, models: say what, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        for engine in common.ENGINES:
            engine.close()
