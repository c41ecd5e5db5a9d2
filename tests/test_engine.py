"""The fused engine on a tiny random LLaMA: fused equals solo, sampling independence,
compaction, bounded compiles, cancel, and bad input through the API."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flover_jax import executor, step
from flover_jax.chunks import PromptPiece
from flover_jax.engine import Engine, TimedRequest
from flover_jax.sampling_params import SamplingParams
from flover_jax.state import DecodeState
from models import kernels, transformer
from models.config import LayerSpec, Rope
from models.presets import tiny_config
from models.transformer import init_params


class IterationClock:
    """A fake clock that advances one unit per scheduler iteration: arrivals become exact."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def tick(self, _scheduler=None) -> None:
        self.t += 1.0

    def sleep(self, seconds: float) -> None:
        self.t += seconds


def run_with_fake_clock(engine, workload, policy=None):
    clock = IterationClock()
    return engine.run(workload, policy, on_iteration=clock.tick, clock=clock, sleep=clock.sleep)


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config("llama", max_positions=256)
    # Large weights give peaked, varied logits (no near-ties, no degenerate loops).
    return cfg, init_params(cfg, jax.random.key(0), scale=0.3)


@pytest.fixture(scope="module")
def engine(tiny):
    cfg, params = tiny
    engine = Engine(cfg, params, max_slots=8, max_len=128)
    assert engine.executor.attention_kernel and engine.executor.matmul_kernel  # "auto" here
    return engine


@pytest.fixture(scope="module")
def xla_engine(tiny):
    """The same engine with XLA's ops instead of the CPU kernels."""
    cfg, params = tiny
    return Engine(cfg, params, max_slots=8, max_len=128, attention="xla", matmul="xla")


def mixed_workload(n=24, seed=0, sampling=False):
    rng = np.random.default_rng(seed)
    requests = []
    for i in range(n):
        params = SamplingParams(
            max_new_tokens=int(rng.integers(1, 48)),
            ignore_eos=bool(i % 3),
            temperature=0.8 if sampling and i % 2 else 0.0,
            top_p=0.9 if sampling and i % 4 == 1 else 1.0,
            top_k=20 if sampling and i % 4 == 3 else 0,
            seed=i,
            logprobs=i % 5 == 0,  # rows that ask share steps with rows that do not
        )
        prompt = rng.integers(3, 256, int(rng.integers(1, 40))).tolist()
        requests.append(TimedRequest(prompt, params, arrival_s=float(i) * 1.5))
    return requests


def solo_tokens(engine, request):
    return engine.generate([request.prompt], request.params)[0].token_ids


_SOLO_RUNS = {}  # (engine, prompt, params) -> the output alone: each policy's test reuses it


def solo_output(engine, request):
    key = (id(engine), tuple(request.prompt), request.params)
    if key not in _SOLO_RUNS:
        _SOLO_RUNS[key] = engine.generate([request.prompt], request.params)[0]
    return _SOLO_RUNS[key]


@pytest.mark.parametrize("ops", ["cpu_kernels", "xla"])
@pytest.mark.parametrize("policy", ["flover", "fused", "static"])
def test_fused_equals_solo_greedy(request, policy, ops):
    engine = request.getfixturevalue({"cpu_kernels": "engine", "xla": "xla_engine"}[ops])
    workload = mixed_workload()
    result = run_with_fake_clock(engine, workload, policy)
    stats = result.stats
    assert stats.admitted == len(workload)
    if policy != "static":
        assert stats.joins > 0
    if policy == "flover":
        assert stats.mid_window_finishes > 0 and stats.compactions > 0 and stats.moves > 0
    for request, output in zip(workload, result.outputs):
        assert output.finish_reason in ("stop", "length")
        alone = solo_output(engine, request)
        assert output.token_ids == alone.token_ids, f"request {output.request_id}"
        if request.params.logprobs:  # equal to rounding: a prefill's batch moves the last bits
            np.testing.assert_allclose(output.logprobs, alone.logprobs, rtol=1e-5, atol=1e-5)
        else:
            assert output.logprobs is None


FAMILY_CONFIGS = {
    family: tiny_config(family, max_positions=256)
    for family in ("gpt2", "gptj", "gpt_neox", "qwen2", "qwen3", "phi3", "gemma2", "gemma3",
                   "mixtral", "qwen3_moe")
} | {
    "llama-yarn": tiny_config("llama", max_positions=256).replace(layers=(LayerSpec(
        rope=Rope(scaling="yarn", factor=4.0, original_max_positions=32, attention_factor=1.14),
        mlp="gated", activation="silu"),) * 2),
}


