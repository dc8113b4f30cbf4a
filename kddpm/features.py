"""Feature networks for FID, KID and precision/recall, and cached reference features.

``feature_extractor(name_or_path)`` returns a callable ``uint8 [N, H, W, C] -> float32 [N, D]``:

* ``"fashion_mnist"``: a small CNN kddpm trains on Fashion-MNIST's train split and ships in the
  package (``kddpm/assets/``; ``tools/train_feature_network.py`` remakes it); D = 128, its
  penultimate layer. Works offline.
* ``"inception"``: Keras' InceptionV3 (ImageNet weights, ``include_top=False``, average
  pooling), D = 2048, images resized to 299x299 bilinearly and grey repeated to 3 channels.
  Its FIDs are comparable between kddpm runs, not with papers' numbers, which use the TF-slim
  "FID Inception" graph.
* a ``.keras`` file: its penultimate layer's output, or the layer named ``layer``.

Images of another size than the network's input are resized bilinearly, channels repeated or
averaged to the count it takes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from kddpm.errors import KddpmError
from kddpm.progress import progress_bar

FASHION_MNIST_FEATURES = "fashion_mnist_features.keras"
INCEPTION_WEIGHTS = "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"
_CACHE_FORMAT = "kddpm-reference-features-2"


@dataclasses.dataclass
class FeatureExtractor:
    """``extractor(images)``: uint8 [N, H, W, C] -> float32 [N, dimension], in batches.

    name identifies the network (and its weights) in caches and reports.
    """

    name: str
    network: keras.Model
    input_shape: tuple[int, int, int]
    preprocess: Callable[[tf.Tensor], tf.Tensor]

    @property
    def dimension(self) -> int:
        return int(self.network.outputs[0].shape[-1])

    def __call__(self, images: np.ndarray, batch_size: int = 200, progress: bool = False) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] not in (1, 3, 4) or images.dtype != np.uint8:
            raise KddpmError(
                f"Feature extraction takes uint8 images [N, H, W, 1 or 3], got {images.dtype} {images.shape}; "
                "convert [-1, 1] floats with kddpm.sampling.to_uint8."
            )
        bar = progress_bar(len(images), unit_name="image") if progress else None
        features = []
        for start in range(0, len(images), batch_size):
            batch = self._fit_input(tf.constant(images[start : start + batch_size]))
            features.append(self.network(self.preprocess(batch), training=False).numpy().astype(np.float32))
            if bar is not None:
                bar.update(min(start + batch_size, len(images)))
        return np.concatenate(features) if features else np.zeros((0, self.dimension), np.float32)

    def _fit_input(self, images: tf.Tensor) -> tf.Tensor:
        """uint8 [B, H, W, C] -> float32 [B, h, w, c] in 0..255, the network's input size and channels."""
        height, width, channels = self.input_shape
        x = tf.cast(images[..., :3], tf.float32)
        if x.shape[-1] != channels:
            x = tf.repeat(x, channels, axis=-1) if x.shape[-1] == 1 else tf.reduce_mean(x, axis=-1, keepdims=True)
        if tuple(x.shape[1:3]) != (height, width):
            x = tf.image.resize(x, (height, width), method="bilinear")
        return x


def feature_extractor(name_or_path: str, weights: str | os.PathLike | None = None, layer: str | None = None):
    """The feature network ``name_or_path`` ('fashion_mnist', 'inception' or a .keras file); see the module."""
    if name_or_path == "fashion_mnist":
        classifier, digest = shipped_fashion_mnist_classifier()
        # Named by its weights' digest, so that a retrained network never reuses old caches.
        return _penultimate(classifier, f"fashion_mnist@{digest}", "features", named_layer=False)
    if name_or_path == "inception":
        return _inception(weights)
    path = Path(name_or_path).expanduser()
    if path.suffix != ".keras":
        raise KddpmError(
            f"Unknown feature extractor {name_or_path!r}: use 'fashion_mnist', 'inception' or a .keras model file."
        )
    if not path.is_file():
        raise KddpmError(f"No feature model at {path}; give a .keras file, 'fashion_mnist' or 'inception'.")
    try:
        network = keras.models.load_model(path)
    except Exception as error:  # Keras raises many types for unreadable files
        raise KddpmError(f"Cannot load the feature model {path} ({type(error).__name__}); check the file.") from None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return _penultimate(network, f"{path.name}@{digest}", layer)


