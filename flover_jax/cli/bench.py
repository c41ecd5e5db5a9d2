"""--mode=bench: a timed workload and its summary JSON. A bad line stops it before it starts."""

from __future__ import annotations

import json
import sys

from flover_jax import files
from flover_jax.cli import common
from flover_jax.cli.flags import FLAGS, default_sampling
from flover_jax.cli.interrupts import Interrupts


def _arrival_flags() -> dict:
    return {"seed": FLAGS.seed, "interval_s": FLAGS.interval_s, "rate": FLAGS.rate,
            "burstiness": FLAGS.burstiness}


def _check_workload() -> None:
    """Refuse bad workload and sampling flags before the model loads."""
    from flover_jax import workload

    default_sampling()
    if FLAGS.solo_samples < 0:
        raise ValueError(f"--solo_samples={FLAGS.solo_samples}: must be >= 0 (0 skips the solo runs)")
    if FLAGS.workload == "trace":
        if not FLAGS.trace:
            raise ValueError("--workload=trace needs --trace=FILE")
        return
    # Sizes first: each below is built whole in memory.
    workload.arrival_times(FLAGS.workload, FLAGS.num_requests, **_arrival_flags())
    longest = FLAGS.max_len if FLAGS.backend == "engine" else MAX_SERVER_PROMPT
    sizes = workload.prompt_sizes(FLAGS.num_requests, FLAGS.prompt_len, FLAGS.output_len,
                                  FLAGS.seed, FLAGS.shared_prefix, FLAGS.turns)
    if not FLAGS.prompts_file and max(sizes) >= longest:
        raise ValueError(f"--prompt_len={FLAGS.prompt_len} (with --shared_prefix and --turns): "
                         f"a prompt of {max(sizes)} tokens; prompts must be shorter than {longest} "
                         f"({'--max_len' if FLAGS.backend == 'engine' else 'a server'})")


# Random prompt tokens for a server: ids below this are valid in every vocabulary we serve.
SERVER_VOCAB = 256
MAX_SERVER_PROMPT = 1 << 20  # tokens; the server refuses what its own max_len does not hold


def _workload(engine):
    """The timed requests, each checked against the engine here (when the bench runs one): a
    request that could not run stops the bench before it starts, named, instead of counting
    as an error."""
    from flover_jax import workload

    defaults = default_sampling()
    if FLAGS.workload == "trace":
        return workload.read_trace(FLAGS.trace, defaults,
                                   check=engine.check_request if engine else None)
    arrivals = _arrival_flags()
    if FLAGS.prompts_file:  # real prompts, arrivals and lengths as the flags say
        prompts, numbers = [], []
        for line in files.read_jsonl("prompts_file", FLAGS.prompts_file):
            prompt, params, length = common.parse_line(line, defaults, ("max_new_tokens",))
            if length:
                raise ValueError(f"line {line.number}: max_new_tokens={length['max_new_tokens']!r}: "
                                 "bench takes output lengths from --output_len")
            if FLAGS.chat and isinstance(prompt, str):
                prompt = engine.chat_prompt(prompt)
            prompts.append((prompt, params))
            numbers.append(line.number)
        requests = workload.with_prompts(prompts, FLAGS.workload, FLAGS.num_requests,
                                         FLAGS.output_len, **arrivals)
        # Request i is line i's prompt (cycling), with its own drawn length.
        where = [f"prompts_file line {numbers[i % len(numbers)]}" for i in range(len(requests))]
    else:
        vocab_size = engine.cfg.vocab_size if engine else SERVER_VOCAB
        requests = workload.synthetic(FLAGS.workload, FLAGS.num_requests, FLAGS.prompt_len,
                                      FLAGS.output_len, vocab_size, params=defaults,
                                      shared_prefix=FLAGS.shared_prefix, turns=FLAGS.turns,
                                      **arrivals)
        where = [f"request {i} (--prompt_len, --output_len)" for i in range(len(requests))]
    for request, label in zip(requests, where if engine else ()):
        try:
            engine.check_request(request.prompt, request.params)
        except ValueError as e:
            raise ValueError(f"{label}: {e}") from None
    return requests


def bench_mode(interrupts: Interrupts) -> int:
    """A signal ends bench at once: a run cut short is not a measurement."""
    from rich.console import Console

    from flover_jax import bench, viz

    common.follow_unless_process_0()
    _check_workload()
    output = files.output("output_json", FLAGS.output_json,
                          [("trace", FLAGS.trace), ("prompts_file", FLAGS.prompts_file)])
    if FLAGS.backend == "openai":
        return _bench_server(output)
    engine = common.engine()
    requests = _workload(engine)
    if FLAGS.warmup:
        print("compiling every shape bucket first (excluded from the timings; cached in "
              ".cache/jax for later runs)", file=sys.stderr, flush=True)
    summary = bench.run(engine, requests, warmup=FLAGS.warmup, solo_samples=FLAGS.solo_samples)
    Console(stderr=True).print(viz.summary_table(summary, f"bench · {FLAGS.workload}"))
    with output.open() as out:
        out.write(json.dumps(summary, indent=2, allow_nan=False) + "\n")  # undefined: null
    if output.path is not None:
        print(f"wrote {output.path}", file=sys.stderr)
    return 0


def _bench_server(output) -> int:
    """The same workload through HTTP to an OpenAI-compatible server, streamed."""
    from rich.console import Console

    from flover_jax import metrics, viz
    from flover_jax.openai_client import OpenAIServer

    server = OpenAIServer(FLAGS.base_url, FLAGS.api_key)
    requests = _workload(None)
    records, wall_s = server.replay(requests)
    for record, request in zip(records, requests):
        record["prompt_len"] = len(request.prompt) if isinstance(request.prompt, list) else None
    summary = {"backend": "openai", "base_url": FLAGS.base_url, "model": server.model,
               "wall_s": wall_s} | metrics.latency_figures(records) | {
        "requests": records}
    Console(stderr=True).print(viz.summary_table(summary, f"bench · {FLAGS.workload} · "
                                                          f"{FLAGS.base_url}"))
    for record in records:
        if record["finish_reason"] == "error":
            print(f"a request failed: {record['error']}", file=sys.stderr)
    with output.open() as out:
        out.write(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    if output.path is not None:
        print(f"wrote {output.path}", file=sys.stderr)
    return 0
