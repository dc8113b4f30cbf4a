"""Datasets -> ``tf.data`` pipelines of float32 images in [-1, 1].

One entry point, ``load_dataset(source, ...)``, for three kinds of source (``kddpm.data.sources``):

* ``"fashion_mnist"`` (the default): Fashion-MNIST; the 10k test split ships inside kddpm, the
  60k train split is used when found (``kddpm.data.fashion_mnist``).
* ``"tfds:NAME"``: any tensorflow-datasets dataset with an ``image`` feature.
* a directory of images (PNG, JPEG, BMP, GIF) of any size, in class sub-folders or not.

The pipeline (``kddpm.data.pipeline``) shuffles indices, not images, reads only what each worker
trains on, and resumes at any batch without reading the ones before it.
"""

from kddpm.data.fashion_mnist import (
    FASHION_MNIST,
    FASHION_MNIST_CLASSES,
    fashion_mnist_dirs,
    load_fashion_mnist,
    read_idx,
)
from kddpm.data.pipeline import (
    CACHE_BUDGET_BYTES,
    STREAM_SHUFFLE_BUFFER,
    batch_records,
    distributed_dataset,
    load_dataset,
)
from kddpm.data.sources import IMAGE_EXTENSIONS, ImageSource, files_source, image_source, inspect_image

__all__ = [
    "CACHE_BUDGET_BYTES",
    "FASHION_MNIST",
    "FASHION_MNIST_CLASSES",
    "IMAGE_EXTENSIONS",
    "STREAM_SHUFFLE_BUFFER",
    "ImageSource",
    "batch_records",
    "distributed_dataset",
    "fashion_mnist_dirs",
    "files_source",
    "image_source",
    "inspect_image",
    "load_dataset",
    "load_fashion_mnist",
    "read_idx",
]
