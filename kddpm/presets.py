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

    def unet_kwargs(self, image_shape: tuple[int, int, int] | None = None) -> dict:
        """The arguments of ``kddpm.build_unet`` for this preset, for its own image shape or for
        ``image_shape`` (H, W, C): the same widths and depth, with attention at the same levels of
        the U-Net (the preset's 16x16 of a 32x32 network is 32x32 of a 64x64 one)."""
        shape = tuple(int(d) for d in (image_shape or self.image_shape))
        if len(shape) != 3 or min(shape) < 1:
            raise KddpmError(f"image_shape must be (H, W, C) with positive sizes, got {image_shape}.")
        own, new = _level_heights(self.image_shape[0], self.channel_mults), _level_heights(shape[0], self.channel_mults)
        levels = [own.index(resolution) for resolution in self.attention_resolutions]
        if len(set(new)) < len(new):
            raise KddpmError(
                f"{shape[0]}x{shape[1]} images are too small for the {self.name} preset's {len(new)} levels; give a "
                f"larger --image-size (at least {2 ** (len(new) - 1)}) or another --preset."
            )
        return {
            "image_shape": shape,
            "base_channels": self.base_channels,
            "channel_mults": self.channel_mults,
            "num_res_blocks": self.num_res_blocks,
            "attention_resolutions": tuple(new[level] for level in levels),
            "dropout": self.dropout,
            "norm_groups": self.norm_groups,
        }


# The paper's 256x256 network and training (hojonathanho/diffusion, scripts/run_celebahq.py and
# run_lsun.py, model unet2d16b2c112244): the architecture of google/ddpm-church-256 and its siblings.
_PAPER_256 = dict(
    image_shape=(256, 256, 3),
    base_channels=128,
    channel_mults=(1, 1, 2, 2, 4, 4),
    num_res_blocks=2,
    attention_resolutions=(16,),
    dropout=0.0,
    norm_groups=32,
    batch_size=64,
    learning_rate=2e-5,
    warmup_steps=5000,
    ema_decay=0.9999,
    flip=True,
    ema_warmup=False,
)

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
        Preset(
            name="color64",
            description="a 6.1M-parameter U-Net for 64x64 colour images, sized for CPU-scale runs on your own folder",
            image_shape=(64, 64, 3),
            base_channels=64,
            channel_mults=(1, 2, 2, 2),
            num_res_blocks=1,
            attention_resolutions=(16,),
            dropout=0.0,
            norm_groups=32,
            batch_size=32,
            learning_rate=2e-4,
            warmup_steps=1000,
            train_steps=100_000,
            ema_decay=0.999,
            flip=True,
        ),
        Preset(
            name="celebahq256",
            description="the paper's 113.7M-parameter 256x256 model with the original code's CelebA-HQ settings",
            **_PAPER_256,
            train_steps=500_000,
        ),
        Preset(
            name="lsun256",
            description="the same 256x256 model with the original code's LSUN settings (church: 1.2M steps)",
            **_PAPER_256,
            train_steps=1_200_000,
        ),
    )
}


def _level_heights(height: int, channel_mults: tuple[int, ...]) -> list[int]:
    """The feature-map height at each level of the U-Net: halved (rounded up, as stride-2 'same'
    convolutions do) between levels."""
    heights = [height]
    for _ in channel_mults[1:]:
        heights.append(-(-heights[-1] // 2))
    return heights


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise KddpmError(f"Unknown preset {name!r}; choose one of {', '.join(PRESETS)}.") from None
