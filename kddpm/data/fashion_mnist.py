"""Fashion-MNIST (Xiao et al. 2017): the bundled 10k test split, and the 60k train split where it is found.

The train split is searched in ``data_dir``, ``$KDDPM_FASHION_MNIST``, Debian's
``/usr/share/datasets/fashion-mnist`` (package ``dataset-fashion-mnist``), Keras' download cache,
and a prepared tensorflow-datasets copy; nothing is downloaded.
"""

from __future__ import annotations

import gzip
import os
from importlib import resources
from pathlib import Path

import numpy as np

from kddpm.errors import KddpmError

FASHION_MNIST = "fashion_mnist"
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