@pytest.mark.parametrize("family", FAMILY_CONFIGS)
def test_fused_equals_solo_greedy_for_every_family(family):
    """Each family's layers through the engine (CPU kernels where they apply): a request's
    tokens in the fused loop are its tokens alone."""
    cfg = FAMILY_CONFIGS[family]
    params = init_params(cfg, jax.random.key(1), scale=0.3)
    engine = Engine(cfg, params, max_slots=4, max_len=128)
    # "auto": the attention kernel where it computes the model's attention (sliding windows
    # included; not Gemma 2's soft-capping, which XLA's ops compute), the matmul kernel
    # everywhere.
    assert engine.executor.matmul_kernel
    assert engine.executor.attention_kernel == (family != "gemma2")
    if family == "gemma2":
        with pytest.raises(ValueError, match="attention='cpu_kernel' cannot be used: it does "
                                             "not soft-cap the scores"):
            Engine(cfg, params, max_slots=4, max_len=128, attention="cpu_kernel")
    workload = mixed_workload(n=6)
    result = run_with_fake_clock(engine, workload, "flover")
    assert result.stats.joins > 0
    for request, output in zip(workload, result.outputs):
        assert output.token_ids == solo_tokens(engine, request), f"request {output.request_id}"


def test_chunked_prefill_and_prefix_hits_give_each_request_its_solo_tokens(tiny):
    """Long prompts go in pieces of 16 between decode steps, compacted mid-prompt, a prompt's
    consecutive pieces share a call, and requests that open with a cached system prompt copy
    its K/V instead of computing it: each request's tokens (penalties included, which read the
    prompt's marks) are the ones it gets alone on an engine with no prefix cache that computes
    one piece per iteration."""
    cfg, params = tiny
    engine = Engine(cfg, params, max_slots=4, max_len=128, prefill_chunk=16, prefix_cache_rows=2)
    alone = Engine(cfg, params, max_slots=4, max_len=128, prefill_chunk=16, prefix_cache_rows=0,
                   prefill_budget=16)
    calls = []
    prefill = engine.executor.prefill
    engine.executor.prefill = lambda pieces: calls.append([p.slot for p in pieces]) or prefill(pieces)
    rng = np.random.default_rng(3)
    systems = [rng.integers(3, 256, 40).tolist(), rng.integers(3, 256, 21).tolist()]
    workload = []
    for i in range(14):
        own = rng.integers(3, 256, int(rng.integers(1, 30))).tolist()
        prompt = systems[i % 3] + own if i % 3 < 2 else own
        params_i = SamplingParams(max_new_tokens=int(rng.integers(1, 30)), ignore_eos=bool(i % 2),
                                  repetition_penalty=1.4 if i % 4 == 1 else 1.0,
                                  frequency_penalty=0.5 if i % 4 == 3 else 0.0)
        workload.append(TimedRequest(prompt, params_i, arrival_s=float(i) * 1.5))
    result = run_with_fake_clock(engine, workload, "flover")
    stats = result.stats
    assert stats.prefix_hits > 0 and stats.prefixes_stored > 0
    assert stats.prompt_pieces > stats.admitted and stats.compactions > 0
    assert any(len(set(slots)) < len(slots) for slots in calls)  # a slot's pieces shared a call
    assert engine.prefix_cache.referenced == 0
    for request, output in zip(workload, result.outputs):
        assert output.finish_reason in ("stop", "length")
        assert output.token_ids == solo_tokens(alone, request), f"request {output.request_id}"


def test_a_slots_consecutive_pieces_in_one_call_fill_it_as_calls_of_one_piece_do(engine):
    """Two pieces of one prompt in one prefill call leave the slot's K/V, its prompt marks and
    its first token bitwise as two calls do, the second piece reading the first's K/V and
    marks within the call."""
    ex = engine.executor
    prompt = np.random.default_rng(9).integers(3, 256, 100).tolist()
    params = SamplingParams(max_new_tokens=4, repetition_penalty=1.5)

    def pieces(slot):
        return [PromptPiece(slot, prompt[:64], 0, False, params),
                PromptPiece(slot, prompt[64:], 64, True, params)]

    together = ex.read(ex.prefill(pieces(0)))
    apart = [ex.read(ex.prefill([piece])) for piece in pieces(1)]
    assert together.tokens.tolist() == [-1, apart[1].tokens[0]]  # only the last piece samples
    seen = np.asarray(ex.state.seen)
    assert np.array_equal(seen[0], seen[1])
    assert set(np.flatnonzero(seen[0])) == {*prompt, int(apart[1].tokens[0])}
    for k, v in zip(ex.state.cache.k, ex.state.cache.v):
        for array in (np.asarray(k), np.asarray(v)):
            assert np.array_equal(array[0, :, :100], array[1, :, :100])
    ex.release([0, 1])


