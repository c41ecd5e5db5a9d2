"""Long prompts without stalls (chunked prefill) and shared prompts computed once (prefix
caching), each measured both ways in one run on this machine.

    .venv/bin/python benchmarks/long_prompts.py --output_json=benchmarks/results/long_prompts.json

- stall: `--decoders` requests decode (8-token prompts, EOS ignored) when one
  `--long_prompt`-token prompt arrives. With `--prefill_chunk` at its default the long
  prompt goes in pieces between decode steps; with 0 it goes in whole, and every decoder waits
  for it. Figures: the decoders' longest gap between two tokens (max ITL) and the long
  prompt's TTFT.
- shared: `--shared` requests at once, each a `--system`-token system prompt and its own
  question of 16 to 32 tokens, greedy, with the prefix cache and without: mean TTFT, and
  whether every request's tokens are the same both ways.

Each engine runs its workload once untimed first (compiles every shape it meets), then timed.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import numpy as np
from absl import app, flags

sys.path.insert(0, str(Path(__file__).parent))
from common import cpu_description, merge_results  # noqa: E402

from flover_jax.engine import DEFAULT_PREFILL_CHUNK, Engine, TimedRequest  # noqa: E402
from flover_jax.loader import load_model  # noqa: E402
from flover_jax.sampling_params import SamplingParams  # noqa: E402
from flover_jax.scheduler import DEFAULT_PREFILL_BUDGET  # noqa: E402

flags.DEFINE_string("model", "smollm2-135m", "Model.")
flags.DEFINE_list("experiments", ["stall", "shared"], "Which to run.")
flags.DEFINE_integer("prefill_chunk", DEFAULT_PREFILL_CHUNK, "The chunked engine's pieces.")
flags.DEFINE_integer("decoders", 16, "stall: requests decoding when the long prompt arrives.")
flags.DEFINE_integer("long_prompt", 2000, "stall: the long prompt's tokens.")
flags.DEFINE_float("arrives_s", 2.0, "stall: when the long prompt arrives.")
flags.DEFINE_integer("shared", 32, "shared: requests.")
flags.DEFINE_integer("system", 500, "shared: system prompt tokens.")
flags.DEFINE_string("output_json", None, "Merge the figures into this JSON.")
FLAGS = flags.FLAGS

GREEDY = SamplingParams(ignore_eos=True)


def timed_run(engine: Engine, workload: list[TimedRequest]):
    engine.run(workload)  # untimed: compiles the shapes this workload meets
    engine.reset_prefix_cache()  # the timed run starts cold
    return engine.run(workload)


def stall(cfg, params, vocab: int) -> dict:
    rng = np.random.default_rng(0)
    max_len = FLAGS.long_prompt + 48
    decode_len = 400  # decoders are still decoding when the long prompt is in
    workload = [TimedRequest(rng.integers(3, vocab, 8).tolist(),
                             SamplingParams(max_new_tokens=decode_len, ignore_eos=True))
                for _ in range(FLAGS.decoders)]
    long = TimedRequest(rng.integers(3, vocab, FLAGS.long_prompt).tolist(),
                        SamplingParams(max_new_tokens=32, ignore_eos=True), FLAGS.arrives_s)
    workload.append(long)
    figures = {}
    for chunk in (FLAGS.prefill_chunk, 0):
        engine = Engine(cfg, params, max_slots=FLAGS.decoders + 1, max_len=max_len,
                        prefill_chunk=chunk, prefix_cache_rows=0)
        outputs = timed_run(engine, workload).outputs
        gaps = [b - a for o in outputs[:-1] for a, b in zip(o.token_times_s, o.token_times_s[1:])]
        figures[f"prefill_chunk={chunk}"] = {
            "decoders_max_itl_s": max(gaps), "decoders_median_itl_s": statistics.median(gaps),
            "long_prompt_ttft_s": outputs[-1].ttft_s,
        }
        print(chunk, figures[f"prefill_chunk={chunk}"], flush=True)
    chunked, whole = (figures[f"prefill_chunk={c}"] for c in (FLAGS.prefill_chunk, 0))
    return {"decoders": FLAGS.decoders, "long_prompt": FLAGS.long_prompt, "runs": figures,
            "max_itl_ratio": chunked["decoders_max_itl_s"] / whole["decoders_max_itl_s"],
            "ttft_ratio": chunked["long_prompt_ttft_s"] / whole["long_prompt_ttft_s"]}


def shared(cfg, params, vocab: int) -> dict:
    rng = np.random.default_rng(1)
    system = rng.integers(3, vocab, FLAGS.system).tolist()
    workload = [TimedRequest(system + rng.integers(3, vocab, int(rng.integers(16, 33))).tolist(),
                             SamplingParams(max_new_tokens=32, ignore_eos=True))
                for _ in range(FLAGS.shared)]
    max_len = FLAGS.system + 32 + 32 + 16
    figures, tokens = {}, {}
    for rows in (4, 0):
        engine = Engine(cfg, params, max_slots=FLAGS.shared, max_len=max_len,
                        prefill_chunk=FLAGS.prefill_chunk, prefix_cache_rows=rows)
        result = timed_run(engine, workload)
        name = "prefix_cache" if rows else "no_prefix_cache"
        ttfts = [o.ttft_s for o in result.outputs]
        tokens[name] = [o.token_ids for o in result.outputs]
        figures[name] = {"mean_ttft_s": statistics.mean(ttfts), "p99_ttft_s": float(
            np.percentile(ttfts, 99)), "wall_s": result.wall_s,
            "prefix_hit_rate": result.stats.prefix_hit_rate, "prefix_hits": result.stats.prefix_hits}
        print(name, figures[name], flush=True)
    return {"requests": FLAGS.shared, "system": FLAGS.system, "runs": figures,
            "mean_ttft_ratio": figures["prefix_cache"]["mean_ttft_s"]
            / figures["no_prefix_cache"]["mean_ttft_s"],
            "tokens_identical": tokens["prefix_cache"] == tokens["no_prefix_cache"]}


def main(argv: list[str]) -> None:
    del argv
    cfg, params, _ = load_model(FLAGS.model)
    record = {"cpu": cpu_description(), "model": FLAGS.model,
              "prefill_chunk": FLAGS.prefill_chunk, "prefill_budget": DEFAULT_PREFILL_BUDGET,
              "command": "python benchmarks/long_prompts.py " + " ".join(sys.argv[1:])}
    for name in FLAGS.experiments:
        record[name] = {"stall": stall, "shared": shared}[name](cfg, params, cfg.vocab_size)
    print(record)
    if FLAGS.output_json:
        merge_results(Path(FLAGS.output_json), record)


if __name__ == "__main__":
    app.run(main)
