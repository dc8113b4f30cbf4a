"""FID, KID, precision/recall and bits/dim against independent computations."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import linalg, stats

from kddpm import DiffusionModel, KddpmError, NoiseSchedule
from kddpm.metrics import (
    bits_per_dim,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_stats,
    kernel_distance,
    precision_recall,
)

# --- FID ---------------------------------------------------------------------------------------


def test_fid_of_two_gaussians_has_the_closed_form():
    """For N(mu1, S1) and N(mu2, S2) with commuting (diagonal) covariances the distance is
    ||mu1 - mu2||^2 + sum (sqrt(s1) - sqrt(s2))^2."""
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([0.5, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert frechet_distance_from_stats(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)
    # And with samples: large draws approach it.
    rng = np.random.default_rng(0)
    a = mu1 + rng.standard_normal((200_000, 3)) * np.sqrt(s1)
    b = mu2 + rng.standard_normal((200_000, 3)) * np.sqrt(s2)
    assert frechet_distance(a, b) == pytest.approx(expected, abs=0.03)


def test_fid_matches_a_direct_computation_on_random_features():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((500, 16)) @ rng.standard_normal((16, 16))
    b = rng.standard_normal((400, 16)) * 1.5 + 0.3
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a.T), np.cov(b.T)
    # The trace of (S_a S_b)^(1/2) from the eigenvalues of S_a^(1/2) S_b S_a^(1/2), which are real.
    root_a = linalg.sqrtm(cov_a).real
    eigenvalues = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    expected = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sum(np.sqrt(np.abs(eigenvalues)))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_fid_with_fewer_samples_than_dimensions_warns_and_still_computes():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((10, 32)), rng.standard_normal((10, 32)) + 1
    with pytest.warns(UserWarning, match="covariance is singular"):
        value = frechet_distance(a, b)
    assert np.isfinite(value) and value > 20  # 32 dimensions shifted by 1
    with pytest.raises(KddpmError, match="one feature space"):
        frechet_distance_from_stats(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(KddpmError, match=r"\[N, D\]"):
        feature_statistics(np.zeros(5))


# --- KID ---------------------------------------------------------------------------------------


def direct_mmd2(x, y):
    """The unbiased MMD^2 written out as sums over pairs (Binkowski et al. 2018, eq. 3)."""
    d = x.shape[1]
    k = lambda u, v: (u @ v / d + 1.0) ** 3  # noqa: E731
    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_the_pairwise_definition_and_is_unbiased():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((30, 5)), rng.standard_normal((30, 5)) + 0.5
    mean, std = kernel_distance(a, b, subsets=1, subset_size=30)
    assert mean == pytest.approx(direct_mmd2(a, b), rel=1e-10) and std == 0.0
    # Same distribution: the unbiased estimate averages to about zero.
    same = [
        kernel_distance(rng.standard_normal((100, 8)), rng.standard_normal((100, 8)), 10, 100, s)[0] for s in range(5)
    ]
    assert abs(np.mean(same)) < 0.02
    mean, std = kernel_distance(rng.standard_normal((300, 8)), rng.standard_normal((300, 8)) + 1, 20, 100)
    assert mean > 10 * std > 0


# --- Precision and recall -------------------------------------------------------------------------


def test_precision_and_recall_of_nested_sets():
    """Fakes that cover half the real set's support: precision 1, recall about 1/2."""
    rng = np.random.default_rng(4)
    real = rng.uniform(0, 1, (2000, 2))
    fake = rng.uniform(0, 1, (1000, 2)) * np.array([0.5, 1.0])
    precision, recall = precision_recall(real, fake, k=3)
    assert precision > 0.97 and 0.45 < recall < 0.6
    # Far apart: nothing inside the other's manifold.
    precision, recall = precision_recall(real, fake + 10, k=3)
    assert precision == 0 and recall == 0
    # A brute-force count on a small case.
    real, fake = rng.standard_normal((40, 3)), rng.standard_normal((30, 3)) + 0.5
    radii = np.sort(np.linalg.norm(real[:, None] - real[None], axis=2), axis=1)[:, 3]
    inside = [np.any(np.linalg.norm(real - f, axis=1) <= radii) for f in fake]
    assert precision_recall(real, fake, k=3)[0] == pytest.approx(np.mean(inside))


# --- Bits per dimension ----------------------------------------------------------------------------

MEAN, STD = -0.2, 0.3  # the data's Gaussian, per pixel, in [-1, 1] units


@keras.saving.register_keras_serializable(package="kddpm_tests")
class GaussianDataEps(keras.layers.Layer):
    """The exact eps of Gaussian data N(MEAN, STD^2):
    E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) m) / (abar s^2 + 1 - abar)."""

    def __init__(self, alphas_cumprod, **kwargs):
        super().__init__(**kwargs)
        self.alphas_cumprod = [float(a) for a in alphas_cumprod]

    def call(self, inputs):
        x_t, t = inputs
        abar = tf.reshape(tf.gather(tf.constant(self.alphas_cumprod, tf.float32), t), [-1, 1, 1, 1])
        return tf.sqrt(1 - abar) * (x_t - tf.sqrt(abar) * MEAN) / (abar * STD**2 + 1 - abar)

    def get_config(self):
        return {**super().get_config(), "alphas_cumprod": self.alphas_cumprod}


