"""Per-example random streams: normal and uniform, the same under XLA, and example i's draw
independent of which other examples are drawn with it."""

import math

import numpy as np
import tensorflow as tf

from kddpm.streams import example_integers, example_normals, example_uniforms, fold_in, seed_pair

KEY = fold_in(seed_pair(2024), 7)


def test_normals_are_standard_normal_and_the_same_under_xla():
    plain = tf.function(example_normals)(KEY, 0, 200, [500]).numpy().astype(np.float64).ravel()
    xla = tf.function(example_normals, jit_compile=True)(KEY, 0, 200, [500]).numpy().astype(np.float64).ravel()
    np.testing.assert_allclose(plain, xla, rtol=1e-5, atol=1e-6)
    # 100,000 draws against N(0, 1): moments, and the Kolmogorov-Smirnov distance to the
    # normal CDF (its 1% critical value is 1.63 / sqrt(n) = 0.0052).
    assert abs(plain.mean()) < 0.015 and abs(plain.std() - 1) < 0.01
    assert abs(np.mean(plain**4) - 3) < 0.08
    ordered = np.sort(plain)
    cdf = 0.5 * (1 + np.vectorize(math.erf)(ordered / math.sqrt(2)))
    steps = np.arange(1, len(ordered) + 1) / len(ordered)
    assert max(np.abs(steps - cdf).max(), np.abs(steps - 1 / len(ordered) - cdf).max()) < 0.0052
    other = example_normals(fold_in(seed_pair(2025), 7), 0, 200, [500]).numpy().ravel()
    assert abs(np.corrcoef(plain, other)[0, 1]) < 0.02


def test_example_i_is_the_same_whatever_else_is_drawn():
    for shape in ([3], [5, 5, 1], [4, 4, 2]):  # odd sizes pad each example's block
        whole = example_normals(KEY, 0, 12, shape).numpy()
        for first, count in ((0, 1), (5, 4), (11, 1), (3, 9)):
            part = example_normals(KEY, first, count, shape).numpy()
            # The integers are identical; log and cos may round differently in vector lanes.
            np.testing.assert_allclose(part, whole[first : first + count], rtol=1e-6, atol=1e-6)
        # Under XLA too, with the position as a tensor (as replicas pass it).
        xla = tf.function(example_normals, jit_compile=True)(KEY, tf.constant(5), tf.constant(4), shape)
        np.testing.assert_allclose(xla.numpy(), whole[5:9], rtol=1e-5, atol=1e-6)
        # Rows are not copies of each other.
        assert np.abs(np.corrcoef(whole.reshape(12, -1))[0, 1:]).max() < 0.95 or whole[0].size < 4


def test_uniforms_and_integers():
    u = example_uniforms(KEY, 0, 1000, [100]).numpy().ravel()
    assert u.min() > 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.005 and abs(u.var() - 1 / 12) < 0.002
    t = example_integers(KEY, 0, 100_000, 1000).numpy()
    assert t.min() == 0 and t.max() == 999
    counts = np.bincount(t, minlength=1000)
    # Chi-square with 999 degrees of freedom: mean 999, sd 44.7; 5 sd is far out.
    chi2 = ((counts - 100) ** 2 / 100).sum()
    assert chi2 < 999 + 5 * 44.7
    np.testing.assert_array_equal(example_integers(KEY, 40, 10, 1000).numpy(), t[40:50])
