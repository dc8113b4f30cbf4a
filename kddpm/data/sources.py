"""Where training images come from: a list of records and how to read record i.

Every source but a streaming tfds dataset is random-access: ``read(i)`` returns record i's image
and label inside a ``tf.data`` map, so that the pipeline (``kddpm.data.pipeline``) can shuffle
indices instead of images and read only what a worker trains on.

* Fashion-MNIST: numpy arrays in memory (47 MB for the 60k train split).
* A folder of images: the list of files, checked when the folder is listed from each file's
  header and its last bytes (so that a truncated file is named before training, without
  decoding any pixels), and decoded when read.
* tensorflow-datasets: random access through ``tfds.data_source`` where the dataset is prepared
  in the ArrayRecord format; otherwise a stream read in order (``stream``), shuffled by the
  pipeline with a bounded buffer.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tensorflow as tf

from kddpm.data.fashion_mnist import FASHION_MNIST, FASHION_MNIST_CLASSES, load_fashion_mnist
from kddpm.errors import KddpmError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
# Pillow's image modes, as the channel count kddpm trains on (alpha dropped: grey or colour).
_MODE_CHANNELS = {"1": 1, "L": 1, "LA": 1, "I": 1, "I;16": 1, "F": 1, "P": 3, "PA": 3, "RGB": 3, "RGBA": 3}
_MODE_CHANNELS.update({"CMYK": 3, "YCbCr": 3, "LAB": 3, "HSV": 3})


@dataclasses.dataclass
class ImageSource:
    """Images with int32 labels, and where they came from.

    read: index (int64 scalar tensor) -> (uint8 [H, W, C] image, int32 label), for random-access
    sources (usable inside ``tf.data`` maps); None for a stream. stream: the (image, label)
    elements in their fixed order, for sources without random access. channels: the images'
    channel count (1 or 3) as read. image_size: (H, W) when every image has it (known without
    decoding), else None. class_names: the name of each label, in label order; None when the
    source has no labels. files: a folder's files, in record order (to name a bad one).
    """

    description: str
    size: int | None
    class_names: list[str] | None = None
    channels: int | None = None
    image_size: tuple[int, int] | None = None
    read: Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]] | None = None
    stream: tf.data.Dataset | None = None
    files: list[str] | None = None
    arrays: tuple[np.ndarray, np.ndarray] | None = None  # in memory: (uint8 images [N, H, W, C], int32 labels [N])

    @property
    def random_access(self) -> bool:
        return self.read is not None

    @property
    def dataset(self) -> tf.data.Dataset:
        """The unbatched (image, label) elements in record order (all of them, once)."""
        if self.stream is not None:
            return self.stream
        return tf.data.Dataset.range(self.size).map(self.read, num_parallel_calls=tf.data.AUTOTUNE)


def in_memory_source(images: np.ndarray, labels: np.ndarray, description: str, class_names=None) -> ImageSource:
    """A source over uint8 images [N, H, W, C] and labels [N] held in memory."""
    images = np.ascontiguousarray(images, np.uint8)
    labels = np.asarray(labels, np.int32)
    images_tensor, labels_tensor = tf.constant(images), tf.constant(labels)

    def read(index):
        return tf.gather(images_tensor, index), tf.gather(labels_tensor, index)

    return ImageSource(
        description,
        len(images),
        class_names,
        channels=int(images.shape[-1]),
        image_size=(int(images.shape[1]), int(images.shape[2])),
        read=read,
        arrays=(images, labels),
    )


def image_source(
    source: str = FASHION_MNIST,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    channels: int | None = None,
    skip_bad_images: bool = False,
) -> ImageSource:
    """The images of ``source``: 'fashion_mnist', 'tfds:NAME' or a folder (see the module docstring).

    channels: folders only: convert every image to 1 or 3 channels; by default the count comes
    from the files (mixed grey and colour is an error naming the --channels flag).
    skip_bad_images: folders only: leave out files whose header or ending is broken (counted in
    the description) instead of raising KddpmError naming them.
    """
    if channels is not None and channels not in (1, 3):
        raise KddpmError(f"channels must be 1 (grey) or 3 (colour), got {channels} (--channels).")
    if source == FASHION_MNIST:
        images, labels, description = load_fashion_mnist(split, data_dir)
        return in_memory_source(images, labels, description, list(FASHION_MNIST_CLASSES))
    if source.startswith("tfds:"):
        return _tfds_source(source[len("tfds:") :], split, data_dir)
    path = Path(source).expanduser()
    if path.is_dir():
        return folder_source(path, channels, skip_bad_images)
    raise KddpmError(f"Unknown dataset {source!r}: use '{FASHION_MNIST}', 'tfds:NAME' or an existing folder of images.")


# --- Folders -------------------------------------------------------------------------------------


def folder_source(path: Path, channels: int | None = None, skip_bad_images: bool = False) -> ImageSource:
    """A folder of images (class sub-folders optional), listed and checked, decoded when read."""
    files = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise KddpmError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) in {path}; check the folder.")
    return _checked_files(files, path, channels, skip_bad_images)


def files_source(paths, channels: int | None = None) -> ImageSource:
    """Image files and folders of them, in the order given (a folder's files sorted), checked as a
    folder's are; unlabelled. For the images a user edits (``kddpm img2img --input ...``)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            if not found:
                raise KddpmError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) in {path}; check the folder.")
            files += found
        elif path.is_file():
            files.append(str(path))
        else:
            raise KddpmError(f"No image at {path}; give image files or folders of them.")
    source = _checked_files(files, None, channels, False)
    return dataclasses.replace(source, description=f"{len(files)} images", class_names=None)


