"""The paper's evaluation: FID, KID, precision/recall on features, and the bound in bits/dim.

Sample-quality metrics take two feature sets, [N, D] arrays from one feature network
(``kddpm.features``): real images and generated ones. They are plain numpy (and scipy for the
matrix square root), written to give the same numbers as the tools papers use:

* FID: pytorch-fid's ``calculate_frechet_distance``.
* KID: Binkowski et al. 2018 as torch-fidelity computes it (unbiased MMD^2, cubic kernel).
* precision / recall: Kynkaanniemi et al. 2019 (k-nearest-neighbour balls).

``bits_per_dim`` is the variational bound of Ho et al. (eq. 5) for each image, all T terms, in
one compiled loop per batch.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import tensorflow as tf

from kddpm.errors import KddpmError
from kddpm.progress import progress_bar
from kddpm.streams import example_normals, fold_in, seed_pair

# --- FID ---------------------------------------------------------------------------------------


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), in float64.

    As pytorch-fid: when the product's square root is not finite (a singular product), eps * I
    is added to both covariances; a square root with a non-negligible imaginary part is an error.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise KddpmError(
            f"FID needs statistics of one feature space: means {mu1.shape} and {mu2.shape}, covariances "
            f"{sigma1.shape} and {sigma2.shape}; compute both with the same feature extractor."
        )
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(len(mu1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise KddpmError(
                f"FID: the covariance product's square root has imaginary part {np.abs(covmean.imag).max()}."
            )
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu [D], sigma [D, D]) of features [N, D] in float64, as pytorch-fid computes them."""
    features = _check_features(features, "features", minimum=2)
    if len(features) <= features.shape[1]:
        warnings.warn(
            f"{len(features)} feature vectors of dimension {features.shape[1]}: the covariance is singular, and "
            "FID at this size is biased upward; compare it only with FIDs of the same N and feature network.",
            stacklevel=2,
        )
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two feature sets [N, D] and [M, D] of one feature network."""
    return frechet_distance_from_stats(*feature_statistics(features_a), *feature_statistics(features_b))


# --- KID ---------------------------------------------------------------------------------------


def kernel_distance(
    features_a: np.ndarray, features_b: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID: (mean, std) over ``subsets`` random subsets of the unbiased MMD^2 estimate with the
    kernel k(x, y) = (x.y / D + 1)^3 (Binkowski et al. 2018; torch-fidelity's defaults).

    Each subset draws ``subset_size`` rows of each set without replacement (fewer when a set is
    smaller: min(subset_size, N, M)).
    """
    a = _check_features(features_a, "features_a", minimum=2)
    b = _check_features(features_b, "features_b", minimum=2)
    if a.shape[1] != b.shape[1]:
        raise KddpmError(f"KID needs one feature space: dimensions {a.shape[1]} and {b.shape[1]}.")
    size = min(subset_size, len(a), len(b))
    rng = np.random.RandomState(seed)
    values = np.empty(subsets)
    for index in range(subsets):
        x = a[rng.choice(len(a), size, replace=False)]
        y = b[rng.choice(len(b), size, replace=False)]
        values[index] = _mmd2_unbiased(x, y)
    return float(values.mean()), float(values.std())


def _polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    m = len(x)
    k_xx, k_yy, k_xy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / m**2)