def _penultimate(network: keras.Model, name: str, layer: str | None, named_layer: bool = True) -> FeatureExtractor:
    """The output of ``layer`` (default: the layer before the last) as features."""
    try:
        inputs = network.inputs
        output = network.get_layer(layer).output if layer is not None else network.layers[-2].output
    except (AttributeError, ValueError, IndexError):
        raise KddpmError(
            f"The feature model {name} has no usable layer{f' named {layer!r}' if layer else ''}: it must be a "
            "functional Keras model with at least two layers whose output is a vector [N, D]."
        ) from None
    if len(output.shape) != 2:
        raise KddpmError(f"The feature layer of {name} outputs shape {output.shape}; features must be [N, D].")
    input_shape = tuple(int(d) for d in inputs[0].shape[1:])
    if len(input_shape) != 3:
        raise KddpmError(f"The feature model {name} takes inputs {inputs[0].shape}; it must take images [N, H, W, C].")
    features = keras.Model(inputs, output)
    name = f"{name}:{layer}" if layer and named_layer else name
    return FeatureExtractor(name, features, input_shape, lambda x: x)


def _inception(weights) -> FeatureExtractor:
    if weights is None:
        cache = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models" / INCEPTION_WEIGHTS
        if not cache.is_file():
            raise KddpmError(
                f"InceptionV3's ImageNet weights are not in Keras' cache ({cache}) and no --weights was given: "
                'on a machine with internet run `python -c "import keras; keras.applications.InceptionV3('
                'include_top=False)"` once (or download the file and pass --weights PATH); '
                "--extractor fashion_mnist works offline."
            )
        weights = cache
    weights = Path(weights).expanduser()
    if not weights.is_file():
        raise KddpmError(f"No InceptionV3 weights at {weights}; give the notop .h5 file Keras downloads.")
    network = keras.applications.InceptionV3(include_top=False, weights=None, pooling="avg", input_shape=(299, 299, 3))
    try:
        network.load_weights(weights)
    except Exception as error:  # h5py and Keras raise many types
        raise KddpmError(f"Cannot load InceptionV3 weights from {weights} ({type(error).__name__}).") from None
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
    return FeatureExtractor(
        f"inception_v3@{digest}", network, (299, 299, 3), keras.applications.inception_v3.preprocess_input
    )


def shipped_fashion_mnist_classifier() -> tuple[keras.Model, str]:
    """(the shipped trained classifier, a digest of its file): float32 images [N, 28, 28, 1] in
    0..255 -> 10 logits, Fashion-MNIST's labels (92% test accuracy). Its penultimate layer is the
    'fashion_mnist' feature extractor; the guidance benchmark uses its logits."""
    path = resources.files("kddpm") / "assets" / FASHION_MNIST_FEATURES
    with resources.as_file(path) as file:
        classifier = keras.models.load_model(file)
        digest = hashlib.sha256(Path(file).read_bytes()).hexdigest()[:12]
    return classifier, digest


def fashion_mnist_classifier() -> keras.Model:
    """The shipped feature network's architecture: float32 images [N, 28, 28, 1] in 0..255 -> 10 logits.

    Two conv blocks (32 and 64 channels), a 128-unit ReLU layer named 'features' (the penultimate
    layer FID uses), dropout, and the logits.
    """
    inputs = keras.Input((28, 28, 1), name="images")
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0)(inputs)
    for channels in (32, 64):
        x = keras.layers.Conv2D(channels, 3, padding="same", activation="relu")(x)
        x = keras.layers.Conv2D(channels, 3, padding="same", activation="relu")(x)
        x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dropout(0.3)(x)
    x = keras.layers.Dense(128, activation="relu", name="features")(x)
    x = keras.layers.Dropout(0.3)(x)
    outputs = keras.layers.Dense(10, name="logits")(x)
    return keras.Model(inputs, outputs, name="fashion_mnist_features")


# --- Reference features, cached ----------------------------------------------------------------