def _checked_files(files: list[str], path: Path | None, channels: int | None, skip_bad_images: bool) -> ImageSource:
    """A source over ``files``, each checked from its header and end (see ``inspect_image``);
    path: the folder they are in (labels are its sub-folders), or None (no labels)."""
    where = str(path) if path else "the files given"
    # Headers and file endings only: cheap enough for hundreds of thousands of files.
    with ThreadPoolExecutor(max_workers=8) as pool:
        checked = list(pool.map(inspect_image, files, chunksize=256))
    bad = [(name, problem) for name, (_, _, problem) in zip(files, checked) if problem]
    skipped = ""
    if bad:
        shown = "; ".join(f"{name}: {problem}" for name, problem in bad[:3]) + (" ..." if len(bad) > 3 else "")
        if not skip_bad_images:
            raise KddpmError(
                f"{len(bad)} of {len(files)} images in {where} cannot be decoded ({shown}); replace or delete "
                "them, or leave them out with --skip-bad-images (load_dataset(..., skip_bad_images=True))."
            )
        keep = [index for index, (_, _, problem) in enumerate(checked) if not problem]
        if not keep:
            raise KddpmError(f"None of the images in {where} can be decoded ({shown}); check the folder.")
        files, checked = [files[i] for i in keep], [checked[i] for i in keep]
        skipped = f", {len(bad)} undecodable {'file' if len(bad) == 1 else 'files'} skipped: {shown}"
    counts = [found for found, _, _ in checked]
    if channels is None:
        kinds = sorted(set(counts))
        if len(kinds) > 1:
            examples = ", ".join(
                f"{files[counts.index(k)]} is {'grey' if k == 1 else 'colour'} ({k} channel{'s' if k > 1 else ''})"
                for k in kinds
            )
            raise KddpmError(
                f"Images in {where} mix grey and colour ({examples}); choose one with --channels 1 or --channels 3 "
                "(load_dataset(..., channels=...)), which converts them while reading."
            )
        channels = kinds[0]
    sizes = {size for _, size, _ in checked}
    parents = [Path(name).parent.relative_to(path).as_posix() if path else "." for name in files]
    classes = sorted(set(parents))
    label_of = {name: index for index, name in enumerate(classes)}
    labels = np.array([label_of[parent] for parent in parents], np.int32)
    files_tensor, labels_tensor = tf.constant(files), tf.constant(labels)

    def read(index):
        return decode_file(tf.gather(files_tensor, index), channels), tf.gather(labels_tensor, index)

    folders = len(classes)
    description = f"{len(files)} images in {path} ({folders} {'folder' if folders == 1 else 'folders'}{skipped})"
    return ImageSource(
        description,
        len(files),
        # Images directly in the folder have no class: the folder then has no labels to learn.
        None if "." in classes else classes,
        channels=channels,
        image_size=next(iter(sizes)) if len(sizes) == 1 else None,
        read=read,
        files=files,
    )


