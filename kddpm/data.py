"""Datasets -> ``tf.data`` pipelines of float32 images in [-1, 1].

One entry point, ``load_dataset(source, ...)``, for three kinds of source:

* ``"fashion_mnist"`` (the default): Fashion-MNIST. The 10k test split ships inside kddpm; the
  60k train split is used when found: a directory given as ``data_dir``, ``$KDDPM_FASHION_MNIST``,
  Debian's ``/usr/share/datasets/fashion-mnist`` (package ``dataset-fashion-mnist``),
  Keras' download cache, or a prepared tensorflow-datasets copy.
* ``"tfds:NAME"``: any tensorflow-datasets dataset with an ``image`` feature.
* a directory of images (PNG, JPEG, BMP, GIF) of any size, in class sub-folders or not.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from kddpm.errors import KddpmError

FASHION_MNIST = "fashion_mnist"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


# Fashion-MNIST's label names, in label order (Xiao et al. 2017).
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


@dataclasses.dataclass
class ImageSource:
    """Unbatched uint8 images [H, W, C] with int32 labels, and where they came from.

    class_names: the name of each label, in label order (Fashion-MNIST's ten, a tfds
    dataset's ClassLabel names, a folder's sub-folder names); None when the source has no
    labels (a folder without class sub-folders, a tfds dataset without a 'label' feature).
    """

    dataset: tf.data.Dataset
    description: str
    size: int | None
    class_names: list[str] | None = None


def fashion_mnist_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The directories searched for Fashion-MNIST's IDX files, in order; only ``data_dir`` if given."""
    if data_dir is not None:
        return [Path(data_dir).expanduser()]
    candidates = [os.environ.get("KDDPM_FASHION_MNIST")]
    candidates += ["/usr/share/datasets/fashion-mnist", Path.home() / ".keras/datasets/fashion-mnist"]
    return [Path(c).expanduser() for c in candidates if c]


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file (optionally gzipped) into a numpy array of its stored shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as file:
            data = file.read()
    except (OSError, EOFError) as error:
        raise KddpmError(f"Cannot read {path}: {error}; the file may be truncated, download it again.") from error
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise KddpmError(f"{path} is not an IDX file of unsigned bytes; check the Fashion-MNIST files.")
    rank = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(rank))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * rank)
    if body.size != int(np.prod(shape)):
        raise KddpmError(f"{path} holds {body.size} values, its header says {shape}; the file is truncated.")
    return body.reshape(shape)


def load_fashion_mnist(
    split: str = "train", data_dir: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray, str]:
    """Fashion-MNIST as numpy arrays: images uint8 [N, 28, 28, 1], labels uint8 [N], description.

    split 'train' uses the 60k training images where they are found (see ``fashion_mnist_dirs``
    and a prepared tensorflow-datasets copy) and otherwise the bundled 10k test split;
    split 'test' is always the bundled copy.
    """
    if split not in _FASHION_MNIST_FILES:
        raise KddpmError(f"Fashion-MNIST has splits 'train' and 'test', not {split!r}.")
    if data_dir is not None and not Path(data_dir).expanduser().is_dir():
        raise KddpmError(
            f"Fashion-MNIST directory {data_dir} does not exist; give the folder holding train-images-idx3-ubyte.gz."
        )
    if split == "train":
        for directory in fashion_mnist_dirs(data_dir):
            found = _idx_pair(directory, *_FASHION_MNIST_FILES["train"])
            if found:
                images, labels = (read_idx(p) for p in found)
                return images[..., None], labels, f"Fashion-MNIST train split ({len(images)} images, {directory})"
        if data_dir is not None:
            raise KddpmError(
                f"No train-images-idx3-ubyte(.gz) in {data_dir}; point data_dir at the Fashion-MNIST IDX files."
            )
        prepared = _tfds_fashion_mnist()
        if prepared is not None:
            return prepared
    bundled = resources.files("kddpm") / "datasets" / "fashion_mnist"
    with resources.as_file(bundled) as directory:
        images, labels = (read_idx(p) for p in _idx_pair(Path(directory), *_FASHION_MNIST_FILES["test"]))
    return images[..., None], labels, f"Fashion-MNIST test split bundled with kddpm ({len(images)} images)"


