"""--mode=generate: one result record per prompt line, in order, whatever the lines hold."""

from __future__ import annotations

import json
import sys
import threading

from flover_jax import files
from flover_jax.cli import common
from flover_jax.cli.flags import FLAGS, default_sampling
from flover_jax.cli.interrupts import Interrupts
from flover_jax.files import Line


def _log_finished(kind: str, request) -> None:
    if kind == "finished":
        print(f"request {request.request_id} finished: {request.finish_reason.value}, "
              f"{len(request.token_ids)} tokens", file=sys.stderr, flush=True)


def generate_records(engine, lines: list[Line], defaults, chat: bool = False,
                     stop: threading.Event | None = None) -> list[dict]:
    """The result record of each line, in order: its tokens, or its error naming the line.
    Once `stop` is set the records of requests still unfinished are left out."""
    from flover_jax.request import FinishReason

    ids: list[int | None] = []
    errors: dict[int, str] = {}
    for line in lines:
        try:
            prompt, params, _ = common.parse_line(line, defaults)
            if chat and isinstance(prompt, str):
                prompt = engine.chat_prompt(prompt)
            ids.append(engine.submit(prompt, params))
        except ValueError as e:
            ids.append(None)
            errors[len(ids) - 1] = str(e)
    outputs = {}
    for request_id in (i for i in ids if i is not None):
        if (output := engine.result(request_id, stop=stop)) is None:
            break
        outputs[request_id] = output
    for request_id in set(ids) - set(outputs) - {None}:  # stopped: what finished meanwhile
        if (output := engine.poll(request_id)) is not None:
            outputs[request_id] = output
    records = []
    for index, (line, request_id) in enumerate(zip(lines, ids)):
        if request_id is None:
            records.append({"index": index, "prompt_ids": [], "token_ids": [], "text": None,
                            "logprobs": None, "finish_reason": FinishReason.ERROR.value,
                            "error": errors[index], "ttft_s": None, "latency_s": 0.0})
        elif request_id in outputs:
            o = outputs[request_id]
            records.append({"index": index, "prompt_ids": o.prompt_ids, "token_ids": o.token_ids,
                            "text": o.text, "logprobs": o.logprobs,
                            "finish_reason": o.finish_reason,
                            "error": o.error and f"line {line.number}: {o.error}",
                            "ttft_s": o.ttft_s, "latency_s": o.latency_s})
    return records


def generate_mode(interrupts: Interrupts) -> int:
    common.follow_unless_process_0()
    if (FLAGS.prompt is None) == (FLAGS.prompts_file is None):
        raise ValueError("generate: give exactly one of --prompt or --prompts_file")
    if FLAGS.prompt == "":
        raise ValueError("--prompt='': empty; give the text to continue")
    defaults = default_sampling()
    lines = ([Line(1, {"prompt": FLAGS.prompt})] if FLAGS.prompt is not None
             else files.read_jsonl("prompts_file", FLAGS.prompts_file))
    output = files.output("output", FLAGS.output, [("prompts_file", FLAGS.prompts_file)])
    engine = common.engine()
    engine.scheduler.on_event = _log_finished
    with interrupts.while_running() as stop:
        records = generate_records(engine, lines, defaults, FLAGS.chat, stop)
        with output.open() as out:
            for record in records:
                out.write(json.dumps(record) + "\n")
    if failed := sum(record["error"] is not None for record in records):
        print(f"{failed} of {len(lines)} requests ended with an error (see their records)",
              file=sys.stderr)
    return interrupts.exit_code() or 0
