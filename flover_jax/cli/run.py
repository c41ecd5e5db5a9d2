"""--mode=run, the main job: chat requests arriving over a few seconds, shown live, then a summary."""

from __future__ import annotations

import sys

from flover_jax.cli import common
from flover_jax.cli.flags import FLAGS
from flover_jax.cli.interrupts import Interrupts


def run_mode(interrupts: Interrupts) -> int:
    from rich.console import Console
    from rich.text import Text

    from flover_jax import metrics, viz, workload

    console = Console()
    with console.status(f"loading {FLAGS.model}"):
        engine = common.engine()
    if engine.tokenizer is None:
        raise ValueError(f"model={FLAGS.model!r}: run mode sends chat prompts and this model has "
                         "no tokenizer (bench and generate take token ids)")
    requests = workload.demo(engine.chat_prompt, FLAGS.num_requests, FLAGS.rate, FLAGS.seed)
    with console.status("compiling the decode buckets (cached in .cache/jax after the first run)"):
        engine.executor.warmup(kv_lengths=[k for k in engine.executor.buckets.kv_lengths if k <= 256],
                               prompt_lengths=[k for k in engine.executor.buckets.prompt_lengths if k <= 64])
    title = f"flover_jax · {FLAGS.model} · policy={FLAGS.policy} · {FLAGS.max_slots} slots"
    view = viz.LiveView(len(requests), FLAGS.max_slots, title, console)
    with interrupts.while_running() as stop, view:
        result = engine.run(requests, on_event=view.event, on_iteration=view.iteration, stop=stop)
    console.print(viz.summary_table(metrics.summarize(result) | {"ops": engine.executor.op_choice.summary()}))
    for output in result.outputs:
        if output.error:
            print(f"request {output.request_id}: {output.error}", file=sys.stderr)
    if answered := [o for o in result.outputs if not o.error and o.finish_reason != "cancelled"]:
        console.print(Text.assemble((f"request {answered[0].request_id} answered: ", "dim"),
                                    repr(answered[0].text)))  # text, not rich markup
    if code := interrupts.exit_code():
        print("interrupted: the requests still running were cancelled", file=sys.stderr)
        return code
    return 0
