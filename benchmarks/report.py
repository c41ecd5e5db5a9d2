"""Render docs/benchmarks.md and its plots from benchmarks/results/ (see run_all.sh)."""

from __future__ import annotations

import collections
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path("benchmarks/results")
DOCS = Path("docs")
IMG = DOCS / "img"
POLICIES = ("flover", "fused", "static", "sequential")


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _save(fig, name: str) -> str:
    """Write the figure to docs/img/NAME.png; returns its Markdown image link."""
    fig.tight_layout()
    fig.savefig(IMG / f"{name}.png", dpi=120)
    plt.close(fig)
    return f"![{name}](img/{name}.png)"


def _makespan(run: dict) -> str:
    """The (median) makespan, with the range of the repeats when there were several."""
    runs = run.get("repeats", {}).get("makespan_s", [])
    spread = f" ({min(runs):.1f}-{max(runs):.1f}, {len(runs)} runs)" if len(runs) > 1 else ""
    return f"{run['makespan_s']:.1f} s{spread}"


def _ran(paper: dict, experiment: str) -> str:
    """Which run an experiment's figures come from (paper.py merges runs of some experiments)."""
    ran = paper.get("ran", {}).get(experiment)
    return f"From `{ran['command']}`, {ran['at']}. " if ran else ""


def constant_section(paper: dict) -> str:
    runs = paper["constant"]
    sizes = sorted(runs, key=int)
    rows = []
    for n in sizes:
        seq = runs[n]["sequential"]["makespan_s"]
        row = [n]
        for p in POLICIES:
            r = runs[n][p]
            speedup = seq / r["makespan_s"]
            row.append(f"{r['makespan_s']:.1f} s / {r['output_tokens_per_s']:.0f} ({speedup:.1f}x)")
        rows.append(row)
    fig, ax = plt.subplots(figsize=(6, 4))
    for p in POLICIES:
        ax.plot([int(n) for n in sizes], [runs[n][p]["output_tokens_per_s"] for n in sizes], "o-", label=p)
    ax.set(xscale="log", xlabel="requests (one every 0.5 s)", ylabel="output tokens/s",
           title="Throughput against concurrency")
    ax.legend()
    image = _save(fig, "constant")
    return (
        "## Constant arrivals (the paper's Fig. 4)\n\n"
        + _ran(paper, "constant") +
        "One request every 0.5 s, 8-token prompts, outputs uniform in [128, 512], EOS ignored. "
        "Each cell: makespan / output tokens per second (speedup over `sequential`).\n\n"
        + _table(["requests", *POLICIES], rows) + f"\n\n{image}\n"
    )


def headline_section(paper: dict) -> str:
    h = paper["headline"]
    f, s = h["flover"], h["sequential"]
    # The policies' repeats alternate in one run: each pair saw the machine in the same spell.
    paired = [b / a for a, b in zip(f["repeats"]["makespan_s"], s["repeats"]["makespan_s"])]
    return (
        "## 32 requests x 512 tokens, one every 0.5 s\n\n" + _ran(paper, "headline") + "\n\n"
        + _table(["policy", "makespan", "tokens/s", "mean latency", "mean in flight"], [
            [p, _makespan(r), f"{r['output_tokens_per_s']:.0f}",
             f"{r['e2e_s']['mean']:.1f} s", f"{r['mean_inflight']:.1f}"]
            for p, r in h.items()
        ])
        + f"\n\n`flover` finishes {statistics.median(paired):.1f}x sooner than `sequential`: the "
        f"median over the {len(paired)} pairs of repeats run back to back "
        f"({_span(paired, '.1f')}x); the ratio of the medians above is "
        f"{s['makespan_s'] / f['makespan_s']:.1f}x (paper: 10.9x for GPT-J 6B on an A100).\n"
        + (f"With XLA's matmuls instead of the CPU matmul kernel, `flover` takes "
           f"{xla['makespan_s'] / f['makespan_s']:.2f}x as long"
           + (f"; with XLA's ops for attention too, {ops['makespan_s'] / f['makespan_s']:.2f}x"
              if (ops := h.get("flover, XLA ops")) else "") + ".\n"
           if (xla := h.get("flover, XLA matmuls")) else "")
    )


def roofline_section(roof: dict, paper: dict) -> str:
    h = paper["headline"]
    flover, sequential = h["flover"]["makespan_s"], h["sequential"]["makespan_s"]
    rows = [[f"{b['bandwidth_gbs']:.0f} GB/s, {b['gflops']:.0f} GFLOP/s", f"{b['flover_s']:.1f} s",
             f"{b['sequential_s']:.1f} s", f"{flover / b['flover_s']:.2f}x",
             f"{sequential / b['flover_s']:.1f}x", f"{b['sequential_s'] / b['flover_s']:.1f}x"]
            for b in roof["bounds"]]
    limits, achieved = roof["machine_limits"], roof["bounds"][-1]
    return (
        "### Against the machine's limits (`benchmarks/roofline.py`)\n\n"
        "The same workload replayed against a decode step that costs exactly its roofline: every "
        "weight and every live slot's KV read once at the given bandwidth, or the FLOPs at the "
        "given rate, whichever is larger (reads and FLOPs perfectly overlapped), with no prefill "
        "and no host time. The first row takes this machine's limits as `benchmarks/step_times.py` "
        f"measured them in the same run ({limits['how']}): no engine could finish sooner at "
        "those. The last row takes the "
        "bandwidth at which this bound on `sequential` equals its measured makespan: the "
        "effective rate of `sequential`, its prefills, reads and host time counted as streaming, "
        f"{achieved['bandwidth_gbs']:.0f} GB/s, {achieved['bandwidth_gbs'] / limits['read_gbs']:.0%} "
        "of the machine's (its decode steps alone stream faster: the step table).\n\n"
        + _table(["bound at", "flover at best", "sequential at best", "measured flover / best",
                  "measured sequential / flover at best", "sequential at best / flover at best"],
                 rows)
        + "\n\nThe fifth column is the largest speedup over the measured `sequential` run that an "
        "engine could reach: at the machine's limits (first row), or with steps that stream no "
        "faster than our one-slot steps do (last row). The last column is the speedup if both "
        "policies ran at those limits: the faster the steps, the more the workload is bound by "
        "its arrivals (the last request comes at 15.5 s and still needs 512 steps), and the "
        "lower the ratio it allows.\n"
    )