@keras.saving.register_keras_serializable(package="kddpm_tests")
class ClassGaussianEps(keras.layers.Layer):
    """The exact eps of class c's data N(CLASS_MEANS[c], STD^2); the null label K: N(MEAN, STD^2)."""

    def __init__(self, alphas_cumprod, **kwargs):
        super().__init__(**kwargs)
        self.alphas_cumprod = [float(a) for a in alphas_cumprod]

    def call(self, inputs):
        x_t, t, label = inputs
        abar = tf.reshape(tf.gather(tf.constant(self.alphas_cumprod, tf.float32), t), [-1, 1, 1, 1])
        mean = tf.reshape(tf.gather(tf.constant([*CLASS_MEANS, MEAN], tf.float32), label), [-1, 1, 1, 1])
        return tf.sqrt(1 - abar) * (x_t - tf.sqrt(abar) * mean) / (abar * STD**2 + 1 - abar)

    def get_config(self):
        return {**super().get_config(), "alphas_cumprod": self.alphas_cumprod}


CLASS_MEANS = (-0.5, 0.4)


def gaussian_model(schedule, conditional=False):
    x_t = keras.Input((4, 4, 1), name="x_t")
    t = keras.Input((), dtype="int32", name="t")
    if not conditional:
        return DiffusionModel(keras.Model([x_t, t], GaussianDataEps(schedule.alphas_cumprod)([x_t, t])), schedule)
    label = keras.Input((), dtype="int32", name="label")
    network = keras.Model([x_t, t, label], ClassGaussianEps(schedule.alphas_cumprod)([x_t, t, label]))
    return DiffusionModel(network, schedule, num_classes=len(CLASS_MEANS))


def numpy_bound(images_uint8, schedule, variance, rng, means=None):
    """The bound written from the paper's eq. 5 and section 3.3, one image at a time, own noise.

    means: the data mean the (exact) network assumes for each image (default MEAN for all).
    Returns its three parts per image, in bits/dim: (prior L_T, sum of the KL terms, decoder L_0).
    """
    betas = np.linspace(schedule.params["beta_start"], schedule.params["beta_end"], schedule.timesteps)
    alphas = 1 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    beta_tilde = betas * (1 - abar_prev) / (1 - abar)
    sigma2 = beta_tilde.copy() if variance == "beta_tilde" else betas.copy()
    sigma2[0] = beta_tilde[1]  # improved-diffusion's convention at t = 1
    parts = []
    means = np.full(len(images_uint8), MEAN) if means is None else means
    for image, data_mean in zip(images_uint8, means):
        x0 = image.astype(np.float64).ravel() / 127.5 - 1
        dims = x0.size
        m, v = math.sqrt(abar[-1]) * x0, 1 - abar[-1]
        prior = np.sum(0.5 * (-1 - math.log(v) + v + m**2))  # L_T
        kl = decoder = 0.0
        for t in range(schedule.timesteps):
            x_t = math.sqrt(abar[t]) * x0 + math.sqrt(1 - abar[t]) * rng.standard_normal(dims)
            eps = math.sqrt(1 - abar[t]) * (x_t - math.sqrt(abar[t]) * data_mean) / (abar[t] * STD**2 + 1 - abar[t])
            x0_hat = np.clip((x_t - math.sqrt(1 - abar[t]) * eps) / math.sqrt(abar[t]), -1, 1)

            def posterior_mean(start, t=t, x_t=x_t):
                return (
                    math.sqrt(abar_prev[t]) * betas[t] * start + math.sqrt(alphas[t]) * (1 - abar_prev[t]) * x_t
                ) / (1 - abar[t])

            mu = posterior_mean(x0_hat)
            if t == 0:  # L_0: the bins of width 2/255 around x0, the outer ones open
                s = math.sqrt(sigma2[0])
                upper = np.where(x0 > 0.999, 1.0, stats.norm.cdf((x0 + 1 / 255 - mu) / s))
                lower = np.where(x0 < -0.999, 0.0, stats.norm.cdf((x0 - 1 / 255 - mu) / s))
                decoder = -np.sum(np.log(np.maximum(upper - lower, 1e-12)))
            else:  # L_{t-1}: KL between Gaussians of variances beta_tilde_t and sigma_t^2
                true_mu = posterior_mean(x0)
                kl += np.sum(
                    0.5
                    * (
                        math.log(sigma2[t] / beta_tilde[t])
                        + beta_tilde[t] / sigma2[t]
                        + (true_mu - mu) ** 2 / sigma2[t]
                        - 1
                    )
                )
        parts.append(np.array([prior, kl, decoder]) / (dims * math.log(2)))
    return np.array(parts).T