def cache_directory() -> Path:
    """Where reference features are cached: $KDDPM_CACHE, else $XDG_CACHE_HOME/kddpm, else ~/.cache/kddpm."""
    if os.environ.get("KDDPM_CACHE"):
        return Path(os.environ["KDDPM_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "kddpm"


def reference_features(
    extractor: FeatureExtractor,
    reference: str,
    image_shape: tuple[int, int, int],
    cache_dir: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    progress: bool = False,
    log: Callable[[str], object] | None = None,
) -> dict:
    """The real side of an evaluation: {'features' [N, D] or None, 'mu', 'sigma', 'description',
    'label_counts'}: label_counts [K] int, images per class, or None for a reference without labels.

    reference: 'fashion_mnist:test' / 'fashion_mnist:train', 'tfds:NAME:SPLIT', a folder of
    images, or a '.npz' of statistics (written here, or with 'mu' and 'sigma' only: FID only).
    Images are brought to ``image_shape`` as the model's training data was (padding or
    resizing, ``kddpm.load_dataset``), then through the extractor. The result is cached as .npz
    keyed by the extractor, the reference and the image shape; a cache file that names
    another extractor, reference or shape is recomputed, never used.
    """
    from kddpm.metrics import feature_statistics

    log = log or (lambda line: None)
    if reference.endswith(".npz"):
        return _read_statistics(Path(reference).expanduser(), extractor, image_shape)
    identity = {
        "format": _CACHE_FORMAT,
        "extractor": extractor.name,
        "reference": reference,
        "image_shape": list(image_shape),
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(cache_dir).expanduser() if cache_dir else cache_directory()
    path = cache / f"reference-{key}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as stored:
                if json.loads(str(stored["identity"])) == identity:
                    log(f"Reference features from the cache {path}")
                    counts = stored["label_counts"]
                    return {
                        "features": stored["features"],
                        "mu": stored["mu"],
                        "sigma": stored["sigma"],
                        "description": str(stored["description"]),
                        "label_counts": counts if counts.size else None,
                    }
        except (OSError, ValueError, KeyError):
            pass  # a damaged or foreign cache entry is recomputed below
        log(f"The cache {path} does not match; recomputing it")
    images, labels, description = reference_images(reference, image_shape, data_dir)
    log(f"Reference: {description}")
    counts = None if labels is None else np.bincount(labels)
    features = extractor(images, progress=progress)
    mu, sigma = feature_statistics(features)
    cache.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial.npz")
    np.savez(
        partial,
        identity=json.dumps(identity, sort_keys=True),
        features=features,
        mu=mu,
        sigma=sigma,
        description=description,
        label_counts=np.zeros(0, np.int64) if counts is None else counts,
    )
    os.replace(partial, path)
    return {"features": features, "mu": mu, "sigma": sigma, "description": description, "label_counts": counts}


def reference_images(reference: str, image_shape, data_dir=None) -> tuple[np.ndarray, np.ndarray | None, str]:
    """(uint8 [N, H, W, C] images of ``reference``, brought to ``image_shape`` as training data is,
    their int32 [N] labels or None when the reference has no classes, a description)."""
    from kddpm.data import image_source, load_dataset

    if reference.startswith("fashion_mnist:"):
        source, split = "fashion_mnist", reference.split(":", 1)[1]
    elif reference.startswith("tfds:"):
        parts = reference.split(":")
        if len(parts) != 3:
            raise KddpmError(f"A tensorflow-datasets reference is tfds:NAME:SPLIT, got {reference!r}.")
        source, split = f"tfds:{parts[1]}", parts[2]
    elif Path(reference).expanduser().is_dir():
        source, split = str(Path(reference).expanduser()), "train"
    else:
        raise KddpmError(
            f"Unknown reference {reference!r}: use fashion_mnist:test, fashion_mnist:train, tfds:NAME:SPLIT, "
            "a folder of images or a statistics .npz."
        )
    loaded = image_source(source, split, data_dir, int(image_shape[2]) if Path(source).is_dir() else None)
    dataset = load_dataset(loaded, batch_size=500, image_shape=image_shape, shuffle=False, drop_remainder=False)
    batches, labels = [], []
    for images, batch_labels in dataset:
        batches.append(np.round((images.numpy() + 1.0) * 127.5).astype(np.uint8))
        labels.append(batch_labels.numpy().astype(np.int32))
    return np.concatenate(batches), np.concatenate(labels) if loaded.class_names else None, loaded.description


def _read_statistics(path: Path, extractor: FeatureExtractor, image_shape) -> dict:
    if not path.is_file():
        raise KddpmError(f"No statistics file at {path}; give an .npz written by kddpm evaluate, or a dataset.")
    try:
        with np.load(path, allow_pickle=False) as stored:
            content = {name: stored[name] for name in stored.files}
    except (OSError, ValueError) as error:
        raise KddpmError(f"{path} is not a readable .npz ({error}).") from None
    if "mu" not in content or "sigma" not in content:
        raise KddpmError(f"{path} is not a statistics file of ours: it has no 'mu' and 'sigma' arrays.")
    if "identity" in content:
        identity = json.loads(str(content["identity"]))
        if identity.get("extractor") != extractor.name or tuple(identity.get("image_shape", ())) != tuple(image_shape):
            raise KddpmError(
                f"{path} holds features of {identity.get('extractor')} at {identity.get('image_shape')}, not of "
                f"{extractor.name} at {list(image_shape)}; give the reference data instead so they are recomputed."
            )
    elif len(content["mu"]) != extractor.dimension:
        raise KddpmError(f"{path} holds {len(content['mu'])}-d statistics; the extractor gives {extractor.dimension}.")
    counts = content.get("label_counts")
    return {
        "features": content.get("features"),
        "mu": content["mu"],
        "sigma": content["sigma"],
        "description": str(content.get("description", path)),
        "label_counts": counts if counts is not None and counts.size else None,
    }
