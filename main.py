"""flover_jax command line: run a workload live, generate from prompts, benchmark, convert.

  python main.py                                   # a Flover workload on the default model
  python main.py --mode=generate --prompt="Hi" --chat --max_new_tokens=32
  python main.py --mode=generate --prompts_file=in.jsonl --output=out.jsonl
  python main.py --mode=bench --workload=constant --num_requests=32 --output_json=r.json
  python main.py --mode=convert --src=model.gguf --dst=checkpoints/name
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", "run", ["run", "generate", "bench", "convert"], "What to do.")
flags.DEFINE_string("model", "smollm2-135m", "Preset, Hugging Face directory, .gguf or checkpoint.")
flags.DEFINE_string("dtype", None, "Weights' dtype (default: the checkpoint's; imports are float32); "
                    "bfloat16 suits GPU/TPU.")
flags.DEFINE_integer("max_slots", 16, "Requests decoded at once (slot capacity).")
flags.DEFINE_integer("max_len", 512, "Tokens per slot: prompt + output.")
flags.DEFINE_enum("policy", "flover", ["flover", "fused", "static", "sequential"], "Scheduling.")
flags.DEFINE_enum("attention", "auto", ["auto", "xla", "cpu_kernel"],
                  "Decode attention: auto = the CPU kernel on one CPU device in float32, else XLA.")
flags.DEFINE_enum("matmul", "auto", ["auto", "xla", "cpu_kernel"],
                  "Weight matmuls: auto = the CPU kernel on one CPU device in float32, else XLA.")
flags.DEFINE_bool("batch_invariant", False, "One decode program and prompts prefilled alone: "
                  "each request gets its solo tokens even in bfloat16 on a GPU, at the cost "
                  "of computing every slot every step.")
flags.DEFINE_integer("tp", 1, "Tensor-parallel degree: devices (across all processes) per model.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
flags.DEFINE_integer("num_processes", 1, "Processes in a multi-process run.")
flags.DEFINE_integer("process_id", 0, "This process's index in a multi-process run.")
# generate
flags.DEFINE_string("prompt", None, "One prompt (generate mode).")
flags.DEFINE_string("prompts_file", None, 'JSONL: {"prompt": ...} or {"prompt_ids": [...]} a line.')
flags.DEFINE_string("output", None, "JSONL results (generate mode); stdout when unset.")
flags.DEFINE_bool("chat", False, "Wrap text prompts in the model's chat template.")
flags.DEFINE_integer("max_new_tokens", 64, "Default tokens to generate per request.")
flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
flags.DEFINE_integer("top_k", 0, "0 = off.")
flags.DEFINE_float("top_p", 1.0, "1 = off.")
flags.DEFINE_float("repetition_penalty", 1.0, "1 = off.")
flags.DEFINE_float("presence_penalty", 0.0, "0 = off.")
flags.DEFINE_integer("seed", 0, "Sampling seed (and the workload's random seed).")
flags.DEFINE_multi_string("stop", [], "Stop string (repeatable).")
flags.DEFINE_bool("ignore_eos", False, "Decode to max_new_tokens whatever the model says.")
# run / bench
flags.DEFINE_enum("workload", "poisson", ["constant", "poisson", "burst", "trace"], "Arrivals.")
flags.DEFINE_integer("num_requests", 24, "Requests in the workload.")
flags.DEFINE_float("interval_s", 0.5, "Gap between arrivals (constant workload).")
flags.DEFINE_float("rate", 4.0, "Requests per second (poisson workload).")
flags.DEFINE_float("burstiness", 1.0, "Gamma shape of the gaps: 1 = Poisson, < 1 burstier.")
flags.DEFINE_string("trace", None, "JSONL trace (trace workload).")
flags.DEFINE_integer("prompt_len", 8, "Random-token prompt length (bench).")
flags.DEFINE_string("output_len", "uniform:128:512", "Output tokens: N or uniform:LO:HI (bench).")
flags.DEFINE_string("output_json", None, "Write the bench summary here.")
flags.DEFINE_bool("warmup", True, "Compile every bucket before timing (bench).")
flags.DEFINE_integer("solo_samples", 3, "Requests run alone for latency_vs_solo (0: skip).")
# convert
flags.DEFINE_string("src", None, "Model to convert (.gguf or Hugging Face directory).")
flags.DEFINE_string("dst", None, "Checkpoint directory to write.")


def _default_sampling():
    """The sampling flags as SamplingParams: every request's defaults."""
    from flover_jax.sampling import SamplingParams

    params = SamplingParams(
        max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature, top_k=FLAGS.top_k,
        top_p=FLAGS.top_p, repetition_penalty=FLAGS.repetition_penalty,
        presence_penalty=FLAGS.presence_penalty, seed=FLAGS.seed, stop=tuple(FLAGS.stop),
        ignore_eos=FLAGS.ignore_eos,
    )
    params.validate()
    return params


