"""The compiled samplers against numpy implementations of Algorithm 2 and DDIM written from ddpm.md."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import GaussianEps, numpy_threshold, tiny_unet

from kddpm import DiffusionModel, KddpmError, NoiseSchedule
from kddpm.sampling import (
    XLA_CPU_MAX_BATCH,
    Sampler,
    ddim_plan,
    ddim_timesteps,
    ddpm_plan,
    initial_noise,
    make_plan,
)
from kddpm.streams import seed_pair

T = 100


@pytest.fixture(scope="module")
def network():
    net = tiny_unet((8, 8, 1))
    rng = np.random.default_rng(3)
    net.set_weights([rng.normal(0, 0.15, w.shape).astype(np.float32) for w in net.get_weights()])
    return net


def eps_of(network, x, t):
    if isinstance(network, GaussianEps):
        return network.numpy(x, t)
    return keras.ops.convert_to_numpy(network([x.astype(np.float32), np.full(len(x), t, np.int32)]))


def numpy_ddpm(network, betas, x_T, noise, variance="beta_tilde", clip=False):
    """Algorithm 2, float64, one step at a time; with clipping, the posterior mean of the clipped x0."""
    alphas = 1 - betas
    abar = np.cumprod(alphas)
    x = x_T.astype(np.float64)
    for k, t in enumerate(range(len(betas) - 1, -1, -1)):
        eps = eps_of(network, x, t)
        abar_prev = abar[t - 1] if t > 0 else 1.0
        if clip:
            x0 = numpy_threshold((x - math.sqrt(1 - abar[t]) * eps) / math.sqrt(abar[t]), clip)
            mean = (math.sqrt(abar_prev) * betas[t] / (1 - abar[t])) * x0 + (
                math.sqrt(alphas[t]) * (1 - abar_prev) / (1 - abar[t])
            ) * x
        else:
            mean = (x - (1 - alphas[t]) / math.sqrt(1 - abar[t]) * eps) / math.sqrt(alphas[t])
        sigma2 = betas[t] * (1 - abar_prev) / (1 - abar[t]) if variance == "beta_tilde" else betas[t]
        x = mean + (math.sqrt(sigma2) * noise[k] if t > 0 else 0.0)
    return x


def numpy_ddim(network, betas, taus, x_T, noise, eta, clip=False, recompute_eps=True):
    """DDIM (Song et al. 2021, eq. 12), float64. With clipping, the direction term uses the eps
    the clipped x0 implies (guided-diffusion's ``_predict_eps_from_xstart``); recompute_eps=False
    keeps the network's eps there instead, as diffusers' DDIMScheduler does by default."""
    abar = np.cumprod(1 - betas)
    x = x_T.astype(np.float64)
    for k, t in enumerate(taus):
        eps = eps_of(network, x, t)
        a_t = abar[t]
        a_prev = abar[taus[k + 1]] if k + 1 < len(taus) else 1.0
        x0 = numpy_threshold((x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t), clip)
        if clip and recompute_eps:
            eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma**2) * eps + sigma * noise[k]
    return x


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.linear(T, 1e-3, 0.2)


def draws(steps, batch=3, seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((batch, 8, 8, 1)).astype(np.float32),
        rng.standard_normal((steps, batch, 8, 8, 1)).astype(np.float32),
    )


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
@pytest.mark.parametrize(
    "variance, clip", [("beta_tilde", False), ("beta", False), ("beta_tilde", True), ("beta", "dynamic")]
)
def test_ddpm_matches_numpy_algorithm_2(network, schedule, variance, clip, jit_compile):
    x_T, noise = draws(T)
    plan = ddpm_plan(schedule, variance, clip)
    ours = Sampler(network, (8, 8, 1), jit_compile).sample(plan, x_T=x_T, noise=noise).numpy()
    reference = numpy_ddpm(network, schedule.betas, x_T, noise, variance, clip)
    np.testing.assert_allclose(ours, reference, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
@pytest.mark.parametrize(
    "steps, eta, clip", [(10, 0.0, False), (25, 1.0, False), (10, 0.5, True), (12, 0.0, "dynamic")]
)
def test_ddim_matches_numpy(network, schedule, steps, eta, clip, jit_compile):
    x_T, noise = draws(steps)
    plan = ddim_plan(schedule, steps, eta, clip)
    ours = Sampler(network, (8, 8, 1), jit_compile).sample(plan, x_T=x_T, noise=noise).numpy()
    reference = numpy_ddim(network, schedule.betas, list(plan.timesteps), x_T, noise, eta, clip)
    np.testing.assert_allclose(ours, reference, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("clip", [True, "dynamic"])
def test_clipped_ddim_continues_from_the_clipped_prediction(clip):
    """Gaussian data with its mean outside [-1, 1] (as guidance makes it, (1 + w) mu_c - w mu_null):
    the exact posterior mean x0_hat leaves [-1, 1] from the first step, so clipping is active all
    along. The compiled DDIM must follow the numpy DDIM that recomputes eps from the clipped x0,
    and differ clearly from the variant that keeps the network's eps (which drifts off the data)."""
    schedule = NoiseSchedule.linear(1000)
    network = GaussianEps(schedule, mean=1.3, std=0.3)
    x_T = np.random.default_rng(8).standard_normal((64, 4, 4, 1)).astype(np.float32)
    plan = ddim_plan(schedule, 20, clip_x0=clip)
    noise = np.zeros((20, *x_T.shape), np.float32)
    got = Sampler(network, (4, 4, 1), jit_compile=False).sample(plan, x_T=x_T).numpy()
    taus = list(plan.timesteps)
    want = numpy_ddim(network, schedule.betas, taus, x_T, noise, 0.0, clip)
    np.testing.assert_allclose(got, want, atol=1e-3)
    raw_eps = numpy_ddim(network, schedule.betas, taus, x_T, noise, 0.0, clip, recompute_eps=False)
    assert np.abs(raw_eps - want).max() > 0.05
    # Clipping was active: the unclipped x0 predictions of the first step leave [-1, 1].
    first = (x_T - np.sqrt(1 - schedule.alphas_cumprod[999]) * network.numpy(x_T, 999)) / np.sqrt(
        schedule.alphas_cumprod[999]
    )
    assert np.all(np.abs(first) > 1)


def test_dynamic_thresholding_is_the_per_image_quantile():
    from kddpm.sampling import clip_prediction

    rng = np.random.default_rng(2)
    x0 = np.concatenate([rng.normal(0, 3, (2, 5, 7, 3)), rng.uniform(-0.5, 0.5, (1, 5, 7, 3))]).astype(np.float32)
    got = clip_prediction(tf.constant(x0), "dynamic").numpy()
    np.testing.assert_allclose(got, numpy_threshold(x0.astype(np.float64), "dynamic"), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[2], x0[2])  # s = max(1, quantile) = 1 inside [-1, 1]: unchanged
    assert np.abs(got[:2]).max() <= 1 and np.abs(got[:2]).max() > 0.9
    with pytest.raises(KddpmError, match="clip_x0 must be True, False or 'dynamic'"):
        ddim_plan(NoiseSchedule.linear(10), 5, clip_x0="static")


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m", "dpm++2m_sde"])
def test_the_longest_plan_of_every_sampler_is_finite(network, sampler):
    """steps = T (DDPM, DDIM) and T - 1 (DPM-Solver++, whose grid of steps + 1 points over T
    integers repeats a timestep at steps = T): every step finite; steps = T is refused there."""
    schedule = NoiseSchedule.linear(50, 1e-3, 0.2)
    longest = 49 if sampler.startswith("dpm") else 50
    plan = make_plan(schedule, sampler, None if sampler == "ddpm" else longest)
    assert plan.num_steps == longest and len(set(plan.timesteps)) == longest
    assert np.isfinite(plan.coefficients()).all()
    images = Sampler(network, (8, 8, 1), jit_compile=False).sample(plan, 2, seed=1).numpy()
    assert np.isfinite(images).all()
    if sampler.startswith("dpm"):
        with pytest.raises(KddpmError, match="between 1 and T-1=49"):
            make_plan(schedule, sampler, 50)


def test_ddim_with_eta_1_over_all_steps_is_ddpm(schedule):
    ddim, ddpm = ddim_plan(schedule, T, eta=1.0), ddpm_plan(schedule)
    np.testing.assert_array_equal(ddim.timesteps, ddpm.timesteps)
    for name in ("coef_xt", "coef_eps", "sigma"):
        np.testing.assert_allclose(getattr(ddim, name), getattr(ddpm, name), rtol=1e-7, atol=1e-12, err_msg=name)


def test_ddim_timesteps_span_the_schedule():
    taus = ddim_timesteps(1000, 50)
    assert taus[0] == 999 and taus[-1] == 0 and len(set(taus)) == 50 and np.all(np.diff(taus) < 0)
    with pytest.raises(KddpmError):
        ddim_timesteps(100, 101)


def test_progress_chunks_give_the_same_images_as_one_call(network, schedule):
    sampler = Sampler(network, (8, 8, 1))
    plan = ddim_plan(schedule, 20, eta=1.0)
    whole = sampler.sample(plan, 4, seed=7).numpy()
    chunked = sampler.sample(plan, 4, seed=7, progress=True, chunks=6).numpy()
    np.testing.assert_allclose(whole, chunked, atol=1e-6)


def test_the_loop_is_traced_once_per_setting(network, schedule):
    sampler = Sampler(network, (8, 8, 1))
    for steps in (5, 9, 13):
        sampler.sample(ddim_plan(schedule, steps), 2, seed=steps)
    sampler.sample(ddpm_plan(schedule), 3, seed=1)
    (function,) = sampler._functions.values()
    assert function.experimental_get_tracing_count() == 1


def test_same_seed_same_images_and_range(network, schedule):
    model = DiffusionModel(network, schedule)
    a = model.sample(5, seed=11, sampler="ddim", steps=8, eta=1.0)
    b = model.sample(5, seed=11, sampler="ddim", steps=8, eta=1.0)
    c = model.sample(5, seed=12, sampler="ddim", steps=8, eta=1.0)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0.1
    assert a.shape == (5, 8, 8, 1) and a.min() >= -1 and a.max() <= 1
    # Batching the draw gives the same number of images, each in range.
    batched = model.sample(5, seed=11, sampler="ddim", steps=8, batch_size=2)
    assert batched.shape == (5, 8, 8, 1)


def test_auto_uses_xla_for_small_batches_on_cpu(network):
    auto = Sampler(network, (8, 8, 1))
    assert [auto.uses_xla(batch) for batch in (1, XLA_CPU_MAX_BATCH, XLA_CPU_MAX_BATCH + 1)] == [True, True, False]
    assert not Sampler(network, (8, 8, 1), jit_compile=False).uses_xla(1)
    assert Sampler(network, (8, 8, 1), jit_compile=True).uses_xla(64)
    with pytest.raises(KddpmError, match="jit_compile"):
        Sampler(network, (8, 8, 1), jit_compile="yes")


@pytest.mark.parametrize("batch", [2, XLA_CPU_MAX_BATCH + 2])
def test_a_seed_gives_the_same_images_with_and_without_xla(network, schedule, batch):
    """The noise comes from Philox integers, which XLA and the plain graph agree on, so only
    float rounding separates the two compiled loops, at any batch size."""
    plan = ddim_plan(schedule, 12, eta=1.0)
    plain = Sampler(network, (8, 8, 1), jit_compile=False).sample(plan, batch, seed=5).numpy()
    xla = Sampler(network, (8, 8, 1), jit_compile=True).sample(plan, batch, seed=5).numpy()
    auto = Sampler(network, (8, 8, 1)).sample(plan, batch, seed=5).numpy()
    np.testing.assert_allclose(plain, xla, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(auto, xla if batch <= XLA_CPU_MAX_BATCH else plain)
    assert np.abs(plain).max() > 0.5  # not a degenerate all-zero draw


def test_bad_sampler_arguments(network, schedule):
    model = DiffusionModel(network, schedule)
    with pytest.raises(KddpmError, match="Unknown sampler"):
        model.sample(2, sampler="euler")
    with pytest.raises(KddpmError, match="ddim"):
        model.sample(2, sampler="ddpm", steps=10)
    with pytest.raises(KddpmError, match="variance"):
        model.sample(2, variance="learned")
    with pytest.raises(KddpmError, match="noise has shape"):
        Sampler(network, (8, 8, 1)).sample(
            ddim_plan(schedule, 4), x_T=np.zeros((2, 8, 8, 1)), noise=np.zeros((3, 2, 8, 8, 1))
        )
    # Zero or negative steps are errors, never the default in disguise.
    for steps in (0, -5):
        with pytest.raises(KddpmError, match="steps must be a positive integer"):
            model.sample(2, sampler="ddim", steps=steps)
        with pytest.raises(KddpmError, match="steps must be a positive integer"):
            model.sample(2, sampler="ddpm", steps=steps)

    # Options that do not apply, and values that cannot be meant, are errors.
    for kwargs, message in (
        (dict(num_images=0), "num_images must be a positive integer"),
        (dict(num_images=3, batch_size=0), "batch_size must be a positive integer"),
        (dict(num_images=3, batch_size=-2), "batch_size must be a positive integer"),
        (dict(num_images=2, sampler="ddpm", eta=0.5), "eta is DDIM's option"),
        (dict(num_images=2, sampler="ddim", variance="beta"), "variance is DDPM's option"),
        (dict(num_images=2, sampler="ddim", eta=float("nan")), "eta must be a finite number"),
        (dict(num_images=2, sampler="ddim", eta=-1.0), "eta must be a finite number"),
        (dict(num_images=2, x_T=np.zeros((2, 4, 4, 1))), "x_T has shape"),
        (dict(num_images=3, x_T=np.zeros((2, 8, 8, 1))), "x_T holds 2 images"),
    ):
        with pytest.raises(KddpmError, match=message):
            model.sample(**kwargs)


def test_image_i_of_a_seed_does_not_depend_on_the_batch_size(network, schedule):
    model = DiffusionModel(network, schedule)
    settings = dict(seed=21, sampler="ddim", steps=6, eta=1.0, jit_compile=False)
    whole = model.sample(7, **settings)
    # The noise is identical; the network's float rounding may differ with the batch size.
    for batch_size in (1, 2, 3):
        np.testing.assert_allclose(model.sample(7, batch_size=batch_size, **settings), whole, atol=1e-4)
    # The first images of a larger request are the smaller request's images.
    np.testing.assert_allclose(model.sample(10, **settings)[:7], whole, atol=1e-4)
    assert not np.allclose(whole[0], whole[1])


def test_explicit_initial_noise(network, schedule):
    model = DiffusionModel(network, schedule)
    x_T = initial_noise(seed_pair(4), 0, 3, (8, 8, 1)).numpy()
    settings = dict(sampler="ddim", steps=5, eta=1.0, jit_compile=False)
    np.testing.assert_allclose(
        model.sample(x_T=x_T, seed=4, **settings), model.sample(3, seed=4, **settings), atol=1e-6
    )
    other = model.sample(x_T=np.zeros_like(x_T), seed=4, **settings)
    assert not np.allclose(other, model.sample(3, seed=4, **settings))


def test_sampling_in_bfloat16_uses_a_bfloat16_copy_with_current_weights(network, schedule):
    from kddpm.networks import network_with_precision

    model = DiffusionModel(network, schedule)
    copy = network_with_precision(model.ema_denoiser, "bfloat16")
    assert copy.get_layer("eps").compute_dtype == "float32"
    assert {layer.compute_dtype for layer in copy.layers if layer.weights} >= {"bfloat16"}
    x, t = np.random.default_rng(0).standard_normal((2, 8, 8, 1)).astype(np.float32), np.array([3, 60], np.int32)
    exact, rounded = model.ema_denoiser([x, t]).numpy(), copy([x, t]).numpy()
    assert 0 < np.abs(rounded - exact).max() < 0.05 * np.abs(exact).max()  # bfloat16 rounding, same weights
    plan = model.plan("ddim", 6)  # with the model's default clipping

    def expected(net):
        return np.clip(Sampler(net, (8, 8, 1), jit_compile=False).sample(plan, 3, seed=2).numpy(), -1, 1)

    settings = dict(seed=2, sampler="ddim", steps=6, jit_compile=False)
    np.testing.assert_allclose(model.sample(3, precision="bfloat16", **settings), expected(copy), atol=1e-5)
    # Weights changed after the copy was made reach it on the next call.
    model.ema_denoiser.set_weights([w * 0.5 for w in model.ema_denoiser.get_weights()])
    halved = network_with_precision(model.ema_denoiser, "bfloat16")
    np.testing.assert_allclose(model.sample(3, precision="bfloat16", **settings), expected(halved), atol=1e-5)
    with pytest.raises(KddpmError, match="Unknown sampling precision"):
        model.sample(2, precision="int8")