def poisson_section(paper: dict) -> str:
    runs = paper["poisson"]
    gaps = sorted(runs, key=float)
    rows = [[g, f"{runs[g]['flover']['makespan_s']:.1f} s", f"{runs[g]['sequential']['makespan_s']:.1f} s",
             f"{runs[g]['sequential']['makespan_s'] / runs[g]['flover']['makespan_s']:.2f}x",
             runs[g]["flover"]["iterations"], f"{runs[g]['flover']['mean_inflight']:.1f}"] for g in gaps]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([float(g) for g in gaps],
            [runs[g]["sequential"]["makespan_s"] / runs[g]["flover"]["makespan_s"] for g in gaps], "o-")
    ax.set(xscale="log", xlabel="mean gap between arrivals (s)", ylabel="speedup over sequential",
           title="Poisson arrivals, 32 requests")
    image = _save(fig, "poisson")
    return (
        "## Poisson arrivals (Fig. 8)\n\n" + _ran(paper, "poisson")
        + "32 requests, 8-token prompts, outputs of "
        f"{runs[gaps[0]]['flover']['output_tokens'] // 32} tokens, EOS ignored.\n\n"
        + _table(["mean gap (s)", "flover", "sequential", "speedup", "iterations", "mean in flight"], rows)
        + f"\n\n{image}\n"
    )


def ablation_section(paper: dict) -> str:
    runs = paper["ablation"]
    tails = sorted(runs, key=int)
    rows = []
    for t in tails:
        flover, fused = runs[t]["flover"], runs[t]["fused"]
        paired = [b / a for a, b in zip(flover["repeats"]["makespan_s"], fused["repeats"]["makespan_s"])]
        rows.append([f"[128, {t}]", _makespan(flover), _makespan(fused),
                     f"{fused['makespan_s'] / flover['makespan_s']:.2f}x", _span(paired, ".2f") + "x",
                     f"{flover['computed_rows'] / fused['computed_rows']:.2f}"])
    fig, ax = plt.subplots(figsize=(6, 4))
    x = range(len(tails))
    for offset, policy in ((-0.2, "flover"), (0.2, "fused")):
        rates = [runs[t][policy]["output_tokens_per_s"] for t in tails]
        ax.bar([i + offset for i in x], rates, 0.4, label=policy)
    ax.set_xticks(list(x), [f"[128, {t}]" for t in tails])
    ax.set(ylabel="output tokens/s", title="Compaction ablation (32 requests)")
    ax.legend()
    image = _save(fig, "ablation")
    return (
        "## Compaction ablation\n\n" + _ran(paper, "ablation")
        + "32 requests, one every 0.1 s, outputs uniform in [128, L]. "
        "`flover` decodes a window bucket of the live slots and compacts; `fused` computes all 32 "
        "slots every step (paper: 1.14-1.23x for L = 512..2048; L = 256 is below its range). "
        "The two policies take turns, run by run, so each pair of runs gives a gain too (its "
        "range in the fifth column).\n\n"
        + _table(["outputs", "flover", "fused", "flover gain (medians)", "gain, pair by pair",
                  "rows computed (flover / fused)"], rows)
        + f"\n\n{image}\n"
    )


SYSTEMS = {  # name -> what it is, as the tables say it
    "flover": "flover_jax (fp32 weights, fp32 KV)",
    "flover_bf16": "flover_jax (bf16 weights and KV)",
    "flover_int8": "flover_jax (int8 weights, fp32 KV)",
    "vllm_fp32": "vLLM CPU offline engine (fp32)",
    "vllm_bf16": "vLLM CPU offline engine (bf16 weights and KV)",
    "llama_q4_1": "llama-server (Q4_1 weights, f16 KV)",
    "llama_f32": "llama-server (F32 weights, f32 KV)",
    "hf_continuous": "HF continuous batching (fp32)",
    "hf_static": "HF static batched generate (fp32)",
}
# Our engine against the peer of the same precision (int8: against llama.cpp's 4-bit weights).
PEER_RATIOS = (("flover", "vllm_fp32"), ("flover_bf16", "vllm_bf16"), ("flover_int8", "llama_q4_1"))
SERVERS = {  # compare_servers.py's systems, as its table says them
    "flover": "flover_jax server (`main.py --mode=serve`, defaults, fp32)",
    "flover_xla": "flover_jax server, `--matmul=xla --attention=xla`",
    "flover_engine": "flover_jax in-process engine (no HTTP; reference)",
    "llama_q4_1": "llama-server (Q4_1 weights, f16 KV)",
    "llama_f32": "llama-server (F32 weights, f32 KV)",
    "vllm_fp32": "vLLM CPU server (`vllm.entrypoints.openai.api_server`, fp32)",
}


def _measured_on(workload: dict) -> str:
    return f" (measured {workload['date']})" if "date" in workload else ""