def _idx_pair(directory: Path, images_name: str, labels_name: str) -> tuple[Path, Path] | None:
    for suffix in (".gz", ""):
        images, labels = directory / (images_name + suffix), directory / (labels_name + suffix)
        if images.is_file() and labels.is_file():
            return images, labels
    return None


def _tfds_fashion_mnist() -> tuple[np.ndarray, np.ndarray, str] | None:
    """Fashion-MNIST's train split from tensorflow-datasets' cache, if prepared there (no download)."""
    import tensorflow_datasets as tfds

    data_dir = os.environ.get("TFDS_DATA_DIR", str(Path.home() / "tensorflow_datasets"))
    if not (Path(data_dir) / "fashion_mnist").is_dir():
        return None
    try:
        data = tfds.as_numpy(
            tfds.load("fashion_mnist", split="train", batch_size=-1, download=False, data_dir=data_dir)
        )
    except Exception:  # an incomplete or foreign cache: fall back to the bundled split
        return None
    return data["image"], data["label"].astype(np.uint8), f"Fashion-MNIST train split (tensorflow-datasets, {data_dir})"


def image_source(
    source: str = FASHION_MNIST,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    channels: int | None = None,
    skip_bad_images: bool = False,
) -> ImageSource:
    """The unbatched uint8 images of ``source`` (see the module docstring) with their labels.

    skip_bad_images: folders only; files that cannot be decoded are left out (and counted in
    the description) instead of raising KddpmError naming them.
    """
    if source == FASHION_MNIST:
        images, labels, description = load_fashion_mnist(split, data_dir)
        dataset = tf.data.Dataset.from_tensor_slices((images, labels.astype(np.int32)))
        return ImageSource(dataset, description, len(images), list(FASHION_MNIST_CLASSES))
    if source.startswith("tfds:"):
        return _tfds_source(source[len("tfds:") :], split, data_dir)
    path = Path(source).expanduser()
    if path.is_dir():
        return _folder_source(path, channels, skip_bad_images)
    raise KddpmError(f"Unknown dataset {source!r}: use '{FASHION_MNIST}', 'tfds:NAME' or an existing folder of images.")


def _tfds_source(name: str, split: str, data_dir) -> ImageSource:
    import tensorflow_datasets as tfds

    try:
        dataset, info = tfds.load(name, split=split, data_dir=data_dir, with_info=True)
    except Exception as error:  # tfds raises many types for unknown names and splits
        raise KddpmError(f"tensorflow-datasets could not load {name!r} split {split!r}: {error}") from error
    if "image" not in info.features:
        raise KddpmError(f"tensorflow-datasets {name!r} has no 'image' feature; kddpm needs images.")
    has_label = "label" in info.features

    def pick(example):
        label = tf.cast(example["label"], tf.int32) if has_label else tf.constant(0, tf.int32)
        return example["image"], label

    size = info.splits[split].num_examples if split in info.splits else None
    names = None
    if has_label:
        label = info.features["label"]
        names = list(getattr(label, "names", None) or [str(i) for i in range(getattr(label, "num_classes", 0))]) or None
    return ImageSource(dataset.map(pick), f"tensorflow-datasets {name} ({split})", size, names)


