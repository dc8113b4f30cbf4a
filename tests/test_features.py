"""Feature networks (the shipped Fashion-MNIST one, Inception, any .keras file) and cached reference features."""

from pathlib import Path

import keras
import numpy as np
import pytest

from kddpm import KddpmError, load_fashion_mnist
from kddpm.features import (
    FASHION_MNIST_FEATURES,
    fashion_mnist_classifier,
    feature_extractor,
    reference_features,
)

ASSET = Path(__file__).parents[1] / "kddpm" / "assets" / FASHION_MNIST_FEATURES


def test_the_shipped_classifier_is_small_and_at_least_91_percent_accurate_on_the_test_split():
    assert ASSET.stat().st_size < 5e6
    classifier = keras.models.load_model(ASSET)
    images, labels, _ = load_fashion_mnist("test")
    logits = classifier.predict(images.astype(np.float32), batch_size=500, verbose=0)
    accuracy = float(np.mean(np.argmax(logits, axis=1) == labels))
    assert accuracy >= 0.91, accuracy
    # It is the architecture the training script builds.
    assert [w.shape for w in classifier.weights] == [w.shape for w in fashion_mnist_classifier().weights]


def test_fashion_mnist_features_are_the_penultimate_layer_and_resize_other_sizes():
    extractor = feature_extractor("fashion_mnist")
    assert extractor.dimension == 128 and extractor.input_shape == (28, 28, 1)
    images, _, _ = load_fashion_mnist("test")
    features = extractor(images[:50], batch_size=16)
    assert features.shape == (50, 128) and features.dtype == np.float32 and np.all(features >= 0)  # ReLU
    direct = keras.Model(extractor.network.inputs, extractor.network.outputs)(images[:50].astype(np.float32))
    np.testing.assert_allclose(features, direct.numpy(), rtol=1e-5, atol=1e-5)
    # 32x32 (padded) and RGB images are brought to 28x28x1.
    padded = np.pad(images[:4], ((0, 0), (2, 2), (2, 2), (0, 0)))
    assert extractor(padded).shape == (4, 128)
    assert extractor(np.repeat(images[:4], 3, axis=-1)).shape == (4, 128)
    with pytest.raises(KddpmError, match="uint8"):
        extractor(images[:4].astype(np.float32))


def test_any_keras_model_and_its_errors(tmp_path):
    inputs = keras.Input((8, 8, 1))
    hidden = keras.layers.Dense(6, name="hidden")(keras.layers.Flatten(name="flat")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2)(hidden))
    model.save(tmp_path / "net.keras")
    extractor = feature_extractor(str(tmp_path / "net.keras"))
    assert extractor.dimension == 6
    assert extractor(np.zeros((3, 8, 8, 1), np.uint8)).shape == (3, 6)
    assert feature_extractor(str(tmp_path / "net.keras"), layer="flat").dimension == 64
    with pytest.raises(KddpmError, match="no usable layer named 'nope'"):
        feature_extractor(str(tmp_path / "net.keras"), layer="nope")
    conv = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(2, 3), keras.layers.Conv2D(2, 3)])
    conv.save(tmp_path / "conv.keras")
    with pytest.raises(KddpmError, match=r"features must be \[N, D\]"):
        feature_extractor(str(tmp_path / "conv.keras"))
    with pytest.raises(KddpmError, match="No feature model at"):
        feature_extractor(str(tmp_path / "missing.keras"))
    with pytest.raises(KddpmError, match="Unknown feature extractor"):
        feature_extractor("vgg")


def test_inception_needs_weights_and_says_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty-keras-home"))
    with pytest.raises(KddpmError, match=r"not in Keras' cache.*--extractor fashion_mnist works offline"):
        feature_extractor("inception")
    # With a weights file (random weights here; Keras' ImageNet file in real use): 2048-d features.
    network = keras.applications.InceptionV3(include_top=False, weights=None, pooling="avg", input_shape=(299, 299, 3))
    network.save_weights(tmp_path / "inception.weights.h5")
    extractor = feature_extractor("inception", weights=tmp_path / "inception.weights.h5")
    features = extractor(np.random.default_rng(0).integers(0, 256, (2, 28, 28, 1), dtype=np.uint8))
    assert features.shape == (2, 2048) and np.isfinite(features).all()


def test_reference_features_are_cached_and_a_mismatched_cache_is_not_used(tmp_path):
    extractor = feature_extractor("fashion_mnist")
    lines = []
    first = reference_features(extractor, "fashion_mnist:test", (28, 28, 1), cache_dir=tmp_path, log=lines.append)
    assert first["features"].shape == (10_000, 128) and first["sigma"].shape == (128, 128)
    (cached,) = tmp_path.glob("reference-*.npz")
    again = reference_features(extractor, "fashion_mnist:test", (28, 28, 1), cache_dir=tmp_path, log=lines.append)
    assert any("from the cache" in line for line in lines)
    np.testing.assert_array_equal(again["features"], first["features"])
    # Another image shape is another entry (the images are padded as the model's data was).
    padded = reference_features(extractor, "fashion_mnist:test", (32, 32, 1), cache_dir=tmp_path)
    assert len(list(tmp_path.glob("reference-*.npz"))) == 2
    assert not np.allclose(padded["mu"], first["mu"])
    # A cache file that says it is something else is recomputed, not used.
    with np.load(cached) as stored:
        content = dict(stored)
    content["identity"] = content["identity"].item().replace("fashion_mnist:test", "something else")
    content["features"] = np.zeros_like(content["features"])
    np.savez(cached, **content)
    lines.clear()
    recomputed = reference_features(extractor, "fashion_mnist:test", (28, 28, 1), cache_dir=tmp_path, log=lines.append)
    assert any("does not match; recomputing" in line for line in lines)
    np.testing.assert_allclose(recomputed["features"], first["features"], rtol=1e-5, atol=1e-5)


def test_statistics_files_that_are_not_ours_or_not_this_extractors_are_refused(tmp_path):
    extractor = feature_extractor("fashion_mnist")
    np.savez(tmp_path / "foreign.npz", weights=np.zeros(3))
    with pytest.raises(KddpmError, match="not a statistics file of ours"):
        reference_features(extractor, str(tmp_path / "foreign.npz"), (28, 28, 1))
    np.savez(tmp_path / "other.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(KddpmError, match="2048-d statistics"):
        reference_features(extractor, str(tmp_path / "other.npz"), (28, 28, 1))
    with pytest.raises(KddpmError, match="Unknown reference"):
        reference_features(extractor, "imagenet", (28, 28, 1), cache_dir=tmp_path)
