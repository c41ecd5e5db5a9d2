"""The CPU kernels (models/kernels) against the pure-JAX ops they replace: decode attention and
the packed-weight matmul."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hypothesis import given, settings
from hypothesis import strategies as st

from models import kernels
from models.layers import QuantizedWeight, attend, dense, quantize
from models.presets import tiny_config


@pytest.mark.parametrize("kv_heads, group, head_dim, q_scale", [
    (3, 3, 64, 1.0),  # SmolLM2's heads
    (2, 4, 16, 1.0), (4, 2, 32, 1.0), (1, 5, 128, 1.0),  # the other vectorized head sizes
    (2, 1, 24, 1.0),  # a head size the scalar path serves
    (3, 3, 64, 40.0),  # scores spread over hundreds: most weights underflow to (near) zero
])
def test_kernel_matches_masked_attention_over_the_window(kv_heads, group, head_dim, q_scale):
    """Rows read their own slot's first lengths[i] positions, from the window's start on;
    a row of length 0 gets zeros; positions beyond a row's length are never read (NaNs there).
    A last, partial block of 8 or more positions is scored as a block (length 40), a shorter one
    position by position (1, 17)."""
    assert kernels.cpu_kernel_available()
    slots, max_len, start, width = 7, 40, 2, 5
    cfg = tiny_config("llama", n_heads=kv_heads * group, n_kv_heads=kv_heads, head_dim=head_dim)
    rng = np.random.default_rng(0)
    k_cache, v_cache = (rng.standard_normal((slots, kv_heads, max_len, head_dim), np.float32)
                        for _ in range(2))
    lengths = np.array([1, 17, 0, 40, 32], np.int32)  # blocks of 16 positions, and tails
    for row, length in enumerate(lengths):  # what lies beyond a row's length must not matter
        k_cache[start + row, :, length:] = np.nan
        v_cache[start + row, :, length:] = np.nan
    q = q_scale * rng.standard_normal((width, 1, kv_heads * group, head_dim)).astype(np.float32)

    rows = q.reshape(width, kv_heads, group, head_dim)
    out = kernels.cached_attention(jnp.asarray(rows), jnp.asarray(k_cache), jnp.asarray(v_cache),
                                   start + jnp.arange(width), jnp.asarray(lengths))
    assert out.shape == rows.shape

    window = slice(start, start + width)
    clean = [np.nan_to_num(c[window]) for c in (k_cache, v_cache)]
    mask = (np.arange(max_len)[None, :] < lengths[:, None])[:, None, :]
    expected = attend(jnp.asarray(q), *map(jnp.asarray, clean), jnp.asarray(mask), cfg)
    expected = np.asarray(expected).reshape(rows.shape)
    live = lengths > 0
    np.testing.assert_allclose(np.asarray(out)[live], expected[live], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out)[~live], 0.0)


def test_rows_of_one_slot_read_up_to_their_own_positions():
    """A prompt piece: one row per token, several rows on one slot (in any order, and slots
    read more than once), each reading its slot's positions up to its own (causal), as
    XLA's attention does over that slot with a causal mask."""
    slots, max_len, kv_heads, group, head_dim = 4, 48, 3, 3, 64
    cfg = tiny_config("llama", n_heads=kv_heads * group, n_kv_heads=kv_heads, head_dim=head_dim)
    rng = np.random.default_rng(4)
    k_cache, v_cache = (rng.standard_normal((slots, kv_heads, max_len, head_dim), np.float32)
                        for _ in range(2))
    row_slots = np.array([2, 2, 2, 0, 2, 3, 0, 2], np.int32)
    lengths = np.array([30, 31, 32, 5, 33, 48, 6, 17], np.int32)  # a row reads [0, lengths[i])
    q = rng.standard_normal((len(row_slots), 1, kv_heads * group, head_dim)).astype(np.float32)
    rows = q.reshape(len(row_slots), kv_heads, group, head_dim)
    out = kernels.cached_attention(jnp.asarray(rows), jnp.asarray(k_cache), jnp.asarray(v_cache),
                                   jnp.asarray(row_slots), jnp.asarray(lengths))
    mask = (np.arange(max_len)[None, :] < lengths[:, None])[:, None, :]
    expected = attend(jnp.asarray(q), jnp.asarray(k_cache[row_slots]), jnp.asarray(v_cache[row_slots]),
                      jnp.asarray(mask), cfg)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected).reshape(rows.shape),
                               rtol=1e-5, atol=1e-5)