def test_penalties_follow_each_request_through_fused_steps(engine):
    # Each request's seen mask and output counts must follow it into whatever slot and window
    # it decodes in: fused tokens equal solo tokens, and the penalties do change tokens.
    workload = [
        TimedRequest(r.prompt, dataclasses.replace(
            r.params, repetition_penalty=(1.0, 3.0, 1.0)[i % 3],
            presence_penalty=(0.0, 0.0, 4.0)[i % 3],
            frequency_penalty=(0.0, 0.0, 1.5, 0.0, 0.0, 0.0)[i % 6]), r.arrival_s)
        for i, r in enumerate(mixed_workload(n=12, seed=5))
    ]
    fused = run_with_fake_clock(engine, workload, "flover")
    assert fused.stats.compactions > 0
    for request, output in zip(workload, fused.outputs):
        assert output.token_ids == solo_tokens(engine, request), f"request {output.request_id}"
    penalised = [r for i, r in enumerate(workload) if i % 3]
    plain = engine.generate([r.prompt for r in penalised], [
        dataclasses.replace(r.params, repetition_penalty=1.0, presence_penalty=0.0,
                            frequency_penalty=0.0)
        for r in penalised])
    outputs = [o for i, o in enumerate(fused.outputs) if i % 3]
    assert any(o.token_ids != p.token_ids for o, p in zip(outputs, plain))


def test_cpu_kernels_and_xla_ops_agree(engine, xla_engine):
    workload = mixed_workload(n=12, seed=3, sampling=True)
    kernel = run_with_fake_clock(engine, workload).outputs
    xla = run_with_fake_clock(xla_engine, workload).outputs
    assert [o.token_ids for o in kernel] == [o.token_ids for o in xla]


@pytest.fixture(scope="module")
def int8_engines(tiny):
    """The tiny model with int8 weights: with the CPU kernels (int8 panels) and with XLA's ops."""
    cfg, params = tiny
    cfg, params = cfg.replace(quantize="int8"), transformer.quantize_weights(params)
    return (Engine(cfg, params, max_slots=8, max_len=128),
            Engine(cfg, params, max_slots=8, max_len=128, attention="xla", matmul="xla"))


def test_int8_weights_keep_fused_equal_to_solo_and_match_their_xla_reference(int8_engines):
    kernel_engine, xla_engine = int8_engines
    assert kernel_engine.executor.matmul_kernel and not xla_engine.executor.matmul_kernel
    workload = mixed_workload(n=12, seed=5)
    kernel = run_with_fake_clock(kernel_engine, workload).outputs
    for request, output in zip(workload, kernel):
        assert output.token_ids == solo_tokens(kernel_engine, request)
    assert [o.token_ids for o in kernel] == [
        o.token_ids for o in run_with_fake_clock(xla_engine, workload).outputs]


@pytest.mark.parametrize("matmul", ["cpu_kernel", "amx"])
def test_bfloat16_kernels_keep_fused_equal_to_solo(tiny, matmul):
    """bfloat16 weights and KV cache through both kernels (float32 activations, as a CPU engine
    computes them), the matmuls on the FMAs or on AMX tiles: each row is computed alone, so a
    request's tokens do not depend on its neighbours (the kernels' sums are held to XLA's in
    test_kernels). Where the CPU has no AMX tiles, asking for them is an error that says so."""
    cfg, params = tiny
    cfg, params = cfg.replace(dtype="bfloat16"), transformer.with_dtype(params, jnp.bfloat16)
    if matmul == "amx" and not kernels.tiles_available():
        with pytest.raises(ValueError, match="matmul='amx' cannot be used: .*no AMX tiles"):
            Engine(cfg, params, max_slots=8, max_len=128, matmul=matmul)
        return
    engine = Engine(cfg, params, max_slots=8, max_len=128, attention="cpu_kernel", matmul=matmul)
    assert engine.executor.state.cache.k[0].dtype == jnp.uint16  # bfloat16's bits
    assert engine.executor.cfg.activation_dtype == jnp.float32
    assert engine.executor.params.lm_head.tiles == (matmul == "amx")
    workload = mixed_workload(n=12, seed=6)
    for request, output in zip(workload, run_with_fake_clock(engine, workload).outputs):
        assert output.token_ids == solo_tokens(engine, request)


def test_engine_sizes_are_checked(tiny):
    cfg, params = tiny
    for options, message in [
        (dict(max_slots=0), r"max_slots=0: must be an int >= 1"),
        (dict(max_len=1), r"max_len=1: must be an int >= 2"),
        (dict(max_len=4096), r"max_len=4096: must be in \[2, "),
        (dict(max_prefill_batch=0), r"max_prefill_batch=0: must be an int >= 1"),
        (dict(max_prefill_batch=4, batch_invariant=True),
         r"max_prefill_batch=4: must be 1 \(or unset\) with batch_invariant=True"),
    ]:
        with pytest.raises(ValueError, match=message):
            Engine(cfg, params, **{"max_slots": 2, "max_len": 32, **options})
    for prefill_batch in (None, 1):  # unset or 1: prompts are prefilled one at a time
        invariant = Engine(cfg, params, max_slots=2, max_len=32, batch_invariant=True,
                           max_prefill_batch=prefill_batch)
        assert invariant.executor.buckets.prefill_batches(8) == (1,)
    assert Engine(cfg, params, max_slots=8, max_len=32).executor.buckets.prefill_batches(32) == (1, 2, 4, 8)