# The flags each mode reads; giving a mode one it ignores is an error, not a silent no-op.
ENGINE_FLAGS = ("model", "dtype", "max_slots", "max_len", "policy", "attention", "matmul",
                "batch_invariant", "tp", "coordinator_address", "num_processes", "process_id")
SAMPLING_FLAGS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty",
                  "presence_penalty", "seed", "stop", "ignore_eos")
ARRIVAL_FLAGS = ("workload", "num_requests", "interval_s", "rate", "burstiness")
MODE_FLAGS = {
    "run": ENGINE_FLAGS + ("num_requests", "rate", "seed"),
    "generate": ENGINE_FLAGS + SAMPLING_FLAGS + ("prompt", "prompts_file", "output", "chat"),
    "bench": ENGINE_FLAGS + SAMPLING_FLAGS + ARRIVAL_FLAGS + (
        "trace", "prompts_file", "chat", "prompt_len", "output_len", "output_json", "warmup",
        "solo_samples"),
    "convert": ("src", "dst"),
}
# Within bench: a trace sets arrivals, prompts and lengths; otherwise --output_len sets lengths.
NOT_WITH_TRACE = ARRIVAL_FLAGS[1:] + ("prompts_file", "chat", "prompt_len", "output_len")
# The gap flags each arrival process reads.
GAP_FLAGS = {"constant": ("interval_s",), "poisson": ("rate", "burstiness"), "burst": ()}


def _reject_given(names, why: str) -> None:
    for name in names:
        if FLAGS[name].present:
            raise ValueError(f"--{name} {why}")


def _check_flags_apply() -> None:
    used = set(MODE_FLAGS[FLAGS.mode])
    everything = set().union(*MODE_FLAGS.values())
    _reject_given(sorted(everything - used), f"has no effect with --mode={FLAGS.mode}")
    if FLAGS.mode == "bench" and FLAGS.workload == "trace":
        _reject_given(NOT_WITH_TRACE, "has no effect with --workload=trace: the trace sets it")
    elif FLAGS.mode == "bench":
        _reject_given(["max_new_tokens"], "has no effect in bench: --output_len sets lengths")
        _reject_given(["trace"], "needs --workload=trace")
        unread = sorted(set().union(*GAP_FLAGS.values()) - set(GAP_FLAGS[FLAGS.workload]))
        _reject_given(unread, f"has no effect with --workload={FLAGS.workload}")
    if FLAGS.num_processes < 1:
        raise ValueError(f"--num_processes={FLAGS.num_processes}: must be >= 1")
    if not 0 <= FLAGS.process_id < FLAGS.num_processes:
        raise ValueError(f"--process_id={FLAGS.process_id}: must be in [0, {FLAGS.num_processes}) "
                         "(--num_processes)")
    if FLAGS.num_processes == 1:
        _reject_given(["coordinator_address"], "has no effect with --num_processes=1")


def _check_writable(flag: str) -> None:
    """Fail before the work, not after it, when an output file cannot be written."""
    path = Path(FLAGS[flag].value).resolve()
    if not path.parent.is_dir():
        raise ValueError(f"{flag}={FLAGS[flag].value!r}: directory {str(path.parent)!r} does not exist")
    if path.is_dir():
        raise ValueError(f"{flag}={FLAGS[flag].value!r}: is a directory")