def peers_section(peers: dict, machine: str = "", image: str = "peers_concurrency") -> str:
    """compare_peers.py's tables; `machine` names another run's machine (its own section, its
    plot saved as `image`)."""
    systems = [s for s in SYSTEMS if s in peers["systems"]]
    runs = peers["systems"]
    ours = runs.get("flover", {}).get("headline")
    parts = [f"## Side by side with the peers (`benchmarks/compare_peers.py`){machine}\n\n"
             "Same model (SmolLM2-135M-Instruct), same requests (8-token random prompts, EOS ignored, "
             "greedy), same machine; each table's systems ran back to back in one run; each peer in its "
             "own environment under `.peers/` "
             "(`benchmarks/peers/setup.sh`)"
             + (f"; {peers['machine']['cpu']}, each system allowed {peers['machine']['slots']} requests "
                "at once" if "cpu" in peers["machine"] else "") + ". Versions: "
             + "; ".join(f"{s}: " + ", ".join(f"{k} {v}" for k, v in peers["versions"][s].items())
                         for s in systems) + ".\n"]
    if ours is not None:
        w = peers["workloads"]["headline"]
        rows = []
        for s in systems:
            r = runs[s]["headline"]
            rows.append([SYSTEMS[s], _makespan(r), f"{r['output_tokens_per_s']:.0f}",
                         f"{r['ttft_s']['p50']:.2f} s", f"{r['tpot_s']['p50'] * 1e3:.0f} ms",
                         f"{ours['output_tokens_per_s'] / r['output_tokens_per_s']:.2f}x"])
        parts.append(
            f"### {w['num_requests']} requests x {w['output_len']} tokens, arriving over "
            f"{w['last_arrival_s']:.1f} s{_measured_on(w)}\n\n"
            "Each system's median run of the repeats (makespan range in brackets); tokens/s, "
            "TTFT and TPOT are the median run's.\n\n"
            + _table(["system", "makespan", "output tokens/s", "TTFT p50", "TPOT p50", "flover_jax vs it"],
                     rows) + "\n")
    sizes = sorted(int(name.split("/")[1]) for name in peers["workloads"] if name.startswith("concurrency/"))
    if sizes:
        rate = {s: [runs[s][f"concurrency/{n}"]["output_tokens_per_s"] for n in sizes] for s in systems}
        pairs = [(ours_, peer) for ours_, peer in PEER_RATIOS if ours_ in systems and peer in systems]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for s in systems:
            ax.plot(sizes, rate[s], "o-", label=SYSTEMS[s])
        ax.set(xscale="log", xlabel="concurrent requests (all at once)", ylabel="output tokens/s",
               title="Throughput against concurrency")
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.legend(fontsize=8)
        image = _save(fig, image)
        length = peers["workloads"][f"concurrency/{sizes[0]}"]["output_len"]
        parts.append(
            f"### Throughput against concurrency: n requests at once, {length} tokens each"
            f"{_measured_on(peers['workloads'][f'concurrency/{sizes[0]}'])}\n\n"
            "Output tokens/s (makespan from the first arrival to the last token).\n\n"
            + _table(["requests", *systems, *(f"{a} / {b}" for a, b in pairs)],
                     [[n, *(f"{rate[s][i]:.0f}" for s in systems),
                       *(f"{rate[a][i] / rate[b][i]:.2f}x" for a, b in pairs)]
                      for i, n in enumerate(sizes)])
            + f"\n\n{image}\n")
    return "\n".join(parts)


def timeline_section(timeline: dict) -> str:
    requests = timeline["requests"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1]})
    for r in requests:
        y = r["index"]
        top.barh(y, r["admitted_s"] - r["arrival_s"], left=r["arrival_s"], color="lightgray")
        top.barh(y, r["first_token_s"] - r["admitted_s"], left=r["admitted_s"], color="orange")
        top.barh(y, r["finished_s"] - r["first_token_s"], left=r["first_token_s"], color="tab:blue")
    top.set(ylabel="request", title="Request timeline: queued (gray), prefill (orange), decoding (blue)")
    events = sorted([(r["admitted_s"], 1) for r in requests] + [(r["finished_s"], -1) for r in requests])
    times, counts, n = [0.0], [0], 0
    for t, d in events:
        n += d
        times.append(t)
        counts.append(n)
    bottom.step(times, counts, where="post")
    bottom.set(xlabel="seconds", ylabel="in flight")
    image = _save(fig, "timeline")
    return (
        "## A run, request by request\n\n"
        f"`{timeline['command']}`: {timeline['num_requests']} requests, "
        f"{timeline['output_tokens_per_s']:.0f} tokens/s, latency {timeline['latency_vs_solo']:.2f}x "
        "what the same request costs alone (mean; each request's latency over a solo fit, "
        "TTFT + (tokens - 1) x TPOT of three of its requests run alone after it).\n\n"
        f"{image}\n"
    )


