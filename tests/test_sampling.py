"""Tests for flover_jax.sampling: the per-slot vectorised sampler."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flover_jax.sampling import (
    SlotSampling,
    apply_penalties,
    count_tokens,
    first_argmax,
    mark_tokens,
    sample_tokens,
)
from flover_jax.sampling_params import SamplingParams

# Two batch shapes only, so each jitted sampler compiles at most twice.
B, V = 8, 64  # small batch
BIG = 2048  # many draws at once: rows with consecutive steps are one stream
# Tiny candidate tiers so V = 64 exercises every path of the top-k / top-p
# search: lax.top_k(4), lax.top_k(16), then the full sort.
TIERS = (4, 16)

_traces: list[int] = []


def _sample(logits, params, step, seen, generated):
    _traces.append(1)  # runs only while tracing: counts compilations
    return sample_tokens(logits, params, step, seen, generated, candidate_tiers=TIERS)


sample = jax.jit(_sample)
# Reference: the same sampler with no candidate tiers (always the full sort).
sample_full_sort = jax.jit(lambda *a: sample_tokens(*a, candidate_tiers=()))

FAST = settings(max_examples=15, deadline=None)


def run(logits, params: list[SamplingParams] | SlotSampling, step=None, seen=None, generated=None):
    """Sample with numpy-friendly defaults: step 0, nothing seen/generated."""
    logits = np.asarray(logits, np.float32)
    rows = logits.shape[0]
    if not isinstance(params, SlotSampling):
        params = SlotSampling.from_params(params)
    step = np.zeros(rows, np.int32) if step is None else np.asarray(step, np.int32)
    seen = np.zeros(logits.shape, bool) if seen is None else np.asarray(seen)
    generated = np.zeros(logits.shape, bool) if generated is None else np.asarray(generated)
    return np.asarray(sample(logits, params, step, seen, generated))


def softmax64(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def random_logits(seed: int, rows: int) -> np.ndarray:
    """Rows of distinct (tie-free) logits with varied sharpness (scale 0.3 to 6). Drawn values
    can tie in float32 (seed 130 has one at a top-k boundary, where either token is right), so
    each value is raised to just above the next smaller one where it is not already."""
    rng = np.random.default_rng(seed)
    scale = rng.choice([0.3, 1.0, 2.5, 6.0], size=(rows, 1))
    logits = (rng.standard_normal((rows, V)) * scale).astype(np.float32)
    order = np.argsort(logits, axis=-1, kind="stable")
    ranked = np.take_along_axis(logits, order, -1)
    for j in range(1, V):
        ranked[:, j] = np.maximum(ranked[:, j], np.nextafter(ranked[:, j - 1], np.float32(np.inf)))
    np.put_along_axis(logits, order, ranked, -1)
    return logits


# ---------------------------------------------------------------- greedy


@FAST
@given(seed=st.integers(0, 2**31 - 1))
def test_temperature_zero_is_argmax(seed):
    logits = random_logits(seed, B)
    expected = logits.argmax(-1)
    np.testing.assert_array_equal(run(logits, [SamplingParams()] * B), expected)
    # Still argmax when other rows sample (the sampling branch of the cond).
    mixed = [SamplingParams(), SamplingParams(temperature=1.0, top_p=0.5, seed=3)] * (B // 2)
    np.testing.assert_array_equal(run(logits, mixed)[::2], expected[::2])
    # top_k / top_p are ignored at temperature 0.
    ignored = [SamplingParams(top_k=3, top_p=0.2, seed=seed)] * B
    np.testing.assert_array_equal(run(logits, ignored), expected)


_first_argmax = jax.jit(first_argmax, static_argnums=1)
# Values that make argmax hard: ties, signed zeros, infinities and NaNs.
_HARD_VALUES = st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, np.inf, -np.inf, np.nan])


@settings(max_examples=60, deadline=None)
@given(columns=st.sampled_from([37, 64]), block=st.sampled_from([4, 8, 128]), data=st.data())
def test_first_argmax_is_argmax(columns, block, data):
    """The blocked argmax equals jnp.argmax, ties, NaNs, infinities and a ragged last block included."""
    def row():  # a row over a palette of 1-3 values: all-negative, all-NaN, tied rows are common
        palette = data.draw(st.lists(_HARD_VALUES, min_size=1, max_size=3))
        return data.draw(st.lists(st.sampled_from(palette), min_size=columns, max_size=columns))

    x = np.asarray([row() for _ in range(3)], np.float32)
    np.testing.assert_array_equal(_first_argmax(x, block), jnp.argmax(x, axis=-1))
    hit = x > 0  # the sampler also takes the first True of a bool row
    np.testing.assert_array_equal(_first_argmax(hit, block), jnp.argmax(hit, axis=-1))


def test_greedy_ties_pick_lowest_index():
    logits = np.zeros((B, V), np.float32)
    logits[:, [5, 9, 40]] = 3.0
    np.testing.assert_array_equal(run(logits, [SamplingParams()] * B), np.full(B, 5))


def test_tiny_temperature_is_finite_and_near_greedy():
    logits = np.zeros((B, V), np.float32)
    logits[:, :3] = [300.0, 310.0, 305.0]
    temps = [1e-45, 1e-37, 1e-20, 1e-6] * 2  # logits / 1e-37 would overflow to inf
    params = [
        SamplingParams(temperature=t, top_p=0.9 if i % 2 else 1.0, seed=i)
        for i, t in enumerate(temps)
    ]
    np.testing.assert_array_equal(run(logits, params, step=np.arange(B)), np.ones(B))


# ---------------------------------------------------------------- top-k / top-p


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_top_k_never_leaves_the_k_best(seed):
    logits = random_logits(seed, BIG)
    rng = np.random.default_rng(seed + 1)
    ks = rng.choice([1, 2, 3, 4, 5, 8, 16, 17, 40, 63], size=BIG)  # per-row k, every tier
    temps = rng.choice([0.5, 1.0, 3.0], size=BIG)
    params = [
        SamplingParams(temperature=float(t), top_k=int(k), seed=int(s))
        for t, k, s in zip(temps, ks, rng.integers(0, 2**31 - 1, BIG))
    ]
    tokens = run(logits, params, step=rng.integers(0, 1000, BIG))
    rank = np.argsort(np.argsort(-logits, axis=-1), axis=-1)  # 0 = best
    token_rank = rank[np.arange(BIG), tokens]
    assert np.all(token_rank < ks)
    # Meaningful: rows with k > 1 do not collapse to greedy.
    assert np.mean(token_rank[ks > 1] > 0) > 0.2


@pytest.mark.parametrize("ties", [3, 20])  # ending inside the first candidate tier, or past it
def test_top_p_renormalises_over_every_token_tied_at_the_top_k_boundary(ties):
    """top_k=2 keeps the best token and all `ties` tied second ones; top-p then sees the
    distribution over all of them, so at p = 0.6 the nucleus must reach past the best token
    (its share is e^2 / (e^2 + ties * e) < 0.6) and takes the whole tie."""
    logits = np.full((BIG, V), -30.0, np.float32)
    logits[:, 0], logits[:, 1 : 1 + ties] = 2.0, 1.0
    params = SlotSampling.from_params([SamplingParams(temperature=1.0, top_k=2, top_p=0.6, seed=3)]
                                      * BIG)
    steps, zeros = np.arange(BIG, dtype=np.int32), np.zeros((BIG, V), bool)
    for sampler in (sample, sample_full_sort):
        counts = np.bincount(np.asarray(sampler(logits, params, steps, zeros, zeros)), minlength=V)
        assert counts[1 + ties :].sum() == 0
        expected = softmax64(logits[0, : 1 + ties]) * BIG
        assert np.all(np.abs(counts[: 1 + ties] - expected) <= 5 * np.sqrt(expected) + 1), counts


def test_a_gap_of_one_ulp_decides_at_a_tiny_temperature():
    logits = np.zeros((B, V), np.float32)
    logits[:, 0], logits[:, 1] = 10.0, np.nextafter(np.float32(10.0), np.float32(0.0))
    params = [SamplingParams(temperature=1e-9, seed=i) for i in range(B)]
    for step in range(8):
        np.testing.assert_array_equal(run(logits, params, step=np.full(B, step)), np.zeros(B))


def numpy_nucleus(logits: np.ndarray, temp: float, k: int, p: float, slack: float = 1e-5):
    """Allowed tokens for top-k then top-p, in float64 (a boundary slack of `slack`)."""
    order = np.argsort(-logits, kind="stable")
    if k > 0:
        order = order[:k]
    probs = softmax64(logits[order] / temp)  # renormalised over the top-k set
    cum = np.cumsum(probs)
    n = int(np.searchsorted(cum, min(p + slack, 1.0) - 1e-12)) + 1  # smallest prefix >= p
    return set(order[:n].tolist())


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_top_p_never_leaves_the_nucleus(seed):
    logits = random_logits(seed, BIG)
    rng = np.random.default_rng(seed + 2)
    ps = rng.choice([0.05, 0.3, 0.6, 0.9, 0.99], size=BIG)
    ks = np.where(rng.random(BIG) < 0.3, rng.choice([2, 6, 20], size=BIG), 0)  # some top-k too
    temps = rng.choice([0.5, 1.0, 2.0], size=BIG)
    params = [
        SamplingParams(temperature=float(t), top_k=int(k), top_p=float(p), seed=i)
        for i, (t, k, p) in enumerate(zip(temps, ks, ps))
    ]
    tokens = run(logits, params, step=np.full(BIG, seed % 1000))
    sizes = []
    for b in range(BIG):
        allowed = numpy_nucleus(logits[b], temps[b], ks[b], ps[b])
        assert tokens[b] in allowed, (b, temps[b], ks[b], ps[b])
        sizes.append(len(allowed))
    # Meaningful: nuclei of every tier size occur and are actually sampled from.
    assert min(sizes) == 1 and max(sizes) > TIERS[-1]
    assert np.mean(tokens != logits.argmax(-1)) > 0.2


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_candidate_tiers_agree_with_full_sort(seed):
    logits = random_logits(seed, BIG)
    rng = np.random.default_rng(seed + 3)
    params = SlotSampling.from_params(
        [
            SamplingParams(
                temperature=float(rng.choice([0.0, 0.7, 1.5])),
                top_k=int(rng.choice([0, 0, 3, 10, 30])),
                top_p=float(rng.choice([1.0, 0.5, 0.95])),
                seed=i,
            )
            for i in range(BIG)
        ]
    )
    args = (logits, params, np.arange(BIG, dtype=np.int32), np.zeros((BIG, V), bool))
    tiered = np.asarray(sample(*args, args[-1]))
    full = np.asarray(sample_full_sort(*args, args[-1]))
    np.testing.assert_array_equal(tiered, full)


# ---------------------------------------------------------------- determinism / streams


def test_same_seed_and_step_give_same_token():
    logits = np.tile(random_logits(0, 1), (B, 1))
    p = SamplingParams(temperature=1.0, seed=1234)
    step = np.array([7, 3, 7, 3, 7, 3, 7, 3])
    first = run(logits, [p] * B, step=step)
    again = run(logits, [p] * B, step=step)
    np.testing.assert_array_equal(first, again)
    # Same (seed, step) at different rows -> same token.
    assert len(set(first[step == 7])) == 1 and len(set(first[step == 3])) == 1


def test_different_seeds_give_different_streams():
    logits = np.zeros((BIG, V), np.float32)  # uniform: a stream is hard to repeat by chance
    seeds = np.repeat(np.arange(BIG // 50 + 1), 50)[:BIG]
    steps = np.tile(np.arange(50), BIG // 50 + 1)[:BIG]
    params = [SamplingParams(temperature=1.0, seed=int(s)) for s in seeds]
    tokens = run(logits, params, step=steps)
    n = (BIG // 50) * 50
    streams = tokens[:n].reshape(-1, 50)  # one row per seed, 50 steps each
    assert len({tuple(s) for s in streams}) == len(streams)  # all seeds differ
    assert all(len(set(s)) > 1 for s in streams)  # a stream is not constant


@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    position=st.integers(0, B - 1),
    target=st.sampled_from(
        [
            SamplingParams(temperature=1.0, seed=11),
            SamplingParams(temperature=0.8, top_p=0.9, seed=12),
            SamplingParams(temperature=1.3, top_k=5, seed=13),
            SamplingParams(temperature=1.0, top_k=30, top_p=0.97, seed=14),
            SamplingParams(temperature=1.0, repetition_penalty=1.3, presence_penalty=0.4, seed=15),
            SamplingParams(),
        ]
    ),
)
def test_row_is_independent_of_other_rows_and_position(seed, position, target):
    rng = np.random.default_rng(seed)
    row_logits = random_logits(seed, 1)[0]
    row_seen = rng.random(V) < 0.2
    row_generated = row_seen & (rng.random(V) < 0.5)
    step = 17

    def with_target(logits, params, pos):
        logits, params = logits.copy(), list(params)
        seen, generated = rng.random((B, V)) < 0.2, rng.random((B, V)) < 0.1
        steps = rng.integers(0, 100, B)
        logits[pos], params[pos], steps[pos] = row_logits, target, step
        seen[pos], generated[pos] = row_seen, row_generated
        return run(logits, params, step=steps, seen=seen, generated=generated)[pos]

    others = [
        # all greedy: no other row samples or filters
        [SamplingParams()] * B,
        # flat rows with wide nuclei: force the largest tier / full sort
        [SamplingParams(temperature=2.0, top_p=0.999, seed=i) for i in range(B)],
        # a mix of everything
        [
            SamplingParams(temperature=0.5, top_k=2, seed=5),
            SamplingParams(temperature=1.0, seed=6),
            SamplingParams(repetition_penalty=2.0),
            SamplingParams(temperature=3.0, top_p=0.3, presence_penalty=1.0, seed=7),
        ]
        * (B // 4),
    ]
    flat = np.zeros((B, V), np.float32)
    tokens = {
        with_target(flat if i == 1 else random_logits(seed + i, B), ps, pos)
        for i, ps in enumerate(others)
        for pos in (position, (position + 3) % B)
    }
    assert len(tokens) == 1, tokens


# ---------------------------------------------------------------- penalties


def test_repetition_penalty_hand_built():
    logits = np.zeros((B, V), np.float32)
    logits[:, :4] = [2.0, 1.5, -1.0, 0.5]
    logits[:, 4:] = -5.0
    seen = np.zeros((B, V), bool)
    seen[:, [0, 2]] = True
    none = np.zeros((B, V), bool)
    params = SlotSampling.from_params(
        [SamplingParams(repetition_penalty=2.0)] * (B // 2) + [SamplingParams()] * (B // 2)
    )
    out = np.asarray(apply_penalties(jnp.asarray(logits), params, seen, none))
    # positive seen logit divided, negative seen logit multiplied, unseen untouched
    np.testing.assert_array_equal(out[0, :4], [1.0, 1.5, -2.0, 0.5])
    np.testing.assert_array_equal(out[B - 1], logits[B - 1])  # penalty 1: bit-exact
    # The greedy token 0 is penalised below the runner-up 1 only in penalised rows.
    np.testing.assert_array_equal(run(logits, params, seen=seen), [1] * (B // 2) + [0] * (B // 2))
    # Negative logits: multiplying pushes the seen token further down.
    neg = np.full((B, V), -9.0, np.float32)
    neg[:, :2] = [-1.0, -1.5]
    np.testing.assert_array_equal(run(neg, params, seen=seen)[0], 1)  # -2.0 < -1.5


def test_presence_penalty_hand_built():
    logits = np.full((B, V), -5.0, np.float32)
    logits[:, :3] = [2.0, 1.5, 1.0]
    generated = np.zeros((B, V), bool)
    generated[:, 0] = True
    seen_prompt_only = np.zeros((B, V), bool)
    seen_prompt_only[:, 1] = True  # prompt token: presence penalty must not touch it
    seen = generated | seen_prompt_only
    params = SlotSampling.from_params([SamplingParams(presence_penalty=0.75)] * B)
    out = np.asarray(apply_penalties(jnp.asarray(logits), params, seen, generated))
    np.testing.assert_array_equal(out[0, :3], [1.25, 1.5, 1.0])
    np.testing.assert_array_equal(run(logits, params, seen=seen, generated=generated), [1] * B)
    # Both penalties: repetition first (2.0 / 2 = 1.0, 1.5 / 2 = 0.75), then presence on 0.
    both = SlotSampling.from_params(
        [SamplingParams(repetition_penalty=2.0, presence_penalty=0.5)] * B
    )
    out = np.asarray(apply_penalties(jnp.asarray(logits), both, seen, generated))
    np.testing.assert_array_equal(out[0, :3], [0.5, 0.75, 1.0])
    np.testing.assert_array_equal(run(logits, both, seen=seen, generated=generated), [2] * B)


def test_frequency_penalty_grows_with_the_count_as_openai_defines_it():
    logits = np.full((B, V), -5.0, np.float32)
    logits[:, :4] = [2.0, 1.5, 1.0, 0.5]
    counts = np.zeros((B, V), np.int32)
    counts[:, 0], counts[:, 1] = 3, 1  # token 2 is in the prompt only: never penalised
    seen = counts > 0
    seen[:, 2] = True
    params = SlotSampling.from_params([SamplingParams(presence_penalty=0.25,
                                                      frequency_penalty=0.5)] * B)
    out = np.asarray(apply_penalties(jnp.asarray(logits), params, seen, counts))
    # logit - presence * (count > 0) - frequency * count
    np.testing.assert_array_equal(out[0, :4], [2.0 - 0.25 - 1.5, 1.5 - 0.25 - 0.5, 1.0, 0.5])
    np.testing.assert_array_equal(run(logits, params, seen=seen, generated=counts), [2] * B)
    counted = count_tokens(jnp.asarray(counts), jnp.array([0] * B), jnp.array([True] * (B - 1) + [False]))
    np.testing.assert_array_equal(np.asarray(counted)[:, 0], [4] * (B - 1) + [3])


def test_masks_of_a_larger_table_are_read_at_the_offset():
    # A decode step passes every slot's masks and its window's first slot as the offset.
    logits = np.full((B, V), -5.0, np.float32)
    logits[:, :2] = [2.0, 1.5]
    table = np.zeros((B + 5, V), bool)
    table[3 : 3 + B : 2, 0] = True  # every other row of the window has seen token 0
    table[:3, 0] = table[3 + B :, 0] = True  # rows outside the window would flip the others
    params = SlotSampling.from_params([SamplingParams(repetition_penalty=4.0)] * B)
    offset = jax.jit(lambda *a: sample_tokens(*a, mask_offset=3))
    out = offset(logits, params, np.zeros(B, np.int32), table, np.zeros_like(table))
    np.testing.assert_array_equal(out, [1, 0] * (B // 2))


# ---------------------------------------------------------------- distribution


def test_sampling_frequencies_match_softmax():
    base = np.array([1.0, 0.0, -0.5, 2.0], np.float32)
    logits = np.full((BIG, V), -np.inf, np.float32)  # only the first 4 tokens are possible
    logits[:, :4] = base
    half = BIG // 2
    temps = np.repeat([1.0, 0.5], half)
    params = [SamplingParams(temperature=float(t), seed=2024) for t in temps]
    tokens = run(logits, params, step=np.tile(np.arange(half), 2))
    assert tokens.max() < 4
    tol = 0.05  # ~3.2 sigma for p = 0.5 over 1024 draws
    for rows, t in ((slice(0, half), 1.0), (slice(half, BIG), 0.5)):
        freq = np.bincount(tokens[rows], minlength=4) / half
        np.testing.assert_allclose(freq, softmax64(base / t), atol=tol)
    # The tolerance can tell the two temperatures apart.
    assert np.abs(softmax64(base) - softmax64(base / 0.5)).max() > 3 * tol


def test_filtered_frequencies_are_renormalised_and_nucleus_is_minimal():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.full((BIG, V), -np.inf, np.float32)
    logits[:, :4] = np.log(probs)
    group = BIG // 4
    settings_and_expected = [
        # cum after token 0 is 0.5 >= 0.495: the nucleus is token 0 alone
        (dict(top_p=0.495), [1.0, 0, 0, 0]),
        # 0.5 < 0.505, so token 1 must join: the smallest set reaching p
        (dict(top_p=0.505), [0.625, 0.375, 0, 0]),
        (dict(top_k=3), list(probs[:3] / 0.95) + [0]),
        # top-p sees the top-k-renormalised [0.625, 0.375]: 0.625 >= 0.6 keeps token 0 only
        (dict(top_k=2, top_p=0.6), [1.0, 0, 0, 0]),
    ]
    params = [
        SamplingParams(temperature=1.0, seed=99, **kw)
        for kw, _ in settings_and_expected
        for _ in range(group)
    ]
    tokens = run(logits, params, step=np.tile(np.arange(group), 4))
    tol = 0.07  # ~3.3 sigma for p = 0.5 over 512 draws
    for g, (_, expected) in enumerate(settings_and_expected):
        got = tokens[g * group : (g + 1) * group]
        allowed = np.flatnonzero(expected)
        assert np.isin(got, allowed).all(), (g, np.unique(got))
        np.testing.assert_allclose(np.bincount(got, minlength=4) / group, expected, atol=tol)


# ---------------------------------------------------------------- compiled once


def test_one_compilation_serves_every_param_mix():
    logits = random_logits(1, B)
    run(logits, [SamplingParams()] * B)
    compiled = len(_traces)
    mixes = [
        [SamplingParams(temperature=1.0, seed=i) for i in range(B)],
        [SamplingParams(temperature=0.7, top_k=3, top_p=0.8, repetition_penalty=1.2)] * B,
        [SamplingParams(presence_penalty=-0.5), SamplingParams(temperature=2.0, top_p=0.1)] * 4,
    ]
    for mix in mixes:
        run(logits, mix, step=np.arange(B))
    run(logits, [SamplingParams()] * 3 + [SamplingParams(temperature=1.0, top_k=2)] * (B - 3))
    assert len(_traces) == compiled


# ---------------------------------------------------------------- helpers


def test_mark_tokens_sets_only_active_rows():
    mask = jnp.zeros((4, 6), bool).at[0, 1].set(True)
    out = np.asarray(
        mark_tokens(mask, jnp.array([2, 5, -1, 1]), jnp.array([True, True, False, True]))
    )
    expected = np.zeros((4, 6), bool)
    expected[0, [1, 2]] = True
    expected[1, 5] = True
    expected[3, 1] = True  # row 2 is inactive: its garbage token -1 is ignored
    np.testing.assert_array_equal(out, expected)
    # Marking twice is idempotent.
    again = mark_tokens(jnp.asarray(out), jnp.array([2, 5, 0, 1]), jnp.ones(4, bool))
    assert np.asarray(again)[2, 0] and np.asarray(again).sum() == expected.sum() + 1


def test_mark_tokens_at_a_row_offset_leaves_other_rows():
    mask = jnp.zeros((6, 5), bool)
    out = np.asarray(mark_tokens(mask, jnp.array([4, 1]), jnp.array([True, True]), 3))
    expected = np.zeros((6, 5), bool)
    expected[3, 4] = expected[4, 1] = True
    np.testing.assert_array_equal(out, expected)


def test_slot_sampling_build_and_update():
    ps = [
        SamplingParams(
            temperature=0.5, top_k=7, top_p=0.9, repetition_penalty=1.1, presence_penalty=0.2,
            seed=42, logprobs=True,
        )
    ]
    slots = SlotSampling.from_params(ps, num_slots=3)
    assert slots.num_slots == 3
    np.testing.assert_allclose(slots.temperature, [0.5, 0.0, 0.0])
    np.testing.assert_array_equal(slots.top_k, [7, 0, 0])
    np.testing.assert_allclose(slots.top_p, [0.9, 1.0, 1.0])
    np.testing.assert_allclose(slots.repetition_penalty, [1.1, 1.0, 1.0])
    np.testing.assert_allclose(slots.presence_penalty, [0.2, 0.0, 0.0])
    np.testing.assert_array_equal(slots.seed, [42, 0, 0])
    np.testing.assert_array_equal(slots.logprobs, [True, False, False])
    dtypes = {f.name: getattr(slots, f.name).dtype for f in dataclasses.fields(SlotSampling)}
    assert dtypes == {
        "temperature": np.float32, "top_k": np.int32, "top_p": np.float32,
        "repetition_penalty": np.float32, "presence_penalty": np.float32,
        "frequency_penalty": np.float32, "seed": np.int32, "logprobs": np.bool_,
        "top_logprobs": np.int32,
    }
    assert len(jax.tree_util.tree_leaves(slots)) == 9
    greedy = SlotSampling.greedy(3)
    np.testing.assert_array_equal(greedy.temperature, [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(greedy.top_p, [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="num_slots=1"):
        SlotSampling.from_params(ps * 2, num_slots=1)
    with pytest.raises(ValueError, match="top_k=-2"):
        SlotSampling.from_params([SamplingParams(top_k=-2)])


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("temperature", -0.5, ">= 0"),
        ("temperature", float("nan"), ">= 0"),
        ("top_p", 0, r"\(0, 1\]"),
        ("top_p", 1.5, r"\(0, 1\]"),
        ("top_k", -1, r"\[0, 2147483647\] \(0 disables\)"),
        ("top_k", 2**31, r"\[0, 2147483647\]"),
        ("temperature", 1e39, "finite in float32"),
        ("repetition_penalty", 1e39, "finite in float32"),
        ("presence_penalty", -1e39, "finite in float32"),
        ("max_new_tokens", -3, ">= 1"),
        ("max_new_tokens", 0, ">= 1"),
        ("repetition_penalty", 0.0, "> 0"),
        ("repetition_penalty", -1.0, "> 0"),
        ("presence_penalty", float("inf"), "finite"),
        ("frequency_penalty", float("nan"), "finite in float32"),
        ("frequency_penalty", True, "finite in float32"),
        ("seed", -1, r"\[0, 2147483647\]"),
        ("seed", 2**31, r"\[0, 2147483647\]"),
        ("stop", ("ok", ""), "non-empty strings"),
        ("stop", (3,), "non-empty strings"),
        ("stop_token_ids", (1, -2), "ints >= 0"),
        ("stop_token_ids", (1.5,), "ints >= 0"),
    ],
)
def test_validate_rejects_bad_values(field, value, allowed):
    params = SamplingParams(**{field: value})
    with pytest.raises(ValueError, match=rf"^{field}=") as err:
        params.validate()
    message = str(err.value)
    assert repr(getattr(params, field)) in message
    assert re.search(allowed, message), message


def test_validate_accepts_good_values_and_normalises_lists():
    SamplingParams().validate()
    p = SamplingParams(
        max_new_tokens=1, temperature=0.7, top_k=50, top_p=0.95, repetition_penalty=1.2,
        presence_penalty=-0.5, seed=2**31 - 1, stop=["\n\n", "END"], stop_token_ids=[0, 2],
        ignore_eos=True,
    )
    p.validate()
    assert p.stop == ("\n\n", "END") and p.stop_token_ids == (0, 2)
    hash(p)  # frozen with tuple fields: usable as a dict key
    SamplingParams(top_p=1.0, temperature=0.0, top_k=0, seed=0).validate()