def _read_lines(flag: str) -> list[tuple[int, str]]:
    """(line number, line) of an input file's non-blank lines."""
    try:
        text = Path(FLAGS[flag].value).read_text()
    except OSError as e:
        raise ValueError(f"{flag}={FLAGS[flag].value!r}: {e.strerror}") from None
    return [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


class _Follower(Exception):
    """Raised on processes other than 0 once they have replayed process 0's run."""


_ENGINES = []


def _engine():
    """The engine every mode uses. In a multi-process run, processes other than 0 follow
    process 0's device calls here and then leave the mode."""
    import jax

    from flover_jax.engine import Engine

    engine = Engine.from_pretrained(
        FLAGS.model, dtype=FLAGS.dtype, max_slots=FLAGS.max_slots, max_len=FLAGS.max_len,
        policy=FLAGS.policy, tp=FLAGS.tp, attention=FLAGS.attention, matmul=FLAGS.matmul,
        batch_invariant=FLAGS.batch_invariant,
    )
    if jax.process_index() > 0:
        engine.follow()
        raise _Follower
    _ENGINES.append(engine)
    return engine


def _parse_line(number: int, line: str, defaults, extra=()):
    """(prompt, SamplingParams, the `extra` keys) of one prompts-file line (see
    workload.parse_request), or raise ValueError naming the line."""
    from flover_jax.workload import parse_request

    try:
        return parse_request(json.loads(line), defaults, extra)
    except json.JSONDecodeError as e:
        raise ValueError(f"line {number}: not JSON ({e.msg})") from None
    except ValueError as e:
        raise ValueError(f"line {number}: {e}") from None


def _log_finished(kind: str, request) -> None:
    if kind == "finished":
        print(f"request {request.request_id} finished: {request.finish_reason.value}, "
              f"{len(request.token_ids)} tokens", file=sys.stderr, flush=True)


def _follow_unless_process_0() -> None:
    """Processes other than 0 replay process 0's device calls and leave the mode: the
    inputs and outputs are process 0's alone."""
    import jax

    if jax.process_index() > 0:
        _engine()


def generate_mode() -> int:
    from flover_jax.request import FinishReason

    _follow_unless_process_0()
    if bool(FLAGS.prompt) == bool(FLAGS.prompts_file):
        raise ValueError("generate: give exactly one of --prompt or --prompts_file")
    defaults = _default_sampling()
    lines = (
        [(1, json.dumps({"prompt": FLAGS.prompt}))] if FLAGS.prompt else _read_lines("prompts_file")
    )
    if FLAGS.output:
        _check_writable("output")
    engine = _engine()
    engine.scheduler.on_event = _log_finished
    ids: list[int | None] = []
    errors: dict[int, str] = {}
    numbers = [number for number, _ in lines]
    for number, line in lines:
        try:
            prompt, params, _ = _parse_line(number, line, defaults)
            if FLAGS.chat and isinstance(prompt, str):
                prompt = engine.chat_prompt(prompt)
            ids.append(engine.submit(prompt, params))
        except ValueError as e:
            ids.append(None)
            errors[len(ids) - 1] = str(e)
    outputs = {}
    # Ctrl-C only sets a flag, checked between iterations: a KeyboardInterrupt raised at an
    # arbitrary point can be swallowed (in a finalizer, say), a flag cannot.
    interrupt = threading.Event()
    previous_handler = signal.signal(signal.SIGINT, lambda *_: interrupt.set())
    try:
        for request_id in (i for i in ids if i is not None):
            if (output := engine.result(request_id, stop=interrupt)) is None:
                break
            outputs[request_id] = output
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    interrupted = interrupt.is_set()
    if interrupted:  # write what finished
        for request_id in ids:
            if request_id is not None and (output := engine.poll(request_id)) is not None:
                outputs[request_id] = output
    out = open(FLAGS.output, "w") if FLAGS.output else sys.stdout
    failed = 0
    try:
        for index, request_id in enumerate(ids):
            if request_id is None:
                record = {"index": index, "prompt_ids": [], "token_ids": [], "text": None,
                          "logprobs": None, "finish_reason": FinishReason.ERROR.value,
                          "error": errors[index], "ttft_s": None, "latency_s": 0.0}
            elif request_id in outputs:
                o = outputs[request_id]
                error = o.error and f"line {numbers[index]}: {o.error}"
                record = {"index": index, "prompt_ids": o.prompt_ids, "token_ids": o.token_ids,
                          "text": o.text, "logprobs": o.logprobs,
                          "finish_reason": o.finish_reason, "error": error,
                          "ttft_s": o.ttft_s, "latency_s": o.latency_s}
            else:
                continue  # unfinished when interrupted
            failed += record["error"] is not None
            out.write(json.dumps(record) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    if failed:
        print(f"{failed} of {len(ids)} requests ended with an error (see their records)",
              file=sys.stderr)
    return 130 if interrupted else 0


def _arrival_flags() -> dict:
    return dict(seed=FLAGS.seed, interval_s=FLAGS.interval_s, rate=FLAGS.rate,
                burstiness=FLAGS.burstiness)


def _check_workload() -> None:
    """Refuse bad workload and sampling flags before the model loads."""
    from flover_jax import workload

    _default_sampling()
    if FLAGS.workload == "trace":
        if not FLAGS.trace:
            raise ValueError("--workload=trace needs --trace=FILE")
        return
    workload.arrival_times(FLAGS.workload, FLAGS.num_requests, **_arrival_flags())
    workload.output_lengths(FLAGS.output_len, FLAGS.num_requests, FLAGS.seed)


def _workload(engine):
    from flover_jax import workload

    defaults = _default_sampling()
    if FLAGS.workload == "trace":
        return workload.read_trace(FLAGS.trace, defaults)
    arrivals = _arrival_flags()
    if FLAGS.prompts_file:  # real prompts, arrivals and lengths as the flags say
        prompts = []
        for number, line in _read_lines("prompts_file"):
            prompt, params, length = _parse_line(number, line, defaults, ("max_new_tokens",))
            if length:
                raise ValueError(f"line {number}: max_new_tokens={length['max_new_tokens']!r}: "
                                 "bench takes output lengths from --output_len")
            if FLAGS.chat and isinstance(prompt, str):
                prompt = engine.chat_prompt(prompt)
            prompts.append((prompt, params))
        return workload.with_prompts(prompts, FLAGS.workload, FLAGS.num_requests,
                                     FLAGS.output_len, **arrivals)
    return workload.synthetic(FLAGS.workload, FLAGS.num_requests, FLAGS.prompt_len,
                              FLAGS.output_len, engine.cfg.vocab_size, params=defaults, **arrivals)


def run_mode() -> int:
    """The main job: chat requests arriving over a few seconds, shown live, then a summary."""
    from rich.console import Console
    from rich.text import Text

    from flover_jax import metrics, viz, workload

    console = Console()
    with console.status(f"loading {FLAGS.model}"):
        engine = _engine()
    if engine.tokenizer is None:
        raise ValueError(f"model={FLAGS.model!r}: run mode sends chat prompts and this model has "
                         "no tokenizer (bench and generate take token ids)")
    requests = workload.demo(engine.chat_prompt, FLAGS.num_requests, FLAGS.rate, FLAGS.seed)
    with console.status("compiling the decode buckets (cached in .cache/jax after the first run)"):
        engine.executor.warmup(kv_lengths=[k for k in engine.executor.buckets.kv_lengths if k <= 256],
                               prompt_lengths=[k for k in engine.executor.buckets.prompt_lengths if k <= 64])
    title = f"flover_jax · {FLAGS.model} · policy={FLAGS.policy} · {FLAGS.max_slots} slots"
    view = viz.LiveView(len(requests), FLAGS.max_slots, title, console)
    try:
        with view:
            result = engine.run(requests, on_event=view.event, on_iteration=view.iteration)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    console.print(viz.summary_table(metrics.summarize(result)))
    for output in result.outputs:
        if output.error:
            print(f"request {output.request_id}: {output.error}", file=sys.stderr)
    if answered := [o for o in result.outputs if not o.error]:  # text, not rich markup
        console.print(Text.assemble((f"request {answered[0].request_id} answered: ", "dim"),
                                    repr(answered[0].text)))
    return 0


def bench_mode() -> int:
    from rich.console import Console

    from flover_jax import bench, viz

    _follow_unless_process_0()
    _check_workload()
    if FLAGS.output_json:
        _check_writable("output_json")
    engine = _engine()
    requests = _workload(engine)
    if FLAGS.warmup:
        print("compiling every shape bucket first (excluded from the timings; cached in "
              ".cache/jax for later runs)", file=sys.stderr, flush=True)
    summary = bench.run(engine, requests, warmup=FLAGS.warmup, solo_samples=FLAGS.solo_samples)
    Console(stderr=True).print(viz.summary_table(summary, f"bench · {FLAGS.workload}"))
    text = json.dumps(summary, indent=2, allow_nan=False)  # undefined figures are null
    if FLAGS.output_json:
        Path(FLAGS.output_json).write_text(text)
        print(f"wrote {FLAGS.output_json}", file=sys.stderr)
    else:
        print(text)
    return 0


def convert_mode() -> int:
    import time

    from flover_jax import checkpoint
    from flover_jax.loader import convert

    if not FLAGS.src or not FLAGS.dst:
        raise ValueError("convert: --src and --dst are required")
    start = time.perf_counter()
    cfg, params, tokenizer = convert(FLAGS.src)
    path = checkpoint.save(FLAGS.dst, cfg, params, tokenizer)
    print(f"converted {FLAGS.src} -> {path} in {time.perf_counter() - start:.1f} s")
    return 0


def main(argv: list[str]) -> int:
    del argv
    import jax
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax narrates every file it opens at INFO

    # Compiled programs persist across runs (all of them: many take under the default 1 s).
    jax.config.update("jax_compilation_cache_dir", str(Path(__file__).parent / ".cache" / "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    modes = {"run": run_mode, "generate": generate_mode, "bench": bench_mode, "convert": convert_mode}
    try:
        _check_flags_apply()
        if FLAGS.num_processes > 1:
            from flover_jax import distributed

            if not FLAGS.coordinator_address:
                raise ValueError("--num_processes > 1 needs --coordinator_address=host:port")
            distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        return modes[FLAGS.mode]()
    except _Follower:
        return 0
    except (ValueError, OSError) as e:  # bad flags, files, models: say what, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        for engine in _ENGINES:
            engine.close()


if __name__ == "__main__":
    app.run(main)