@pytest.mark.parametrize("option", ["attention", "matmul"])
def test_kernel_choices_are_checked(tiny, option):
    cfg, params = tiny
    with pytest.raises(ValueError, match=rf"{option}='flash': must be one of"):
        Engine(cfg, params, max_slots=2, max_len=32, **{option: "flash"})
    with pytest.raises(ValueError, match=rf"{option}='cpu_kernel' cannot be used: .*this one is float16"):
        Engine(cfg.replace(dtype="float16"), params, max_slots=2, max_len=32,
               **{option: "cpu_kernel"})
    if option == "matmul":
        with pytest.raises(ValueError, match="matmul='amx' cannot be used: AMX tiles multiply "
                                             "bfloat16 weights, this model's are float32"):
            Engine(cfg, params, max_slots=2, max_len=32, matmul="amx")
    fp16 = Engine(cfg.replace(dtype="float16"), params, max_slots=2, max_len=32)
    assert not fp16.executor.attention_kernel  # "auto" falls back to XLA's ops
    assert not fp16.executor.matmul_kernel


def test_packed_params_are_reused_or_refused(engine, tiny):
    """An engine's packed params serve another kernel engine as they are; an engine on XLA's
    matmuls refuses them with a message."""
    cfg, _ = tiny
    packed = engine.executor.params
    again = Engine(cfg, packed, max_slots=2, max_len=32)
    assert again.executor.params.lm_head.panels is packed.lm_head.panels
    with pytest.raises(ValueError, match="params: packed for the CPU matmul kernel"):
        Engine(cfg, packed, max_slots=2, max_len=32, matmul="xla")


def test_cpu_windows_start_at_one_row(tiny):
    # A CPU step costs by the rows it computes (accelerators start at 8 rows: buckets.py).
    cfg, params = tiny
    xla = Engine(cfg, params, max_slots=16, max_len=32, attention="xla")
    kernel = Engine(cfg, params, max_slots=16, max_len=32, attention="cpu_kernel")
    assert xla.executor.buckets.windows == (1, 2, 4, 8, 16)
    assert kernel.executor.buckets.windows == (1, 2, 4, 8, 12, 16)


def test_batch_invariant_engine_gives_solo_tokens_in_bfloat16():
    # XLA picks a kernel, and so its rounding, by shape. In bfloat16 the default engine gives
    # 13 of these 16 requests their solo tokens on XLA:CPU 0.10.2 (3 diverge):
    # their rows ran in windows, kv lengths and prefill batches that depend on who shared the
    # device. batch_invariant leaves a request only shapes its own prompt decides.
    cfg = tiny_config("llama", max_positions=256, d_model=256, n_heads=4, n_kv_heads=2,
                      head_dim=64, d_ff=512, n_layers=4).replace(dtype="bfloat16")
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16),
                          init_params(cfg, jax.random.key(0), scale=0.1))
    engine = Engine(cfg, params, max_slots=8, max_len=128, batch_invariant=True)
    workload = mixed_workload(n=16)
    result = run_with_fake_clock(engine, workload, "flover")
    assert result.stats.joins > 0
    assert set(result.stats.windows) == {8}  # every step computes every slot
    assert result.stats.prefill_calls == len(workload)  # every prompt prefilled alone
    for request, output in zip(workload, result.outputs):
        assert output.token_ids == solo_tokens(engine, request), f"request {output.request_id}"


def test_sampling_depends_only_on_seed_and_params(engine):
    workload = mixed_workload(sampling=True, seed=1)
    fused = run_with_fake_clock(engine, workload).outputs
    # The same requests in reverse order and all at once: other neighbours, other slots.
    shuffled = [TimedRequest(r.prompt, r.params, 0.0) for r in reversed(workload)]
    burst = list(reversed(run_with_fake_clock(engine, shuffled).outputs))
    for request, a, b in zip(workload, fused, burst):
        assert a.token_ids == b.token_ids == solo_tokens(engine, request)
    sampled = [o for r, o in zip(workload, fused) if r.params.temperature > 0]
    greedy_twins = engine.generate(
        [r.prompt for r in workload if r.params.temperature > 0],
        [SamplingParams(max_new_tokens=r.params.max_new_tokens, ignore_eos=r.params.ignore_eos)
         for r in workload if r.params.temperature > 0],
    )
    assert any(s.token_ids != g.token_ids for s, g in zip(sampled, greedy_twins))


