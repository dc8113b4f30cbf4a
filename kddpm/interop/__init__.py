"""The diffusers format: load the paper's published checkpoints, and write kddpm models back.

diffusers stores a DDPM as a ``UNet2DModel`` (``config.json`` + safetensors weights) and a
``DDPMScheduler`` config. The DDPM family of that U-Net (time_embedding_type 'positional',
freq_shift 1, flip_sin_to_cos false, downsample_padding 0, single-head attention) is the
paper's network, which is kddpm's ``build_unet``; this module maps one onto the other:

- names: kddpm names every layer after its place (``down_1_res_0_conv1``), diffusers its
  parameters (``down_blocks.1.resnets.0.conv1.weight``); up level l is diffusers' up block
  L - 1 - l.
- layouts: PyTorch convolutions are [out, in, kh, kw], Keras' [kh, kw, in, out]; PyTorch linear
  weights are [out, in], Keras' Dense kernels [in, out]; GroupNorm's weight/bias are gamma/beta.
- padding: diffusers pads (0, 1, 0, 1) before its stride-2 convolutions when
  downsample_padding is 0, which is TensorFlow's "same" padding.

Weights are read and written with safetensors' numpy API; neither torch nor diffusers is needed.
"""

from kddpm.interop.files import from_diffusers, to_diffusers
from kddpm.interop.scheduler import diffusers_scheduler_config, schedule_from_config
from kddpm.interop.unet import unet_architecture, unet_kwargs_from_config

__all__ = [
    "diffusers_scheduler_config",
    "from_diffusers",
    "schedule_from_config",
    "to_diffusers",
    "unet_architecture",
    "unet_kwargs_from_config",
]
