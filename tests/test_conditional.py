"""Class-conditional models and classifier-free guidance: the network, training, the guided sampler."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import tiny_unet

from kddpm import DiffusionModel, KddpmError, NoiseSchedule, build_unet
from kddpm.labels import drop_labels
from kddpm.sampling import Sampler, ddim_plan, ddpm_plan
from kddpm.streams import seed_pair

SHAPE = (8, 8, 1)
NAMES = ["circle", "square", "cross"]


def conditional_model(**kwargs):
    settings = dict(num_classes=3, class_names=NAMES, ema_decay=0.9, label_dropout=0.2)
    settings.update(kwargs)
    return DiffusionModel(tiny_unet(SHAPE, num_classes=3), NoiseSchedule.linear(50), **settings)


def perturbed(model):
    """The model with every EMA weight moved off its initial value (zero-initialised layers hide the label)."""
    rng = np.random.default_rng(1)
    model.ema_denoiser.set_weights([w + 0.1 * rng.standard_normal(w.shape) for w in model.ema_denoiser.get_weights()])
    return model


def test_the_label_embedding_is_added_and_the_unconditional_network_is_unchanged():
    plain = build_unet(SHAPE, 8, (1, 2), 1, (4,), 0.0, 4, seed=3)
    conditional = build_unet(SHAPE, 8, (1, 2), 1, (4,), 0.0, 4, seed=3, num_classes=10)
    assert [i.name for i in plain.inputs] == ["x_t", "t"]
    assert [i.name for i in conditional.inputs] == ["x_t", "t", "label"]
    # One Embedding(K + 1, 4 * base_channels) more, every other weight the same.
    assert conditional.count_params() - plain.count_params() == 11 * 32
    plain_weights = {w.path: w.numpy() for w in plain.weights}
    for weight in conditional.weights:
        if "class_embedding" not in weight.path:
            np.testing.assert_array_equal(weight.numpy(), plain_weights[weight.path])
    # The label changes eps (once the zero-initialised layers are not zero).
    rng = np.random.default_rng(1)
    conditional.set_weights([w + 0.1 * rng.standard_normal(w.shape) for w in conditional.get_weights()])
    x = tf.random.normal((2, *SHAPE), seed=2)
    t = tf.constant([5, 5])
    a = conditional([x, t, tf.constant([0, 0])])
    b = conditional([x, t, tf.constant([1, 10])])
    assert float(tf.reduce_max(tf.abs(a - b))) > 1e-3


class GaussianClasses:
    """The exact eps of Gaussian data N(mu_c, s^2 I), class c; the null label's data is N(mu_null, s^2 I).

    eps*(x_t, t, c) = sqrt(1 - abar) (x_t - sqrt(abar) mu_c) / (abar s^2 + 1 - abar). It is affine
    in mu_c with a slope that does not depend on c, so guidance with weight w gives exactly the
    eps of N((1 + w) mu_c - w mu_null, s^2 I): the guided samples' mean is known in closed form.
    It counts its calls at run time and records the batch it was given.
    """

    def __init__(self, schedule, means, null_mean, std):
        self.abar = tf.constant(schedule.alphas_cumprod, tf.float32)
        self.means = tf.constant([*means, null_mean], tf.float32)
        self.var = std**2
        self.calls = tf.Variable(0)
        self.batch = tf.Variable(0)
        self.traced = 0

    def __call__(self, inputs, training=False):
        x, t, labels = inputs
        self.traced += 1
        self.calls.assign_add(1)
        self.batch.assign(tf.shape(x)[0])
        abar = tf.reshape(tf.gather(self.abar, t), [-1, 1, 1, 1])
        mean = tf.reshape(tf.gather(self.means, labels), [-1, 1, 1, 1])
        return tf.sqrt(1.0 - abar) * (x - tf.sqrt(abar) * mean) / (abar * self.var + 1.0 - abar)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("guidance", [0.0, 1.5])
def test_guided_samples_have_the_closed_form_mean(sampler, guidance):
    schedule = NoiseSchedule.linear(1000)
    means, null_mean, std = [0.6, -0.3], 0.1, 0.2
    network = GaussianClasses(schedule, means, null_mean, std)
    plan = ddpm_plan(schedule) if sampler == "ddpm" else ddim_plan(schedule, 100)
    runner = Sampler(network, (1, 1, 1), jit_compile=False, num_classes=2)
    n = 4000
    labels = np.repeat([0, 1], n // 2).astype(np.int32)
    x = runner.sample(plan, n, seed=0, labels=labels, guidance_scale=guidance).numpy().reshape(2, -1)
    for c in (0, 1):
        want = (1 + guidance) * means[c] - guidance * null_mean
        assert abs(x[c].mean() - want) < 4 * std / np.sqrt(n / 2) + 0.01
        assert abs(x[c].std() - std) < 0.02
    # One network call per step, on the doubled batch when guided.
    assert int(network.calls.numpy()) == plan.num_steps and network.traced == 1
    assert int(network.batch.numpy()) == (2 * n if guidance else n)


def test_the_null_label_gives_unconditional_samples():
    schedule = NoiseSchedule.linear(1000)
    network = GaussianClasses(schedule, [0.6, -0.3], 0.1, 0.2)
    runner = Sampler(network, (1, 1, 1), jit_compile=False, num_classes=2)
    x = runner.sample(ddim_plan(schedule, 50), 2000, seed=1).numpy()  # labels None: the null label
    assert abs(x.mean() - 0.1) < 0.02


def test_guided_sampling_is_one_graph_with_xla_too():
    schedule = NoiseSchedule.linear(1000)
    network = GaussianClasses(schedule, [0.6, -0.3], 0.1, 0.2)
    plan = ddim_plan(schedule, 20)
    labels = np.array([0, 1, 1], np.int32)
    plain = Sampler(network, (1, 1, 1), jit_compile=False, num_classes=2)
    xla = Sampler(network, (1, 1, 1), jit_compile=True, num_classes=2)
    a = plain.sample(plan, 3, seed=4, labels=labels, guidance_scale=2.0).numpy()
    b = xla.sample(plan, 3, seed=4, labels=labels, guidance_scale=2.0).numpy()
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_conditional_training_is_reproducible_and_uses_the_labels():
    images = np.random.default_rng(0).uniform(-1, 1, (16, *SHAPE)).astype(np.float32)
    labels = np.arange(16, dtype=np.int32) % 3
    weights = []
    for _ in range(2):
        keras.utils.set_random_seed(0)
        model = conditional_model()
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
        model.fit(images, labels, batch_size=8, epochs=2, verbose=0, shuffle=False)
        weights.append(model.denoiser.get_weights())
    assert all(np.array_equal(a, b) for a, b in zip(*weights))
    embedding = model.denoiser.get_layer("class_embedding").embeddings.numpy()
    keras.utils.set_random_seed(0)
    untouched = conditional_model().denoiser.get_layer("class_embedding").embeddings.numpy()
    # Every class row and the null row (label dropout) were trained.
    assert all(not np.array_equal(embedding[k], untouched[k]) for k in range(4))


def test_label_dropout_rate_and_keys():
    model = conditional_model(label_dropout=0.25)
    labels = tf.zeros([20000], tf.int32)
    key = tf.constant([7, 3], tf.int64)
    dropped = drop_labels(labels, model.label_dropout, model.num_classes, key, tf.constant(0)).numpy()
    assert set(np.unique(dropped)) == {0, 3}
    assert abs(np.mean(dropped == 3) - 0.25) < 0.01
    # Example i's draw depends on its place in the global batch, not on how the batch is split.
    second_half = drop_labels(labels[:10000], 0.25, 3, key, tf.constant(10000)).numpy()
    np.testing.assert_array_equal(second_half, dropped[10000:])


def test_conditional_data_errors():
    model = conditional_model()
    model.compile(optimizer="adam")
    images = np.zeros((8, *SHAPE), np.float32)
    with pytest.raises(KddpmError, match=r"class-conditional .* train it on \(images, labels\)"):
        model.fit(images, batch_size=8, epochs=1, verbose=0)
    before = model.denoiser.get_weights()
    for bad in (3, -1):
        with pytest.raises(KddpmError, match=r"labels must be class indices in \[0, 3\)"):
            model.fit(images, np.full([8], bad, np.int32), batch_size=8, epochs=1, verbose=0)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.denoiser.get_weights()))
    with pytest.raises(KddpmError, match="no label input"):
        DiffusionModel(tiny_unet(SHAPE), num_classes=3)
    with pytest.raises(KddpmError, match="class_names has 2 names"):
        conditional_model(class_names=["a", "b"])


def test_sample_by_name_or_index_with_guidance_and_its_errors():
    model = perturbed(conditional_model())
    by_name = model.sample(2, seed=0, sampler="ddim", steps=3, labels="Square", guidance_scale=2.0)
    by_index = model.sample(2, seed=0, sampler="ddim", steps=3, labels=[1, 1], guidance_scale=2.0)
    np.testing.assert_array_equal(by_name, by_index)
    other = model.sample(2, seed=0, sampler="ddim", steps=3, labels=[2, 2], guidance_scale=2.0)
    assert np.abs(other - by_index).max() > 1e-4
    # Image i is the same whatever the batch split, labels included.
    split = model.sample(2, seed=0, sampler="ddim", steps=3, labels=[1, 1], guidance_scale=2.0, batch_size=1)
    np.testing.assert_allclose(split, by_index, atol=1e-5)
    with pytest.raises(KddpmError, match="Unknown class 'dog'; this model's classes are circle, square, cross"):
        model.sample(1, labels="dog")
    with pytest.raises(KddpmError, match=r"Class 7 is outside \[0, 2\]"):
        model.sample(1, labels=7)
    with pytest.raises(KddpmError, match="guidance_scale needs labels"):
        model.sample(1, guidance_scale=1.0)
    with pytest.raises(KddpmError, match="guidance_scale must be >= 0"):
        model.sample(1, labels=0, guidance_scale=-1.0)
    with pytest.raises(KddpmError, match="labels holds 3 classes for 2 images"):
        model.sample(2, labels=[0, 1, 2])
    unconditional = DiffusionModel(tiny_unet(SHAPE), NoiseSchedule.linear(50))
    with pytest.raises(KddpmError, match="need a class-conditional model"):
        unconditional.sample(1, labels=0)


def test_a_conditional_model_saves_and_loads_with_its_classes(tmp_path):
    model = perturbed(conditional_model())
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert (loaded.num_classes, loaded.class_names, loaded.label_dropout) == (3, NAMES, 0.2)
    want = model.sample(2, seed=1, sampler="ddim", steps=3, labels="cross", guidance_scale=1.0)
    got = loaded.sample(2, seed=1, sampler="ddim", steps=3, labels="cross", guidance_scale=1.0)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_seed_pair_is_used_for_conditional_noise_too():
    # The initial noise of a conditional model's images is the unconditional one: the label
    # changes the network's input, never the random streams.
    schedule = NoiseSchedule.linear(1000)
    network = GaussianClasses(schedule, [0.0, 0.0], 0.0, 1.0)  # eps = x_t: DDIM then keeps x_T's direction
    runner = Sampler(network, (1, 1, 1), jit_compile=False, num_classes=2)
    a = runner.sample(ddim_plan(schedule, 5), 4, seed=3, labels=np.zeros(4, np.int32)).numpy()
    b = runner.sample(ddim_plan(schedule, 5), 4, seed=3, labels=np.ones(4, np.int32), guidance_scale=1.0).numpy()
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert seed_pair(3).shape == (2,)