def test_temperature_zero_ignores_seed(engine):
    prompt = [5, 6, 7, 8]
    a, b = engine.generate([prompt, prompt], [SamplingParams(max_new_tokens=20, seed=1),
                                              SamplingParams(max_new_tokens=20, seed=2)])
    assert a.token_ids == b.token_ids


@pytest.mark.parametrize("kv_len", [10, 16])
@pytest.mark.parametrize("piece", [1, 3, 5, 16])
def test_compaction_in_pieces_copies_what_one_piece_copies(kv_len, piece):
    """On CPU a move copies its KV in pieces of positions (step.CPU_COMPACT_PIECE_BYTES); any
    piece size, dividing kv_len or not, must copy exactly the positions one whole block does."""
    cfg = tiny_config("llama")  # 2 layers, 2 KV heads of 16: 512 bytes per position
    state = DecodeState.empty(cfg, 6, 32)
    keys = iter(jax.random.split(jax.random.key(0), 2 * cfg.n_layers))
    cache = jax.tree.map(lambda a: jax.random.normal(next(keys), a.shape), state.cache)
    state = state.replace(cache=cache, pos=jnp.arange(6, dtype=jnp.int32),
                          active=jnp.array([1, 1, 1, 1, 0, 0], bool))
    src, dst = jnp.array([0, 2, 6]), jnp.array([4, 5, 6])  # two moves and a padding entry
    whole = step.compact(state, src, dst, kv_len)
    pieced = step.compact(state, src, dst, kv_len, piece_bytes=piece * 512)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(pieced)):
        assert np.array_equal(a, b)
    for a, before in zip(jax.tree.leaves(pieced.cache), jax.tree.leaves(state.cache)):
        want = np.array(before)
        want[[4, 5], :, :kv_len] = want[[0, 2], :, :kv_len]  # the moved blocks, nothing past kv_len
        assert np.array_equal(a, want)
    assert pieced.active.tolist() == [False, True, False, True, True, True]


def test_compaction_moves_every_slot_array_bitwise(engine):
    executor = engine.executor
    scheduler = engine.scheduler
    params = [SamplingParams(max_new_tokens=60, temperature=0.5, top_k=7, seed=i, ignore_eos=True)
              for i in range(6)]
    ids = [engine.submit([3 + i, 9, 4 + i], p) for i, p in enumerate(params)]
    for _ in range(3):
        scheduler.iteration()
    slots = {i: scheduler.table.slot_of(i) for i in ids}
    before = executor.state.slot_rows()
    kv_len = 64
    k_before, v_before = map(np.asarray, executor.state.cache.stacked())  # [L, S, heads, T, E]
    moves = [(slots[ids[1]], 6), (slots[ids[3]], 7)]
    executor.compact(moves, kv_len)
    after = executor.state.slot_rows()
    k_after, v_after = map(np.asarray, executor.state.cache.stacked())
    for src, dst in moves:
        for name, rows in before.items():
            if name == ".active":
                assert rows[src] and after[name][dst] and not after[name][src]
            else:
                assert np.array_equal(rows[src], after[name][dst]), name
        assert np.array_equal(k_before[:, src, :, :kv_len], k_after[:, dst, :, :kv_len])
        assert np.array_equal(v_before[:, src, :, :kv_len], v_after[:, dst, :, :kv_len])
    untouched = [s for s in range(8) if s not in {d for _, d in moves}]
    for name, rows in before.items():
        if name != ".active":
            assert np.array_equal(rows[untouched], after[name][untouched]), name
    assert np.array_equal(k_before[:, untouched], k_after[:, untouched])
    # Tell the table too, then finish: the moved requests decode on from their new slots.
    scheduler.table.apply_moves(moves)
    outputs = [engine.result(i) for i in ids]
    for p, output in zip(params, outputs):
        alone = engine.generate([output.prompt_ids], p)[0]
        assert output.token_ids == alone.token_ids


def test_compiles_are_bounded_by_buckets(tiny, compiles):
    """Prompts in pieces of 16, some opening alike (prefix hits): warm-up covers every shape."""
    cfg, params = tiny
    engine = Engine(cfg, params, max_slots=8, max_len=128, prefill_chunk=16, prefix_cache_rows=2)
    b = engine.executor.buckets
    engine.executor.warmup()
    rng = np.random.default_rng(7)
    opening = rng.integers(3, 256, 20).tolist()
    workload = [
        TimedRequest(
            opening[: 20 * (i % 2)] + rng.integers(3, 256, int(rng.integers(1, 40))).tolist(),
            SamplingParams(max_new_tokens=int(rng.integers(1, 60)),
                           temperature=float(rng.choice([0.0, 0.7])), top_k=int(rng.integers(0, 5)),
                           top_p=float(rng.choice([1.0, 0.8])), seed=i, ignore_eos=bool(i % 2)),
            arrival_s=float(rng.exponential(0.8)) * i,
        )
        for i in range(120)
    ]
    with compiles() as count:
        result = run_with_fake_clock(engine, workload)
    assert len(result.outputs) == 120
    assert result.stats.compactions > 0 and result.stats.prefix_hits > 0
    assert result.stats.prompt_pieces > result.stats.admitted
    assert count() == 0, f"{count()} compiles after warming every bucket"
    assert set(result.stats.windows) <= set(b.windows)


