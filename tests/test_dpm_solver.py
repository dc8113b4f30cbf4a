"""DPM-Solver++(2M) in the compiled loop: against an independent numpy implementation of the
published update, against diffusers' DPMSolverMultistepScheduler (fixture), DDIM where the maths
says they agree, and one graph call per chunk with the multistep history carried across chunks."""

from pathlib import Path

import numpy as np
import pytest
from conftest import GaussianEps, numpy_threshold

from kddpm import KddpmError, NoiseSchedule
from kddpm.interop import from_diffusers
from kddpm.sampling import Sampler, ddim_plan, dpm_solver_plan, make_plan

FIXTURES = Path(__file__).parent / "fixtures" / "diffusers"


def reference_dpm_solver_pp_2m(eps, x_T, alphas_cumprod, steps, clip=False):
    """Lu et al. 2022, Algorithm 2 (DPM-Solver++(2M)), written out step by step in float64:
    timesteps as diffusers' linspace spacing, a first-order first step and a final step to sigma 0."""
    T = len(alphas_cumprod)
    timesteps = np.linspace(0, T - 1, steps + 1).round()[::-1][:-1].astype(int)

    def alpha_sigma_lambda(t):
        if t is None:  # the end of the last step: sigma = 0
            return 1.0, 0.0, np.inf
        a, s = np.sqrt(alphas_cumprod[t]), np.sqrt(1 - alphas_cumprod[t])
        return a, s, np.log(a / s)

    x = x_T.astype(np.float64)
    previous = None  # (x0 prediction, lambda) of the step before
    for i, t in enumerate(timesteps):
        a, s, lam = alpha_sigma_lambda(t)
        x0 = numpy_threshold((x - s * eps(x, t)) / a, clip)
        a_next, s_next, lam_next = alpha_sigma_lambda(timesteps[i + 1] if i + 1 < len(timesteps) else None)
        h = lam_next - lam
        last = i == len(timesteps) - 1
        if previous is None or last:
            d = x0
        else:
            r = (lam - previous[1]) / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * previous[0]
        x = (s_next / s) * x - a_next * (np.exp(-h) - 1) * d if not last else d
        previous = (x0, lam)
    return x


@pytest.mark.parametrize("steps", [1, 2, 5, 10, 25])
@pytest.mark.parametrize("clip", [False, True, "dynamic"])
def test_dpm_solver_matches_the_published_algorithm(steps, clip):
    schedule = NoiseSchedule.linear(1000)
    network = GaussianEps(schedule, mean=0.9, std=0.4)  # clipping at 1 bites for this data
    x_T = np.random.default_rng(steps).standard_normal((6, 2, 2, 1)).astype(np.float32)
    plan = make_plan(schedule, "dpm++2m", steps, clip_x0=clip)
    got = Sampler(network, (2, 2, 1), jit_compile=False).sample(plan, x_T=x_T).numpy()
    want = reference_dpm_solver_pp_2m(network.numpy, x_T, schedule.alphas_cumprod, steps, clip)
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_dpm_solver_reaches_the_data_distribution_in_few_steps():
    schedule = NoiseSchedule.cosine(1000)
    network = GaussianEps(schedule, mean=0.4, std=0.3)
    x = Sampler(network, (1, 1, 1), jit_compile=False).sample(make_plan(schedule, "dpm++2m", 15), 4000, seed=0)
    assert abs(float(np.mean(x)) - 0.4) < 0.02 and abs(float(np.std(x)) - 0.3) < 0.02


def test_first_order_steps_are_ddim():
    # The first step (no history) and the last (to sigma = 0) are first order: DDIM with eta = 0.
    schedule = NoiseSchedule.linear(1000)
    plan = dpm_solver_plan(schedule, 10)
    abar = schedule.alphas_cumprod
    for k, abar_next in ((0, abar[plan.timesteps[1]]), (plan.num_steps - 1, 1.0)):
        t = plan.timesteps[k]
        # DDIM: x' = sqrt(abar') x0 + sqrt(1 - abar') eps, with x0 = (x - sqrt(1 - abar) eps) / sqrt(abar).
        ddim_x = np.sqrt(abar_next / abar[t])
        ddim_eps = np.sqrt(1 - abar_next) - np.sqrt(abar_next) * np.sqrt(1 - abar[t]) / np.sqrt(abar[t])
        dpm_x = plan.coef_xt[k] + plan.coef_x0[k] * plan.x0_from_xt[k]
        dpm_eps = plan.coef_eps[k] - plan.coef_x0[k] * plan.x0_from_eps[k]
        np.testing.assert_allclose([dpm_x, dpm_eps], [ddim_x, ddim_eps], rtol=1e-10, atol=1e-12)
        assert plan.coef_x0_prev[k] == 0 and plan.sigma[k] == 0
    assert np.all(plan.coef_x0_prev[1:-1] != 0)  # second order in between
    # One step is DDIM's one step: x0 itself.
    one = dpm_solver_plan(schedule, 1)
    ddim_one = ddim_plan(schedule, 1)
    np.testing.assert_array_equal(one.timesteps, ddim_one.timesteps)


