"""`auto` ops chosen by measurement (flover_jax/op_choice.py): timed once per machine and
shape, cached, the least-slow pair picked, and fused still equal to solo with the pick."""

import json

import jax
import pytest

from flover_jax import op_choice
from flover_jax.bench import run as bench_run
from flover_jax.engine import Engine, TimedRequest
from flover_jax.sampling_params import SamplingParams
from models import kernels
from models.presets import tiny_config
from models.transformer import init_params, with_dtype

PAIRS = {"cpu_kernel/cpu_kernel", "cpu_kernel/xla", "xla/cpu_kernel", "xla/xla"}


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config("llama", n_layers=1, max_positions=128)
    return cfg, init_params(cfg, jax.random.key(0), scale=0.3)


@pytest.fixture
def measuring(monkeypatch, tmp_path):
    """`auto` times the candidates, into a fresh cache."""
    monkeypatch.setenv(op_choice.MODE_ENV, "measure")
    monkeypatch.setenv("FLOVER_KERNEL_CACHE", str(tmp_path))
    return tmp_path


def test_pick_takes_the_pair_least_slow_at_its_worst_width():
    step_ms = {"cpu_kernel/cpu_kernel": {1: 10.0, 32: 100.0},  # 1.25x the best at width 1
               "xla/xla": {1: 8.0, 32: 150.0},                 # 1.5x at 32
               "cpu_kernel/xla": {1: 9.0, 32: 105.0}}          # at most 1.125x: picked
    assert op_choice.pick(step_ms) == "cpu_kernel/xla"
    assert op_choice.pick({"a/b": {1: 5.0}, "c/d": {1: 5.0}}) == "a/b"  # a tie: the first


def test_auto_times_every_pair_once_per_machine_and_shape(tiny, measuring, monkeypatch):
    cfg, params = tiny
    first = Engine(cfg, params, max_slots=1, max_len=64).executor.op_choice
    assert first.how == "measured" and set(first.step_ms) == PAIRS
    assert all(set(by_width) == {1} for by_width in first.step_ms.values())
    assert f"{first.attention}/{first.matmul}" == op_choice.pick(first.step_ms)
    [cached] = (measuring / "op_choice").glob("*.json")
    assert json.loads(cached.read_text())["attention"] == first.attention

    def no_timing(_executors):
        raise AssertionError("timed again")

    monkeypatch.setattr(op_choice, "decode_step_ms", no_timing)
    again = Engine(cfg, params, max_slots=1, max_len=64).executor
    assert again.op_choice.how == "cached" and again.op_choice.step_ms == first.step_ms
    assert (again.attention_kernel, again.matmul_kernel) == (first.attention_kernel,
                                                            first.matmul_kernel)
    with pytest.raises(AssertionError, match="timed again"):  # another shape is timed afresh
        Engine(cfg, params, max_slots=2, max_len=64)
    # Named paths, or one candidate left, are not timed.
    assert Engine(cfg, params, max_slots=2, max_len=64, attention="xla",
                  matmul="cpu_kernel").executor.op_choice.how == "asked"
    assert Engine(cfg.replace(dtype="float16"), params, max_slots=2,  # no kernel computes it
                  max_len=64).executor.op_choice.how == "asked"


def test_the_fastest_pair_runs_fused_equal_to_solo_and_the_bench_says_so(tiny, measuring,
                                                                         monkeypatch):
    """Step times that favour XLA's attention with the kernel's matmuls (at every width, 4
    slots: 1 and 4): those run, and each request gets its solo tokens."""
    cfg, params = tiny

    def fake_times(executors):
        assert set(executors) == PAIRS
        return {pair: {w: (1.0 if pair == "xla/cpu_kernel" else 2.0) * w
                       for w in op_choice.timing_widths(ex.num_slots, ex.buckets.windows)}
                for pair, ex in executors.items()}

    monkeypatch.setattr(op_choice, "decode_step_ms", fake_times)
    prompt_ms = {"cpu_kernel": 3.0, "amx": 5.0}  # where the CPU has AMX tiles: the FMAs win
    monkeypatch.setattr(op_choice, "prompt_matmul_ms", lambda candidates: prompt_ms)
    engine = Engine(cfg, params, max_slots=4, max_len=64)
    assert set(engine.executor.op_choice.step_ms["xla/xla"]) == {1, 4}
    assert (engine.executor.attention_kernel, engine.executor.matmul_kernel) == (False, True)
    prompt_timed = kernels.tiles_available()
    requests = [TimedRequest(list(range(3 + i, 9 + 2 * i)),
                             SamplingParams(max_new_tokens=6 + 3 * i, ignore_eos=True), 0.0)
                for i in range(6)]
    summary = bench_run(engine, requests, warmup=False, solo_samples=0)
    assert summary["ops"] == {"attention": "xla", "matmul": "cpu_kernel", "chosen_by": "measured",
                              "step_ms": {pair: {"1": 2.0, "4": 8.0} for pair in PAIRS - {"xla/cpu_kernel"}}
                              | {"xla/cpu_kernel": {"1": 1.0, "4": 4.0}},
                              "prompt_matmul": "cpu_kernel",
                              "prompt_ms": prompt_ms if prompt_timed else {}}
    for request, output in zip(requests, engine.run(requests).outputs):
        assert output.token_ids == engine.generate([request.prompt], request.params)[0].token_ids