def _folder_source(path: Path, channels: int | None, skip_bad_images: bool = False) -> ImageSource:
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise KddpmError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) in {path}; check the folder.")
    names = [str(f) for f in files]
    # Every file is decoded once here, so that a truncated or unreadable image is named now
    # instead of failing training later with a bare graph error.
    found = _decodable_channel_counts(names)
    bad = [name for name in names if name not in found]
    skipped = ""
    if bad:
        shown = "; ".join(f"{name}: {_decode_error(name)}" for name in bad[:3]) + (" ..." if len(bad) > 3 else "")
        if not skip_bad_images:
            raise KddpmError(
                f"{len(bad)} of {len(names)} images in {path} cannot be decoded ({shown}); replace or delete "
                "them, or leave them out with --skip-bad-images (load_dataset(..., skip_bad_images=True))."
            )
        files = [f for f in files if str(f) in found]
        names = [str(f) for f in files]
        if not names:
            raise KddpmError(f"None of the images in {path} can be decoded ({shown}); check the folder.")
        skipped = f", {len(bad)} undecodable files skipped: {shown}"
    classes = sorted({f.parent.relative_to(path).as_posix() for f in files})
    label_of = {name: index for index, name in enumerate(classes)}
    labels = np.array([label_of[f.parent.relative_to(path).as_posix()] for f in files], np.int32)

    if channels is None:
        kinds = sorted({found[name] for name in names})
        if len(kinds) > 1:
            examples = ", ".join(f"{next(n for n in names if found[n] == k)} has {k}" for k in kinds)
            raise KddpmError(
                f"Images in {path} have mixed channel counts ({examples}); convert them to one "
                "format or pass channels=1 or channels=3 (--channels) to convert while loading."
            )
        channels = kinds[0]
    elif channels not in (1, 3, 4):
        raise KddpmError(f"channels must be 1, 3 or 4, got {channels}.")
    dataset = tf.data.Dataset.from_tensor_slices((names, labels)).map(
        lambda name, label: (_decode_file(name, channels), label), num_parallel_calls=tf.data.AUTOTUNE
    )
    description = f"{len(names)} images in {path} ({len(classes)} folders{skipped})"
    # Images directly in the folder have no class: the folder then has no labels to learn.
    return ImageSource(dataset, description, len(names), None if "." in classes else classes)


def _decode_file(name: tf.Tensor, channels: int = 0) -> tf.Tensor:
    return tf.io.decode_image(tf.io.read_file(name), channels=channels, expand_animations=False)


def _decodable_channel_counts(names: list[str]) -> dict[str, int]:
    """{file: channel count} for the files that decode; the others are missing from it."""
    indices = tf.data.Dataset.from_tensor_slices(np.arange(len(names), dtype=np.int32))
    counts = indices.map(
        lambda i: (i, tf.shape(_decode_file(tf.gather(names, i)))[-1]),
        num_parallel_calls=tf.data.AUTOTUNE,
    ).ignore_errors()
    return {names[int(i)]: int(count) for i, count in counts.as_numpy_iterator()}


def _decode_error(name: str) -> str:
    """Why ``name`` does not decode, in one short line."""
    try:
        _decode_file(tf.constant(name))
    except tf.errors.OpError as error:
        # TensorFlow prefixes the kernel's name in braces; the reason is what follows.
        message = re.sub(r"\{\{.*?\}\}\s*|\s*\[Op:.*$", "", error.message).strip().splitlines()
        return f"truncated or corrupt ({message[0][:100] if message else type(error).__name__})"
    return "could not be decoded"


