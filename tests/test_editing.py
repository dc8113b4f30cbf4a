"""Editing real images: img2img, RePaint inpainting, DDIM inversion, interpolation, and sampling
from a given x_t, against closed forms on Gaussian data with exact networks and diffusers' fixture."""

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import GaussianEps, tiny_unet

from kddpm import DiffusionModel, KddpmError, NoiseSchedule
from kddpm.sampling import make_plan
from kddpm.sampling.edits import inversion_plan, repaint_plan, repaint_timesteps

FIXTURES = Path(__file__).parent / "fixtures" / "diffusers"


def with_network(model, network, image_shape=None):
    """``model`` sampling with ``network`` (an exact eps of known data) instead of its U-Net."""
    model.ema_denoiser = network
    model.image_shape = image_shape or model.image_shape
    model._sampler = None
    return model


def gaussian_model(schedule, mean, std):
    """A 1x1x1-image model whose network is the exact eps of N(mean, std^2) data."""
    model = DiffusionModel(tiny_unet((4, 4, 1)), schedule, clip_x0=False)
    return with_network(model, GaussianEps(schedule, mean=mean, std=std), (1, 1, 1))


def test_img2img_with_ddpm_has_the_posterior_mean_of_the_noised_image():
    """From a constant image c noised to t0 and denoised exactly: E[x] = M + r (c - M),
    r = abar S^2 / (abar S^2 + 1 - abar) at t0 (the Gaussian posterior mean, averaged over the noise)."""
    schedule = NoiseSchedule.linear(1000)
    mean, std, c = 0.2, 0.3, -0.6
    model = gaussian_model(schedule, mean, std)
    images = np.full((4000, 1, 1, 1), c, np.float32)
    for strength in (0.3, 0.6):
        out = model.img2img(images, strength, sampler="ddpm", seed=1)
        abar = schedule.alphas_cumprod[round(strength * 1000) - 1]
        r = abar * std**2 / (abar * std**2 + 1 - abar)
        expected = mean + r * (c - mean)
        assert abs(out.mean() - expected) < 4 * std / np.sqrt(len(images)) + 0.005, (strength, out.mean(), expected)
    # Strength 1 starts at the first timestep from (almost exactly) sampling's own x_T.
    np.testing.assert_allclose(model.img2img(images[:50], 1.0, seed=3), model.sample(50, seed=3), atol=0.02)
    # diffusers' rule: with k steps the last round(strength * k) timesteps run.
    plan = make_plan(schedule, "dpm++2m", 20)
    with pytest.raises(KddpmError, match="runs none of the sampler's 20 steps"):
        model.img2img(images[:2], 0.02)
    assert round(0.5 * 20) == 10 and plan.timesteps[10] < plan.timesteps[9]


def test_sampling_from_a_given_x_t_continues_the_plan_below_it():
    schedule = NoiseSchedule.linear(1000)
    model = gaussian_model(schedule, 0.1, 0.4)
    x_T = np.random.default_rng(0).standard_normal((6, 1, 1, 1)).astype(np.float32)
    # From the first timestep, the whole process.
    np.testing.assert_allclose(model.sample(x_T=x_T, start_t=999, seed=2), model.sample(x_T=x_T, seed=2), atol=1e-6)
    plan = make_plan(schedule, "ddim", 50, start_t=600)
    assert plan.timesteps[0] == 600 and np.all(plan.timesteps[1:] < 600) and np.all(np.diff(plan.timesteps) < 0)
    assert make_plan(schedule, "ddpm", start_t=5).timesteps.tolist() == [5, 4, 3, 2, 1, 0]
    # Several continuations of one x_t (Figure 7) differ only through the reverse noise.
    x_t = np.repeat(x_T[:1], 3, axis=0)
    continuations = model.sample(x_T=x_t, start_t=300, sampler="ddpm", seed=4)
    assert len(np.unique(continuations.round(6))) == 3
    with pytest.raises(KddpmError, match="start_t needs x_T"):
        model.sample(4, start_t=10)


def test_ddim_inversion_follows_the_probability_flow_and_reconstructs():
    """For N(M, S^2) data the DDIM ODE maps each x_0 to
    x_T = sqrt(abar_T) M + sqrt(abar_T S^2 + 1 - abar_T) (x_0 - M) / S."""
    schedule = NoiseSchedule.linear(1000)
    mean, std = 0.3, 0.5
    model = gaussian_model(schedule, mean, std)
    # Points of the data, kept in [-1, 1] as images are (the map holds point by point).
    x0 = np.clip(np.random.default_rng(1).normal(mean, std, (500, 1, 1, 1)), -1, 1).astype(np.float32)
    x_T = model.invert(x0, steps=100)
    abar = schedule.alphas_cumprod[-1]
    exact = np.sqrt(abar) * mean + np.sqrt(abar * std**2 + 1 - abar) * (x0 - mean) / std
    error = np.abs(x_T - exact)
    assert error.mean() < 0.025 and error.max() < 0.05 and np.abs(x_T).max() > 2 * std  # ~0.017 here
    again = model.sample(x_T=x_T, sampler="ddim", steps=100, eta=0.0, clip_x0=False)
    assert np.abs(again - x0).mean() < 0.02  # DDIM-100's own discretisation error
    # 99 rows up to T - 1, the network evaluated at the level each row goes to.
    plan = inversion_plan(schedule, 100)
    assert plan.timesteps[-1] == 999 and plan.num_steps == 99 and np.all(np.diff(plan.timesteps) > 0)