@pytest.mark.parametrize(
    "variance, timesteps, beta_end",
    [("beta_tilde", 60, 0.2), ("beta", 60, 0.2), ("beta_tilde", 8, 0.05)],
    ids=["beta_tilde", "beta", "short-schedule"],
)
def test_bits_per_dim_matches_numpy_within_monte_carlo_error(variance, timesteps, beta_end):
    """Each of the bound's three parts against the independent computation. The short schedule
    ends far from N(0, I) (abar_T = 0.81), so its prior term L_T is large (~0.7 bits/dim here)
    and a dropped or mis-indexed L_T fails; the long one checks the KL sum and the decoder."""
    schedule = NoiseSchedule.linear(timesteps, 1e-3, beta_end)
    model = gaussian_model(schedule)
    rng = np.random.default_rng(5)
    images = np.clip(np.round((rng.normal(MEAN, STD, (256, 4, 4, 1)) + 1) * 127.5), 0, 255).astype(np.uint8)
    result = bits_per_dim(model, images, variance=variance, batch_size=24, seed=3)
    assert set(result) == {"total", "prior", "decoder", "kl"}
    np.testing.assert_allclose(result["total"], result["prior"] + result["kl"] + result["decoder"], rtol=1e-12)
    prior, kl, decoder = numpy_bound(images, schedule, variance, rng)
    # The prior involves no noise: it must agree per image, to float32 rounding of the pixels.
    np.testing.assert_allclose(result["prior"], prior, rtol=1e-6)
    # The others are paired by image: the difference is noise alone; its mean must be within 4
    # standard errors (plus a small floor for parts whose noise is tiny).
    for name, reference in (("kl", kl), ("decoder", decoder)):
        difference = result[name] - reference
        bound = 4 * difference.std() / math.sqrt(len(images)) + 1e-4 * np.abs(reference).mean()
        assert abs(difference.mean()) < bound, name
    assert np.all(result["prior"] > 0) and np.all(result["kl"] > 0) and np.all(result["decoder"] > 0)
    if timesteps == 8:
        assert result["prior"].mean() > 0.1  # a real share of the total, not a rounding-level term
    # Independent of the batch size (the noise is keyed by image), and a float input on the grid is the same.
    again = bits_per_dim(model, images.astype(np.float32) / 127.5 - 1, variance=variance, batch_size=256, seed=3)
    np.testing.assert_allclose(again["total"], result["total"], rtol=1e-6)


def test_bits_per_dim_of_a_conditional_model_uses_the_labels_given():
    """Two classes of Gaussian data with an exact class-conditional network: the class-conditional
    bound matches numpy with each image's class mean, the null label's with the pooled mean."""
    schedule = NoiseSchedule.linear(40, 1e-3, 0.2)
    model = gaussian_model(schedule, conditional=True)
    rng = np.random.default_rng(9)
    labels = np.repeat([0, 1], 64).astype(np.int32)
    pixels = rng.normal(np.asarray(CLASS_MEANS)[labels][:, None, None, None], STD, (128, 4, 4, 1))
    images = np.clip(np.round((pixels + 1) * 127.5), 0, 255).astype(np.uint8)
    given = bits_per_dim(model, images, batch_size=50, seed=1, labels=labels)
    null = bits_per_dim(model, images, batch_size=50, seed=1)  # None: the null label
    for result, means in ((given, np.asarray(CLASS_MEANS)[labels]), (null, np.full(128, MEAN))):
        reference = numpy_bound(images, schedule, "beta_tilde", rng, means).sum(axis=0)
        difference = result["total"] - reference
        assert abs(difference.mean()) < 4 * difference.std() / math.sqrt(len(images)) + 1e-4
    # Knowing the class is worth bits: the classes' means are far apart.
    assert given["total"].mean() < null["total"].mean() - 0.05
    with pytest.raises(KddpmError, match="labels must be 128 class indices in \\[0, 2\\]"):
        bits_per_dim(model, images, labels=np.full(128, 3))
    with pytest.raises(KddpmError, match="labels need a class-conditional model"):
        bits_per_dim(gaussian_model(schedule), images, labels=labels)


def test_bits_per_dim_refuses_images_off_the_grid_or_of_the_wrong_shape():
    model = gaussian_model(NoiseSchedule.linear(10))
    with pytest.raises(KddpmError, match="256-level grid"):
        bits_per_dim(model, np.full((2, 4, 4, 1), 0.001, np.float32))
    with pytest.raises(KddpmError, match=r"images \[N, 4, 4, 1\]"):
        bits_per_dim(model, np.zeros((2, 8, 8, 1), np.uint8))
    with pytest.raises(KddpmError, match="Unknown variance"):
        bits_per_dim(model, np.zeros((2, 4, 4, 1), np.uint8), variance="learned")