def gpu_section(gpu: dict) -> str:
    """The device run of benchmarks/gpu_check.sh (a GPU lent for minutes, not part of run_all.sh)."""
    m, h, inv, g = gpu["machine"], gpu["headline"], gpu["invariance"], gpu["greedy"]
    e = gpu["engine"]
    driver = f", driver {m['driver']}" if "driver" in m else ""
    tests = gpu.get("tests")
    tested = (f"**Tests on the GPU.** `{tests['command']}`: {tests['passed']} passed, "
              f"{tests['failed']} failed ({tests['which']}).\n\n") if tests else ""
    rows = [[p, f"{r['makespan_s']:.2f} s", f"{r['output_tokens_per_s']:.0f}",
             f"{r['tpot_s']['p50'] * 1e3:.1f} ms", f"{r['mean_inflight']:.1f}", r["computed_rows"]]
            for p, r in h.items() if isinstance(r, dict)]
    arrivals = 31 * h["interval_s"]
    rerun = ""
    if now := gpu.get("invariance_windows_from_8"):
        rerun = (f" {now['note']} `{now['command']}` (decode windows of {now['windows']} rows): "
                 f"{now['identical']} of {now['requests']} (first differences at "
                 f"{now['first_difference']}). A request alone now runs on the same 8-row program "
                 "as a few in flight, so the remaining differences come with wider windows or "
                 "prompts prefilled together (this run does not tell them apart).")
    return (
        f"## On a GPU: {m['device']} (`benchmarks/gpu_check.sh`)\n\n"
        f"`{gpu['command']}`: jax {m['jax']}{driver}; {m['model']} in {e['dtype']}, "
        f"{e['max_slots']} slots of {e['max_len']} tokens. One run on a machine lent for 15 "
        "minutes in all, so it is not part of run_all.sh and some parts were cut short (said "
        "below).\n\n" + tested +
        f"**bfloat16 against float32** (greedy, 4 chat prompts): tokens agree up to positions "
        f"{g['agree_up_to']} of {g['lengths']}; the bf16 answers stay on topic "
        f"(\"{g['bf16_texts'][0].removesuffix('<|im_end|>')}\").\n\n"
        f"**Compiling every bucket** ({gpu['executables']} executables"
        f"{'; ' + gpu['executables_note'] if 'executables_note' in gpu else ''}): "
        f"{gpu['compile_s_cold']:.0f} s cold, "
        f"{gpu['compile_s_from_cache']:.0f} s from the persistent compilation cache.\n\n"
        "**Decode step against live slots** (medians of 9 calls, each read back to the host):\n\n"
        + gpu["decode_table_md"]
        + f"\n**Batch invariance in bfloat16:** {inv['identical']} of {inv['requests']} chat "
        "requests arriving staggered got exactly the tokens they get alone (first differences at "
        f"{inv['first_difference']}, lengths {inv['lengths']})."
        + rerun + "\n\n"
        f"**The headline on this card:** 32 x 512 tokens, one every {h['interval_s'] * 1e3:.0f} ms "
        f"(the paper's ratio of interval to solo latency; solo latency {h['solo_latency_s']:.2f} s):"
        "\n\n" + _table(["policy", "makespan", "tokens/s", "TPOT p50", "mean in flight",
                          "rows computed"], rows)
        + f"\n\nThe last request arrives at {arrivals:.2f} s; at flover's median TPOT its 512 "
        f"tokens end at about {arrivals + h['flover']['tpot_s']['p50'] * 512:.1f} s. "
        "`sequential` did not "
        "finish inside this lease; the next section measures it.\n"
    )


def _span(values: list[float], fmt: str) -> str:
    """'lo-hi' of some figures, each written with fmt."""
    return f"{min(values):{fmt}}-{max(values):{fmt}}"


def _gpu_headline_rows(runs: list[dict]) -> tuple[list[list], dict[str, list[float]]]:
    """One table row per gpu_check.sh --sections=headline run, and the figures the text quotes."""
    rows, figures = [], {k: [] for k in ("ratio", "seq_ms", "flover_ms", "off_bound", "fused_gap")}
    for r in runs:
        h = r["headline"]
        flover, fused, seq = (h[p]["makespan_s"] for p in ("flover", "fused", "sequential"))
        tpot = h["flover"]["tpot_s"]["p50"]
        bound = 31 * h["interval_s"] + tpot * 512
        figures["ratio"].append(seq / flover)
        figures["seq_ms"].append(seq / h["sequential"]["output_tokens"] * 1e3)
        figures["flover_ms"].append(tpot * 1e3)
        figures["off_bound"].append(abs(flover / bound - 1))
        figures["fused_gap"].append(abs(fused / flover - 1))
        rows.append([f"{h['interval_s'] * 1e3:.0f} ms", f"{h['solo_latency_s']:.2f} s",
                     f"{flover:.2f} s", f"{fused:.2f} s", f"{seq:.1f} s", f"**{seq / flover:.1f}x**",
                     f"{bound:.2f} s", f"{figures['seq_ms'][-1]:.1f} ms", f"{tpot * 1e3:.1f} ms"])
    return rows, figures


def gpu_headline_section(data: dict) -> str:
    """The headline with `sequential` (gpu_check.sh --sections=headline): runs of today's engine,
    then the earlier runs whose windows started at one row."""
    header = ["interval", "solo latency", "flover", "fused", "sequential", "flover vs sequential",
              "arrival estimate", "sequential per token", "flover TPOT p50"]
    runs, earlier = data["runs"], data["windows_from_1"]["runs"]
    m, e = runs[0]["machine"], runs[0]["engine"]
    rows, now = _gpu_headline_rows(runs)
    earlier_rows, then = _gpu_headline_rows(earlier)
    fraction = statistics.median(r["headline"]["interval_s"] / r["headline"]["solo_latency_s"]
                                 for r in runs)
    return (
        f"## The headline against `sequential` on a GPU: {m['device']}\n\n"
        f"`{runs[0]['command']}`, run {len(runs)} times: jax {m['jax']}; {e['dtype']}, "
        f"{e['max_slots']} slots of {e['max_len']} tokens, decode windows of {e['windows']} rows. "
        f"{data['note']} Compiling every bucket ({runs[0]['executables']} executables) took "
        f"{runs[0]['compile_s']:.0f} s cold and {_span([r['compile_s'] for r in runs[1:]], '.0f')} s "
        "from the cache. The interval keeps the paper's ratio of interval to a request's solo "
        "latency (0.5 s to 7.2 s on GPT-J), so it follows each run's measured solo latency (the "
        "median of two runs after a warm one). The arrival estimate is the last arrival plus 512 "
        "tokens at flover's median TPOT (not a bound: TPOT varies, and a run can end a little "
        "before it).\n\n"
        + _table(header, rows)
        + f"\n\nflover finishes **{statistics.median(now['ratio']):.1f}x** sooner than `sequential` "
        f"(median of {len(runs)}; {_span(now['ratio'], '.1f')}x), at the arrival estimate (within "
        f"{max(now['off_bound']):.0%}). That is about this workload's ceiling on a "
        "card where a step costs the same for 1 or 32 rows: with requests arriving every "
        f"{fraction:.3f} of a solo latency, and each costing what it costs alone, the last one ends "
        f"31 x {fraction:.3f} + 1 solo latencies after the first arrives, where `sequential` takes 32: "
        f"about {32 / (31 * fraction + 1):.1f}x. A request alone costs "
        f"{_span(now['seq_ms'], '.1f')} ms a token, flover's requests "
        f"{_span(now['flover_ms'], '.1f')} ms; `fused` ends within {max(now['fused_gap']):.0%} of "
        "flover, since computing every row costs almost nothing on this card, unlike on the CPU."
        f"\n\n**Before windows started at 8 rows off CPU.** {data['windows_from_1']['note']} Decode "
        f"windows from 1 row; {earlier[0]['executables']} executables, compiled in "
        f"{earlier[0]['compile_s']:.0f} s cold and {earlier[1]['compile_s']:.0f} s from the cache:"
        "\n\n" + _table(header, earlier_rows)
        + f"\n\nThere flover was {_span(then['ratio'], '.1f')}x `sequential`, but partly because a "
        f"request alone ran on the one-row program at {_span(then['seq_ms'], '.1f')} ms a token "
        "(next section): the runs above measure the engine as it is.\n"
    )


