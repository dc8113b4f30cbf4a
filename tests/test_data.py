"""Data sources and the tf.data pipeline."""

import gzip

import keras
import numpy as np
import pytest
import tensorflow_datasets as tfds

from kddpm import KddpmError, load_dataset, load_fashion_mnist
from kddpm.data import image_source, read_idx


def test_bundled_fashion_mnist_test_split():
    images, labels, description = load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28, 1) and images.dtype == np.uint8
    assert labels.shape == (10000,) and set(np.unique(labels)) == set(range(10))
    # The published t10k split starts with these labels (ankle boot, pullover, trouser, ...).
    np.testing.assert_array_equal(labels[:10], [9, 2, 1, 1, 6, 1, 4, 6, 5, 7])
    assert np.bincount(labels).tolist() == [1000] * 10
    assert "bundled" in description


def write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as file:
        file.write(header + array.astype(np.uint8).tobytes())


def test_train_split_is_found_in_a_given_folder(tmp_path):
    images = np.arange(5 * 28 * 28).reshape(5, 28, 28) % 256
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([0, 1, 2, 3, 4]))
    loaded, labels, description = load_fashion_mnist("train", tmp_path)
    np.testing.assert_array_equal(loaded[..., 0], images)
    np.testing.assert_array_equal(labels, [0, 1, 2, 3, 4])
    assert str(tmp_path) in description


def test_train_split_falls_back_to_the_bundled_split(tmp_path, monkeypatch):
    monkeypatch.setattr("kddpm.data.fashion_mnist_dirs", lambda data_dir=None: [tmp_path])
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    images, _, description = load_fashion_mnist("train")
    assert len(images) == 10000 and "bundled" in description


def test_missing_and_truncated_files_give_clear_errors(tmp_path):
    with pytest.raises(KddpmError, match="does not exist"):
        load_fashion_mnist("train", tmp_path / "nowhere")
    with pytest.raises(KddpmError, match="No train-images"):
        load_fashion_mnist("train", tmp_path)
    write_idx(tmp_path / "x.gz", np.zeros((4, 28, 28)))
    with gzip.open(tmp_path / "x.gz") as file:
        data = file.read()
    with gzip.open(tmp_path / "short.gz", "wb") as file:
        file.write(data[:-100])
    with pytest.raises(KddpmError, match="truncated"):
        read_idx(tmp_path / "short.gz")
    (tmp_path / "cut.gz").write_bytes((tmp_path / "x.gz").read_bytes()[:30])
    with pytest.raises(KddpmError, match=r"cut\.gz"):
        read_idx(tmp_path / "cut.gz")
    with pytest.raises(KddpmError, match="Unknown dataset"):
        load_dataset(str(tmp_path / "missing-folder"))


def test_pipeline_scales_pads_and_batches():
    dataset = load_dataset("fashion_mnist", split="test", batch_size=8, pad_to=32, shuffle=False)
    images, labels = next(iter(dataset))
    assert images.shape == (8, 32, 32, 1) and images.dtype == "float32" and labels.dtype == "int32"
    raw, raw_labels, _ = load_fashion_mnist("test")
    np.testing.assert_allclose(images.numpy()[:, 2:30, 2:30, 0], raw[:8, :, :, 0] / 127.5 - 1.0, atol=1e-6)
    assert np.all(images.numpy()[:, :2] == -1.0) and np.all(images.numpy()[:, :, 30:] == -1.0)
    np.testing.assert_array_equal(labels.numpy(), raw_labels[:8])


def test_image_shape_pads_fashion_mnist_and_refuses_other_channels():
    images, _ = next(iter(load_dataset(split="test", batch_size=4, image_shape=(32, 32, 1))))
    assert images.shape == (4, 32, 32, 1)
    with pytest.raises(KddpmError, match="1-channel"):
        load_dataset(split="test", image_shape=(28, 28, 3))


