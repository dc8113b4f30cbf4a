"""DiffusionModel: Algorithm 1, EMA, saving and reloading, and bad data."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import tiny_unet

from kddpm import DiffusionModel, KddpmError, NoiseSchedule
from kddpm.training import make_optimizer


def make_model(seed=0, **kwargs):
    keras.utils.set_random_seed(seed)
    model = DiffusionModel(tiny_unet(), NoiseSchedule.linear(), seed=seed, **kwargs)
    model.compile(optimizer=make_optimizer(1e-3, warmup_steps=0))
    return model


def images(count=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (count, 8, 8, 1)).astype(np.float32)


def test_train_step_loss_is_l_simple_on_the_drawn_t_and_noise():
    """The reported loss equals ||eps - eps_theta(sqrt(abar) x0 + sqrt(1-abar) eps, t)||^2 in numpy."""
    model = make_model(ema_decay=0.9)
    rng = np.random.default_rng(0)
    model.denoiser.set_weights([rng.normal(0, 0.1, w.shape).astype(np.float32) for w in model.denoiser.get_weights()])
    x0 = images(16)
    t, noise = (v.numpy() for v in model._draw_t_and_noise(tf.constant(x0), model._training_key()))
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[t][:, None, None, None]
    x_t = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise
    eps = model.denoiser([x_t.astype(np.float32), t], training=False).numpy()
    expected = np.mean((noise - eps) ** 2)
    logs = model.train_on_batch(x0, return_dict=True)
    assert logs["loss"] == pytest.approx(expected, rel=1e-4)


def test_the_quartile_losses_and_the_gradient_norm_are_those_of_the_drawn_t():
    """loss_q0..loss_q3 are the mean loss of the examples whose t lies in each quarter of [0, T),
    and grad_norm the global norm of the L_simple gradient before clipping, both in numpy / a tape."""
    model = make_model(clip_grad_norm=1e-3)  # clipping active: the norm logged is the one before it
    rng = np.random.default_rng(1)
    model.denoiser.set_weights([rng.normal(0, 0.1, w.shape).astype(np.float32) for w in model.denoiser.get_weights()])
    x0 = images(64)
    t, noise = (v.numpy() for v in model._draw_t_and_noise(tf.constant(x0), model._training_key()))
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[t][:, None, None, None]
    x_t = tf.constant((np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise).astype(np.float32))
    with tf.GradientTape() as tape:
        eps = model.denoiser([x_t, tf.constant(t)], training=True)
        loss = tf.reduce_mean(tf.square(noise - eps))
    norm = tf.linalg.global_norm(tape.gradient(loss, model.denoiser.trainable_variables)).numpy()
    per_example = np.mean((noise - eps.numpy()) ** 2, axis=(1, 2, 3))
    logs = model.train_on_batch(x0, return_dict=True)
    assert norm > 10 * 1e-3 and logs["grad_norm"] == pytest.approx(norm, rel=1e-4)
    for q in range(4):
        inside = (t >= q * 250) & (t < (q + 1) * 250)
        assert inside.sum() > 5  # 64 draws: every quarter has examples
        assert logs[f"loss_q{q}"] == pytest.approx(per_example[inside].mean(), rel=1e-4)
    assert logs["loss"] == pytest.approx(per_example.mean(), rel=1e-4)


def test_training_draws_are_uniform_t_and_standard_normal_noise():
    model = make_model()
    x0 = tf.zeros((4096, 8, 8, 1))
    t, noise = model._draw_t_and_noise(x0, model._training_key())
    t = t.numpy()
    assert t.min() >= 0 and t.max() <= 999
    assert abs(t.mean() - 499.5) < 15 and len(np.unique(t)) > 950
    assert abs(noise.numpy().mean()) < 0.01 and abs(noise.numpy().std() - 1) < 0.01
    # Each batch draws afresh: the key is the number of batches trained on.
    model.batches_seen.assign(1)
    t2, _ = model._draw_t_and_noise(x0, model._training_key())
    assert np.mean(t2.numpy() == t) < 0.05


def test_fit_reduces_the_loss_and_accepts_labelled_data():
    model = make_model()
    x = np.repeat(images(4), 16, axis=0)
    labels = np.zeros(len(x), np.int32)
    dataset = tf.data.Dataset.from_tensor_slices((x, labels)).batch(16).repeat()
    history = model.fit(dataset, steps_per_epoch=40, epochs=3, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.8 * losses[0]
    assert model.optimizer.iterations.numpy() == 120
    # Images without labels work as well.
    model.fit(x, batch_size=16, epochs=1, verbose=0)


def test_ema_update_with_warmup_matches_the_formula():
    model = make_model(ema_decay=0.99)
    before = [w.copy() for w in model.denoiser.get_weights()]
    ema_before = model.ema_denoiser.get_weights()
    for a, b in zip(before, ema_before):
        np.testing.assert_array_equal(a, b)
    model.train_on_batch(images(16))
    after = model.denoiser.get_weights()
    decay = min(0.99, (1 + 1) / (10 + 1))  # n = 1 after the first step
    changed = 0
    for ema, old, new in zip(model.ema_denoiser.get_weights(), before, after):
        np.testing.assert_allclose(ema, decay * old + (1 - decay) * new, rtol=1e-5, atol=1e-7)
        changed += int(np.abs(new - old).max() > 0)
    assert changed > 0

    # Without warm-up the plain decay applies.
    model = make_model(ema_decay=0.5, ema_warmup=False)
    before = model.denoiser.get_weights()
    model.train_on_batch(images(16))
    for ema, old, new in zip(model.ema_denoiser.get_weights(), before, model.denoiser.get_weights()):
        np.testing.assert_allclose(ema, 0.5 * old + 0.5 * new, rtol=1e-5, atol=1e-7)


def test_gradient_norm_is_clipped():
    model = make_model(clip_grad_norm=1e-3)
    model.compile(optimizer=keras.optimizers.SGD(1.0))
    before = model.denoiser.get_weights()
    model.train_on_batch(images(16))
    update = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(model.denoiser.get_weights(), before)))
    assert update == pytest.approx(1e-3, rel=1e-3)


def test_save_load_and_continue_training(tmp_path):
    data = tf.data.Dataset.from_tensor_slices(images(64)).batch(16)
    model = make_model(ema_decay=0.9)
    model.fit(data, epochs=1, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)  # safe mode, no custom objects
    assert isinstance(loaded, DiffusionModel)
    assert loaded.schedule.get_config() == model.schedule.get_config() and loaded.ema_decay == 0.9
    x, t = images(2), np.array([3, 700], np.int32)
    for a, b in ((model.denoiser, loaded.denoiser), (model.ema_denoiser, loaded.ema_denoiser)):
        np.testing.assert_array_equal(a([x, t]).numpy(), b([x, t]).numpy())
    assert loaded.optimizer.iterations.numpy() == 4
    np.testing.assert_array_equal(
        loaded.sample(2, seed=1, sampler="ddim", steps=5), model.sample(2, seed=1, sampler="ddim", steps=5)
    )
    # Continuing after the reload is the same as continuing without it.
    model.fit(data, epochs=1, verbose=0)
    loaded.fit(data, epochs=1, verbose=0)
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_evaluate_reports_a_deterministic_validation_loss():
    model = make_model()
    data = tf.data.Dataset.from_tensor_slices(images(32)).batch(16)
    first, second = model.evaluate(data, verbose=0), model.evaluate(data, verbose=0)
    assert first == second and 0.5 < first < 2.0  # eps_theta = 0 at init: loss ~ E[eps^2] = 1


def test_data_that_does_not_match_the_denoiser_is_refused():
    model = make_model()
    with pytest.raises(KddpmError, match="shape"):
        model.fit(np.zeros((8, 16, 16, 1), np.float32), batch_size=4, verbose=0)
    with pytest.raises(KddpmError, match="shape"):
        model.fit(np.zeros((8, 8, 8, 3), np.float32), batch_size=4, verbose=0)
    with pytest.raises(KddpmError, match="uint8"):
        model.fit(np.zeros((8, 8, 8, 1), np.uint8), batch_size=4, verbose=0)
    with pytest.raises(KddpmError, match=r"outside \[-1, 1\]"):
        model.fit(np.full((8, 8, 8, 1), 255.0, np.float32), batch_size=4, verbose=0)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_out_of_range_data_is_refused_with_and_without_xla_and_changes_nothing(jit_compile):
    """XLA compiles asserts to nothing; the check must hold there too (Keras turns XLA on for a GPU)."""
    model = make_model()
    model.compile(optimizer=make_optimizer(1e-3), jit_compile=jit_compile)
    before = model.get_weights()
    with pytest.raises(KddpmError, match=r"outside \[-1, 1\]"):
        model.fit(np.full((8, 8, 8, 1), 255.0, np.float32), batch_size=4, verbose=0)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert int(model.optimizer.iterations.numpy()) == 0
    # Good data still trains, and the flag does not reach the logs.
    history = model.fit(images(8), batch_size=4, epochs=1, verbose=0)
    logged = {"loss", "loss_q0", "loss_q1", "loss_q2", "loss_q3", "grad_norm"}
    assert set(history.history) == logged and int(model.optimizer.iterations.numpy()) == 2


def test_bad_data_is_named_without_a_host_read_after_every_step():
    """The data flags stay on the device and are read once at the epoch's end (or every
    DATA_CHECK_EVERY steps): the steps after a bad batch run, the bad batch applies nothing,
    and the error names the step where it happened."""
    model = make_model()
    model.compile(optimizer=make_optimizer(1e-3))
    batches = [images(4, seed=k) for k in range(6)]
    batches[2] = np.full((4, 8, 8, 1), 255.0, np.float32)  # the third step's batch was never scaled
    data = tf.data.Dataset.from_tensor_slices(np.concatenate(batches)).batch(4)
    with pytest.raises(KddpmError, match=r"outside \[-1, 1\].*first at step 3 of this fit"):
        model.fit(data, epochs=1, verbose=0)
    # Steps 4 to 6 ran before the flags were read; step 3 applied no update.
    assert int(model.optimizer.iterations.numpy()) == 5 and int(model.batches_seen.numpy()) == 5


def test_timesteps_outside_the_schedule_are_refused_where_users_pass_them():
    model = make_model()
    x = images(2)
    for bad in (np.array([0, 1000], np.int32), np.array([-1, 3], np.int32)):
        with pytest.raises(KddpmError, match=r"t must lie in \[0, 1000\)"):
            model([x, bad])
        with pytest.raises(KddpmError, match=r"t must lie in \[0, 1000\)"):
            model.schedule.q_sample(x, bad, x)
        with pytest.raises(KddpmError, match=r"t must lie in \[0, 1000\)"):
            model.schedule.predict_x0(x, tf.constant(bad), x)
    with pytest.raises(KddpmError, match="integer"):
        model.schedule.q_posterior(x, x, np.array([1.5, 2.0]))
    # In a graph the check is an assert.
    with pytest.raises(tf.errors.InvalidArgumentError, match="t must lie in"):
        tf.function(model.schedule.q_sample)(x, tf.constant([5, 1000]), x)
    np.testing.assert_array_equal(model([x, np.array([0, 999], np.int32)]), model.denoiser([x, np.array([0, 999])]))


def test_gradient_accumulation_is_refused_with_the_reason():
    model = make_model()
    with pytest.raises(KddpmError, match="gradient_accumulation_steps=4 is not supported"):
        model.compile(optimizer=keras.optimizers.Adam(1e-3, gradient_accumulation_steps=4))


def test_bad_constructor_arguments():
    with pytest.raises(KddpmError, match="ema_decay"):
        DiffusionModel(tiny_unet(), ema_decay=1.0)


def test_truncated_and_damaged_keras_files_are_named_as_such(tmp_path):
    from kddpm import load_diffusion_model

    model = make_model()
    path = tmp_path / "model.keras"
    model.save(path)
    whole = path.read_bytes()
    truncated = tmp_path / "truncated.keras"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(KddpmError, match="truncated or not a zip archive") as caught:
        load_diffusion_model(truncated)
    assert "File not found" not in str(caught.value) and str(truncated) in str(caught.value)
    # A flipped byte inside a member fails its checksum.
    damaged = bytearray(whole)
    middle = whole.index(b"model.weights.h5") + 200
    damaged[middle] ^= 0xFF
    (tmp_path / "damaged.keras").write_bytes(bytes(damaged))
    with pytest.raises(KddpmError, match=r"damaged|truncated"):
        load_diffusion_model(tmp_path / "damaged.keras")
    assert isinstance(load_diffusion_model(path), DiffusionModel)
