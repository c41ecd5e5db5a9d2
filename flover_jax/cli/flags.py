"""The command line's one flag table, which flags each mode reads, and their checks.

A flag that the mode (or, in bench, the workload) does not read is an error, not a
silent no-op; everything here runs before a model loads.
"""

from __future__ import annotations

from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", "run", ["run", "generate", "bench", "convert", "serve"], "What to do.")
flags.DEFINE_string("model", "smollm2-135m", "Preset, Hugging Face directory, .gguf or checkpoint.")
flags.DEFINE_string("dtype", None, "Weights' dtype (default: the checkpoint's own; quantized GGUF "
                    "tensors are float32); bfloat16 halves the weights and KV cache.")
flags.DEFINE_enum("quantize", None, ["int8"], "Weight-only quantization of the matmul weights: "
                  "int8 with a scale per output channel (a quarter of float32's bytes).")
flags.DEFINE_integer("max_slots", 16, "Requests decoded at once (slot capacity).")
flags.DEFINE_integer("max_len", 512, "Tokens per slot: prompt + output.")
flags.DEFINE_enum("policy", "flover", ["flover", "fused", "static", "sequential"], "Scheduling.")
flags.DEFINE_enum("attention", "auto", ["auto", "xla", "cpu_kernel"],
                  "Decode attention: auto = the faster of XLA's and the CPU kernel (one CPU device, "
                  "float32 or bfloat16 KV), as timed on this machine.")
flags.DEFINE_enum("matmul", "auto", ["auto", "xla", "cpu_kernel", "amx"],
                  "Weight matmuls: auto = the fastest of XLA's, the CPU kernel (one CPU device, "
                  "float32, bfloat16 or int8 weights) and the kernel on AMX tiles (amx: bfloat16 "
                  "weights, activations as two bfloat16 parts at the dot), as timed on this machine.")
flags.DEFINE_bool("batch_invariant", False, "One decode program and prompts prefilled alone: "
                  "each request gets its solo tokens even in bfloat16 on a GPU, at the cost "
                  "of computing every slot every step.")
flags.DEFINE_integer("prefill_chunk", 64, "Prompts are prefilled in pieces of this many tokens "
                     "(boundaries at its multiples; the prefix cache's granularity), so a long "
                     "prompt never stalls the others (0: whole prompts at once).")
flags.DEFINE_integer("prefill_budget", 256, "Prompt tokens one iteration prefills at most, "
                     "between decode steps (with --prefill_chunk > 0).")
flags.DEFINE_bool("prefix_cache", True, "Reuse the K/V of prompt openings seen before (system "
                  "prompts, conversations); needs --prefill_chunk > 0.")
flags.DEFINE_integer("prefix_cache_rows", 4, "Cached prefixes held at once; each takes a slot's "
                     "memory (--max_len tokens of K/V).")
flags.DEFINE_integer("tp", 1, "Tensor-parallel degree: devices (across all processes) per model.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
flags.DEFINE_integer("num_processes", 1, "Processes in a multi-process run.")
flags.DEFINE_integer("process_id", 0, "This process's index in a multi-process run.")
# generate
flags.DEFINE_string("prompt", None, "One prompt (generate mode).")
flags.DEFINE_string("prompts_file", None, 'JSONL: {"prompt": ...} or {"prompt_ids": [...]} a line.')
flags.DEFINE_string("output", None, "JSONL results (generate mode); stdout when unset or '-'.")
flags.DEFINE_bool("chat", False, "Wrap text prompts in the model's chat template.")
flags.DEFINE_integer("max_new_tokens", 64, "Default tokens to generate per request.")
flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
flags.DEFINE_integer("top_k", 0, "0 = off.")
flags.DEFINE_float("top_p", 1.0, "1 = off.")
flags.DEFINE_float("repetition_penalty", 1.0, "1 = off.")
flags.DEFINE_float("presence_penalty", 0.0, "0 = off.")
flags.DEFINE_float("frequency_penalty", 0.0, "0 = off.")
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
flags.DEFINE_string("prompt_len", "8", "Random-token prompt lengths (bench): N, uniform:LO:HI or "
                    "lognormal:MEDIAN:SIGMA:MAX.")
flags.DEFINE_string("output_len", "uniform:128:512", "Output tokens (bench): N, uniform:LO:HI "
                    "or lognormal:MEDIAN:SIGMA:MAX.")
flags.DEFINE_integer("shared_prefix", 0, "Random-token prompts open with the same this many "
                     "tokens, a system prompt (bench).")
flags.DEFINE_integer("turns", 1, "Random-token requests form conversations of this many turns, "
                     "each prompt the conversation so far (bench).")
flags.DEFINE_string("output_json", None, "Write the bench summary here ('-': stdout, the default).")
flags.DEFINE_bool("warmup", True, "Compile every bucket before timing (bench).")
flags.DEFINE_integer("solo_samples", 3, "Requests run alone for latency_vs_solo (0: skip).")
flags.DEFINE_enum("backend", "engine", ["engine", "openai"], "Bench this process's engine, or an "
                  "OpenAI-compatible server at --base_url (ours, vLLM's, llama-server...).")
flags.DEFINE_string("base_url", None, "The server --backend=openai sends to (http://host:port).")
# serve
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
flags.DEFINE_integer("port", 8000, "Port to listen on (0: any free one; the log says which).")
flags.DEFINE_string("api_key", None, "serve: clients must send 'Authorization: Bearer KEY' on "
                    "/v1 routes (default: $FLOVER_API_KEY; unset: no key); bench: the key sent.")
flags.DEFINE_integer("max_waiting", 64, "Requests that may queue beyond the slots; more: 429.")
flags.DEFINE_float("drain_s", 30.0, "On SIGTERM, how long requests in flight may finish.")
flags.DEFINE_float("request_timeout_s", 600.0, "A call not answered within this (queueing "
                   "included) is cancelled: 504, or an error event ending its stream.")
# convert
flags.DEFINE_string("src", None, "Model to convert (.gguf or Hugging Face directory).")
flags.DEFINE_string("dst", None, "Checkpoint directory to write.")

# The flags each mode reads.
ENGINE_FLAGS = ("model", "dtype", "quantize", "max_slots", "max_len", "policy", "attention",
                "matmul", "batch_invariant", "prefill_chunk", "prefill_budget", "prefix_cache",
                "prefix_cache_rows", "tp",
                "coordinator_address", "num_processes", "process_id")
SAMPLING_FLAGS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty",
                  "presence_penalty", "frequency_penalty", "seed", "stop", "ignore_eos")
