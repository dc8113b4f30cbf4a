"""kddpm: Denoising Diffusion Probabilistic Models (Ho, Jain, Abbeel 2020) in Keras 3.

Public names: ``NoiseSchedule``, ``build_unet``, ``DiffusionModel``, ``load_diffusion_model``,
``load_dataset``, ``load_fashion_mnist``, ``PRESETS``, ``KddpmError``. Importing the package
registers every Keras class a kddpm model is saved with, so ``keras.models.load_model`` reads
a saved model after ``import kddpm`` alone.
"""

import os

# Keras reads its backend once, at first import; kddpm is TensorFlow-only.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from kddpm import _startup

if _startup.invoked_as_command_line() and not _startup.verbose_requested():
    _startup.quiet_tensorflow_import()

from kddpm.data import load_dataset, load_fashion_mnist
from kddpm.errors import KddpmError
from kddpm.loading import load_diffusion_model
from kddpm.model import DiffusionModel
from kddpm.presets import PRESETS
from kddpm.schedule import NoiseSchedule
from kddpm.unet import build_unet

__version__ = "0.1.0"
__all__ = [
    "PRESETS",
    "DiffusionModel",
    "KddpmError",
    "NoiseSchedule",
    "build_unet",
    "load_dataset",
    "load_diffusion_model",
    "load_fashion_mnist",
]
