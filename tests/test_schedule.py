"""NoiseSchedule against numpy computations written directly from the formulas in ddpm.md."""

import math

import numpy as np
import pytest

from kddpm import KddpmError, NoiseSchedule


def reference_tables(betas):
    """Every table, one element at a time, as the paper writes it (t = 1..T is index 0..T-1)."""
    T = len(betas)
    ref = {"betas": betas, "alphas": np.empty(T), "alphas_cumprod": np.empty(T), "alphas_cumprod_prev": np.empty(T)}
    running = 1.0
    for i in range(T):
        ref["alphas"][i] = 1.0 - betas[i]
        ref["alphas_cumprod_prev"][i] = running
        running *= 1.0 - betas[i]
        ref["alphas_cumprod"][i] = running
    abar, abar_prev = ref["alphas_cumprod"], ref["alphas_cumprod_prev"]
    ref["sqrt_alphas_cumprod"] = np.array([math.sqrt(a) for a in abar])
    ref["sqrt_one_minus_alphas_cumprod"] = np.array([math.sqrt(1 - a) for a in abar])
    ref["posterior_variance"] = np.array([betas[i] * (1 - abar_prev[i]) / (1 - abar[i]) for i in range(T)])
    log_var = [math.log(ref["posterior_variance"][max(i, 1)]) for i in range(T)]
    ref["posterior_log_variance_clipped"] = np.array(log_var)
    ref["posterior_mean_coef1"] = np.array([math.sqrt(abar_prev[i]) * betas[i] / (1 - abar[i]) for i in range(T)])
    ref["posterior_mean_coef2"] = np.array(
        [math.sqrt(1 - betas[i]) * (1 - abar_prev[i]) / (1 - abar[i]) for i in range(T)]
    )
    return ref


def cosine_betas(T, s):
    f = [math.cos(((t / T + s) / (1 + s)) * math.pi / 2) ** 2 for t in range(T + 1)]
    return np.array([min(1 - (f[t] / f[0]) / (f[t - 1] / f[0]), 0.999) for t in range(1, T + 1)])


@pytest.mark.parametrize(
    "schedule, betas",
    [
        (NoiseSchedule.linear(), np.array([1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)])),
        (NoiseSchedule.linear(50, 1e-3, 0.05), np.array([1e-3 + (0.05 - 1e-3) * i / 49 for i in range(50)])),
        (NoiseSchedule.cosine(), cosine_betas(1000, 0.008)),
        (NoiseSchedule.cosine(100, s=0.01), cosine_betas(100, 0.01)),
    ],
)
def test_tables_match_the_formulas(schedule, betas):
    reference = reference_tables(betas)
    for name, expected in reference.items():
        actual = getattr(schedule, name)
        assert actual.dtype == np.float64, name
        assert actual.shape == (len(betas),), name
        np.testing.assert_allclose(actual, expected, rtol=1e-10, atol=1e-14, err_msg=name)


def test_known_values_of_the_linear_schedule():
    schedule = NoiseSchedule.linear()
    # diffusers' DDPM scheduler test: beta_tilde at t = 0, 487, 999.
    np.testing.assert_allclose(schedule.posterior_variance[[0, 487, 999]], [0.0, 0.00979, 0.02], atol=1e-5)
    # abar_T is about 4e-5: x_T is practically pure noise.
    assert 3e-5 < schedule.alphas_cumprod[-1] < 5e-5


def test_cosine_betas_are_clipped():
    schedule = NoiseSchedule.cosine()
    assert schedule.betas.max() == pytest.approx(0.999)
    assert np.all(np.diff(schedule.alphas_cumprod) < 0)


def test_float32_tensors():
    schedule = NoiseSchedule.linear()
    tensor = schedule.tensor("alphas_cumprod")
    assert tensor.dtype.name == "float32"
    np.testing.assert_allclose(tensor.numpy(), schedule.alphas_cumprod.astype(np.float32))


def test_q_sample_predict_x0_and_q_posterior():
    schedule = NoiseSchedule.linear()
    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1, 1, (5, 4, 4, 2)).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    t = np.array([0, 1, 250, 998, 999], np.int32)
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[t][:, None, None, None]
    x_t = schedule.q_sample(x0, t, noise).numpy()
    np.testing.assert_allclose(x_t, np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise, rtol=1e-5, atol=1e-5)
    # predict_x0 inverts q_sample (least precise at t = T where sqrt(abar) is 0.0064).
    np.testing.assert_allclose(schedule.predict_x0(x_t, t, noise).numpy(), x0, atol=2e-3)

    mean, variance, log_variance = schedule.q_posterior(x0, x_t, t)
    betas = np.linspace(1e-4, 0.02, 1000)
    abar_all = np.cumprod(1 - betas)
    for row, step in enumerate(t):
        abar_t = abar_all[step]
        abar_prev = abar_all[step - 1] if step > 0 else 1.0
        expected_mean = (
            np.sqrt(abar_prev) * betas[step] / (1 - abar_t) * x0[row]
            + np.sqrt(1 - betas[step]) * (1 - abar_prev) / (1 - abar_t) * x_t[row]
        )
        np.testing.assert_allclose(mean.numpy()[row], expected_mean, rtol=1e-5, atol=1e-5)
        expected_variance = betas[step] * (1 - abar_prev) / (1 - abar_t)
        np.testing.assert_allclose(variance.numpy()[row].ravel(), [expected_variance], rtol=1e-5, atol=1e-12)
    assert variance.shape == (5, 1, 1, 1) and log_variance.shape == (5, 1, 1, 1)


def test_q_sample_has_the_closed_form_statistics():
    """q(x_t | x_0) = N(sqrt(abar_t) x_0, 1 - abar_t) checked on many draws."""
    schedule = NoiseSchedule.linear()
    rng = np.random.default_rng(1)
    x0 = np.full((20000, 1, 1, 1), 0.7, np.float32)
    t = np.full(20000, 300, np.int32)
    x_t = schedule.q_sample(x0, t, rng.standard_normal(x0.shape).astype(np.float32)).numpy()
    abar = schedule.alphas_cumprod[300]
    assert abs(x_t.mean() - math.sqrt(abar) * 0.7) < 0.02
    assert abs(x_t.var() - (1 - abar)) < 0.02


def test_config_round_trip_and_bad_arguments():
    schedule = NoiseSchedule.cosine(200, s=0.01)
    again = NoiseSchedule.from_config(schedule.get_config())
    np.testing.assert_array_equal(again.betas, schedule.betas)
    with pytest.raises(KddpmError, match="Unknown schedule"):
        NoiseSchedule("sigmoid")
    with pytest.raises(KddpmError, match="beta"):
        NoiseSchedule.linear(beta_start=0.0)