class EquicorrelatedEps:
    """The exact eps of x0 ~ N(M 1, S^2 ((1 - rho) I + rho 1 1^T)) over each image's n pixels:
    eps = sqrt(1 - abar) C_t^-1 (x_t - sqrt(abar) M), C_t = a I + b 1 1^T (Sherman-Morrison)."""

    def __init__(self, schedule, mean, std, rho):
        self.abar = tf.constant(schedule.alphas_cumprod, tf.float32)
        self.mean, self.var, self.rho = mean, std**2, rho

    def __call__(self, inputs, training=False):
        x, t = inputs
        abar = tf.reshape(tf.gather(self.abar, t), [-1, 1, 1, 1])
        n = float(np.prod(x.shape[1:]))
        a = abar * self.var * (1 - self.rho) + 1 - abar
        b = abar * self.var * self.rho
        d = x - tf.sqrt(abar) * self.mean
        total = tf.reduce_sum(d, axis=[1, 2, 3], keepdims=True)
        return tf.sqrt(1 - abar) / a * (d - b / (a + n * b) * total)


def test_repaint_comes_closer_to_the_exact_conditional_mean_than_plain_replacement():
    schedule = NoiseSchedule.linear(1000)
    mean, std, rho, c = 0.0, 0.6, 0.8, 0.9
    model = DiffusionModel(tiny_unet((2, 4, 1), attention_resolutions=()), schedule, clip_x0=False)
    with_network(model, EquicorrelatedEps(schedule, mean, std, rho))
    n_known = 4
    images = np.zeros((400, 2, 4, 1), np.float32)
    images[:, 0] = c  # the top row is known
    mask = np.zeros((400, 2, 4), np.float32)
    mask[:, 1] = 1.0  # fill the bottom row
    exact = mean + rho * n_known * (c - mean) / (1 + (n_known - 1) * rho)
    distances = {}
    for name, jumps in (("repaint", 10), ("replacement", 1)):
        out = model.inpaint(images, mask, steps=250, jump_length=10, jump_n_sample=jumps, seed=5)
        np.testing.assert_array_equal(out[:, 0], images[:, 0])  # kept pixels exactly as given
        distances[name] = abs(out[:, 1].mean() - exact)
    assert distances["repaint"] < distances["replacement"], distances
    assert distances["repaint"] < 0.35 * abs(exact - mean), distances
    print(f"RePaint vs exact: {distances} (exact {exact:.3f})")


def test_repaint_timesteps_are_diffusers_and_the_plan_runs_them():
    fixture = np.load(FIXTURES / "repaint_timesteps.npz")
    for key in fixture.files:
        timesteps, steps, length, samples = map(int, key.split("_"))
        np.testing.assert_array_equal(repaint_timesteps(timesteps, steps, length, samples), fixture[key], err_msg=key)
    schedule = NoiseSchedule.linear(200)
    plan = repaint_plan(schedule, 40, 4, 2)
    network_rows = plan.known_rows[:, 0]
    sequence = repaint_timesteps(200, 40, 4, 2)
    assert plan.num_steps == len(sequence) and network_rows.sum() == np.sum(
        np.diff(np.append(sequence[0] + 1, sequence)) < 0
    )
    # The last row finishes the image: the known pixels come back unnoised.
    np.testing.assert_allclose(plan.known_rows[-1], [1.0, 1.0, 0.0])


def test_interpolation_rows_vary_only_through_lambda():
    schedule = NoiseSchedule.linear(1000)
    model = gaussian_model(schedule, 0.0, 0.5)
    a, b = np.full((1, 1, 1), -0.8, np.float32), np.full((1, 1, 1), 0.8, np.float32)
    row = model.interpolate(a, b, num=5, t=400, seed=2)
    # Every image of a row gets the same reverse noise: lambda = 0, 0.5, 1 come out the same
    # whatever their place in the row.
    three = model.interpolate(a, b, num=3, t=400, seed=2)
    np.testing.assert_allclose(three, row[[0, 2, 4]], atol=1e-6)
    assert np.all(np.diff(row[:, 0, 0, 0]) > 0)  # monotone from a towards b
    ddim = model.interpolate(a, b, num=5, method="ddim", steps=50)
    np.testing.assert_allclose(ddim[[0, -1], 0, 0, 0], [-0.8, 0.8], atol=0.06)  # the ends: DDIM-50 reconstructions
    with pytest.raises(KddpmError, match="Unknown interpolation method"):
        model.interpolate(a, b, method="linear")
