"""kddpm: Denoising Diffusion Probabilistic Models (Ho, Jain, Abbeel 2020) in Keras 3.

Public names: ``NoiseSchedule``, ``build_unet``, ``DiffusionModel``, ``load_diffusion_model``,
``load_dataset``, ``load_fashion_mnist``, ``PRESETS``, ``KddpmError``. They are imported on
first use, so that ``kddpm``'s command line can quiet TensorFlow before TensorFlow loads.
"""

import importlib
import os

# Keras reads its backend once, at first import; kddpm is TensorFlow-only.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

__version__ = "0.1.0"

_PUBLIC = {
    "NoiseSchedule": "kddpm.schedule",
    "build_unet": "kddpm.unet",
    "DiffusionModel": "kddpm.model",
    "load_diffusion_model": "kddpm.model",
    "load_dataset": "kddpm.data",
    "load_fashion_mnist": "kddpm.data",
    "PRESETS": "kddpm.presets",
    "KddpmError": "kddpm.errors",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'kddpm' has no attribute {name!r}")
