"""Tensor parallelism on 8 fake CPU devices: tokens and logits equal tp=1, weights really split,
collectives in the compiled step, invalid meshes fail before any compile."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from flover_jax.engine import Engine, TimedRequest
from flover_jax.executor import state_bytes
from flover_jax.sampling_params import SamplingParams
from flover_jax.sharding import make_mesh, param_shardings
from models import transformer
from models.presets import tiny_config
from models.transformer import init_params
from tests.test_engine import mixed_workload, run_with_fake_clock

# 8 query heads, 2 KV heads: tp 1/2 split both, tp 4/8 split the queries and replicate KV.
CFG = tiny_config("llama", n_heads=8, n_kv_heads=2, head_dim=8, max_positions=256)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0), scale=0.3)


def workload():
    return mixed_workload(n=20, seed=2, sampling=True)


@pytest.fixture(scope="module")
def reference(params):
    engine = Engine(CFG, params, max_slots=8, max_len=128, mesh=make_mesh(1))
    return run_with_fake_clock(engine, workload()).outputs


# KV heads replicated (2 of them, 8 devices). KV heads split, one a device: the three-way test
# below; two dense and mixture-of-experts families split over two devices further down.
def test_fused_run_equals_tp1(params, reference):
    engine = Engine(CFG, params, max_slots=8, max_len=128, mesh=make_mesh(8))
    result = run_with_fake_clock(engine, workload())
    assert result.stats.joins > 0 and result.stats.compactions > 0
    assert [o.token_ids for o in result.outputs] == [o.token_ids for o in reference]
    for output, expected in zip(result.outputs, reference):  # split over devices: rounding
        if expected.logprobs is None:
            assert output.logprobs is None
        else:
            np.testing.assert_allclose(output.logprobs, expected.logprobs, rtol=1e-5, atol=1e-5)


def test_sharded_engines_attend_with_xla(params):
    """The CPU attention kernel is not partitioned: "auto" leaves it out of a tp mesh."""
    assert not Engine(CFG, params, max_slots=2, max_len=32, mesh=make_mesh(2)).executor.attention_kernel
    with pytest.raises(ValueError, match=r"cannot be used: it runs on one device, the mesh has 2"):
        Engine(CFG, params, max_slots=2, max_len=32, mesh=make_mesh(2), attention="cpu_kernel")


# int8: a quantized weight's values split as the weight does, its scales as its outputs.
@pytest.mark.parametrize("tp, quantize", [(2, None), (4, None), (8, None), (2, "int8")])
def test_logits_match_tp1(params, tp, quantize):
    cfg = CFG.replace(quantize=quantize)
    if quantize:
        params = transformer.quantize_weights(params)
    mesh = make_mesh(tp)
    sharded = jax.device_put(params, param_shardings(params, cfg, mesh))
    if quantize:
        assert sharded.layers[0].attn.wq.values.sharding.spec == P(None, "model", None)
        assert sharded.layers[0].attn.wq.scales.sharding.spec == P(None, "model", None)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 11)))
    forward = jax.jit(transformer.forward, static_argnums=1)
    np.testing.assert_allclose(forward(sharded, cfg, tokens), forward(params, cfg, tokens), atol=1e-4)


def test_each_device_holds_a_slice_and_the_step_communicates(params):
    engine = Engine(CFG, params, max_slots=4, max_len=64, mesh=make_mesh(2))
    layer = engine.executor.params.layers[0]
    split = {
        "wq": (layer.attn.wq, 1), "wk": (layer.attn.wk, 1), "wv": (layer.attn.wv, 1),
        "wo": (layer.attn.wo, 0), "w_in": (layer.mlp.w_in, 1), "w_gate": (layer.mlp.w_gate, 1),
        "w_out": (layer.mlp.w_out, 0), "lm_head": (engine.executor.params.lm_head, 1),
    }
    for name, (array, axis) in split.items():
        shards = array.addressable_shards
        assert len(shards) == 2, name
        for shard in shards:
            assert shard.data.shape[axis] == array.shape[axis] // 2, name
    for k_cache in engine.executor.state.cache.k:  # each layer's [slots, kv_heads, max_len, head_dim]
        assert k_cache.addressable_shards[0].data.shape[1] == CFG.n_kv_heads // 2
    ex = engine.executor
    # The capacity check's estimate is what the state's shards take: both devices share the host.
    shards = [s for leaf in jax.tree.leaves(ex.state) for s in leaf.addressable_shards]
    estimate = state_bytes(ex.state, jax.tree.map(lambda leaf: leaf.sharding, ex.state))
    assert estimate == {"host": sum(s.data.nbytes for s in shards)}
    hlo = ex.verbs.decode_step.lower(ex.params, ex.state, jnp.int32(0), 4, 64).compile().as_text()
    assert any(op in hlo for op in ("all-reduce", "reduce-scatter", "all-gather"))


def test_invalid_meshes_fail_before_any_compile(compiles):
    tiny = tiny_config("llama")  # 4 heads
    params = init_params(tiny, jax.random.key(0))
    with compiles() as count:
        with pytest.raises(ValueError, match=r"tp=3: does not divide n_heads=4; allowed tp: \[1, 2, 4\]"):
            Engine(tiny, params, max_slots=2, max_len=32, mesh=make_mesh(3))
        with pytest.raises(ValueError, match=r"tp=16: more devices asked than exist \(8 available\)"):
            Engine.from_pretrained("tiny-llama", tp=16)
    assert count() == 0


def test_nine_heads_and_three_kv_heads_split_three_ways_as_over_one():
    """SmolLM2's head layout (9 query heads, 3 KV heads): tp=3 splits both, one KV head a device."""
    cfg = tiny_config("llama", n_heads=9, n_kv_heads=3, head_dim=8, d_ff=96, max_positions=256)
    params = init_params(cfg, jax.random.key(4), scale=0.3)
    one = Engine(cfg, params, max_slots=4, max_len=96, mesh=make_mesh(1))
    three = Engine(cfg, params, max_slots=4, max_len=96, mesh=make_mesh(3))
    assert three.executor.params.layers[0].attn.wk.addressable_shards[0].data.shape[1] == 1
    work = [TimedRequest([5 + i, 17, 42 + 3 * i, 9], SamplingParams(
        max_new_tokens=4 + 3 * i, ignore_eos=True, logprobs=True), float(i)) for i in range(5)]
    a = run_with_fake_clock(one, work)
    b = run_with_fake_clock(three, work)
    assert b.stats.joins > 0 and b.stats.compactions > 0
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    for x, y in zip(a.outputs, b.outputs):  # split over devices: sums in another order
        np.testing.assert_allclose(y.logprobs, x.logprobs, rtol=1e-5, atol=1e-5)


