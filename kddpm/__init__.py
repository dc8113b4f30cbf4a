"""kddpm: Denoising Diffusion Probabilistic Models (Ho, Jain, Abbeel 2020) in Keras 3.

Public names: ``NoiseSchedule``, ``build_unet``, ``DiffusionModel``, ``load_diffusion_model``,
``load_dataset``, ``load_fashion_mnist``, ``PRESETS``, ``KddpmError``. Importing the package
registers every Keras class a kddpm model is saved with, so ``keras.models.load_model`` reads
a saved model after ``import kddpm`` alone. TensorFlow's start-up log lines are hidden while it
loads (set ``TF_CPP_MIN_LOG_LEVEL`` yourself to see them).

The ``kddpm`` command imports the package without TensorFlow, so that ``kddpm --help`` answers
at once; each verb loads what it needs.
"""

import os

# Keras reads its backend once, at first import; kddpm is TensorFlow-only.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from kddpm import _startup
from kddpm.errors import KddpmError

__version__ = "0.2.0"
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
# Where each public name lives (the command line imports them on first use).
_HOMES = {
    "PRESETS": "kddpm.presets",
    "DiffusionModel": "kddpm.model",
    "NoiseSchedule": "kddpm.schedule",
    "build_unet": "kddpm.unet",
    "load_dataset": "kddpm.data",
    "load_diffusion_model": "kddpm.loading",
    "load_fashion_mnist": "kddpm.data",
}


def __getattr__(name):
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'kddpm' has no attribute {name!r}")


if not _startup.invoked_as_command_line():
    _startup.quiet_tensorflow_import()
    from kddpm.data import load_dataset, load_fashion_mnist
    from kddpm.loading import load_diffusion_model
    from kddpm.model import DiffusionModel
    from kddpm.presets import PRESETS
    from kddpm.schedule import NoiseSchedule
    from kddpm.unet import build_unet
