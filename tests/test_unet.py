"""The U-Net: the paper's size, shapes, the time embedding, and saving."""

import math

import keras
import numpy as np
import pytest
from conftest import tiny_unet

from kddpm import KddpmError, build_unet
from kddpm.presets import PRESETS
from kddpm.unet import GroupNorm, SinusoidalEmbedding


def test_cifar10_preset_has_the_papers_parameter_count():
    model = build_unet(**PRESETS["cifar10"].unet_kwargs())
    assert abs(model.count_params() - 35.7e6) / 35.7e6 < 0.01


def test_inputs_outputs_and_zero_initialised_output():
    model = tiny_unet((16, 12, 3), attention_resolutions=(8,))
    assert [i.name for i in model.inputs] == ["x_t", "t"]
    assert model.inputs[1].dtype == "int32" and model.inputs[0].dtype == "float32"
    x = np.random.default_rng(0).standard_normal((3, 16, 12, 3)).astype(np.float32)
    eps = model([x, np.array([0, 10, 999], np.int32)])
    assert eps.shape == (3, 16, 12, 3)
    # The output convolution starts at zero, as in the paper's code.
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(eps), 0.0)


def test_output_depends_on_t_once_trained_weights_are_nonzero():
    model = tiny_unet()
    rng = np.random.default_rng(0)
    model.set_weights([rng.normal(0, 0.2, w.shape).astype(np.float32) for w in model.get_weights()])
    x = rng.standard_normal((2, 8, 8, 1)).astype(np.float32)
    a = keras.ops.convert_to_numpy(model([x, np.array([5, 5], np.int32)]))
    b = keras.ops.convert_to_numpy(model([x, np.array([500, 500], np.int32)]))
    assert np.abs(a - b).max() > 1e-3


def test_sinusoidal_embedding_matches_the_transformer_formula():
    dim = 16
    t = np.array([0, 1, 17, 999], np.int32)
    embedding = keras.ops.convert_to_numpy(SinusoidalEmbedding(dim)(t))
    half = dim // 2
    for row, step in enumerate(t):
        for k in range(half):
            frequency = math.exp(-math.log(10000) * k / (half - 1))
            assert embedding[row, k] == pytest.approx(math.sin(step * frequency), abs=1e-4)
            assert embedding[row, half + k] == pytest.approx(math.cos(step * frequency), abs=1e-4)


def test_keras_round_trip_gives_identical_outputs(tmp_path):
    model = tiny_unet((8, 8, 2), dropout=0.1)
    rng = np.random.default_rng(0)
    model.set_weights([rng.normal(0, 0.1, w.shape).astype(np.float32) for w in model.get_weights()])
    path = tmp_path / "unet.keras"
    model.save(path)
    loaded = keras.models.load_model(path)  # safe mode, no custom objects
    x = rng.standard_normal((4, 8, 8, 2)).astype(np.float32)
    t = np.array([0, 3, 400, 999], np.int32)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model([x, t])), keras.ops.convert_to_numpy(loaded([x, t])))


def test_sizes_the_down_sampling_cannot_divide_are_refused():
    with pytest.raises(KddpmError, match="divisible by 4"):
        build_unet((28, 30, 1), 8, (1, 2, 2), 1, (), 0.0, norm_groups=4)
    with pytest.raises(KddpmError, match="norm_groups"):
        build_unet((8, 8, 1), 12, (1, 2), 1, (), 0.0, norm_groups=8)


def test_group_norm_matches_numpy():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 5, 4, 12)) * 3 + 1).astype(np.float32)
    layer = GroupNorm(4)
    layer.build(x.shape)
    gamma, beta = rng.standard_normal(12).astype(np.float32), rng.standard_normal(12).astype(np.float32)
    layer.set_weights([gamma, beta])
    groups = x.reshape(3, 5, 4, 4, 3)
    mean = groups.mean(axis=(1, 2, 4), keepdims=True)
    var = groups.var(axis=(1, 2, 4), keepdims=True)
    expected = ((groups - mean) / np.sqrt(var + 1e-6)).reshape(x.shape) * gamma + beta
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)), expected, atol=1e-4)