def gpu_batch_invariant_section(data: dict) -> str:
    """gpu_check.sh with and without --batch_invariant on one lease: tokens, speed, compiles."""
    inv, heads = data["invariance"], data["headline"]
    names = {"default": "default", "batch_invariant": "`batch_invariant=True`"}
    inv_rows = [[names[k], r["engine"]["windows"], f"**{r['invariance']['identical']} of "
                 f"{r['invariance']['requests']}**", r["invariance"]["first_difference"]]
                for k, r in inv.items()]
    compiles = {"default": heads["default"], "batch_invariant": data["compile"]["batch_invariant"]}
    head_rows = []
    for k, r in heads.items():
        h = r["headline"]
        flover, fused, seq = (h[p]["makespan_s"] for p in ("flover", "fused", "sequential"))
        head_rows.append([
            names[k], r["engine"]["windows"],
            f"{compiles[k]['executables']} in {compiles[k]['compile_s']:.0f} s",
            f"{h['interval_s'] * 1e3:.0f} ms", f"{flover:.2f} s", f"{fused:.2f} s",
            f"{seq:.1f} s", f"{seq / flover:.1f}x", f"{h['sequential']['tpot_s']['p50'] * 1e3:.2f} ms",
            h["flover"]["computed_rows"]])
    m = inv["default"]["machine"]
    commands = "; ".join(f"`{r['command']}`" for group in (inv, heads, data["compile"])
                         for r in group.values())
    return (
        f"## Batch-invariant mode on a GPU: {m['device']}\n\n"
        f"jax {m['jax']}; bfloat16. {data['note']} Commands: {commands}.\n\n"
        "**Tokens.** 16 chat requests arriving staggered (64 slots of 1024 tokens), each against "
        "the same request alone on the same engine; a first difference equal to the request's "
        "length means every token matched:\n\n"
        + _table(["engine", "decode windows", "solo tokens", "first differences"], inv_rows)
        + "\n\n**Speed and compiles.** The headline (32 x 512 tokens, the interval at the "
        "paper's ratio to the solo latency), 32 slots of 576 tokens; compiles are cold, every "
        "bucket of prompts up to 32 tokens:\n\n"
        + _table(["engine", "decode windows", "executables compiled", "interval", "flover",
                  "fused", "sequential", "flover vs sequential", "sequential TPOT p50",
                  "rows flover computed"], head_rows)
        + "\n\nWith one decode program every step computes all 32 slots, yet flover ends at the "
        "same time: on this card a step costs about the same up to 32 rows, and flover's makespan "
        "is at the arrival estimate either way. `sequential` ran its lone request on the 32-row program "
        "instead of the 8-row one; the ratio moved with it. The mode's price shows on a CPU, "
        "where every computed row costs (it then costs what `fused` does), and on a card past "
        "the width where rows start to cost.\n"
    )


def gpu_width_section(probe: dict) -> str:
    """benchmarks/gpu_width_probe.py on a lent GPU: why windows start at 8 rows off CPU."""
    rows = [[w, f"{t['read_back_ms']:.2f} ms", f"{t['pipelined_ms']:.2f} ms"]
            for w, t in probe["steps"].items()]
    solo = {name: statistics.median(runs) for name, runs in probe["solo"].items()}
    (name_1, from_1), (name_8, from_8) = solo.items()
    return (
        f"## The narrowest window on a GPU: {probe['device']}\n\n"
        f"`{probe['command']}`: jax {probe['jax']}; random weights of SmolLM2-135M's shape in "
        f"bfloat16, one live row at 240 tokens of context. {probe.get('note', '')}\n\n"
        + _table(["window", "step, read back", "step, pipelined"], rows)
        + f"\n\nA request alone (8 + 256 tokens, medians of 3): {from_1:.2f} s on {name_1}, "
        f"{from_8:.2f} s on {name_8}: **{from_1 / from_8:.1f}x** sooner. So off CPU the engine's "
        "windows start at 8 rows (`Buckets.for_engine(min_window=8)`).\n"
    )


def interrupts_section(record: dict) -> str:
    t = record["totals"]
    by_mode = collections.Counter(try_["mode"] for try_ in record["tries"])
    return (
        "## Stopping on a signal (`benchmarks/interrupts.py`)\n\n"
        f"`{record['command']}` on {record['cpu']}: {t['tries']} runs of main.py "
        f"({', '.join(f'{n} {mode}' for mode, n in sorted(by_mode.items()))}), each sent SIGINT "
        "(or, one in five, SIGTERM) at a random moment of its load, warm-up or run; "
        f"{t['interrupted']} were still running when it came. **{t['clean']} of {t['tries']} "
        f"stopped cleanly** (exit 130 / 143, or finished before the signal): "
        f"{t['crashes']} crashes, {t['tracebacks']} tracebacks, {t['hangs']} hangs.\n"
    )