def inspect_image(name: str) -> tuple[int, tuple[int, int], str | None]:
    """(channels, (height, width), problem or None) of an image file, from its header and its end.

    Pillow reads the header without decoding pixels; the last bytes show a file cut short (a
    PNG ends with its IEND chunk, a JPEG with the EOI marker, which its compressed data cannot
    contain, a GIF with its trailer, a BMP is as long as its header says).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(name) as image:
            mode, (width, height), kind = image.mode, image.size, image.format
    except (UnidentifiedImageError, OSError, ValueError) as error:
        return 0, (0, 0), f"truncated or corrupt: not a readable image ({str(error).splitlines()[0][:80]})"
    try:
        size = os.path.getsize(name)
        with open(name, "rb") as file:
            file.seek(max(0, size - 1024))
            tail = file.read()
            file.seek(2)
            declared = int.from_bytes(file.read(4), "little")
    except OSError as error:
        return 0, (0, 0), f"unreadable ({error.strerror})"
    truncated = (
        (kind == "PNG" and b"IEND" not in tail)
        or (kind == "JPEG" and b"\xff\xd9" not in tail)
        or (kind == "GIF" and not tail.rstrip(b"\0").endswith(b";"))
        or (kind == "BMP" and size < declared)
    )
    if truncated:
        return 0, (0, 0), f"truncated or corrupt: its {kind} data ends early"
    return _MODE_CHANNELS.get(mode, 3), (height, width), None


def decode_file(name: tf.Tensor, channels: int) -> tf.Tensor:
    """The image file ``name`` as uint8 [H, W, channels]: alpha dropped, grey and colour converted."""
    image = tf.io.decode_image(tf.io.read_file(name), expand_animations=False)
    return to_channels(image, channels)


def to_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
    """uint8 [H, W, 1..4] -> [H, W, channels] (1 or 3): an alpha channel is dropped, then grey and
    colour are converted as TensorFlow's rgb_to_grayscale and grayscale_to_rgb do."""
    count = tf.shape(image)[-1]
    image = tf.cond(tf.equal(count % 2, 0), lambda: image[..., : count - 1], lambda: image)  # LA, RGBA
    count = tf.shape(image)[-1]
    if channels == 1:
        image = tf.cond(tf.equal(count, 3), lambda: tf.image.rgb_to_grayscale(image), lambda: image[..., :1])
    else:
        image = tf.cond(tf.equal(count, 1), lambda: tf.image.grayscale_to_rgb(image), lambda: image[..., :3])
    return tf.ensure_shape(image, [None, None, channels])


# --- tensorflow-datasets ---------------------------------------------------------------------------


def _tfds_source(name: str, split: str, data_dir) -> ImageSource:
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
        info = builder.info
    except Exception as error:  # tfds raises many types for unknown names
        raise KddpmError(f"tensorflow-datasets could not load {name!r}: {error}") from error
    if "image" not in info.features:
        raise KddpmError(f"tensorflow-datasets {name!r} has no 'image' feature; kddpm needs images.")
    has_label = "label" in info.features
    names = None
    if has_label:
        label = info.features["label"]
        names = list(getattr(label, "names", None) or [str(i) for i in range(getattr(label, "num_classes", 0))]) or None
    shape = info.features["image"].shape
    channels = int(shape[-1]) if shape[-1] else None
    image_size = (int(shape[0]), int(shape[1])) if shape[0] and shape[1] else None
    size = info.splits[split].num_examples if split in info.splits else None
    try:
        records = tfds.data_source(name, split=split, data_dir=data_dir)
    except Exception:  # not prepared as ArrayRecord (or no random access in this tfds): stream it
        records = None
    if records is not None:
        return ImageSource(
            f"tensorflow-datasets {name} ({split}, random access)",
            len(records),
            names,
            channels=channels,
            image_size=image_size,
            read=_random_access_reader(records, has_label, channels),
        )
    try:
        dataset = tfds.load(name, split=split, data_dir=data_dir)
    except Exception as error:  # tfds raises many types for unknown names and splits
        raise KddpmError(f"tensorflow-datasets could not load {name!r} split {split!r}: {error}") from error

    def pick(example):
        label = tf.cast(example["label"], tf.int32) if has_label else tf.constant(0, tf.int32)
        return example["image"], label

    return ImageSource(
        f"tensorflow-datasets {name} ({split}, streamed)",
        size,
        names,
        channels=channels,
        image_size=image_size,
        stream=dataset.map(pick),
    )


def _random_access_reader(records, has_label: bool, channels: int | None):
    """read(i) through a tfds data source (Python __getitem__ inside tf.data)."""

    def fetch(index):
        record = records[int(index)]
        return np.asarray(record["image"], np.uint8), np.int32(record["label"] if has_label else 0)

    def read(index):
        image, label = tf.numpy_function(fetch, [index], (tf.uint8, tf.int32), stateful=False)
        image = tf.ensure_shape(image, [None, None, channels])
        return image, tf.ensure_shape(label, [])

    return read