def test_attention_block_matches_numpy():
    from kddpm.unet import _Blocks

    x_in = keras.Input((4, 4, 8))
    model = keras.Model(x_in, _Blocks(0.0, 2).attention(x_in))
    rng = np.random.default_rng(1)
    model.set_weights([rng.normal(0, 0.3, w.shape).astype(np.float32) for w in model.get_weights()])
    x = rng.standard_normal((2, 4, 4, 8)).astype(np.float32)
    # Functional weight order follows the graph: Attention takes [query, value, key].
    gamma, beta, wq, bq, wv, bv, wk, bk, wo, bo = model.get_weights()
    groups = x.reshape(2, 16, 2, 4)
    h = (groups - groups.mean(axis=(1, 3), keepdims=True)) / np.sqrt(groups.var(axis=(1, 3), keepdims=True) + 1e-6)
    h = h.reshape(2, 16, 8) * gamma + beta
    q, k, v = h @ wq + bq, h @ wk + bk, h @ wv + bv
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(8)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected = x + ((weights @ v) @ wo + bo).reshape(2, 4, 4, 8)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(x)), expected, atol=1e-4)


def test_arguments_that_would_build_something_else_are_refused():
    # The paper's attention at 16x16 on 28x28 images would silently build no attention at all.
    with pytest.raises(KddpmError, match=r"\[16\] match no feature-map height.*\[28, 14, 7\]"):
        build_unet((28, 28, 1), 32, (1, 2, 2), 1, (16,), 0.0, 8)
    for shape in ((28, 28), (28, 28, 1, 1), "28x28", (28, 0, 1)):
        with pytest.raises(KddpmError, match="image_shape"):
            build_unet(shape, 32, (1, 2, 2), 1, (), 0.0, 8)


def test_a_seed_fixes_the_initial_weights_and_attention_starts_as_the_identity():
    a, b = tiny_unet(seed=7), tiny_unet(seed=7)
    for x, y in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(x, y)
    c = tiny_unet(seed=8)
    assert any(not np.array_equal(x, y) for x, y in zip(a.get_weights(), c.get_weights()))
    # Every attention block's output projection is zero (the original code's proj_out).
    dense_before_reshape = [
        layer
        for layer, following in zip(a.layers, a.layers[1:])
        if isinstance(layer, keras.layers.Dense) and isinstance(following, keras.layers.Reshape)
    ]
    attention_blocks = sum(isinstance(layer, keras.layers.Attention) for layer in a.layers)
    assert attention_blocks >= 2 and len(dense_before_reshape) == attention_blocks
    for layer in dense_before_reshape:
        np.testing.assert_array_equal(layer.kernel.numpy(), 0.0)


def test_dropout_masks_are_per_example_and_keyed_by_global_position():
    import tensorflow as tf

    from kddpm.streams import example_keys, fold_in, seed_pair

    model = tiny_unet(dropout=0.5, seed=1)
    rng = np.random.default_rng(0)
    model.set_weights([rng.normal(0, 0.2, w.shape).astype(np.float32) for w in model.get_weights()])
    x = np.repeat(rng.standard_normal((1, 8, 8, 1)).astype(np.float32), 6, axis=0)
    t = np.full(6, 300, np.int32)
    key = fold_in(seed_pair(3), 3)
    with example_keys(key, tf.constant(0)):
        whole = model([x, t], training=True).numpy()
    # Identical inputs, different masks: each example draws its own.
    assert np.abs(whole[0] - whole[1]).max() > 1e-3
    # Rows 2..5 drawn as another replica's slice (first = 2) get the same masks.
    with example_keys(key, tf.constant(2)):
        part = model([x[2:], t[2:]], training=True).numpy()
    np.testing.assert_allclose(part, whole[2:], rtol=1e-5, atol=1e-6)
    # The same inside a compiled function, and a dropout-free call is deterministic.
    with example_keys(key, tf.constant(2)):
        compiled = tf.function(lambda a, b: model([a, b], training=True))(x[2:], t[2:]).numpy()
    np.testing.assert_allclose(compiled, whole[2:], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(model([x, t]).numpy()[0], model([x, t]).numpy()[1])