def test_flips_are_seeded_and_shuffling_is_reproducible():
    def first_batch(seed):
        dataset = load_dataset(split="test", batch_size=256, flip=True, seed=seed)
        return next(iter(dataset))

    (a, la), (b, lb) = first_batch(1), first_batch(1)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    raw, _, _ = load_fashion_mnist("test")
    # Every image is its original or its mirror image, and both occur.
    originals = {raw[i].tobytes(): i for i in range(len(raw))}
    flipped = 0
    for image in a.numpy():
        as_uint8 = np.round((image + 1) * 127.5).astype(np.uint8)
        if as_uint8.tobytes() not in originals:
            assert as_uint8[:, ::-1].tobytes() in originals
            flipped += 1
    assert 80 < flipped < 176


def test_tfds_dataset_through_mock_data():
    with tfds.testing.mock_data(num_examples=12):
        dataset = load_dataset("tfds:mnist", batch_size=4, image_shape=(32, 32, 1))
        images, labels = next(iter(dataset))
    assert images.shape == (4, 32, 32, 1) and labels.shape == (4,)
    assert images.numpy().min() >= -1 and images.numpy().max() <= 1


def save_png(path, shape, value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    keras.utils.save_img(path, np.full(shape, value, np.uint8), scale=False)


def test_folder_of_images_of_any_size(tmp_path):
    save_png(tmp_path / "cats" / "a.png", (40, 60, 3), 0)
    save_png(tmp_path / "cats" / "b.png", (17, 23, 3), 255)
    save_png(tmp_path / "dogs" / "c.png", (64, 64, 3), 255)
    dataset = load_dataset(str(tmp_path), batch_size=3, image_size=16, shuffle=False)
    images, labels = next(iter(dataset))
    assert images.shape == (3, 16, 16, 3)
    np.testing.assert_array_equal(labels.numpy(), [0, 0, 1])
    np.testing.assert_allclose(images.numpy()[0], -1.0)
    np.testing.assert_allclose(images.numpy()[2], 1.0)


def test_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(KddpmError, match="No images"):
        image_source(str(tmp_path / "empty"))
    save_png(tmp_path / "mixed" / "gray.png", (8, 8, 1))
    save_png(tmp_path / "mixed" / "rgb.png", (8, 8, 3))
    with pytest.raises(KddpmError, match="mixed channel counts"):
        load_dataset(str(tmp_path / "mixed"), image_size=8)
    # Asking for one channel count converts them instead.
    images, _ = next(iter(load_dataset(str(tmp_path / "mixed"), batch_size=2, image_size=8, channels=1)))
    assert images.shape == (2, 8, 8, 1)


def test_skipping_batches_resumes_the_stream_and_labels_can_be_left_out():
    """A resumed run's pipeline yields what the uninterrupted one yields from that step on,
    across an epoch boundary (the 10k split is 39 batches of 256), flips and shuffling included."""
    settings = dict(split="test", batch_size=256, flip=True, repeat=True, seed=3)
    full = [images.numpy() for images, _ in load_dataset(**settings).take(42)]
    resumed = [images.numpy() for images in load_dataset(**settings, skip_batches=37, labels=False).take(5)]
    for expected, got in zip(full[37:], resumed):
        np.testing.assert_array_equal(got, expected)
    assert not np.array_equal(full[0], full[39])  # the second epoch is shuffled and flipped anew


def test_undecodable_images_are_named_or_skipped_with_a_count(tmp_path):
    for index in range(4):
        save_png(tmp_path / "a" / f"{index}.png", (10, 10, 1), 60 * index)
    whole = (tmp_path / "a" / "0.png").read_bytes()
    (tmp_path / "a" / "cut.png").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "a" / "text.jpg").write_bytes(b"not an image")
    with pytest.raises(KddpmError, match="2 of 6 images") as caught:
        load_dataset(str(tmp_path / "a"), image_size=8)
    for name in ("cut.png", "text.jpg"):
        assert str(tmp_path / "a" / name) in str(caught.value)
    source = image_source(str(tmp_path / "a"), skip_bad_images=True)
    assert source.size == 4 and "2 undecodable files skipped" in source.description
    images, _ = next(iter(load_dataset(source, batch_size=4, shuffle=False)))
    np.testing.assert_allclose(np.sort(images.numpy()[:, 0, 0, 0]), (np.arange(4) * 60) / 127.5 - 1, atol=1e-6)
