"""The input pipeline: indices are shuffled, not images, and each worker reads only its share.

For a random-access source of N records and a global batch of G images, epoch e's order is a
seeded permutation of the records (``tf.random.experimental.index_shuffle``, a Philox-based
bijection keyed by (seed, e), computed per index: nothing of size N is built), and global batch
n is positions [b G, (b + 1) G) of epoch e = n // B's order, b = n % B, B = N // G batches an
epoch. Then:

* a perfect shuffle, with memory bounded by the prefetch depth, whatever N;
* a worker of W reads and decodes only its contiguous slice [w G / W, (w + 1) G / W) of each
  global batch, and its replicas their contiguous parts of that, so one process, N replicas and
  N workers train on exactly the same images (the train step keys every draw by the example's
  position in the global batch);
* resuming at batch n is arithmetic: nothing before it is read;
* a random flip is keyed by (seed, the example's position in the whole stream).

Sources without random access (tfds datasets not prepared as ArrayRecord) are read as a stream,
shuffled with a buffer of ``STREAM_SHUFFLE_BUFFER`` images, skipped through on resume, and read
in full by every worker, which keeps its slice of each global batch.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from kddpm.data.fashion_mnist import FASHION_MNIST
from kddpm.data.sources import ImageSource, image_source, in_memory_source, to_channels
from kddpm.errors import KddpmError
from kddpm.streams import fold_in, seed_pair

# Decoded images are kept in memory when all of them fit in this (Fashion-MNIST's 60k train
# images take 47 MB; 256x256 colour images cross it at 1,366).
CACHE_BUDGET_BYTES = 256 * 2**20
STREAM_SHUFFLE_BUFFER = 10_000


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
    input_context: tf.distribute.InputContext | None = None,
) -> tf.data.Dataset:
    """A batched pipeline of (images [B, H, W, C] float32 in [-1, 1], labels [B] int32).

    Args:
        source: 'fashion_mnist', 'tfds:NAME', a folder of images (``kddpm.data.image_source``),
            or an ``ImageSource`` already loaded.
        image_shape: (H, W, C) the network expects: images are padded (when smaller, like
            28x28 Fashion-MNIST for a 32x32 network) or resized to it. Its channel count must be
            the source's unless ``channels`` is given (a colour folder is never made grey
            silently). Overrides image_size and pad_to.
        image_size: (H, W) or one int: resize to it, cropping the centre to keep the aspect
            ratio (images of any sizes).
        pad_to: (H, W) or one int: pad with -1 (black) around the image up to this size.
        channels: 1 or 3: convert every image to it while reading (grey <-> colour, alpha dropped).
        flip: random horizontal flips, keyed by the image's position in the stream.
        shuffle: a new seeded permutation every epoch (else the records' order).
        cache: keep the decoded images in memory when all of them fit ``CACHE_BUDGET_BYTES``
            (Fashion-MNIST is in memory anyway); otherwise each image is read when used.
        repeat: endless epochs; drop_remainder: batches of exactly batch_size (each epoch then
            leaves out N mod batch_size images, other ones every epoch).
        data_dir: Fashion-MNIST or tensorflow-datasets directory.
        skip_batches: start this many batches into the stream (resuming a run at that step:
            the images, their order and flips are those an uninterrupted run sees next).
        labels: False gives the images alone (an unconditional model ignores labels).
        skip_bad_images: folders only: leave out files whose header or end is broken instead of
            raising an error naming them.
        input_context: under ``strategy.distribute_datasets_from_function``: this worker's share
            of each global batch (batch_size), as per-replica batches (see the module docstring).

    Without input_context the batch is the global batch; Keras splits it between local replicas.
    """
    loaded = (
        source if isinstance(source, ImageSource) else image_source(source, split, data_dir, channels, skip_bad_images)
    )
    fit = _Fit.of(loaded, image_shape, image_size, pad_to, channels)
    layout = _Layout(batch_size, loaded.size, input_context, repeat, drop_remainder)
    small = fit.decoded_shape is not None and loaded.size * int(np.prod(fit.decoded_shape)) <= CACHE_BUDGET_BYTES
    if cache and small and loaded.random_access and loaded.arrays is None:
        loaded, fit = _decoded_in_memory(loaded, fit), fit.after_caching()
    key = seed_pair(seed)

    def finish(position, image, label):
        image = tf.cast(fit.decoded(image), tf.float32) / 127.5 - 1.0
        if flip:
            image = tf.image.stateless_random_flip_left_right(image, seed=fold_in(key, position))
        if fit.pad_to is not None:
            image = _pad(image, fit.pad_to)
        return (image, label) if labels else image

    if loaded.random_access:
        dataset = layout.examples(skip_batches).map(
            lambda position, record: (position, *loaded.read(_shuffled(record, layout, key, shuffle))),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    else:
        dataset = _streamed(loaded, layout, shuffle, seed, skip_batches)
    dataset = dataset.map(finish, num_parallel_calls=tf.data.AUTOTUNE)
    if layout.distributed and not loaded.random_access:
        # Every worker reads the whole stream and keeps its contiguous slice of each global batch.
        share = slice(layout.offset, layout.offset + layout.local)
        dataset = dataset.batch(layout.global_batch, drop_remainder=True)
        dataset = dataset.map(lambda *batch: tuple(x[share] for x in batch) if len(batch) > 1 else batch[0][share])
        dataset = dataset.unbatch()
    dataset = dataset.batch(layout.batch, drop_remainder=drop_remainder or layout.distributed)
    options = tf.data.Options()
    options.deterministic = True
    # Keras splits a single pipeline's global batches between local replicas; several workers go
    # through distribute_datasets_from_function (input_context) and read their own shares.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)


@dataclasses.dataclass(frozen=True)
class _Fit:
    """How a source's images are brought to the network's shape: channels converted to
    ``channels`` (None: as read), resized (centre crop, antialiased) to ``resize_to``, then,
    as floats, padded with -1 to ``pad_to``."""

    channels: int | None
    resize_to: tuple[int, int] | None
    pad_to: tuple[int, int] | None
    decoded_shape: tuple[int, int, int] | None  # after conversion and resizing (None: varies)

    @classmethod
    def of(cls, loaded: ImageSource, image_shape, image_size, pad_to, channels) -> _Fit:
        wanted = channels
        if image_shape is not None:
            image_shape = tuple(int(d) for d in image_shape)
            if len(image_shape) != 3:
                raise KddpmError(f"image_shape must be (H, W, C), got {image_shape}.")
            if channels is None and loaded.channels not in (None, image_shape[2]):
                kinds = {1: "grey (1 channel)", 3: "colour (3 channels)"}
                raise KddpmError(
                    f"{loaded.description} holds {kinds.get(loaded.channels, loaded.channels)} images but the "
                    f"network expects {image_shape[2]} channels; build the model for the data (--channels "
                    f"{loaded.channels}) or convert the images while reading (--channels {image_shape[2]})."
                )
            wanted = image_shape[2]
        convert = wanted if wanted is not None and wanted != loaded.channels else None
        count = wanted or loaded.channels
        resize, pad, size = None, None, loaded.image_size
        if image_shape is not None:
            target = image_shape[:2]
            if size is not None and size != target and size[0] <= target[0] and size[1] <= target[1]:
                pad = target  # 28x28 Fashion-MNIST in a 32x32 network: padded, not stretched
            elif size != target:
                resize, size = target, target
        else:
            if image_size is not None:
                resize = size = _pair(image_size)
            if pad_to is not None:
                pad = _pair(pad_to)
        decoded = (*size, count) if size is not None and count else None
        return cls(convert, resize, pad, decoded)

    def after_caching(self) -> _Fit:
        """The same fit for images already converted and resized (held in memory)."""
        return dataclasses.replace(self, channels=None, resize_to=None)

    def decoded(self, image: tf.Tensor) -> tf.Tensor:
        """uint8 [h, w, c] as read -> uint8 [H, W, C] before padding."""
        if self.channels is not None:
            image = to_channels(image, self.channels)
        if self.resize_to is not None:
            target = self.resize_to
            image = tf.cond(
                tf.reduce_all(tf.equal(tf.shape(image)[:2], target)),
                lambda: image,
                lambda: _resize_uint8(image, target),
            )
            image = tf.ensure_shape(image, [*target, None])
        return image


def batch_records(size: int, batch_size: int, step: int, seed: int = 0, shuffle: bool = True) -> np.ndarray:
    """The record indices [batch_size] of global batch ``step`` (repeated, drop_remainder layout):
    what the pipeline reads for that step, computed without reading anything."""
    per_epoch = size // batch_size
    epoch, index = divmod(int(step), per_epoch)
    positions = tf.range(index * batch_size, (index + 1) * batch_size, dtype=tf.int64)
    if not shuffle:
        return positions.numpy()
    key = fold_in(seed_pair(seed), epoch + 1)
    return np.array([int(_index_shuffle(position, key, size)) for position in positions.numpy()])


def distributed_dataset(strategy: tf.distribute.Strategy, source: str | ImageSource, batch_size: int, **kwargs):
    """``load_dataset`` under ``strategy``: each worker builds the pipeline of its own share of
    every global batch of ``batch_size`` (``strategy.distribute_datasets_from_function``)."""
    return strategy.distribute_datasets_from_function(
        lambda context: load_dataset(source, batch_size=batch_size, input_context=context, **kwargs)
    )


class _Layout:
    """Which examples of the stream this pipeline reads, in which order, in what batches."""

    def __init__(self, global_batch: int, size: int | None, context, repeat: bool, drop_remainder: bool):
        self.global_batch = int(global_batch)
        self.size = size
        self.repeat = repeat
        self.distributed = context is not None
        workers = context.num_input_pipelines if context else 1
        worker = context.input_pipeline_id if context else 0
        replicas = context.num_replicas_in_sync if context else 1
        if self.global_batch % replicas:
            raise KddpmError(
                f"The global batch of {self.global_batch} must divide evenly over {replicas} replicas (--batch-size)."
            )
        self.local = self.global_batch // workers
        self.offset = worker * self.local
        # Keras splits a single pipeline's global batches itself; each worker of several emits
        # per-replica batches, in replica order (they are dealt to its replicas in turn).
        self.batch = self.global_batch // replicas if self.distributed else self.global_batch
        if size is not None:
            full = size // self.global_batch
            self.batches_per_epoch = full if drop_remainder or self.distributed else -(-size // self.global_batch)
            if self.batches_per_epoch < 1:
                raise KddpmError(
                    f"The data holds {size} images, fewer than one batch of {self.global_batch}; give a smaller "
                    "--batch-size or more images."
                )

    def examples(self, skip_batches: int) -> tf.data.Dataset:
        """(position in the stream, position in its epoch's order) of this pipeline's examples."""
        start = skip_batches * self.local
        if self.repeat:
            counter = tf.data.Dataset.counter(start)
        else:
            counter = tf.data.Dataset.range(start, self.batches_per_epoch * self.local)
        local, total, per_epoch = self.local, self.global_batch, self.batches_per_epoch
        offset, size = self.offset, self.size

        def place(k):
            step, j = k // local, k % local
            position = step * total + offset + j
            epoch_position = (step % per_epoch) * total + offset + j
            return position, tf.stack([step // per_epoch, epoch_position])

        dataset = counter.map(place)
        if not self.repeat and self.batches_per_epoch * total > size:  # the last, partial batch
            dataset = dataset.filter(lambda position, record: record[1] < size)
        return dataset


def _shuffled(record: tf.Tensor, layout: _Layout, key: tf.Tensor, shuffle: bool) -> tf.Tensor:
    """The record index at [epoch, position in the epoch's order]: a permutation keyed by (seed, epoch)."""
    epoch, position = record[0], record[1]
    if not shuffle:
        return position
    return _index_shuffle(position, fold_in(key, epoch + 1), layout.size)


def _index_shuffle(position, key: tf.Tensor, size: int) -> tf.Tensor:
    """Position ``position`` of the permutation of [0, size) keyed by ``key`` (Philox-based,
    computed for this index alone)."""
    return tf.random.experimental.index_shuffle(position, key, size - 1)


def _streamed(loaded: ImageSource, layout: _Layout, shuffle: bool, seed: int, skip_batches: int) -> tf.data.Dataset:
    """(position, image, label) of a stream: shuffled with a bounded buffer, skipped through on resume."""
    dataset = loaded.stream
    if shuffle:
        dataset = dataset.shuffle(STREAM_SHUFFLE_BUFFER, seed=seed, reshuffle_each_iteration=True)
    if layout.repeat:
        dataset = dataset.repeat()
    dataset = dataset.enumerate().skip(skip_batches * layout.global_batch)
    return dataset.map(lambda position, example: (position, *example))


def _decoded_in_memory(loaded: ImageSource, fit: _Fit) -> ImageSource:
    """The source's images read once, converted and resized, and held as arrays."""
    dataset = tf.data.Dataset.range(loaded.size).map(
        lambda i: (lambda image, label: (fit.decoded(image), label))(*loaded.read(i)),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    images, labels = [], []
    for image_batch, label_batch in dataset.batch(256):
        images.append(image_batch.numpy())
        labels.append(label_batch.numpy())
    cached = in_memory_source(np.concatenate(images), np.concatenate(labels), loaded.description, loaded.class_names)
    return dataclasses.replace(cached, files=loaded.files)


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