def test_kernel_reads_only_each_rows_sliding_window_with_its_scale():
    """Row i reads positions [firsts[i], lengths[i]) (a sliding window over its live ones),
    scaled by `scale`: what lies before the window, or beyond the length, must not matter."""
    slots, max_len, start, width, kv_heads, group, head_dim = 6, 40, 1, 4, 2, 2, 32
    cfg = tiny_config("llama", n_heads=kv_heads * group, n_kv_heads=kv_heads, head_dim=head_dim,
                      attention_scale=0.3)
    rng = np.random.default_rng(2)
    k_cache, v_cache = (rng.standard_normal((slots, kv_heads, max_len, head_dim), np.float32)
                        for _ in range(2))
    lengths, firsts = np.array([9, 40, 3, 20], np.int32), np.array([1, 8, 0, 20], np.int32)
    for row, (first, length) in enumerate(zip(firsts, lengths)):
        for cache in (k_cache, v_cache):
            cache[start + row, :, :first] = np.nan
            cache[start + row, :, length:] = np.nan
    q = rng.standard_normal((width, 1, kv_heads * group, head_dim)).astype(np.float32)
    rows = q.reshape(width, kv_heads, group, head_dim)
    out = kernels.cached_attention(jnp.asarray(rows), jnp.asarray(k_cache), jnp.asarray(v_cache),
                                   start + jnp.arange(width), jnp.asarray(lengths),
                                   jnp.asarray(firsts), 0.3)

    window = slice(start, start + width)
    clean = [np.nan_to_num(c[window]) for c in (k_cache, v_cache)]
    positions = np.arange(max_len)[None, :]
    mask = ((positions >= firsts[:, None]) & (positions < lengths[:, None]))[:, None, :]
    expected = attend(jnp.asarray(q), *map(jnp.asarray, clean), jnp.asarray(mask), cfg)
    expected = np.asarray(expected).reshape(rows.shape)
    live = lengths > firsts
    np.testing.assert_allclose(np.asarray(out)[live], expected[live], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out)[~live], 0.0)


def test_kernel_rows_do_not_depend_on_their_neighbours():
    """Batch invariance: a row's output is bitwise the same whatever the other rows hold."""
    rng = np.random.default_rng(1)
    k_cache, v_cache = (jnp.asarray(rng.standard_normal((6, 3, 32, 64), np.float32)) for _ in range(2))
    q = jnp.asarray(rng.standard_normal((6, 3, 3, 64), np.float32))
    lengths = jnp.asarray([5, 31, 12, 32, 1, 20], jnp.int32)
    together = kernels.cached_attention(q, k_cache, v_cache, jnp.arange(6), lengths)
    for row in range(6):
        alone = kernels.cached_attention(q[row:row + 1], k_cache, v_cache, jnp.asarray([row]),
                                         lengths[row:row + 1])
        np.testing.assert_array_equal(np.asarray(alone[0]), np.asarray(together[row]))


def test_kernel_jits_and_rejects_mismatched_caches():
    """It compiles under jit, and a mismatched cache is refused by the kernel with a message."""
    q = jnp.zeros((2, 3, 3, 64), jnp.float32)
    cache = jnp.zeros((4, 3, 16, 64), jnp.float32)
    lengths = jnp.asarray([3, 4], jnp.int32)
    out = jax.jit(kernels.cached_attention)(q, cache, cache, jnp.asarray([1, 2]), lengths)
    assert out.shape == q.shape
    with pytest.raises(Exception, match="cached_attention: expected"):
        kernels.cached_attention(q, cache, cache[:, :2], jnp.asarray([0, 1]),
                                 lengths).block_until_ready()
    with pytest.raises(Exception, match="cached_attention: expected"):
        kernels.cached_attention(q, cache, cache, jnp.asarray([0]), lengths).block_until_ready()


def _index_written(row: tuple[int, int]) -> tuple[int, int]:
    """(slot, position) of the cache entry a row of test_cache_write_... names (4 slots, 16
    positions): negative indices from the end. Of two rows on one entry, which lands is unspecified."""
    return tuple(i % n if -n <= i < n else i for i, n in zip(row, (4, 16)))


@settings(max_examples=25, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(-6, 5), st.integers(-20, 20)), min_size=1, max_size=6,
                     unique_by=_index_written),
       bits=st.booleans())