# --- Precision and recall ------------------------------------------------------------------------


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, block: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of ``fake`` against ``real`` features.

    Each set's manifold is the union of balls around its points with radius the distance to the
    point's k-th nearest neighbour in its own set. Precision: the share of fake points inside the
    real manifold; recall: the share of real points inside the fake manifold.
    """
    real = _check_features(real, "real", minimum=k + 1)
    fake = _check_features(fake, "fake", minimum=k + 1)
    if real.shape[1] != fake.shape[1]:
        raise KddpmError(f"precision/recall need one feature space: dimensions {real.shape[1]} and {fake.shape[1]}.")
    real_radii = _kth_neighbour_distances(real, k, block)
    fake_radii = _kth_neighbour_distances(fake, k, block)
    precision = _share_inside(fake, real, real_radii, block)
    recall = _share_inside(real, fake, fake_radii, block)
    return precision, recall


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum((a * a).sum(1)[:, None] - 2.0 * a @ b.T + (b * b).sum(1)[None, :], 0.0)


def _kth_neighbour_distances(points: np.ndarray, k: int, block: int) -> np.ndarray:
    radii = np.empty(len(points))
    for start in range(0, len(points), block):
        distances = _squared_distances(points[start : start + block], points)
        # Column k of the sorted row: index 0 is the point itself (distance 0).
        radii[start : start + block] = np.sqrt(np.partition(distances, k, axis=1)[:, k])
    return radii


def _share_inside(queries: np.ndarray, centres: np.ndarray, radii: np.ndarray, block: int) -> float:
    inside = 0
    for start in range(0, len(queries), block):
        distances = np.sqrt(_squared_distances(queries[start : start + block], centres))
        inside += int(np.any(distances <= radii[None, :], axis=1).sum())
    return inside / len(queries)


def _check_features(features, name: str, minimum: int) -> np.ndarray:
    features = np.asarray(features, np.float64)
    if features.ndim != 2:
        raise KddpmError(f"{name} must be feature vectors [N, D], got shape {features.shape}.")
    if len(features) < minimum:
        raise KddpmError(f"{name} has {len(features)} feature vectors; this metric needs at least {minimum}.")
    if not np.isfinite(features).all():
        raise KddpmError(f"{name} holds NaN or infinite values; check the images and the feature network.")
    return features


# --- The variational bound in bits per dimension -------------------------------------------------


def bits_per_dim(
    model,
    images: np.ndarray,
    variance: str = "beta_tilde",
    batch_size: int | None = None,
    seed: int = 0,
    use_ema: bool = True,
    clip_x0: bool | str = True,
    progress: bool = False,
    labels: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The paper's bound L = L_T + sum_{t>1} L_{t-1} + L_0 (eq. 5) per image, in bits per dimension.

    images: uint8 [N, H, W, C], or float32 [N, H, W, C] in [-1, 1] on the 256-level grid (as
    ``kddpm.load_dataset`` gives them). variance: the reverse process' fixed sigma_t^2,
    'beta_tilde' or 'beta'. clip_x0: form p's mean from x0_hat clipped to [-1, 1], as the
    original code's and improved-diffusion's evaluation does (False: the unclipped mean of eq. 11;
    'dynamic': dynamically thresholded). labels: class-conditional models only, [N] int class
    indices in [0, K] of the images, for the class-conditional bound; None there means the null
    label K for every image (the unconditional bound of the same network).

    Returns numpy float64 arrays [N]: ``prior`` = KL(q(x_T|x_0) || N(0, I)); ``kl`` = sum over
    t = 2..T of KL(q(x_{t-1}|x_t, x_0) || p(x_{t-1}|x_t)); ``decoder`` = -log p(x_0|x_1), the
    discretized Gaussian of section 3.3 (bins of width 2/255, the outer two open); ``total``,
    their sum. Each term is in nats averaged over the H*W*C dimensions, divided by ln 2.

    At t = 1 beta_tilde is 0, so its log is replaced by beta_tilde at t = 2 for both variances,
    as improved-diffusion does (``posterior_log_variance_clipped``; for 'beta' its table is
    log([beta_tilde_2, beta_2, ..., beta_T])): the decoder needs a positive width, and this is the
    choice the published bits/dim were computed with. Every t is evaluated (no sampling of t),
    inside one compiled ``tf.while_loop`` per batch; the noise of image i at step t is a function
    of (seed, t, i) alone, so results do not depend on ``batch_size``.
    """
    from kddpm.sampling import VARIANCES, check_clip_x0

    if variance not in VARIANCES:
        raise KddpmError(f"Unknown variance {variance!r}; use one of {VARIANCES}.")
    clip_x0 = check_clip_x0(clip_x0)
    x0 = _images_on_grid(images, model.image_shape)
    labels = _labels_for(model, labels, len(x0))
    network = model.ema_denoiser if use_ema else model.denoiser
    schedule = model.schedule
    log_variances = np.log(
        np.append(
            schedule.posterior_variance[1],
            (schedule.posterior_variance if variance == "beta_tilde" else schedule.betas)[1:],
        )
    )
    tables = tf.constant(
        np.stack(
            [
                np.sqrt(schedule.alphas_cumprod),
                np.sqrt(1.0 - schedule.alphas_cumprod),
                schedule.posterior_mean_coef1,
                schedule.posterior_mean_coef2,
                schedule.posterior_log_variance_clipped,
                log_variances,
            ],
            axis=1,
        ),
        tf.float64,
    )
    prior = _prior_bits_per_dim(x0, schedule.alphas_cumprod[-1])
    run = _bound_function(network, tables, schedule.timesteps, model.image_shape, clip_x0, labels is not None)
    key = seed_pair(seed)
    batch_size = batch_size or min(len(x0), 256)
    kl, decoder = np.empty(len(x0)), np.empty(len(x0))
    bar = None
    if progress:
        bar = progress_bar(len(x0), unit_name="image")
    for start in range(0, len(x0), batch_size):
        stop = min(start + batch_size, len(x0))
        condition = () if labels is None else (tf.constant(labels[start:stop]),)
        batch_kl, batch_decoder = run(tf.constant(x0[start:stop]), key, tf.constant(start, tf.int32), *condition)
        kl[start:stop], decoder[start:stop] = batch_kl.numpy(), batch_decoder.numpy()
        if bar is not None:
            bar.update(stop)
    return {"total": prior + kl + decoder, "prior": prior, "decoder": decoder, "kl": kl}


