"""Evaluating a model: samples -> features -> FID, KID, precision/recall; real images -> bits/dim.

``evaluate`` is what ``kddpm evaluate`` and the training callback run. The maths is in
``kddpm.metrics``, the feature networks and the cached real side in ``kddpm.features``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from kddpm.errors import KddpmError
from kddpm.features import FeatureExtractor, feature_extractor, reference_features, reference_images
from kddpm.metrics import bits_per_dim, feature_statistics, frechet_distance_from_stats, kernel_distance
from kddpm.metrics import precision_recall as improved_precision_recall
from kddpm.sampling import DEFAULT_STEPS, to_uint8

METRICS = ("fid", "kid", "pr", "bpd")
FASHION_MNIST_SHAPES = ((28, 28, 1), (32, 32, 1))


def parse_metrics(text: str | Sequence[str]) -> tuple[str, ...]:
    """'fid,kid' or ['fid', 'kid'] -> ('fid', 'kid'), refusing unknown names."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    unknown = sorted(set(names) - set(METRICS))
    if unknown or not names:
        raise KddpmError(f"Unknown metrics {unknown or names}; choose from {', '.join(METRICS)} (comma-separated).")
    return tuple(dict.fromkeys(names))


def default_extractor(image_shape: tuple[int, int, int]) -> str:
    """'fashion_mnist' for Fashion-MNIST-shaped models (28x28x1, 32x32x1), else 'inception'."""
    return "fashion_mnist" if tuple(image_shape) in FASHION_MNIST_SHAPES else "inception"


def default_reference(image_shape: tuple[int, int, int]) -> str:
    if tuple(image_shape) in FASHION_MNIST_SHAPES:
        return "fashion_mnist:test"
    raise KddpmError(
        f"No default reference for {'x'.join(map(str, image_shape))} images; give --reference "
        "(tfds:NAME:SPLIT, a folder of images, or a statistics .npz)."
    )


def evaluate(
    model,
    metrics: Sequence[str] = ("fid", "kid", "pr"),
    num_samples: int = 10_000,
    sampler: str = "ddim",
    steps: int | None = None,
    clip_x0: bool | None = None,
    reference: str | None = None,
    extractor: str | FeatureExtractor | None = None,
    weights: str | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    bpd_images: int = 256,
    bpd_variances: Sequence[str] = ("beta_tilde",),
    kid_subset_size: int = 1000,
    data_dir: str | None = None,
    progress: bool = False,
    log: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """Scores ``model`` and returns {'metrics': {...}, 'settings': {...}, 'seconds': float}.

    fid: float; kid: {'mean', 'std'}; pr: {'precision', 'recall'} (k = 3); bpd: for each
    variance, the mean of {'total', 'prior', 'decoder', 'kl'} over the first ``bpd_images``
    reference images. Samples: ``num_samples`` from the EMA weights with ``sampler``/``steps``
    (default: the sampler's own, DDIM 50, DPM-Solver++ 20; DDPM takes all T) and ``seed``, in
    batches of ``batch_size`` (default 256).
    """
    started = time.perf_counter()
    log = log or (lambda line: None)
    clip_x0 = model.clip_x0 if clip_x0 is None else bool(clip_x0)
    metrics = parse_metrics(metrics)
    if num_samples < 2:
        raise KddpmError(f"num_samples must be at least 2, got {num_samples}.")
    image_shape = tuple(model.image_shape)
    reference = reference or default_reference(image_shape)
    batch_size = batch_size or 256
    results: dict[str, Any] = {}
    settings: dict[str, Any] = {
        "num_samples": num_samples,
        "sampler": sampler,
        "steps": model.schedule.timesteps if sampler == "ddpm" else steps or DEFAULT_STEPS[sampler],
        "clip_x0": clip_x0,
        "seed": seed,
        "reference": reference,
    }
    sample_metrics = [m for m in metrics if m != "bpd"]
    if sample_metrics:
        if not isinstance(extractor, FeatureExtractor):
            extractor = feature_extractor(extractor or default_extractor(image_shape), weights)
        settings["extractor"] = extractor.name
        real = reference_features(extractor, reference, image_shape, data_dir=data_dir, progress=progress, log=log)
        settings["reference_description"] = real["description"]
        needs_features = [m for m in sample_metrics if m != "fid"]
        if needs_features and real["features"] is None:
            raise KddpmError(f"{reference} holds statistics only (FID); {', '.join(needs_features)} need features.")
        if num_samples <= extractor.dimension:
            log(
                f"Warning: {num_samples} samples for {extractor.dimension}-d features make the covariance singular; "
                f"this FID is biased upward and comparable only with FIDs of {num_samples} samples."
            )
        log(f"Sampling {num_samples} images ({sampler}, {settings['steps']} steps)")
        images = model.sample(
            num_samples,
            seed=seed,
            sampler=sampler,
            steps=None if sampler == "ddpm" else steps,
            clip_x0=clip_x0,
            batch_size=batch_size,
            progress=progress,
        )
        log("Features of the samples")
        fake = extractor(to_uint8(images), progress=progress)
        if "fid" in sample_metrics:
            results["fid"] = frechet_distance_from_stats(*feature_statistics(fake), real["mu"], real["sigma"])
        if "kid" in sample_metrics:
            mean, std = kernel_distance(real["features"], fake, subset_size=kid_subset_size, seed=seed)
            results["kid"] = {"mean": mean, "std": std}
        if "pr" in sample_metrics:
            precision, recall = improved_precision_recall(real["features"], fake, k=3)
            results["pr"] = {"precision": precision, "recall": recall}
    if "bpd" in metrics:
        if reference.endswith(".npz"):
            raise KddpmError("bits/dim needs real images; give a dataset as --reference, not statistics.")
        images, description = reference_images(reference, image_shape, data_dir)
        images = images[:bpd_images]
        settings.update(bpd_images=len(images), bpd_data=description)
        results["bpd"] = {}
        for variance in bpd_variances:
            log(f"Bits/dim of {len(images)} reference images, sigma^2 = {variance} ({model.schedule.timesteps} steps)")
            bound = bits_per_dim(model, images, variance=variance, batch_size=batch_size, seed=seed, progress=progress)
            results["bpd"][variance] = {part: float(np.mean(values)) for part, values in bound.items()}
    return {"metrics": results, "settings": settings, "seconds": time.perf_counter() - started}


def format_table(results: dict[str, Any]) -> str:
    """The metrics as a small text table."""
    rows = []
    found = results["metrics"]
    if "fid" in found:
        rows.append(("FID", f"{found['fid']:.3f}"))
    if "kid" in found:
        rows.append(("KID", f"{found['kid']['mean']:.5f} +- {found['kid']['std']:.5f}"))
    if "pr" in found:
        rows.append(("precision / recall", f"{found['pr']['precision']:.3f} / {found['pr']['recall']:.3f}"))
    for variance, parts in found.get("bpd", {}).items():
        terms = f"prior {parts['prior']:.4f} + KL {parts['kl']:.3f} + decoder {parts['decoder']:.3f}"
        rows.append((f"bits/dim ({variance})", f"{parts['total']:.3f} = {terms}"))
    width = max(len(name) for name, _ in rows) if rows else 0
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)
