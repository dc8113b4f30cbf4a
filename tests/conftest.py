import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import pytest

from kddpm import build_unet


def tiny_unet(image_shape=(8, 8, 1), **overrides):
    """A U-Net small enough that a train step takes milliseconds."""
    settings = dict(
        image_shape=image_shape,
        base_channels=8,
        channel_mults=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(4,),
        dropout=0.0,
        norm_groups=4,
    )
    settings.update(overrides)
    return build_unet(**settings)


@pytest.fixture
def seeded():
    keras.utils.set_random_seed(1234)