def load_dataset(
    source: str | ImageSource = FASHION_MNIST,
    *,
    split: str = "train",
    batch_size: int = 64,
    image_shape: Sequence[int] | None = None,
    image_size: int | Sequence[int] | None = None,
    pad_to: int | Sequence[int] | None = None,
    channels: int | None = None,
    flip: bool = False,
    shuffle: bool = True,
    cache: bool = True,
    repeat: bool = False,
    drop_remainder: bool = True,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    skip_batches: int = 0,
    labels: bool = True,
    skip_bad_images: bool = False,
) -> tf.data.Dataset:
    """A batched pipeline of (images [B, H, W, C] float32 in [-1, 1], labels [B] int32).

    Args:
        source: 'fashion_mnist', 'tfds:NAME', a folder of images (see the module docstring),
            or an ``ImageSource`` already loaded by ``image_source``.
        image_shape: (H, W, C) the network expects: images are padded (when smaller, like
            28x28 Fashion-MNIST for a 32x32 network) or resized to it, and their channels
            must match (folders are converted). Overrides image_size, pad_to and channels.
        image_size: (H, W) or one int: resize to it, cropping the centre to keep the aspect
            ratio (required for folders of images of different sizes).
        pad_to: (H, W) or one int: pad with -1 (black) around the image up to this size, for
            networks whose down-sampling needs it (28x28 Fashion-MNIST -> 32x32).
        channels: folders only: convert every image to this many channels; by default all
            images must have the same count.
        flip: random horizontal flips (seeded). shuffle / cache / repeat / drop_remainder:
            the usual tf.data steps; shuffling is seeded and differs between epochs.
        data_dir: Fashion-MNIST or tensorflow-datasets directory.
        labels: False gives the images alone (an unconditional model ignores labels).
        skip_bad_images: folders only: leave out files that cannot be decoded instead of
            raising an error that names them (every file is decoded once when loading).
        skip_batches: start this many batches into the stream (resuming a run at that step:
            the images, their order and flips are those an uninterrupted run sees next).

    Under ``tf.distribute`` the batch is the global batch: each replica trains on its
    contiguous slice of it (the pipeline is sharded by data, not by file).
    """
    if isinstance(source, ImageSource):
        loaded = source
    else:
        if image_shape is not None and channels is None and Path(source).expanduser().is_dir():
            channels = int(image_shape[2])
        loaded = image_source(source, split, data_dir, channels, skip_bad_images)
    if image_shape is not None:
        image_size, pad_to = _fit_to(loaded, tuple(int(d) for d in image_shape))
    dataset = loaded.dataset
    if image_size is not None:
        size = _pair(image_size)
        dataset = dataset.map(
            lambda image, label: (_resize_uint8(image, size), label), num_parallel_calls=tf.data.AUTOTUNE
        )
    if cache:
        dataset = dataset.cache()
    if shuffle:
        dataset = dataset.shuffle(min(loaded.size or 10_000, 60_000), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()
    pad = _pair(pad_to) if pad_to is not None else None

    def to_float(position, example):
        image, label = example
        image = tf.cast(image, tf.float32) / 127.5 - 1.0
        if flip:
            # Seeded by the position in the stream: reproducible, and different every epoch.
            key = tf.stack([tf.constant(seed, tf.int64), position])
            image = tf.image.stateless_random_flip_left_right(image, seed=key)
        if pad is not None:
            image = _pad(image, pad)
        return (image, label) if labels else image

    dataset = dataset.enumerate()
    if skip_batches:
        dataset = dataset.skip(skip_batches * batch_size)
    dataset = dataset.map(to_float, num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    options = tf.data.Options()
    options.deterministic = True
    # Workers split each global batch between them (Keras rebatches, then shards by element),
    # so several workers see exactly the images one process would; file sharding would not.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)


def _fit_to(loaded: ImageSource, shape: tuple[int, int, int]):
    """(image_size, pad_to) that bring ``loaded``'s images to ``shape``; checks channels."""
    spec = loaded.dataset.element_spec[0].shape
    if spec[-1] is not None and spec[-1] != shape[2]:
        raise KddpmError(
            f"{loaded.description} has {spec[-1]}-channel images but the network expects {shape[2]}; "
            "use a model built for that many channels."
        )
    height, width = spec[0], spec[1]
    if (height, width) == shape[:2]:
        return None, None
    if height is not None and width is not None and height <= shape[0] and width <= shape[1]:
        return None, shape[:2]
    return shape[:2], None


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    size = tuple(int(s) for s in size)
    if len(size) != 2:
        raise KddpmError(f"An image size is one int or (height, width), got {size}.")
    return size


def _resize_uint8(image: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
    resized = keras.ops.image.resize(tf.cast(image, tf.float32), size, crop_to_aspect_ratio=True, antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


def _pad(image: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
    height, width = image.shape[0], image.shape[1]
    if height > size[0] or width > size[1]:
        raise KddpmError(f"Cannot pad {height}x{width} images to the smaller {size[0]}x{size[1]}.")
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    paddings = [[top, size[0] - height - top], [left, size[1] - width - left], [0, 0]]
    return tf.pad(image, paddings, constant_values=-1.0)
