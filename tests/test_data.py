"""Data sources and the tf.data pipeline."""

import dataclasses
import gzip

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from kddpm import KddpmError, load_dataset, load_fashion_mnist
from kddpm.data import batch_records, image_source, read_idx
from kddpm.data.sources import in_memory_source


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
    monkeypatch.setattr("kddpm.data.fashion_mnist.fashion_mnist_dirs", lambda data_dir=None: [tmp_path])
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
    with pytest.raises(KddpmError, match=r"grey \(1 channel\) images but the network expects 3.*--channels 3"):
        load_dataset(split="test", image_shape=(28, 28, 3))
    # Asked for, grey becomes colour.
    images, _ = next(iter(load_dataset(split="test", batch_size=2, image_shape=(28, 28, 3), channels=3)))
    assert images.shape == (2, 28, 28, 3) and np.array_equal(images[..., 0], images[..., 2])


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
    with pytest.raises(KddpmError, match=r"mix grey and colour .*gray\.png is grey.*rgb\.png is colour.*--channels 1"):
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


def counting(source):
    """``source`` with every record it reads appended to the returned list (no in-memory shortcut)."""
    reads = []

    def count(index):
        reads.append(int(index))
        return index

    read = source.read
    counted = dataclasses.replace(
        source, read=lambda i: read(tf.numpy_function(count, [i], tf.int64, stateful=True)), arrays=None
    )
    return counted, reads


def numbered_source(count=40):
    """Images whose label is their record index (and whose pixels say it too)."""
    images = np.arange(count, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 1), np.uint8)
    return in_memory_source(images, np.arange(count), f"{count} numbered images")


def test_every_epoch_is_a_new_permutation_of_all_images():
    dataset = load_dataset(numbered_source(40), batch_size=8, repeat=True, seed=1)
    batches = [labels.numpy() for _, labels in dataset.take(10)]  # two epochs of 5 batches
    first, second = np.concatenate(batches[:5]), np.concatenate(batches[5:])
    assert sorted(first) == list(range(40)) and sorted(second) == list(range(40))
    assert not np.array_equal(first, second) and not np.array_equal(first, np.arange(40))
    # The arithmetic batch_records gives is what the pipeline reads.
    for step, labels in enumerate(batches):
        np.testing.assert_array_equal(labels, batch_records(40, 8, step, seed=1))


def test_resuming_at_a_batch_reads_nothing_before_it():
    source, reads = counting(image_source("fashion_mnist", "test"))
    dataset = load_dataset(
        source, batch_size=16, image_shape=(28, 28, 1), repeat=True, seed=3, skip_batches=700, cache=False
    )
    images, labels = next(iter(dataset))
    expected = batch_records(10_000, 16, 700, seed=3)
    raw_images, raw_labels, _ = load_fashion_mnist("test")
    np.testing.assert_array_equal(labels.numpy(), raw_labels[expected])
    np.testing.assert_allclose(images.numpy(), raw_images[expected] / 127.5 - 1.0, atol=1e-6)
    # Only batch 700 and the few after it that the prefetch reads ahead were decoded.
    ahead = set(np.concatenate([batch_records(10_000, 16, step, seed=3) for step in range(700, 720)]).tolist())
    assert 16 <= len(reads) < 16 * 20 and set(reads) <= ahead


def test_a_colour_folder_stays_colour_and_a_truncated_jpeg_is_named_before_training(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "photos").mkdir()
    for index in range(3):
        keras.utils.save_img(tmp_path / "photos" / f"{index}.jpg", rng.integers(0, 256, (20, 30, 3)).astype(np.uint8))
    source = image_source(str(tmp_path / "photos"))
    assert source.channels == 3 and source.image_size == (20, 30)
    images, _ = next(iter(load_dataset(source, batch_size=3, image_size=16, shuffle=False)))
    assert images.shape == (3, 16, 16, 3) and np.abs(images[..., 0] - images[..., 1]).max() > 0.1
    whole = (tmp_path / "photos" / "0.jpg").read_bytes()
    (tmp_path / "photos" / "3.jpg").write_bytes(whole[: len(whole) * 2 // 3])  # header intact, data cut
    with pytest.raises(KddpmError, match=r"3\.jpg: truncated or corrupt: its JPEG data ends early.*--skip-bad-images"):
        image_source(str(tmp_path / "photos"))
