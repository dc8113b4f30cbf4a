"""Evaluating a model: samples -> features -> FID, KID, precision/recall; real images -> bits/dim.

``evaluate`` is what ``kddpm evaluate`` and the training callback run. The maths is in
``kddpm.metrics``, the feature networks and the cached real side in ``kddpm.features`` (imported
when ``evaluate`` runs, so that the command line checks its options without TensorFlow).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from kddpm.defaults import DEFAULT_GUIDANCE, DEFAULT_SAMPLER
from kddpm.errors import KddpmError
from kddpm.features import FeatureExtractor, feature_extractor, reference_features, reference_images
from kddpm.metrics import bits_per_dim, feature_statistics, frechet_distance_from_stats, kernel_distance
from kddpm.metrics import precision_recall as improved_precision_recall
from kddpm.sampling import DEFAULT_STEPS, check_clip_x0, to_uint8

METRICS = ("fid", "kid", "pr", "bpd")
# How a class-conditional model's samples are labelled: in the reference's class proportions,
# every class equally often, or all with the null label (the unconditional model inside it).
LABEL_MODES = ("reference", "uniform", "null")
# The labels bits/dim conditions on: the reference images' own (the class-conditional bound), or null.
BPD_LABEL_MODES = ("true", "null")
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
    sampler: str = DEFAULT_SAMPLER,
    steps: int | None = None,
    clip_x0: bool | str | None = None,
    reference: str | None = None,
    extractor=None,
    weights: str | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    bpd_images: int = 256,
    bpd_variances: Sequence[str] = ("beta_tilde",),
    kid_subset_size: int = 1000,
    data_dir: str | None = None,
    progress: bool = False,
    log: Callable[[str], Any] | None = None,
    labels: str | None = None,
    guidance_scale: float | None = None,
    bpd_labels: str | None = None,
) -> dict[str, Any]:
    """Scores ``model`` and returns {'metrics': {...}, 'settings': {...}, 'seconds': float}.

    fid: float; kid: {'mean', 'std'}; pr: {'precision', 'recall'} (k = 3); bpd: for each
    variance, the mean of {'total', 'prior', 'decoder', 'kl'} over the first ``bpd_images``
    reference images. Samples: ``num_samples`` from the EMA weights with ``sampler``/``steps``
    (default: DPM-Solver++(2M), 20 steps; DDPM takes all T), ``clip_x0`` (default: the model's)
    and ``seed``, in batches of ``batch_size`` (default 256).

    Class-conditional models: ``labels`` (default 'reference') labels the samples in the
    reference's class proportions ('reference'; a reference without labels falls back to
    'uniform', said in the log), equally per class ('uniform') or with the null label ('null');
    ``guidance_scale`` defaults to ``DEFAULT_GUIDANCE`` (0 for 'null'). ``bpd_labels`` (default
    'true') conditions bits/dim on the reference images' own labels, or on the null label.
    Unconditional models take none of the three.
    """

    started = time.perf_counter()
    log = log or (lambda line: None)
    clip_x0 = model.clip_x0 if clip_x0 is None else check_clip_x0(clip_x0)
    metrics = parse_metrics(metrics)
    labels, guidance_scale, bpd_labels = _condition_settings(model, labels, guidance_scale, bpd_labels)
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
    if model.num_classes is not None:
        settings.update(labels=labels, guidance_scale=guidance_scale, bpd_labels=bpd_labels)
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
        sample_labels = None
        if labels == "null":
            sample_labels = np.full([num_samples], model.num_classes, np.int32)
        elif labels is not None:
            counts, settings["labels"] = _label_counts(model, labels, real["label_counts"], num_samples, log)
            settings["label_counts"] = counts.tolist()
            sample_labels = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
        guided = "" if sample_labels is None else f", labels {settings['labels']}, guidance {guidance_scale:g}"
        log(f"Sampling {num_samples} images ({sampler}, {settings['steps']} steps{guided})")
        images = model.sample(
            num_samples,
            seed=seed,
            sampler=sampler,
            steps=None if sampler == "ddpm" else steps,
            clip_x0=clip_x0,
            batch_size=batch_size,
            progress=progress,
            labels=sample_labels,
            guidance_scale=guidance_scale if sample_labels is not None else None,
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
        images, image_labels, description = reference_images(reference, image_shape, data_dir)
        images = images[:bpd_images]
        settings.update(bpd_images=len(images), bpd_data=description)
        condition = None
        if bpd_labels == "true":
            if image_labels is None:
                raise KddpmError(
                    f"{reference} has no labels for the class-conditional bound; pass --bpd-labels null "
                    "(bpd_labels='null') or a reference with classes."
                )
            condition = _checked_reference_labels(model, image_labels[:bpd_images])
        results["bpd"] = {}
        for variance in bpd_variances:
            log(f"Bits/dim of {len(images)} reference images, sigma^2 = {variance} ({model.schedule.timesteps} steps)")
            bound = bits_per_dim(
                model,
                images,
                variance=variance,
                batch_size=batch_size,
                seed=seed,
                progress=progress,
                labels=condition,
            )
            results["bpd"][variance] = {part: float(np.mean(values)) for part, values in bound.items()}
    return {"metrics": results, "settings": settings, "seconds": time.perf_counter() - started}


def _condition_settings(model, labels, guidance_scale, bpd_labels) -> tuple[str | None, float | None, str | None]:
    """(labels mode, guidance w, bits/dim labels mode) for ``model``, checked; Nones when unconditional."""
    if model.num_classes is None:
        for name, value in (("labels", labels), ("guidance_scale", guidance_scale), ("bpd_labels", bpd_labels)):
            if value is not None:
                raise KddpmError(
                    f"{name} (--{name.replace('_scale', '').replace('_', '-')}) needs a class-conditional model; "
                    "this one is unconditional: leave it out."
                )
        return None, None, None
    labels = labels or "reference"
    bpd_labels = bpd_labels or "true"
    if labels not in LABEL_MODES:
        raise KddpmError(f"Unknown labels {labels!r}; use one of {', '.join(LABEL_MODES)} (--labels).")
    if bpd_labels not in BPD_LABEL_MODES:
        raise KddpmError(f"Unknown bits/dim labels {bpd_labels!r}; use one of {', '.join(BPD_LABEL_MODES)}.")
    if labels == "null":
        if guidance_scale:
            raise KddpmError("Null-label samples are unconditional and take no guidance; leave out --guidance.")
        guidance_scale = 0.0
    elif guidance_scale is None:
        guidance_scale = DEFAULT_GUIDANCE
    return labels, float(guidance_scale), bpd_labels


def _label_counts(model, mode: str, reference_counts, num_samples: int, log) -> tuple[np.ndarray, str]:
    """(samples per class [K], the mode used): ``num_samples`` split in the reference's
    proportions ('reference') or equally ('uniform', also for a reference without labels).

    Largest remainders: floor(N p_c) each, and the images left over to the classes with the
    largest fractional parts (the lower class first on ties).
    """
    classes = model.num_classes
    if mode == "reference" and reference_counts is None:
        log("The reference has no labels: sampling every class equally often (labels uniform)")
        mode = "uniform"
    if mode == "reference":
        reference_counts = np.asarray(reference_counts, np.float64)
        if len(reference_counts) > classes:
            raise KddpmError(
                f"The reference has {len(reference_counts)} classes, the model {classes}; pass --labels uniform "
                "or a reference with the model's classes."
            )
        weights = np.zeros(classes)
        weights[: len(reference_counts)] = reference_counts
    else:
        weights = np.ones(classes)
    share = num_samples * weights / weights.sum()
    counts = np.floor(share).astype(np.int64)
    left = num_samples - int(counts.sum())
    order = np.lexsort((np.arange(classes), -(share - counts)))
    counts[order[:left]] += 1
    return counts, mode


def _checked_reference_labels(model, labels: np.ndarray) -> np.ndarray:
    if labels.size and labels.max() >= model.num_classes:
        raise KddpmError(
            f"The reference's labels go up to {labels.max()}, beyond the model's {model.num_classes} classes; "
            "pass --bpd-labels null or a reference with the model's classes."
        )
    return labels


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