def test_cache_write_puts_rows_where_a_dropping_scatter_does(rows, bits):
    """Each row lands at its (slot, position) in every head; rows out of range (past the slots
    or max_len, or before their start) write nothing, and negative indices count from the end,
    as in JAX's indexing; the rest of the caches stay as they were. Caches of float32 or of
    bfloat16's bits (uint16) alike."""
    slots, kv_heads, max_len, head_dim = 4, 3, 16, 8
    dtype = np.uint16 if bits else np.float32
    rng = np.random.default_rng(len(rows))
    k_cache, v_cache = (rng.integers(0, 60000, (slots, kv_heads, max_len, head_dim)).astype(dtype)
                        for _ in range(2))
    k_rows, v_rows = (rng.integers(0, 60000, (len(rows), kv_heads, head_dim)).astype(dtype)
                      for _ in range(2))
    row_slots, positions = (jnp.asarray(column, jnp.int32) for column in zip(*rows))
    written = kernels.write_cache(jnp.asarray(k_cache), jnp.asarray(v_cache), row_slots, positions,
                                  jnp.asarray(k_rows), jnp.asarray(v_rows))
    for cache, new, out in zip((k_cache, v_cache), (k_rows, v_rows), written):
        expected = jnp.asarray(cache).at[row_slots, :, positions].set(jnp.asarray(new), mode="drop")
        np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))


def test_cache_write_works_in_place_and_rejects_mismatched_rows():
    """Under jit with the caches donated, the written caches are the donated buffers (no copy
    of a cache per layer and step); rows of another head size are refused with a message."""
    cache = jnp.zeros((4, 3, 16, 8), jnp.float32)
    k_cache, v_cache = cache + 0, cache + 0
    pointers = (k_cache.unsafe_buffer_pointer(), v_cache.unsafe_buffer_pointer())
    rows = jnp.ones((2, 3, 8), jnp.float32)
    write = jax.jit(kernels.write_cache, donate_argnums=(0, 1))
    k_out, v_out = write(k_cache, v_cache, jnp.asarray([1, 3]), jnp.asarray([0, 15]), rows, 2 * rows)
    assert (k_out.unsafe_buffer_pointer(), v_out.unsafe_buffer_pointer()) == pointers
    np.testing.assert_array_equal(np.asarray(v_out[3, :, 15]), 2.0)
    with pytest.raises(Exception, match="cache_write: expected"):
        kernels.write_cache(cache, cache, jnp.asarray([0]), jnp.asarray([0]), rows[:1, :, :4],
                            rows[:1, :, :4])[0].block_until_ready()


@pytest.mark.parametrize("rows, shape, in_dims", [
    (1, (576, 576), 1),  # one row, SmolLM2's projection
    (13, (64, 3, 32), 1),  # per-head outputs; rows in groups of 8, 4 and 1
    (70, (40, 100), 1),  # past one block of 64 rows; 100 columns: the last panel is partial
    (6, (3, 32, 64), 2),  # two input dims, as the attention output's weight [h, e, d]
    (3, (1536, 20), 1),  # one partial panel, a long sum
])
def test_packed_matmul_matches_matmul(rows, shape, in_dims):
    rng = np.random.default_rng(2)
    w = rng.standard_normal(shape, np.float32)
    x = rng.standard_normal((rows, *shape[:in_dims]), np.float32)
    packed = kernels.pack(jnp.asarray(w), in_dims)
    assert packed.panels.shape[0] * kernels.PANEL >= np.prod(shape[in_dims:])
    out = jax.jit(kernels.packed_matmul)(jnp.asarray(x), packed)
    assert out.shape == (rows, *shape[in_dims:])
    expected = np.tensordot(x.astype(np.float64), w.astype(np.float64), in_dims)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype, tiles", [(jnp.float32, False), (jnp.bfloat16, False),
                                          (jnp.bfloat16, True)])
def test_packed_matmul_rows_do_not_depend_on_their_neighbours(dtype, tiles):
    """Batch invariance: a row's output is bitwise the same alone, in any group of rows (8 at a
    time on the FMAs, 16 on AMX tiles, 64 per work item), and in a prompt's leading dims."""
    rng = np.random.default_rng(3)
    packed = kernels.pack(jnp.asarray(rng.standard_normal((96, 150), np.float32), dtype), tiles=tiles)
    x = jnp.asarray(rng.standard_normal((75, 96), np.float32))
    together = np.asarray(kernels.packed_matmul(x, packed))
    for row in (0, 7, 8, 13, 15, 16, 17, 64, 74):
        alone = np.asarray(kernels.packed_matmul(x[row:row + 1], packed))
        np.testing.assert_array_equal(alone[0], together[row])
    np.testing.assert_array_equal(
        np.asarray(kernels.packed_matmul(x[:72].reshape(8, 9, 96), packed)).reshape(72, 150),
        together[:72])


@pytest.mark.parametrize("weights, tiles", [("float32", False), ("bfloat16", False),
                                            ("bfloat16", True), ("int8", False)])