def servers_section(servers: dict, why: str | None) -> str:
    """compare_servers.py: every server through our one HTTP client, per workload."""
    parts = [
        "## Servers through one HTTP client (`benchmarks/compare_servers.py`)\n\n"
        f"On {servers['cpu']} ({servers['date']}): each server in turn on 127.0.0.1, driven by "
        "`main.py --mode=bench --backend=openai` (streamed, one client thread per request, in its "
        "own process); random-token prompts, greedy, EOS ignored; one untimed burst first on every "
        "server, then one run of each workload, every server with its own defaults (prefix "
        "caching and chunked prefill on where it has them). TTFT at the first streamed token, ITL "
        "between streamed tokens. Versions: "
        + "; ".join(f"{s}: {v}" for s, v in servers["versions"].items()) + ".\n"]
    runs = servers["systems"]
    for workload, description in servers["workloads"].items():
        ours = runs.get("flover", {}).get(workload)
        rows = []
        for system, by_workload in runs.items():
            r = by_workload.get(workload)
            if r is None:
                continue
            rows.append([SERVERS.get(system, system), f"{r['output_tokens_per_s']:.0f}",
                         *(f"{r[k][p] * 1e3:.0f} ms" for k in ("ttft_s", "itl_s") for p in ("p50", "p99")),
                         r["errors"],
                         f"{ours['output_tokens_per_s'] / r['output_tokens_per_s']:.2f}x" if ours else ""])
        parts.append(f"### {workload}: {description}\n\n`{servers['commands'][workload]}`, "
                     f"{servers['max_len'][workload]} tokens a slot (sequence).\n\n" + _table(
            ["system", "output tokens/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "errors",
             "flover_jax server vs it"], rows) + "\n")
    if why:
        parts.append(why)
    return "\n".join(parts)


def server_section(overhead: dict | None, soak: dict | None) -> str:
    parts = ["## Serving over HTTP (`benchmarks/server_vs_engine.py`, `benchmarks/soak.py`)\n"]
    if overhead:
        rates = overhead["tokens_per_s"]
        parts.append(
            f"`{overhead['command']}` on {overhead['cpu']}: {overhead['requests']} requests of "
            f"{overhead['output_len']} tokens arriving at once, {overhead['model']}, through the "
            "in-process engine and through our server (each request streamed by its own client "
            "thread in another process), alternating.\n\n"
            + _table(["", "output tokens/s (each run)", "median"],
                     [[name, ", ".join(f"{r:.0f}" for r in rates[name]),
                       f"{statistics.median(rates[name]):.0f}"] for name in ("engine", "server")])
            + f"\n\nThe server serves **{overhead['ratio_of_medians']:.0%}** of the engine's "
            "tokens/s (ratio of medians; the pairs: "
            + ", ".join(f"{r:.0%}" for r in overhead["paired_ratios"]) + "). TTFT p50 "
            + " against ".join(f"{statistics.median(overhead['ttft_p50_s'][n]) * 1e3:.0f} ms"
                               for n in ("server", "engine"))
            + ", ITL p99 "
            + " against ".join(f"{statistics.median(overhead['itl_p99_s'][n]) * 1e3:.0f} ms"
                               for n in ("server", "engine"))
            + " (server against engine, medians). On 2 cores every CPU-second the event loop and "
            "the client threads spend per streamed token is taken from the engine's XLA threads, "
            "so the per-token path is kept lean: plain ASGI middleware (Starlette's "
            "BaseHTTPMiddleware relayed each chunk through a task of its own), one deadline "
            "timer per call instead of an `asyncio.wait_for` task per token, and a client that "
            "splits what arrives into lines itself rather than `http.client` line by line.\n")
    if soak:
        growth = soak["rss_growth"]
        parts.append(
            f"`{soak['command']}` on {soak['cpu']}: {soak['requests']} requests ("
            + ", ".join(f"{n} {kind}" for kind, n in soak["by_kind"].items())
            + f"; statuses {soak['statuses']}) to {soak['model']} with {soak['max_slots']} slots. "
            f"{soak['as_promised']} of {soak['requests']} answered as promised (a bad request a "
            "4xx naming its field, a good one its whole answer); the accepted calls made "
            f"{soak['engine_requests_accepted']} engine requests and the server ended "
            f"{soak['engine_requests_finished']:.0f} ({soak['finished_by_reason']}): none lost, "
            f"none doubled. At the end {soak['slots_in_use_at_end']:.0f} slots in use, "
            f"{soak['running_at_end']:.0f} running, {soak['waiting_at_end']:.0f} waiting; resident "
            f"memory {soak['rss_after_warmup_bytes'] / 2**30:.2f} GiB after the warm-up, "
            f"{soak['rss_end_bytes'] / 2**30:.2f} GiB at the end ({growth:+.1%}). "
            f"**{'Passed' if soak['passed'] else 'FAILED'}.**\n")
    return "\n".join(parts)


