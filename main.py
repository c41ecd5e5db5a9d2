"""flover_jax command line: run a workload live, generate from prompts, benchmark, convert.

  python main.py                                   # a Flover workload on the default model
  python main.py --mode=generate --prompt="Hi" --chat --max_new_tokens=32
  python main.py --mode=generate --prompts_file=in.jsonl --output=out.jsonl
  python main.py --mode=bench --workload=constant --num_requests=32 --output_json=r.json
  python main.py --mode=convert --src=model.gguf --dst=checkpoints/name

The flags are in flover_jax/cli/flags.py, each mode in its own module beside it.
"""

import os
import signal

# Until the command line's own handling is installed (flover_jax/cli/interrupts.py), a signal
# during the imports ends the process at once too: the same exit codes, no traceback.
for _signum, _code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
    signal.signal(_signum, lambda *_, code=_code: os._exit(code))

from absl import app

from flover_jax.cli import main

if __name__ == "__main__":
    app.run(main)