def test_weights_side_by_side_give_each_ones_output_bitwise(weights, tiles):
    """q, k and v projections ([d, heads, head_dim] outputs) packed side by side in one weight:
    each part of the one call equals, bit for bit, that weight's own packed matmul, at widths
    within one tile of rows, across tiles (whose inputs go in chunks) and across work items."""
    rng = np.random.default_rng(4)
    ws = [jnp.asarray(rng.standard_normal((200, heads, 8), np.float32) * 0.1) for heads in (5, 1, 1)]
    if weights == "int8":
        quantized = [quantize(w) for w in ws]
        alone = [kernels.pack(q.values, scales=q.scales) for q in quantized]
        together = kernels.pack_side_by_side([q.values for q in quantized],
                                             [q.scales for q in quantized])
    else:
        ws = [w.astype(weights) for w in ws]
        alone = [kernels.pack(w, tiles=tiles) for w in ws]
        together = kernels.pack_side_by_side(ws)
        together = dataclasses.replace(together, tiles=tiles)
    assert together.parts == ((5, 8), (1, 8), (1, 8))
    for rows in (1, 13, 70):
        x = jnp.asarray(rng.standard_normal((rows, 200), np.float32))
        parts = kernels.packed_matmul_parts(x, together)
        for part, w in zip(parts, alone):
            np.testing.assert_array_equal(np.asarray(part), np.asarray(kernels.packed_matmul(x, w)))


@pytest.mark.parametrize("weights, tiles", [("float32", False), ("bfloat16", False),
                                            ("bfloat16", True), ("int8", False)])
def test_gated_pairs_give_silu_of_gate_times_up(weights, tiles):
    """Gate and up packed in pairs: one call gives silu(x @ gate) * (x @ up), each product the
    one its own packed matmul gives bit for bit and the SiLU as accurate as XLA's (against
    float64 on the same products), with a partial last pair of columns (130 = 2 x 48 + 34),
    across tiles of rows and work items; a row alone gets bitwise what it gets among others."""
    rng = np.random.default_rng(8)
    ws = [jnp.asarray(rng.standard_normal((100, 130), np.float32) * 0.3) for _ in range(2)]
    if weights == "int8":
        quantized = [quantize(w) for w in ws]
        alone = [kernels.pack(q.values, scales=q.scales) for q in quantized]
        gated = kernels.pack_gated([q.values for q in quantized], [q.scales for q in quantized])
    else:
        ws = [w.astype(weights) for w in ws]
        alone = [kernels.pack(w, tiles=tiles) for w in ws]
        gated = dataclasses.replace(kernels.pack_gated(ws), tiles=tiles)
    assert gated.gated and gated.shape == (100, 130)
    x = jnp.asarray(rng.standard_normal((70, 100), np.float32) * 3)  # sums out to +-40: SiLU's tails
    out = np.asarray(kernels.packed_matmul(x, gated))
    gate, up = (np.asarray(kernels.packed_matmul(x, w), np.float64) for w in alone)
    exact = gate / (1 + np.exp(-gate)) * up
    xla_error = np.abs(np.asarray(jax.nn.silu(jnp.asarray(gate, jnp.float32)) * up) - exact)
    assert np.abs(out - exact).max() <= 2 * xla_error.max()
    np.testing.assert_allclose(out, exact, rtol=1e-6, atol=1e-6)
    for row in (0, 9, 16, 69):
        np.testing.assert_array_equal(np.asarray(kernels.packed_matmul(x[row:row + 1], gated))[0],
                                      out[row])


VALUES = [-np.inf, -1.5, -0.0, 0.0, 1.5, 2.0, np.inf, np.nan]  # ties, signed zeros, inf, NaN


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 150), st.data())
def test_packed_argmax_takes_the_first_largest_product(n, data):
    """packed_argmax is jnp.argmax of packed_matmul's products, bit for bit: the first of equal
    maxima (+0 and -0 equal), the first NaN where there is one, across the 48-column blocks the
    threads take in any order. One input, so each product is exactly its row's x times the
    weight: ties, infinities and NaNs come through as drawn."""
    w = np.array(data.draw(st.lists(st.sampled_from(VALUES), min_size=n, max_size=n)), np.float32)
    x = np.array(data.draw(st.lists(st.sampled_from([1.0, -1.0, 0.5, 0.0]), min_size=1, max_size=9)),
                 np.float32)[:, None]
    packed = kernels.pack(jnp.asarray(w[None, :]))
    products = np.asarray(kernels.packed_matmul(jnp.asarray(x), packed))
    np.testing.assert_array_equal(np.asarray(kernels.packed_argmax(jnp.asarray(x), packed)),
                                  np.asarray(jnp.argmax(jnp.asarray(products), axis=-1)))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("dtype, tiles", [("float32", False), ("bfloat16", True)])