def _labels_for(model, labels, count: int) -> np.ndarray | None:
    """The [count] int32 labels a conditional network is called with (None for an unconditional one)."""
    if model.num_classes is None:
        if labels is not None:
            raise KddpmError("labels need a class-conditional model; this one is unconditional.")
        return None
    if labels is None:
        return np.full([count], model.num_classes, np.int32)  # the null label
    labels = np.asarray(labels).reshape(-1)
    if (
        labels.shape != (count,)
        or labels.dtype.kind not in "iu"
        or labels.min() < 0
        or labels.max() > model.num_classes
    ):
        raise KddpmError(
            f"labels must be {count} class indices in [0, {model.num_classes}], one per image; got "
            f"{labels.dtype} {labels.shape}."
        )
    return labels.astype(np.int32)


def _images_on_grid(images, image_shape) -> np.ndarray:
    """float32 [N, H, W, C] in [-1, 1] on the grid k / 127.5 - 1, from uint8 or such floats."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != tuple(image_shape) or len(images) == 0:
        raise KddpmError(
            f"bits_per_dim takes images [N, {', '.join(map(str, image_shape))}] (the model's shape), got "
            f"{images.shape}; pad or resize them as the model's training data was "
            "(kddpm.load_dataset(image_shape=...))."
        )
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 127.5 - 1.0
    if images.dtype.kind != "f":
        raise KddpmError(f"bits_per_dim takes uint8 or float images, got {images.dtype}.")
    levels = (images.astype(np.float64) + 1.0) * 127.5
    if levels.min() < -1e-3 or levels.max() > 255 + 1e-3 or np.abs(levels - np.round(levels)).max() > 1e-3:
        raise KddpmError(
            "bits_per_dim's float images must lie in [-1, 1] on the 256-level grid (uint8 / 127.5 - 1); "
            "pass the uint8 images instead."
        )
    return images.astype(np.float32)


def _prior_bits_per_dim(x0: np.ndarray, alpha_bar_last: float) -> np.ndarray:
    """KL(N(sqrt(abar_T) x0, 1 - abar_T) || N(0, 1)), averaged over dimensions, in bits."""
    mean = math.sqrt(alpha_bar_last) * x0.astype(np.float64)
    variance = 1.0 - alpha_bar_last
    kl = 0.5 * (-1.0 - math.log(variance) + variance + mean**2)
    return kl.reshape(len(x0), -1).mean(axis=1) / math.log(2.0)


def _normal_kl(mean1, log_var1, mean2, log_var2):
    """KL(N(mean1, e^log_var1) || N(mean2, e^log_var2)), elementwise, in nats."""
    return 0.5 * (
        -1.0 + log_var2 - log_var1 + tf.exp(log_var1 - log_var2) + tf.square(mean1 - mean2) * tf.exp(-log_var2)
    )


def _discretized_gaussian_nll(x0, mean, log_scale):
    """-log of the probability a Gaussian gives x0's bin of width 2/255 (outer bins open), in nats.

    Exact normal CDFs from erfc, in float64; a bin above the mean is measured with the upper
    tail, so that a bin far out on either side keeps its precision.
    """
    inv_std = tf.exp(-log_scale)
    upper = inv_std * (x0 - mean + 1.0 / 255.0)
    lower = inv_std * (x0 - mean - 1.0 / 255.0)

    def cdf(z):
        return 0.5 * tf.math.erfc(-z / math.sqrt(2.0))

    def survival(z):
        return 0.5 * tf.math.erfc(z / math.sqrt(2.0))

    inside = tf.where(lower > 0, survival(lower) - survival(upper), cdf(upper) - cdf(lower))
    probability = tf.where(x0 < -0.999, cdf(upper), tf.where(x0 > 0.999, survival(lower), inside))
    return -tf.math.log(tf.maximum(probability, tf.constant(1e-300, x0.dtype)))


def _bound_function(network, tables: tf.Tensor, timesteps: int, image_shape, clip_x0, conditional: bool):
    """One graph per batch: for t = T-1 .. 0 (indices), x_t ~ q(x_t|x_0), eps, and the t-th term."""
    from kddpm.sampling import clip_prediction

    ln2 = math.log(2.0)

    def mean_over_dims(values):
        return tf.reduce_mean(tf.reshape(values, [tf.shape(values)[0], -1]), axis=1) / ln2

    signature = [
        tf.TensorSpec([None, *image_shape], tf.float32),
        tf.TensorSpec([2], tf.int64),
        tf.TensorSpec([], tf.int32),
    ]
    if conditional:
        signature.append(tf.TensorSpec([None], tf.int32))

    @tf.function(input_signature=signature)
    def run(x0, key, first, *condition):
        batch = tf.shape(x0)[0]
        x0_64 = tf.cast(x0, tf.float64)

        def step(t, kl_sum, decoder):
            sqrt_abar, sqrt_one_minus_abar, coef1, coef2, true_log_var, model_log_var = tf.unstack(tables[t])
            noise = tf.cast(example_normals(fold_in(key, t), first, batch, image_shape), tf.float64)
            x_t = sqrt_abar * x0_64 + sqrt_one_minus_abar * noise
            inputs = [tf.cast(x_t, tf.float32), tf.fill([batch], t), *condition]
            eps = tf.cast(network(inputs, training=False), tf.float64)
            x0_hat = clip_prediction((x_t - sqrt_one_minus_abar * eps) / sqrt_abar, clip_x0)
            model_mean = coef1 * x0_hat + coef2 * x_t
            true_mean = coef1 * x0_64 + coef2 * x_t
            term = mean_over_dims(_normal_kl(true_mean, true_log_var, model_mean, model_log_var))
            nll = mean_over_dims(_discretized_gaussian_nll(x0_64, model_mean, 0.5 * model_log_var))
            is_first = tf.equal(t, 0)
            return (
                t - 1,
                kl_sum + tf.where(is_first, tf.zeros_like(term), term),
                tf.where(is_first, nll, decoder),
            )

        zeros = tf.zeros([batch], tf.float64)
        _, kl_sum, decoder = tf.while_loop(
            lambda t, *_: t >= 0, step, (tf.constant(timesteps - 1), zeros, zeros), parallel_iterations=1
        )
        return kl_sum, decoder

    return run
