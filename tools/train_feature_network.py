#!/usr/bin/env python3
"""Trains the Fashion-MNIST feature network kddpm ships (kddpm/assets/fashion_mnist_features.keras).

    python tools/train_feature_network.py   # needs the 60k train split (apt-get install dataset-fashion-mnist)

The architecture is ``kddpm.features.fashion_mnist_classifier``. Training is seeded and runs with
TensorFlow's op determinism, so the same machine and versions give the same file. It trains on
the 60k train split only (the 10k test split measures it; the test suite asserts >= 91%).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np
import tensorflow as tf

from kddpm.data import load_fashion_mnist
from kddpm.features import FASHION_MNIST_FEATURES, fashion_mnist_classifier

SEED = 0
EPOCHS = 12
BATCH = 128


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parents[1] / "kddpm" / "assets" / FASHION_MNIST_FEATURES))
    parser.add_argument("--data-dir", help="the folder of Fashion-MNIST's IDX files (default: where kddpm finds them)")
    args = parser.parse_args(argv)
    keras.utils.set_random_seed(SEED)
    tf.config.experimental.enable_op_determinism()
    images, labels, description = load_fashion_mnist("train", args.data_dir)
    if len(images) != 60_000:
        print(f"error: the 60k train split is needed, found {description}", file=sys.stderr)
        return 2
    test_images, test_labels, _ = load_fashion_mnist("test")
    model = fashion_mnist_classifier()
    schedule = keras.optimizers.schedules.CosineDecay(1e-3, decay_steps=EPOCHS * (60_000 // BATCH))
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    # Random shifts of up to 2 pixels and horizontal flips: garments stay garments.
    augment = keras.Sequential(
        [keras.layers.RandomTranslation(0.07, 0.07, seed=SEED), keras.layers.RandomFlip("horizontal", seed=SEED)]
    )
    data = (
        tf.data.Dataset.from_tensor_slices((images.astype(np.float32), labels.astype(np.int32)))
        .shuffle(60_000, seed=SEED)
        .batch(BATCH)
        .map(lambda x, y: (augment(x, training=True), y))
        .prefetch(tf.data.AUTOTUNE)
    )
    started = time.time()
    model.fit(data, epochs=EPOCHS, verbose=2)
    _, accuracy = model.evaluate(test_images.astype(np.float32), test_labels.astype(np.int32), verbose=0)
    shipped = fashion_mnist_classifier()  # without the optimizer's state: the file stays small
    shipped.set_weights(model.get_weights())
    shipped.save(args.out)
    print(
        f"Test accuracy {accuracy:.4f} after {time.time() - started:.0f} s; wrote {args.out} "
        f"({Path(args.out).stat().st_size / 1e6:.1f} MB)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