ARRIVAL_FLAGS = ("workload", "num_requests", "interval_s", "rate", "burstiness")
MODE_FLAGS = {
    "run": ENGINE_FLAGS + ("num_requests", "rate", "seed"),
    "generate": ENGINE_FLAGS + SAMPLING_FLAGS + ("prompt", "prompts_file", "output", "chat"),
    "bench": ENGINE_FLAGS + SAMPLING_FLAGS + ARRIVAL_FLAGS + (
        "trace", "prompts_file", "chat", "prompt_len", "output_len", "shared_prefix", "turns",
        "output_json", "warmup",
        "solo_samples", "backend", "base_url", "api_key"),
    "convert": ("src", "dst", "dtype", "quantize"),
    "serve": ENGINE_FLAGS + ("host", "port", "api_key", "max_waiting", "drain_s",
                             "request_timeout_s"),
}
# Within bench: a trace sets arrivals, prompts and lengths; otherwise --output_len sets lengths.
NOT_WITH_TRACE = ARRIVAL_FLAGS[1:] + ("prompts_file", "chat", "prompt_len", "output_len",
                                      "shared_prefix", "turns")
# What an engine of this process would read, which a bench of a server does not.
NOT_WITH_SERVER = ENGINE_FLAGS + ("warmup", "solo_samples", "chat")
# The gap flags each arrival process reads.
GAP_FLAGS = {"constant": ("interval_s",), "poisson": ("rate", "burstiness"), "burst": ()}


def default_sampling():
    """The sampling flags as SamplingParams: every request's defaults."""
    from flover_jax.sampling_params import SamplingParams

    params = SamplingParams(
        max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature, top_k=FLAGS.top_k,
        top_p=FLAGS.top_p, repetition_penalty=FLAGS.repetition_penalty,
        presence_penalty=FLAGS.presence_penalty, frequency_penalty=FLAGS.frequency_penalty,
        seed=FLAGS.seed, stop=tuple(FLAGS.stop),
        ignore_eos=FLAGS.ignore_eos,
    )
    params.validate()
    return params


def _reject_given(names, why: str) -> None:
    for name in names:
        if FLAGS[name].present:
            raise ValueError(f"--{name} {why}")


def check_flags(argv: list[str]) -> None:
    """Refuse stray arguments and flags the mode does not read, before any work."""
    if len(argv) > 1:  # `--prompt Hello world` would otherwise drop "world" silently
        raise ValueError(f"unexpected argument {argv[1]!r}: every input is a --flag=value "
                         "(quote a value that holds spaces)")
    used = set(MODE_FLAGS[FLAGS.mode])
    everything = set().union(*MODE_FLAGS.values())
    _reject_given(sorted(everything - used), f"has no effect with --mode={FLAGS.mode}")
    if FLAGS.mode == "bench" and FLAGS.backend == "openai":
        _reject_given(NOT_WITH_SERVER, "has no effect with --backend=openai: the server has its own")
        if not FLAGS.base_url:
            raise ValueError("--backend=openai needs --base_url=http://host:port")
    elif FLAGS.mode == "bench":
        _reject_given(["base_url", "api_key"], "needs --backend=openai")
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
    elif not FLAGS.coordinator_address:
        raise ValueError("--num_processes > 1 needs --coordinator_address=host:port")