def long_prompts_section(record: dict) -> str:
    parts = ["## Long prompts and shared openings (`benchmarks/long_prompts.py`)\n",
             f"`{record['command']}` on {record['cpu']}, {record['model']}, float32, pieces of "
             f"{record['prefill_chunk']} tokens, at most {record.get('prefill_budget', '?')} prompt "
             "tokens an iteration; each engine run once untimed (compiles) and then timed.\n"]
    if stall := record.get("stall"):
        runs = stall["runs"]
        parts.append(
            f"**A long prompt among decoders.** {stall['decoders']} requests decode (8-token "
            f"prompts) when a {stall['long_prompt']}-token prompt arrives.\n\n"
            + _table(["prefill", "decoders' longest gap between tokens", "their median gap",
                      "the long prompt's TTFT"],
                     [[name, f"{r['decoders_max_itl_s']:.2f} s",
                       f"{r['decoders_median_itl_s'] * 1e3:.0f} ms",
                       f"{r['long_prompt_ttft_s']:.2f} s"] for name, r in runs.items()])
            + f"\n\nIn pieces the decoders' longest gap is **{stall['max_itl_ratio']:.2f}x** "
            f"the whole prompt's (target: at most 0.25x), and the long prompt's TTFT "
            f"**{stall['ttft_ratio']:.2f}x** (target: at most 1.5x).\n")
    if shared := record.get("shared"):
        runs = shared["runs"]
        parts.append(
            f"**A shared system prompt.** {shared['requests']} requests at once, each a "
            f"{shared['system']}-token system prompt and its own question of 16-32 tokens, "
            "32 tokens each, greedy.\n\n"
            + _table(["", "mean TTFT", "p99 TTFT", "all done", "prompt tokens from the cache"],
                     [[name.replace("_", " "), f"{r['mean_ttft_s']:.2f} s",
                       f"{r['p99_ttft_s']:.2f} s", f"{r['wall_s']:.1f} s",
                       f"{r['prefix_hit_rate']:.0%}"] for name, r in runs.items()])
            + f"\n\nWith the prefix cache the mean TTFT is **{shared['mean_ttft_ratio']:.2f}x** "
            "the one without (target: at most a third); every request's tokens are "
            + ("**the same both ways**." if shared["tokens_identical"] else "**NOT the same** both ways.")
            + "\n")
    return "\n".join(parts)


def load_memory_section(record: dict) -> str:
    ck = record["checkpoint"]
    disk = ck["safetensors_bytes"]
    rows = [[case["dtype"] + (" (its own)" if name == "own" else " (`dtype=\"float32\"`)"),
             f"{case['param_bytes'] / 1e6:.0f} MB", f"{case['peak_over_baseline'] / 1e6:.0f} MB",
             f"**{case['peak_over_disk']:.2f}x**", f"{case['seconds']:.1f} s"]
            for name, case in record["loads"].items()]
    return (
        "## Host memory of a load (`benchmarks/load_memory.py`)\n\n"
        f"`{record['command']}` on {record['cpu']}, {record['at']}: a random bfloat16 LLaMA "
        f"checkpoint (d_model {ck['d_model']}, {ck['layers']} layers, d_ff {ck['d_ff']}, vocab "
        f"{ck['vocab']}, untied head; {disk / 1e6:.0f} MB of safetensors) loaded in a fresh "
        "process by `load_model`, which reads one tensor at a time straight into its device "
        "buffer (on CPU, host memory). Peak: the process's VmHWM (mapped file pages included) "
        "less its resident memory after the imports; the ratio is to the bytes on disk.\n\n"
        + _table(["loaded as", "params", "peak over baseline", "peak / disk", "load time"], rows)
        + "\n\nIn its own dtype the peak is the model plus a tensor or two; as float32 the model "
        "itself is twice the disk's bytes.\n"
    )


def moe_step_section(record: dict) -> str:
    shape, models, slots = record["shape"], record["models"], record["slots"]
    names = {"moe": f"MoE ({shape['experts']} experts of d_ff {shape['expert_d_ff']}, top "
                    f"{shape['top_k']})",
             "dense_active": f"dense, same active size (d_ff {models['dense_active']['d_ff']})",
             "dense_total": f"dense, same total size (d_ff {models['dense_total']['d_ff']})"}
    rows = [[names[name] + f", {m['mlp_bytes'] / 1e6:.0f} MB of MLP",
             *(f"{ms:.1f}" for ms in m["step_ms"])] for name, m in models.items()]
    moe, active = models["moe"]["step_ms"], models["dense_active"]["step_ms"]
    total = models["dense_total"]["step_ms"]
    return (
        "## Mixture of experts: a decode step against dense models (`benchmarks/moe_step.py`)\n\n"
        f"`{record['command']}` on {record['cpu']}, {record['at']}, jax {record['jax']}: random "
        f"weights, d_model {shape['d_model']}, {shape['layers']} layers, vocab {shape['vocab']}, "
        f"{shape['dtype']}, every live slot at {shape['context']} cached tokens, XLA's matmuls "
        "for all three. Median decode-step ms by live slots:\n\n"
        + _table(["model", *(f"{n} slots" for n in slots)], rows)
        + f"\n\nAt 1 slot the MoE step takes **{moe[0] / active[0]:.1f}x** the same-active dense "
        f"step and {moe[0] / total[0]:.1f}x the same-total one; at {slots[-1]} slots "
        f"{moe[-1] / active[-1]:.1f}x and {moe[-1] / total[-1]:.1f}x. A step runs only the "
        "experts its tokens chose, each once, reading each from its own array (a slice of one "
        "stacked [experts, d, f] array is a copy on XLA:CPU: gathering them so made the step "
        "7.5x the same-active one). n slots choose about E (1 - (1 - k/E)^n) distinct experts "
        "between them (2 of 8 at one slot, 5.5 at four, 7.9 at sixteen), so from a few slots "
        "on a step reads most experts: as many weight bytes as the same-total model.\n"
    )


