"""Named model and training settings, as plain data."""

from __future__ import annotations

import dataclasses

from kddpm.errors import KddpmError


@dataclasses.dataclass(frozen=True)
class Preset:
    """A U-Net size and the training settings that go with it (sampling uses kddpm.defaults)."""

    name: str
    description: str
    image_shape: tuple[int, int, int]
    base_channels: int
    channel_mults: tuple[int, ...]
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]
    dropout: float
    norm_groups: int
    batch_size: int
    learning_rate: float
    warmup_steps: int
    train_steps: int
    ema_decay: float
    flip: bool = False
    # The EMA's warm-up min(decay, (1 + n) / (10 + n)) helps short runs; the paper's runs
    # (800k steps) use the plain decay.
    ema_warmup: bool = True

    def unet_kwargs(self) -> dict:
        """The arguments of ``kddpm.build_unet`` for this preset."""
        return {
            "image_shape": self.image_shape,
            "base_channels": self.base_channels,
            "channel_mults": self.channel_mults,
            "num_res_blocks": self.num_res_blocks,
            "attention_resolutions": self.attention_resolutions,
            "dropout": self.dropout,
            "norm_groups": self.norm_groups,
        }


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            name="tiny",
            description="a 164k-parameter smoke-test model (28x28x1): checks a set-up in seconds, learns little",
            image_shape=(28, 28, 1),
            base_channels=16,
            channel_mults=(1, 2),
            num_res_blocks=1,
            attention_resolutions=(),
            dropout=0.0,
            norm_groups=4,
            batch_size=16,
            learning_rate=1e-3,
            warmup_steps=0,
            train_steps=20,
            ema_decay=0.9,
        ),
        Preset(
            name="demo",
            description="1.1M-parameter U-Net sized to train in about 12 minutes on 2 CPU cores (28x28x1)",
            image_shape=(28, 28, 1),
            base_channels=32,
            channel_mults=(1, 2, 2),
            num_res_blocks=1,
            attention_resolutions=(7,),
            dropout=0.0,
            norm_groups=8,
            batch_size=64,
            learning_rate=1e-3,
            warmup_steps=100,
            train_steps=2600,
            ema_decay=0.995,
        ),
        Preset(
            name="small",
            description="6.5M-parameter U-Net, 64 channels x (1, 2, 2) at 32x32x1 (Fashion-MNIST padded)",
            image_shape=(32, 32, 1),
            base_channels=64,
            channel_mults=(1, 2, 2),
            num_res_blocks=2,
            attention_resolutions=(16,),
            dropout=0.1,
            norm_groups=32,
            batch_size=64,
            learning_rate=2e-4,
            warmup_steps=1000,
            train_steps=50_000,
            ema_decay=0.999,
        ),
        Preset(
            name="cifar10",
            description="the paper's 35.7M-parameter CIFAR-10 model (32x32x3) with the original code's settings",
            image_shape=(32, 32, 3),
            base_channels=128,
            channel_mults=(1, 2, 2, 2),
            num_res_blocks=2,
            attention_resolutions=(16,),
            dropout=0.1,
            norm_groups=32,
            batch_size=128,
            learning_rate=2e-4,
            warmup_steps=5000,
            train_steps=800_000,
            ema_decay=0.9999,
            flip=True,
            ema_warmup=False,
        ),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise KddpmError(f"Unknown preset {name!r}; choose one of {', '.join(PRESETS)}.") from None