def test_warmup_of_given_sizes_compiles_their_buckets(tiny, compiles):
    """warmup(prompt_lengths=[5], kv_lengths=[40]) covers a 5-token prompt decoding to 40."""
    cfg, params = tiny
    engine = Engine(cfg, params, max_slots=4, max_len=128)
    engine.executor.warmup(prompt_lengths=[5], kv_lengths=[40])
    with compiles() as count:
        engine.generate([[3, 4, 5, 6, 7]] * 3, SamplingParams(max_new_tokens=35, ignore_eos=True))
    assert count() == 0


def test_cancel_frees_the_slot_within_one_iteration(engine):
    scheduler = engine.scheduler
    keep = engine.submit([4, 5, 6], SamplingParams(max_new_tokens=30, ignore_eos=True))
    victim = engine.submit([7, 8, 9], SamplingParams(max_new_tokens=100, ignore_eos=True))
    for _ in range(4):
        scheduler.iteration()
    assert len(scheduler.table) == 2
    engine.cancel(victim)
    scheduler.iteration()
    assert len(scheduler.table) == 1
    cancelled = engine.result(victim)
    assert cancelled.finish_reason == "cancelled" and 0 < len(cancelled.token_ids) < 100
    kept = engine.result(keep)
    assert kept.token_ids == engine.generate([[4, 5, 6]], SamplingParams(
        max_new_tokens=30, ignore_eos=True))[0].token_ids


BAD = [
    ([], SamplingParams(), "prompt"),
    ([1, 999], SamplingParams(), r"prompt_ids\[1\]=999"),
    ([1, 2], SamplingParams(max_new_tokens=200), "max_new_tokens=200.*max_len=128"),
    ([1, 2], SamplingParams(max_new_tokens=-1), "max_new_tokens=-1"),
    ([1, 2], SamplingParams(temperature=-0.5), "temperature=-0.5"),
    ([1, 2], SamplingParams(top_p=0.0), "top_p=0"),
    ([1, 2], SamplingParams(top_p=1.5), "top_p=1.5"),
    ([1, 2], SamplingParams(top_k=-1), "top_k=-1"),
    ("text", SamplingParams(), "no tokenizer"),
]


def test_bad_requests_end_with_error_and_harm_no_one(engine):
    good = SamplingParams(max_new_tokens=12, ignore_eos=True)
    prompts = [[10, 11, 12]] + [b[0] for b in BAD] + [[13, 14]]
    params = [good] + [b[1] for b in BAD] + [good]
    outputs = engine.generate(prompts, params)
    assert [o.request_id for o in outputs] == sorted(o.request_id for o in outputs)
    for output, (_, _, pattern) in zip(outputs[1:-1], BAD):
        assert output.finish_reason == "error" and output.token_ids == []
        assert __import__("re").search(pattern, output.error), output.error
    assert outputs[0].token_ids == engine.generate([[10, 11, 12]], good)[0].token_ids
    assert outputs[-1].token_ids == engine.generate([[13, 14]], good)[0].token_ids


def test_streaming_yields_every_token_once_and_returns_the_output(engine):
    request_id = engine.submit([1, 2, 3], SamplingParams(max_new_tokens=17, ignore_eos=True))
    deltas = list(engine.stream(request_id))
    tokens = [t for d in deltas for t in d.token_ids]
    assert deltas[-1].finish_reason == "length" and len(tokens) == 17
    assert all(d.output is None for d in deltas[:-1])
    assert deltas[-1].output.token_ids == tokens  # the stream returned it: the engine keeps none
    assert engine.poll(request_id) is None and not engine.scheduler.knows(request_id)
    with pytest.raises(KeyError, match="unknown or already returned"):
        engine.result(request_id)
    assert tokens == engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=17,
                                                                 ignore_eos=True))[0].token_ids


