"""Class labels of class-conditional models: how many, their names, and checks of what users pass.

K classes have the indices 0..K-1 and the null label K (the unconditional model that
classifier-free guidance needs, learned by replacing a share of the training labels with it).
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from kddpm.defaults import DEFAULT_GUIDANCE
from kddpm.errors import KddpmError
from kddpm.streams import example_uniforms, fold_in


def num_classes_of(denoiser: keras.Model, num_classes: int | None) -> int | None:
    """K of a conditional denoiser (its ``label`` input and ``class_embedding``), checked against ``num_classes``."""
    names = [getattr(tensor, "name", "") for tensor in getattr(denoiser, "inputs", None) or []]
    conditional = any(name.startswith("label") for name in names)
    found = None
    if conditional:
        try:
            found = int(denoiser.get_layer("class_embedding").input_dim) - 1
        except ValueError:
            found = None
    if num_classes is None:
        if conditional and found is None:
            raise KddpmError("The denoiser takes a label input; pass num_classes=K (its null label is K).")
        return found
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise KddpmError(f"num_classes must be a positive integer, got {num_classes!r}.")
    if names and not conditional:
        raise KddpmError(
            f"num_classes={num_classes} but the denoiser has no label input; build it with "
            f"build_unet(..., num_classes={num_classes})."
        )
    if found is not None and found != num_classes:
        raise KddpmError(f"num_classes={num_classes} but the denoiser's class embedding holds {found} classes.")
    return int(num_classes)


def checked_class_names(class_names, num_classes: int | None) -> list[str] | None:
    """``class_names`` as K distinct strings (None stays None)."""
    if class_names is None:
        return None
    names = [str(name) for name in class_names]
    if num_classes is None or len(names) != num_classes:
        raise KddpmError(f"class_names has {len(names)} names for a model with {num_classes} classes.")
    if len(set(names)) != len(names):
        raise KddpmError(f"class_names must be distinct, got {names}.")
    return names


def class_index(num_classes: int | None, class_names: list[str] | None, name_or_index: int | str) -> int:
    """The class index of a class name (case-insensitive) or index; a string of digits counts as an index."""
    if num_classes is None:
        raise KddpmError("This model is unconditional; it has no classes to ask for.")
    if isinstance(name_or_index, str) and not name_or_index.strip().isdigit():
        names = class_names or []
        folded = {name.lower(): i for i, name in enumerate(names)}
        if name_or_index.lower() not in folded:
            known = ", ".join(names) if names else f"indices 0..{num_classes - 1} (the model has no names)"
            raise KddpmError(f"Unknown class {name_or_index!r}; this model's classes are {known}.")
        return folded[name_or_index.lower()]
    index = int(name_or_index)
    if not 0 <= index <= num_classes:
        raise KddpmError(f"Class {index} is outside [0, {num_classes - 1}] ({num_classes} is the null label).")
    return index


def label_array(
    num_classes: int | None,
    class_names: list[str] | None,
    labels: int | str | np.ndarray | list | None,
    num_images: int,
    guidance_scale: float | None = None,
) -> tuple[np.ndarray | None, float]:
    """(``labels`` as [num_images] int32 class indices, the guidance scale w), both checked.

    labels None stays None (w then 0); w None is ``DEFAULT_GUIDANCE`` when labels are given.
    """
    if guidance_scale is None:
        guidance_scale = DEFAULT_GUIDANCE if labels is not None and num_classes is not None else 0.0
    if not (isinstance(guidance_scale, (int, float, np.number)) and math.isfinite(guidance_scale)):
        raise KddpmError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}.")
    if guidance_scale < 0:
        raise KddpmError(f"guidance_scale must be >= 0, got {guidance_scale}.")
    if num_classes is None:
        if labels is not None or guidance_scale:
            raise KddpmError(
                "labels and guidance_scale need a class-conditional model; train one with "
                "num_classes (kddpm train --conditional)."
            )
        return None, 0.0
    w = float(guidance_scale)
    if labels is None:
        if w:
            raise KddpmError("guidance_scale needs labels: guidance moves each image towards its class.")
        return None, 0.0
    if isinstance(labels, (int, np.integer, str)):
        return np.full([num_images], class_index(num_classes, class_names, labels), np.int32), w
    values = [class_index(num_classes, class_names, label) for label in np.asarray(labels).reshape(-1).tolist()]
    if len(values) != num_images:
        raise KddpmError(f"labels holds {len(values)} classes for {num_images} images; give one per image.")
    return np.asarray(values, np.int32), w


def bad_training_labels_message(num_classes: int) -> str:
    return (
        f"Training labels must be class indices in [0, {num_classes}) for this {num_classes}-class "
        "model; check the dataset's labels or build the model with more classes."
    )


def drop_labels(labels: tf.Tensor, rate: float, null_label: int, key: tf.Tensor, first) -> tf.Tensor:
    """Each label [B] replaced by the null label with probability ``rate``, drawn from the
    training key's stream 4 at the examples' global positions first.. (like the noise)."""
    if not rate:
        return labels
    uniform = example_uniforms(fold_in(key, 4), first, tf.shape(labels)[0], ())
    return tf.where(uniform < rate, tf.fill(tf.shape(labels), null_label), labels)