def test_greedy_tokens_are_the_argmax_of_the_logits(family, dtype, tiles):
    """transformer.greedy_tokens (the LM head kernel's argmax) gives each row the argmax of
    transformer.logits, whose [rows, vocab] it never writes; float32 and bfloat16 on AMX tiles
    (LLaMA's gated MLP in pairs, Gemma 3's side by side), int32 [rows] for 1 to 70 rows."""
    from models import transformer

    cfg = tiny_config(family, dtype=dtype)
    params = transformer.pack_weights(transformer.init_params(cfg, jax.random.PRNGKey(0)), cfg, tiles)
    assert transformer.argmax_head(params, cfg)
    rng = np.random.default_rng(9)
    for rows in (1, 13, 70):
        hidden = jnp.asarray(rng.standard_normal((rows, cfg.d_model)), cfg.dtype)
        tokens = np.asarray(transformer.greedy_tokens(params, hidden, cfg))
        logits = transformer.logits(params, hidden, cfg)
        assert tokens.dtype == np.int32
        np.testing.assert_array_equal(tokens, np.asarray(jnp.argmax(logits, axis=-1)))


@pytest.mark.parametrize("d, scale_dtype", [(576, jnp.float32), (100, jnp.bfloat16), (7, jnp.float32)])
def test_rms_norm_kernel_matches_the_xla_norm_row_by_row(d, scale_dtype):
    """kernels.rms_norm against layers.norm's XLA RMSNorm (float32 and bfloat16 scales, widths
    with and without a tail past 16 lanes, rows of very different sizes); a row alone gets
    bitwise what it gets among others; pack_weights marks every norm for it."""
    from models import transformer
    from models.layers import NormWeights, norm

    rng = np.random.default_rng(10)
    x = jnp.asarray(rng.standard_normal((3, 23, d)) * np.logspace(-3, 3, 23)[:, None], jnp.float32)
    weights = NormWeights(jnp.asarray(rng.standard_normal(d), scale_dtype))
    cfg = tiny_config("llama", d_model=d)
    out = np.asarray(norm(x, dataclasses.replace(weights, kernel=True), cfg))
    np.testing.assert_allclose(out, np.asarray(norm(x, weights, cfg)), rtol=2e-6, atol=1e-30)
    np.testing.assert_array_equal(np.asarray(kernels.rms_norm(x[1, 4:5], weights.scale, cfg.norm_eps)),
                                  out[1, 4:5])
    cfg = tiny_config("llama")
    packed = transformer.pack_weights(transformer.init_params(cfg, jax.random.PRNGKey(0)), cfg)
    norms = [n for n in jax.tree.leaves(packed, is_leaf=lambda n: isinstance(n, NormWeights))
             if isinstance(n, NormWeights)]
    assert len(norms) == 2 * cfg.n_layers + 1 and all(n.kernel for n in norms)


@pytest.mark.parametrize("cache_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kv_heads, group, head_dim", [(3, 3, 64), (2, 5, 32), (1, 2, 128)])
def test_a_pieces_rows_taken_together_give_bitwise_what_each_gives_alone(
        cache_dtype, kv_heads, group, head_dim):
    """A prompt piece's consecutive rows on one slot are attended together (each K and V block
    read once for several rows); every row gets bitwise what it gets in a call of its own, so
    a piece computes the same whatever shares its call. Rows reach full blocks and partial
    last blocks of every kind (scored as a block from 8 positions, one by one below), runs
    break at a slot or a window's first position, and a row that attends nowhere gets zeros."""
    slots, max_len = 3, 80
    rng = np.random.default_rng(9)
    k_cache, v_cache = (jnp.asarray(rng.standard_normal((slots, kv_heads, max_len, head_dim)),
                                    cache_dtype) for _ in range(2))
    # A piece of lengths 19..39, then rows of 3 and 0 positions on its slot: runs of 8, 8 and 7.
    piece = np.arange(19, 40, dtype=np.int32)
    row_slots = np.concatenate([np.full(piece.size, 1), [1, 1, 2, 2, 2, 0],
                                np.full(12, 2)]).astype(np.int32)
    lengths = np.concatenate([piece, [3, 0, 60, 61, 62, 1], np.arange(66, 78)]).astype(np.int32)
    firsts = np.zeros_like(lengths)
    firsts[-12:] = [0, 0, 0, 0, 0, 5, 5, 5, 5, 5, 5, 5]  # a window moving past position 0
    q = jnp.asarray(rng.standard_normal((lengths.size, kv_heads, group, head_dim)), jnp.float32)
    together = np.asarray(kernels.cached_attention(
        q, k_cache, v_cache, jnp.asarray(row_slots), jnp.asarray(lengths), jnp.asarray(firsts)))
    for row in range(lengths.size):
        alone = kernels.cached_attention(q[row:row + 1], k_cache, v_cache,
                                         jnp.asarray(row_slots[row:row + 1]),
                                         jnp.asarray(lengths[row:row + 1]),
                                         jnp.asarray(firsts[row:row + 1]))
        np.testing.assert_array_equal(together[row], np.asarray(alone)[0], err_msg=f"row {row}")
    assert not together[lengths == 0].any()