def test_orbax_restores_straight_into_shards(tmp_path, params):
    from flover_jax import checkpoint

    checkpoint.save(tmp_path / "ck", CFG, params)
    mesh = make_mesh(4)
    target = param_shardings(checkpoint.abstract_params(CFG), CFG, mesh)
    _, restored, _ = checkpoint.restore(tmp_path / "ck", target)
    wq = restored.layers[1].attn.wq
    assert wq.sharding == target.layers[1].attn.wq
    assert [s.data.shape for s in wq.addressable_shards] == [(64, 2, 8)] * 4
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("family", ["qwen3", "mixtral"])
def test_a_dense_and_a_mixture_of_experts_family_split_over_two_devices_as_over_one(family):
    # Qwen3: q/k norms on split heads; Mixtral: each expert's MLP split like a dense one.
    cfg = tiny_config(family, max_positions=256)
    params = init_params(cfg, jax.random.key(3), scale=0.3)
    sharded = jax.device_put(params, param_shardings(params, cfg, make_mesh(2)))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 9)))
    forward = jax.jit(transformer.forward, static_argnums=1)
    np.testing.assert_allclose(forward(sharded, cfg, tokens), forward(params, cfg, tokens), atol=1e-4)
    experts = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(sharded)[0]
               if "expert_in" in jax.tree_util.keystr(path)]
    assert bool(experts) == (family == "mixtral")
    for leaf in experts:  # [d, expert d_ff]: each device holds half of every expert
        assert leaf.addressable_shards[0].data.shape[1] * 2 == leaf.shape[1]
    work = mixed_workload(n=4, seed=4)
    one, two = (run_with_fake_clock(Engine(cfg, params, max_slots=2, max_len=96, mesh=make_mesh(tp)),
                                    work).outputs for tp in (1, 2))
    assert [o.token_ids for o in two] == [o.token_ids for o in one]
    assert all(o.finish_reason in ("stop", "length") for o in two)


def test_an_imported_checkpoint_is_read_straight_into_shards(tmp_path):
    from flover_jax.loader import load_model
    from tests.hf_models import make_hf_model

    make_hf_model("mixtral", tmp_path)
    mesh = make_mesh(2)
    cfg, sharded, _ = load_model(tmp_path, mesh=mesh)
    _, whole, _ = load_model(tmp_path)
    target = param_shardings(sharded, cfg, mesh)
    for leaf, where in zip(jax.tree.leaves(sharded), jax.tree.leaves(target)):
        assert leaf.sharding == where
    experts = sharded.layers[0].mlp.expert_in  # 16 x [d, expert d_ff]: d_ff split in two
    assert len(experts) == 16
    assert [s.data.shape for s in experts[0].addressable_shards] == [(64, 16)] * 2
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(whole)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
