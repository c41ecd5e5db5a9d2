"""The CPU decode-attention kernel (models/kernels) against the pure-JAX attention it replaces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import kernels
from models.layers import attend
from models.presets import tiny_config


@pytest.mark.parametrize("kv_heads, group, head_dim, q_scale", [
    (3, 3, 64, 1.0),  # SmolLM2's heads
    (2, 4, 16, 1.0), (4, 2, 32, 1.0), (1, 5, 128, 1.0),  # the other vectorized head sizes
    (2, 1, 24, 1.0),  # a head size the scalar path serves
    (3, 3, 64, 40.0),  # scores spread over hundreds: most weights underflow to (near) zero
])
def test_kernel_matches_masked_attention_over_the_window(kv_heads, group, head_dim, q_scale):
    """Rows read their own slot's first lengths[i] positions, from the window's start on;
    a row of length 0 gets zeros; positions beyond a row's length are never read."""
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
    out = kernels.decode_attention(jnp.asarray(rows), jnp.asarray(k_cache), jnp.asarray(v_cache),
                                   jnp.int32(start), jnp.asarray(lengths))
    assert out.shape == rows.shape

    window = slice(start, start + width)
    clean = [np.nan_to_num(c[window]) for c in (k_cache, v_cache)]
    mask = (np.arange(max_len)[None, :] < lengths[:, None])[:, None, :]
    expected = attend(jnp.asarray(q), *map(jnp.asarray, clean), jnp.asarray(mask), cfg)
    expected = np.asarray(expected).reshape(rows.shape)
    live = lengths > 0
    np.testing.assert_allclose(np.asarray(out)[live], expected[live], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out)[~live], 0.0)


def test_kernel_rows_do_not_depend_on_their_neighbours():
    """Batch invariance: a row's output is bitwise the same whatever the other rows hold."""
    rng = np.random.default_rng(1)
    k_cache, v_cache = (jnp.asarray(rng.standard_normal((6, 3, 32, 64), np.float32)) for _ in range(2))
    q = jnp.asarray(rng.standard_normal((6, 3, 3, 64), np.float32))
    lengths = jnp.asarray([5, 31, 12, 32, 1, 20], jnp.int32)
    together = kernels.decode_attention(q, k_cache, v_cache, jnp.int32(0), lengths)
    for row in range(6):
        alone = kernels.decode_attention(q[row:row + 1], k_cache, v_cache, jnp.int32(row),
                                         lengths[row:row + 1])
        np.testing.assert_array_equal(np.asarray(alone[0]), np.asarray(together[row]))


def test_kernel_jits_and_rejects_mismatched_caches():
    """It compiles under jit, and a mismatched cache is refused by the kernel with a message."""
    q = jnp.zeros((2, 3, 3, 64), jnp.float32)
    cache = jnp.zeros((4, 3, 16, 64), jnp.float32)
    lengths = jnp.asarray([3, 4], jnp.int32)
    out = jax.jit(kernels.decode_attention)(q, cache, cache, jnp.int32(1), lengths)
    assert out.shape == q.shape
    with pytest.raises(Exception, match="decode_attention: expected"):
        kernels.decode_attention(q, cache, cache[:, :2], jnp.int32(0), lengths).block_until_ready()