@pytest.mark.parametrize("steps", [1, 2, 10, 20])
def test_dpm_solver_gives_diffusers_images(steps):
    # diffusers' DPMSolverMultistepScheduler with its defaults, the same U-Net and x_T.
    fixture = np.load(FIXTURES / "cifar_pipeline" / "dpm_solver.npz")
    model = from_diffusers(FIXTURES / "cifar_pipeline")
    plan = make_plan(model.schedule, "dpm++2m", steps, clip_x0=False)
    np.testing.assert_array_equal(plan.timesteps, fixture[f"ode_{steps}_timesteps"])
    x_T = np.transpose(fixture["x_T"], (0, 2, 3, 1))
    # The loop's own output, not model.sample's clipped images: with random weights most pixels
    # leave [-1, 1], where clipping would hide any difference.
    got = Sampler(model.ema_denoiser, model.image_shape, jit_compile=False).sample(plan, x_T=x_T).numpy()
    want = np.transpose(fixture[f"ode_{steps}"], (0, 2, 3, 1))
    assert np.mean(np.abs(want) > 1) > 0.5  # the comparison is on values clipping would have hidden
    # diffusers computes its schedule and solver in float32; unclipped values reach |x| ~ 100.
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("steps", [1, 2, 8])
def test_dpm_solver_sde_gives_diffusers_images_with_the_same_noise(steps):
    fixture = np.load(FIXTURES / "cifar_pipeline" / "dpm_solver.npz")
    model = from_diffusers(FIXTURES / "cifar_pipeline")
    plan = make_plan(model.schedule, "dpm++2m_sde", steps, clip_x0=False)
    np.testing.assert_array_equal(plan.timesteps, fixture[f"sde_{steps}_timesteps"])
    x_T = np.transpose(fixture["x_T"], (0, 2, 3, 1))
    noise = np.transpose(fixture[f"sde_{steps}_noise"], (0, 1, 3, 4, 2))
    got = Sampler(model.ema_denoiser, model.image_shape, jit_compile=False).sample(plan, x_T=x_T, noise=noise)
    want = np.transpose(fixture[f"sde_{steps}"], (0, 2, 3, 1))
    # Unclipped x0 of a random-weight network reaches |x| ~ 200 in one step: float32 rounding is relative.
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=2e-4)


def test_one_graph_call_per_chunk_and_the_history_crosses_chunks():
    schedule = NoiseSchedule.linear(1000)
    network = GaussianEps(schedule)
    runner = Sampler(network, (2, 2, 1), jit_compile=False)
    calls = []
    function = runner._function

    def counting(*args):
        compiled = function(*args)
        return lambda *inputs: calls.append(1) or compiled(*inputs)

    runner._function = counting
    plan = make_plan(schedule, "dpm++2m", 12)
    whole = runner.sample(plan, 3, seed=1).numpy()
    assert len(calls) == 1
    chunked = runner.sample(plan, 3, seed=1, progress=True, chunks=4).numpy()
    assert len(calls) == 1 + 4
    # Chunks split the loop; the previous x0 prediction travels between them.
    np.testing.assert_allclose(chunked, whole, atol=1e-6)
    sde = make_plan(schedule, "dpm++2m_sde", 12)
    np.testing.assert_allclose(
        runner.sample(sde, 3, seed=1, progress=True, chunks=5).numpy(), runner.sample(sde, 3, seed=1).numpy(), atol=1e-6
    )


def test_dpm_solver_under_xla_matches_the_plain_graph():
    schedule = NoiseSchedule.linear(1000)
    network = GaussianEps(schedule)
    plan = make_plan(schedule, "dpm++2m_sde", 10)
    a = Sampler(network, (2, 2, 1), jit_compile=False).sample(plan, 3, seed=2).numpy()
    b = Sampler(network, (2, 2, 1), jit_compile=True).sample(plan, 3, seed=2).numpy()
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_dpm_solver_options_are_checked():
    schedule = NoiseSchedule.linear(100)
    assert make_plan(schedule, "dpm++2m").num_steps == 20
    for kwargs, message in (
        (dict(eta=0.5), "takes steps and clip_x0 only"),
        (dict(variance="beta"), "takes steps and clip_x0 only"),
        (dict(steps=101), "DPM-Solver\\+\\+ steps must be between 1 and T-1=99"),
        (dict(steps=100), "DPM-Solver\\+\\+ steps must be between 1 and T-1=99"),
    ):
        with pytest.raises(KddpmError, match=message):
            make_plan(schedule, "dpm++2m", **kwargs)