def test_kernel_reads_a_bfloat16_cache_as_the_xla_attention_does():
    """A bfloat16 cache is widened as it is read: the same result as attending over its values
    in float32."""
    slots, kv_heads, group, head_dim, max_len = 3, 2, 3, 64, 40
    cfg = tiny_config("llama", n_heads=kv_heads * group, n_kv_heads=kv_heads, head_dim=head_dim)
    rng = np.random.default_rng(5)
    k_cache, v_cache = (jnp.asarray(rng.standard_normal((slots, kv_heads, max_len, head_dim)),
                                    jnp.bfloat16) for _ in range(2))
    q = jnp.asarray(rng.standard_normal((slots, kv_heads, group, head_dim)), jnp.float32)
    lengths = jnp.asarray([1, 23, 40], jnp.int32)
    out = np.asarray(kernels.cached_attention(q, k_cache, v_cache, jnp.arange(slots), lengths))
    rows = q.reshape(slots, 1, kv_heads * group, head_dim)
    mask = (jnp.arange(max_len)[None, :] < lengths[:, None])[:, None, :]
    expected = attend(rows, k_cache.astype(jnp.float32), v_cache.astype(jnp.float32), mask, cfg)
    np.testing.assert_allclose(out.reshape(slots, -1), np.asarray(expected).reshape(slots, -1),
                               rtol=1e-5, atol=1e-5)


def _narrow(w: np.ndarray, weights: str, in_dims: int, tiles: bool = False):
    """w as `weights` (bfloat16 or int8) stores it: the weight XLA's dot takes, and its panels."""
    if weights == "int8":
        q = quantize(jnp.asarray(w), in_dims)
        return q, kernels.pack(q.values, in_dims, q.scales)
    narrow = jnp.asarray(w, jnp.bfloat16)
    return narrow, kernels.pack(narrow, in_dims, tiles=tiles)


@pytest.mark.parametrize("weights, tiles", [("bfloat16", False), ("bfloat16", True), ("int8", False)])
@pytest.mark.parametrize("rows, shape, in_dims", [
    (1, (576, 576), 1), (13, (64, 3, 32), 1), (70, (40, 100), 1), (6, (3, 32, 64), 2),
    (3, (150, 20), 1),  # 150 inputs: int8 groups of 64, 64 and 22
    (17, (37, 50), 1)])  # an odd number of inputs: bfloat16's last pair holds one