def test_a_request_that_ended_while_another_drove_the_loop_still_streams(engine):
    long, short = SamplingParams(max_new_tokens=9), SamplingParams(max_new_tokens=2)
    first, second = engine.submit([1, 2, 3], long), engine.submit([4, 5], short)
    half = engine.submit([6, 7], SamplingParams(max_new_tokens=6))
    partial = next(engine.stream(half))  # one delta, then the stream is left
    engine.result(first)  # drives the loop until `second` and `half` have ended too
    (delta,) = engine.stream(second)
    assert delta.output.token_ids == delta.token_ids == engine.generate([[4, 5]], short)[0].token_ids
    run_with_fake_clock(engine, [])  # `half` ended on the scheduler `run` replaces
    (rest,) = engine.stream(half)
    assert partial.token_ids + rest.token_ids == rest.output.token_ids
    assert rest.output.token_ids == engine.generate([[6, 7]], SamplingParams(max_new_tokens=6))[
        0].token_ids


def test_max_new_tokens_one_and_eos(engine, tiny):
    cfg, _ = tiny
    out = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=1))[0]
    assert len(out.token_ids) == 1 and out.finish_reason == "length"
    # Make the first greedy token an EOS: generation stops there with "stop".
    first = out.token_ids[0]
    eos_engine = Engine(cfg.replace(eos_token_ids=(first,)), engine.executor.params,
                        max_slots=2, max_len=64)
    out = eos_engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=10))[0]
    assert out.token_ids == [first] and out.finish_reason == "stop"
    ignored = eos_engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=10, ignore_eos=True))
    assert len(ignored[0].token_ids) == 10


def test_request_ids_stay_unique_across_runs_and_outputs_return_once(engine):
    first = engine.submit([1, 2], SamplingParams(max_new_tokens=3))
    assert engine.result(first).request_id == first
    with pytest.raises(KeyError, match="unknown or already returned"):
        engine.result(first)
    (ran,) = run_with_fake_clock(engine, [TimedRequest([3, 4], SamplingParams(max_new_tokens=2))]).outputs
    later = engine.submit([5, 6], SamplingParams(max_new_tokens=2))
    assert len({first, ran.request_id, later}) == 3
    assert engine.result(later).token_ids == engine.generate([[5, 6]], SamplingParams(max_new_tokens=2))[
        0
    ].token_ids


def test_run_keeps_unreturned_outputs_and_leaves_no_callbacks_behind(engine):
    short = SamplingParams(max_new_tokens=2)
    bad = engine.submit([], short)  # ends at once, not yet returned
    events = []
    run_with_fake_clock(engine, [TimedRequest([3, 4], short)])
    assert engine.result(bad).finish_reason == "error"
    engine.run([TimedRequest([5], short)], on_event=lambda kind, r: events.append(kind))
    assert events == ["added", "finished"]
    engine.generate([[6, 7]], short)  # on the engine's own scheduler: no run callbacks
    assert events == ["added", "finished"] and engine.scheduler.policy.name == engine.policy
    engine.run([TimedRequest([], short)], on_event=lambda kind, r: events.append(kind))
    assert events[2:] == ["finished"]  # refused at submit: never added, but it ends
    engine.run([])
    engine.cancel(bad)  # an id from an earlier scheduler: returned already, so a no-op
    with pytest.raises(KeyError, match="no such request"):
        engine.cancel(10**6)


def test_logprobs_are_the_models_whatever_the_sampling_and_the_batch(engine, tiny):
    cfg, params = tiny
    prompt, n = [1, 2, 3], 6
    asked = [SamplingParams(max_new_tokens=n, logprobs=True, ignore_eos=True),
             SamplingParams(max_new_tokens=n, logprobs=True, ignore_eos=True, temperature=0.9,
                            top_k=5, repetition_penalty=1.3, seed=4)]
    quiet = SamplingParams(max_new_tokens=n, ignore_eos=True)  # neighbours that do not ask
    outs = engine.generate([prompt, prompt, [7, 8], [9]], [*asked, quiet, quiet])
    for out in outs[:2]:
        # The model's own distribution at each position: a full causal recompute (XLA).
        sequence = jnp.array([prompt + out.token_ids[:-1]])
        log_probs = jax.nn.log_softmax(transformer.forward(params, cfg, sequence)[0], axis=-1)
        reference = log_probs[len(prompt) - 1 + np.arange(n), np.array(out.token_ids)]
        np.testing.assert_allclose(out.logprobs, reference, rtol=1e-5, atol=1e-5)
    # Alone: the same tokens; log-probabilities equal to rounding (a prefill's batch can
    # change the last bits of its logits, never which token is largest).
    for params, fused in zip(asked, outs):
        alone = engine.generate([prompt], params)[0]
        assert alone.token_ids == fused.token_ids
        np.testing.assert_allclose(alone.logprobs, fused.logprobs, rtol=1e-5, atol=1e-5)
    assert outs[0].token_ids != outs[1].token_ids  # the sampled row drew other tokens
    assert [o.logprobs for o in outs[2:]] == [None, None]
    deltas = list(engine.stream(engine.submit(prompt, asked[0])))
    assert sum((d.logprobs for d in deltas), []) == deltas[-1].output.logprobs
    assert all(d.logprobs == [] for d in deltas if not d.token_ids)