def quality_section(record: dict) -> str:
    rows = [[name, f"{v['perplexity']:.3f}", f"{v['perplexity_vs_float32']:+.2%}",
             f"{v['top1_agreement']:.2%}"] for name, v in record["variants"].items()]
    predictions = record["windows"] * (record["window_len"] - 1)
    return (
        "## Narrower weights against float32 (`benchmarks/quality.py`)\n\n"
        f"{record['model']} on Python {record['python']}'s `pydoc_data.topics` (the pages "
        f"`help()` shows): {record['windows']} windows of {record['window_len']} tokens, "
        f"{predictions} next-token predictions, each weight format as an engine here computes "
        f"it ({record['cpu']}; on CPU bfloat16 weights and KV cache with float32 activations, "
        "int8 weights with a float32 scale per output channel and group of 64 inputs; on AMX "
        "tiles, `--matmul=amx`, each matmul's input as two bfloat16 parts). Top-1 "
        "agreement: how often its likeliest next token is float32's.\n\n"
        + _table(["weights", "perplexity", "vs float32", "top-1 agreement with float32"], rows)
        + "\n")


def main() -> None:
    IMG.mkdir(parents=True, exist_ok=True)
    paper = json.loads((RESULTS / "paper.json").read_text())
    machine = paper["machine"]
    parts = [
        "# Benchmarks\n\n"
        "Generated by `benchmarks/run_all.sh` (this file and docs/img/ are its output; do not edit). "
        f"Machine: {machine['platform']}, {machine['device']} ({machine['cpu_cores']} device"
        + (f"; {machine['cpu']}" if "cpu" in machine else "") + "), "
        f"Python {machine['python']}, jax {machine['jax']}; model {paper['model']} in "
        f"{paper['dtype']}, {paper['max_slots']} slots. The machine is shared and noisy (2 cores): "
        "the headline and ablation rows are medians of repeated runs (their range in brackets), "
        "the other figures one run each, and ratios are taken within one run.\n",
        "## Decode step, compaction, prefill (`benchmarks/step_times.py`)\n\n"
        + (RESULTS / "step_times.md").read_text(),
    ]
    for weights in ("bf16", "int8"):  # the decode step with narrower weights
        if (RESULTS / f"step_times_{weights}.md").exists():
            parts.append(f"### The decode step with {weights} weights\n\n"
                         + (RESULTS / f"step_times_{weights}.md").read_text())
    for weights, name in (("float32", "default_against_paths"), ("bf16", "default_against_paths_bf16")):
        if (RESULTS / f"{name}.md").exists():
            parts.append(f"### The default against its own paths, {weights} weights\n\n"
                         + (RESULTS / f"{name}.md").read_text())
    if (RESULTS / "profile.md").exists():
        parts.append("## Where a decode step's time goes (`benchmarks/profile_step.py`)\n\n"
                     + (RESULTS / "profile.md").read_text())
    if "headline" in paper:
        parts.append(headline_section(paper))
        if (RESULTS / "roofline.json").exists():
            parts.append(roofline_section(json.loads((RESULTS / "roofline.json").read_text()), paper))
    for name, section in (("constant", constant_section), ("poisson", poisson_section),
                          ("ablation", ablation_section)):
        if name in paper:
            parts.append(section(paper))
    if (RESULTS / "peers.json").exists():
        parts.append(peers_section(json.loads((RESULTS / "peers.json").read_text())))
    if (RESULTS / "peers_amd_avx2.json").exists():  # the AMD kind without AVX-512
        parts.append(peers_section(json.loads((RESULTS / "peers_amd_avx2.json").read_text()),
                                   " on an AMD EPYC without AVX-512 (family 25 model 1, Zen 3)",
                                   "peers_concurrency_amd_avx2"))
    if (RESULTS / "peers_amd.json").exists():  # an earlier run on the other machine kind
        parts.append(peers_section(json.loads((RESULTS / "peers_amd.json").read_text()),
                                   " on the AMD EPYC machine, an earlier run",
                                   "peers_concurrency_earlier"))
    if (RESULTS / "gpu_h200.json").exists():
        parts.append(gpu_section(json.loads((RESULTS / "gpu_h200.json").read_text())))
    if (RESULTS / "gpu_h200_headline.json").exists():
        parts.append(gpu_headline_section(json.loads((RESULTS / "gpu_h200_headline.json").read_text())))
    if (RESULTS / "gpu_h200_width_probe.json").exists():
        parts.append(gpu_width_section(json.loads((RESULTS / "gpu_h200_width_probe.json").read_text())))
    if (RESULTS / "gpu_h200_batch_invariant.json").exists():
        parts.append(gpu_batch_invariant_section(
            json.loads((RESULTS / "gpu_h200_batch_invariant.json").read_text())))
    if (RESULTS / "timeline.json").exists():
        parts.append(timeline_section(json.loads((RESULTS / "timeline.json").read_text())))
    overhead, soak = (json.loads(path.read_text()) if path.exists() else None
                      for path in (RESULTS / "server_vs_engine.json", RESULTS / "soak.json"))
    if overhead or soak:
        parts.append(server_section(overhead, soak))
    if (RESULTS / "servers.json").exists():
        why = RESULTS / "servers_why.md"
        parts.append(servers_section(json.loads((RESULTS / "servers.json").read_text()),
                                     why.read_text() if why.exists() else None))
    if (RESULTS / "long_prompts.json").exists():
        parts.append(long_prompts_section(json.loads((RESULTS / "long_prompts.json").read_text())))
    if (RESULTS / "interrupts.json").exists():
        parts.append(interrupts_section(json.loads((RESULTS / "interrupts.json").read_text())))
    for name, section in (("load_memory", load_memory_section), ("moe_step", moe_step_section),
                          ("quality", quality_section)):
        if (RESULTS / f"{name}.json").exists():
            parts.append(section(json.loads((RESULTS / f"{name}.json").read_text())))
    notes = Path("benchmarks/NOTES.md")
    if notes.exists():
        parts.append(notes.read_text())
    (DOCS / "benchmarks.md").write_text("\n".join(parts))
    print(f"wrote {DOCS / 'benchmarks.md'}")


if __name__ == "__main__":
    main()