def test_narrow_panels_match_their_xla_reference(weights, tiles, rows, shape, in_dims):
    """bfloat16 and int8 panels (widened as they stream, int8 scaled per column and group) compute what
    `layers.dense` computes on the same stored weight with XLA's dot, and rows stay
    independent of their neighbours. On AMX tiles (where the CPU has them) x goes in as two
    bfloat16 parts, hi (x rounded) and lo (what hi leaves, rounded): the sum of XLA's dots of
    the parts is their reference."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal(shape, np.float32)
    x = jnp.asarray(rng.standard_normal((rows, *shape[:in_dims]), np.float32))
    stored, packed = _narrow(w, weights, in_dims, tiles)
    assert packed.panels.dtype == jnp.dtype(weights)
    out = np.asarray(jax.jit(kernels.packed_matmul)(x, packed))
    parts = [x]
    if tiles and kernels.tiles_available():
        hi = x.astype(jnp.bfloat16)
        parts = [hi, (x - hi.astype(jnp.float32)).astype(jnp.bfloat16)]
    reference = sum(np.asarray(dense(part, stored, in_dims, preferred_element_type=jnp.float32))
                    for part in parts)
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(kernels.packed_matmul(x[-1:], packed))[0], out[-1])


@pytest.mark.skipif(not kernels.tiles_available(), reason="needs AMX tiles (Sapphire Rapids or later)")
def test_tiles_take_x_as_two_bfloat16_parts_as_xla_converts_them():
    """On the tiles the kernel splits x itself: hi, x rounded to bfloat16 to nearest even as
    XLA's convert rounds, and lo, what hi leaves rounded so (0 where hi is infinite). Against
    the identity each output is one input's hi + lo: bitwise what the tiles give for XLA's
    parts fed one at a time, ties, subnormals, signed zeros and infinities included, in rows
    of 17 inputs (not a whole block of 16 or 32); and within 2^-17 of x where x is normal."""
    rng = np.random.default_rng(7)
    packed = kernels.pack(jnp.eye(17, 50, dtype=jnp.bfloat16), tiles=True)
    base = rng.standard_normal((40, 17)).astype(np.float32)
    bits = base.view(np.uint32)
    bits[:10] = (bits[:10] & 0xFFFF0000) | 0x8000  # exact ties: half way between two bfloat16s
    bits[10:20] = (bits[10:20] & 0xFFFF0000) | 0x8001  # just past half way
    base[20, :] = [0.0, -0.0, np.inf, -np.inf, 1e-39, -1e-39, 3e-41, 1.17e-38, 3.4e38, -3.4e38,
                   1.0, 1.00390625, 1.01171875, -1.00390625, 0.5, 2.0, 65504.0]
    x = jnp.asarray(base)
    hi = x.astype(jnp.bfloat16).astype(jnp.float32)
    lo = jnp.where(jnp.isfinite(hi), x - hi, 0.0).astype(jnp.bfloat16).astype(jnp.float32)
    out = np.asarray(kernels.packed_matmul(x, packed))
    parts = np.asarray(kernels.packed_matmul(hi, packed)) + np.asarray(kernels.packed_matmul(lo, packed))
    np.testing.assert_array_equal(out, parts)
    normal = np.abs(base[:20]) > 1e-30
    np.testing.assert_allclose(out[:20, :17][normal], base[:20][normal], rtol=2.0**-17, atol=0)


@pytest.mark.skipif(not kernels.tiles_available(), reason="needs AMX tiles (Sapphire Rapids or later)")
@pytest.mark.parametrize("rows, k, n, in_dims", [
    (1, 64, 48, 1), (16, 100, 50, 1), (17, 37, 96, 1),  # 37 inputs: a lone last one in its pair
    (300, 576, 200, 1),  # two items of rows (256 and 44) per panel
    (6, (3, 32), 64, 2)])
def test_float32_panels_on_tiles_keep_float32s_precision(rows, k, n, in_dims):
    """float32 panels marked for the tiles are multiplied as three bfloat16 parts of each value
    (six products): every output is within float32's bound for a sum of k products, (k + 6)
    2^-24 sum |x_i w_i| (the FMAs' is k 2^-24), the argmax twin picks the same columns, and
    each row comes out bitwise the same alone as with the others (batch invariance)."""
    rng = np.random.default_rng(11)
    shape = (k, n) if in_dims == 1 else (*k, n)
    w = rng.standard_normal(shape).astype(np.float32)
    tiles = dataclasses.replace(kernels.pack(jnp.asarray(w), in_dims), tiles=True)
    x = rng.standard_normal((rows, *shape[:in_dims])).astype(np.float32)
    x2, w2 = x.reshape(rows, -1).astype(np.float64), w.reshape(-1, n).astype(np.float64)
    bound = (x2.shape[1] + 6) * 2.0 ** -24 * (np.abs(x2) @ np.abs(w2))
    out = np.asarray(kernels.packed_matmul(jnp.asarray(x), tiles)).reshape(rows, n)
    assert np.all(np.abs(out - x2 @ w2) <= bound)
    alone = np.asarray(kernels.packed_matmul(jnp.asarray(x[-1:]), tiles)).reshape(1, n)
    np.testing.assert_array_equal(alone[0], out[-1])
    np.testing.assert_array_equal(np.asarray(kernels.packed_argmax(jnp.asarray(x), tiles)),
                                  out.argmax(axis=1))


@pytest.mark.skipif(not kernels.tiles_available(), reason="needs AMX tiles (Sapphire Rapids or later)")
def test_float32_gated_pairs_on_tiles_give_silu_of_gate_times_up():
    """A gated MLP's float32 gate and up on the tiles: each product bitwise the one its own
    weight gives on the tiles, then silu(gate) * up (SiLU within XLA's error)."""
    rng = np.random.default_rng(12)
    gate, up = (jnp.asarray(rng.standard_normal((576, 200)), jnp.float32) for _ in range(2))
    x = jnp.asarray(rng.standard_normal((70, 576)), jnp.float32)
    on_tiles = [dataclasses.replace(kernels.pack(w), tiles=True) for w in (gate, up)]
    g, u = (np.asarray(kernels.packed_matmul(x, w)) for w in on_tiles)
    gated = dataclasses.replace(kernels.pack_gated([gate, up]), tiles=True)
    np.testing.assert_allclose(np.asarray(kernels.packed_matmul(x, gated)),
                               np.asarray(jax.nn.silu(jnp.asarray(g))) * u, rtol=2e-6, atol=1e-6)


def test_panels_of_an_unsupported_kind_are_refused():
    with pytest.raises(ValueError, match="int8 with scales"):
        kernels.pack(jnp.zeros((4, 48), jnp.int8))  # int8 without its scales
    with pytest.raises(ValueError, match="float16 weight"):
        kernels.pack(jnp.zeros((4, 48), jnp.float16))
    with pytest.raises(ValueError, match="AMX tiles multiply bfloat16 ones"):
        kernels.pack(jnp.zeros((4, 48), jnp.float32), tiles=True)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 150), st.integers(1, 6), st.integers(1, 2), st.floats(1e-3, 1e3),
       st.integers(0, 2**31 - 1))