def test_a_bad_mode_is_refused_naming_the_variable(tiny, monkeypatch):
    cfg, params = tiny
    monkeypatch.setenv(op_choice.MODE_ENV, "fastest")
    with pytest.raises(ValueError, match=r"FLOVER_AUTO_OPS='fastest': must be one of \('measure', 'rule'\)"):
        Engine(cfg, params, max_slots=2, max_len=32)


def test_a_bfloat16_model_times_the_amx_tiles_where_the_cpu_has_them(tiny, measuring, monkeypatch):
    """bfloat16 weights add the matmul kernel on AMX tiles to the candidates (where this CPU
    has them); picked, every packed weight is multiplied on the tiles, and each request still
    gets its solo tokens."""
    cfg, params = tiny
    cfg, params = cfg.replace(dtype="bfloat16"), with_dtype(params, jax.numpy.bfloat16)
    amx_pairs = {"cpu_kernel/amx", "xla/amx"} if kernels.tiles_available() else set()

    def fake_times(executors):
        assert set(executors) == PAIRS | amx_pairs
        return {pair: {w: (1.0 if pair.endswith("/amx") else 2.0) * w
                       for w in op_choice.timing_widths(ex.num_slots, ex.buckets.windows)}
                for pair, ex in executors.items()}

    monkeypatch.setattr(op_choice, "decode_step_ms", fake_times)
    engine = Engine(cfg, params, max_slots=4, max_len=64)
    assert engine.executor.op_choice.matmul_tiles == bool(amx_pairs)
    assert engine.executor.params.lm_head.tiles == bool(amx_pairs)
    requests = [TimedRequest(list(range(3 + i, 9 + 2 * i)),
                             SamplingParams(max_new_tokens=6 + 3 * i, ignore_eos=True), 0.0)
                for i in range(6)]
    for request, output in zip(requests, engine.run(requests).outputs):
        assert output.token_ids == engine.generate([request.prompt], request.params)[0].token_ids


@pytest.mark.parametrize("tiles_faster", [True, False])
def test_prompts_take_the_amx_tiles_for_float32_weights_where_faster(tiny, measuring, monkeypatch,
                                                                    tiles_faster):
    """With float32 weights on the matmul kernel, the prompts' matmuls are timed on the FMAs and
    on AMX tiles (as bfloat16 parts), where the CPU has the tiles, and the faster computes every
    prefill while decode steps keep the FMAs; requests with prompts of several pieces still get
    their solo tokens. Without the tiles nothing is timed and prompts take the FMAs."""
    cfg, params = tiny
    timed = []

    def fake_prompt_times(candidates):
        timed.append(set(candidates))
        tiles = candidates["amx"].layers[0].mlp.w_out
        assert tiles.tiles and not candidates["cpu_kernel"].layers[0].mlp.w_out.tiles
        return {"cpu_kernel": 2.0, "amx": 1.0 if tiles_faster else 3.0}

    monkeypatch.setattr(op_choice, "decode_step_ms", lambda executors: {
        pair: {1: 1.0 if pair == "cpu_kernel/cpu_kernel" else 2.0} for pair in executors})
    monkeypatch.setattr(op_choice, "prompt_matmul_ms", fake_prompt_times)
    engine = Engine(cfg, params, max_slots=1, max_len=64, prefill_chunk=8)
    ex = engine.executor
    on_tiles = kernels.tiles_available() and tiles_faster
    assert timed == ([{"cpu_kernel", "amx"}] if kernels.tiles_available() else [])
    assert ex.op_choice.summary()["prompt_matmul"] == ("amx" if on_tiles else "cpu_kernel")
    assert ex.prompt_params.layers[0].mlp.w_out.tiles == on_tiles
    assert not ex.params.layers[0].mlp.w_out.tiles and not ex.prompt_params.lm_head.tiles
    requests = [TimedRequest(list(range(3 + i, 20 + 5 * i)),  # 17-37 tokens: 3-5 pieces of 8
                             SamplingParams(max_new_tokens=5 + 2 * i, ignore_eos=True), 0.1 * i)
                for i in range(5)]
    for request, output in zip(requests, engine.run(requests).outputs):
        assert output.token_ids == engine.generate([request.prompt], request.params)[0].token_ids