def test_top_logprobs_are_the_models_likeliest_tokens_whatever_the_batch(engine, tiny):
    cfg, params = tiny
    prompt, n = [1, 2, 3], 5
    asked = [SamplingParams(max_new_tokens=n, ignore_eos=True, top_logprobs=3),
             SamplingParams(max_new_tokens=n, ignore_eos=True, top_logprobs=20, temperature=0.8,
                            seed=2, logprobs=True)]
    quiet = SamplingParams(max_new_tokens=n, ignore_eos=True)
    outs = engine.generate([prompt, prompt, [7, 8]], [*asked, quiet])
    for wanted, out in zip((3, 20), outs):
        sequence = jnp.array([prompt + out.token_ids[:-1]])
        log_probs = np.asarray(jax.nn.log_softmax(transformer.forward(params, cfg, sequence)[0], -1))
        assert [len(top) for top in out.top_logprobs] == [wanted] * n
        for position, top in zip(len(prompt) - 1 + np.arange(n), out.top_logprobs):
            ids, values = zip(*top)
            order = np.argsort(-log_probs[position], kind="stable")[:wanted]
            assert list(ids) == order.tolist()
            np.testing.assert_allclose(values, log_probs[position][order], rtol=1e-5, atol=1e-5)
        alone = engine.generate([prompt], asked[wanted == 20])[0]
        assert [[t for t, _ in top] for top in alone.top_logprobs] == [
            [t for t, _ in top] for top in out.top_logprobs]
    assert outs[2].top_logprobs is None and outs[0].logprobs is None
    with pytest.raises(ValueError, match=r"top_logprobs=21: must be an int in \[0, 20\]"):
        SamplingParams(top_logprobs=21).validate()


def test_a_decode_state_too_big_for_memory_is_refused_before_it_is_allocated(tiny, monkeypatch):
    cfg, params = tiny
    state = Engine(cfg, params, max_slots=64, max_len=256).executor.state
    needed = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
    free = int(needed / 0.9 * 0.6)  # room for 60% of the slots
    monkeypatch.setattr("flover_jax.executor._free_bytes", lambda pool: free if pool == "host" else None)
    rows = len(Engine(cfg, params, max_slots=1, max_len=8).executor.prefix_rows)  # default 4
    # 60% of the 64 slots' and the prefix rows' state fits: 40 rows, so 36 slots beside them.
    with pytest.raises(ValueError, match=r"max_slots=64, max_len=256: the decode state \(KV cache "
                       r"and per-slot arrays\) needs [\d.]+ GiB on the host, which has [\d.]+ GiB "
                       rf"free; at most {40 - rows} slots of max_len=256 fit beside the prefix "
                       rf"cache's {rows} rows"):
        Engine(cfg, params, max_slots=64, max_len=256)
    Engine(cfg, params, max_slots=40 - rows, max_len=256)  # what the message offers fits


def test_api_misuse_is_named(engine):
    with pytest.raises(ValueError, match="prompts='Hello': expected a list of prompts"):
        engine.generate("Hello")
    running = engine.submit([1, 2], SamplingParams(max_new_tokens=50, ignore_eos=True))
    engine.scheduler.iteration()
    with pytest.raises(RuntimeError, match="warmup: slots are decoding"):
        engine.executor.warmup(windows=[1], kv_lengths=[16], prompt_lengths=[4])
    assert len(engine.result(running).token_ids) == 50
    bad = engine.submit([1], SamplingParams(top_k=-1))
    (delta,) = engine.stream(bad)
    assert delta.finish_reason == "error" and delta.error.startswith("top_k=-1")
    assert delta.output.error == delta.error
    with pytest.raises(KeyError, match="unknown or already returned"):
        list(engine.stream(bad))
    waiting = engine.submit([4, 5], SamplingParams(max_new_tokens=3))
    assert engine.poll(waiting) is None  # poll never drives the loop; step does
    while (output := engine.poll(waiting)) is None:
        engine.step()
    assert output.token_ids == engine.generate([[4, 5]], SamplingParams(max_new_tokens=3))[
        0].token_ids


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 1 << 40), st.integers(0, 40 << 20))
def test_huge_page_span_is_every_whole_huge_page_inside_a_buffer(start, nbytes):
    """The span the executor asks Linux to back with huge pages: all of the buffer's whole huge
    pages, and nothing outside the buffer."""
    page = executor.HUGE_PAGE
    whole = [p for p in range(-(-start // page) * page, start + nbytes, page) if p + page <= start + nbytes]
    span = executor.huge_page_span(start, nbytes)
    assert span == ((whole[0], whole[-1] + page) if whole else None)