def test_int8_quantization_rounds_each_group_to_its_nearest_step(k, n, in_dims, magnitude, seed):
    """In each output channel and group of 64 inputs (the last group maybe shorter) the largest
    |w| maps to 127, every value lands on the nearest of its group's steps (error at most half
    a step), and a channel of zeros stays zeros."""
    rng = np.random.default_rng(seed)
    shape = (k, 2, n) if in_dims == 2 else (k, n)
    w = (rng.standard_normal(shape) * magnitude).astype(np.float32)
    w[..., 0] = 0.0
    q = quantize(jnp.asarray(w), in_dims)
    assert isinstance(q, QuantizedWeight) and q.values.dtype == jnp.int8
    inputs = int(np.prod(shape[:in_dims]))
    groups = -(-inputs // kernels.GROUP)
    values = np.asarray(q.values, np.float32).reshape(inputs, -1)
    scales = np.asarray(q.scales)
    assert scales.shape == (groups, *shape[in_dims:]) and np.all(scales > 0)
    scales = scales.reshape(groups, -1)
    flat = w.reshape(inputs, -1)
    assert np.all(np.abs(values) <= 127) and np.all(values[:, 0] == 0)
    for g in range(groups):
        rows = slice(g * kernels.GROUP, (g + 1) * kernels.GROUP)
        assert np.all(np.max(np.abs(values[rows]), axis=0)[1:] == 127)
        error = np.abs(values[rows] * scales[g] - flat[rows])
        assert np.all(error <= scales[g] / 2 + 1e-6 * np.abs(flat[rows]))  # + float32 rounding


def test_packed_matmul_rejects_mismatched_panels():
    packed = kernels.pack(jnp.zeros((32, 48), jnp.float32))
    wrong = kernels.PackedWeight(packed.panels, packed.scales, (16, 48), 1)  # says 16 inputs, holds 32
    with pytest.raises(Exception, match="packed_matmul: expected"):
        jax.block_until_ready(kernels.packed_matmul(jnp.zeros((2, 16), jnp.float32), wrong))


def test_a_damaged_cached_library_is_rebuilt_not_loaded(tmp_path, monkeypatch):
    """A library cut short (a crash mid-copy) can pass dlopen's checks and kill the process on
    first use; the digest beside it catches that. CXX may be a command with arguments: here a
    stand-in compiler that logs each build and copies the library this process built (a real
    build is what every process's first kernel call runs)."""
    import ctypes
    import sys

    built, builds = kernels._compile(), tmp_path / "builds.log"
    stand_in = tmp_path / "cxx.py"
    stand_in.write_text("import shutil, sys\n"
                        f"open({str(builds)!r}, 'a').write('build\\n')\n"
                        "shutil.copy(sys.argv[1], sys.argv[sys.argv.index('-o') + 1])\n")
    monkeypatch.setenv("FLOVER_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", f"{sys.executable} {stand_in} {built}")
    library = kernels._compile()
    assert kernels._compile() == library and builds.read_text() == "build\n"  # cached: no build
    size = library.stat().st_size
    library.write_bytes(library.read_bytes()[: size // 2])
    assert kernels._compile() == library and library.stat().st_size == size
    assert builds.read_text() == "build\n" * 2
    assert library.with_suffix(".sha256").read_text() == kernels._digest(library)
    assert ctypes.cdll.LoadLibrary(str(library)).FloverPackedMatmul  # loads, symbols present
