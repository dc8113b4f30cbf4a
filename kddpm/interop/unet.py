"""The U-Net side of the diffusers format: UNet2DModel's config <-> build_unet's arguments, and
parameter names and layouts <-> kddpm's layers.

kddpm names every layer after its place (``down_1_res_0_conv1``), diffusers its parameters
(``down_blocks.1.resnets.0.conv1.weight``); up level l is diffusers' up block L - 1 - l.
PyTorch convolutions are [out, in, kh, kw], Keras' [kh, kw, in, out]; PyTorch linear weights
are [out, in], Keras' Dense kernels [in, out]; GroupNorm's weight/bias are gamma/beta.
"""

from __future__ import annotations

import re
from typing import Any

import keras
import numpy as np

from kddpm.errors import KddpmError
from kddpm.unet import ExampleDropout, GroupNorm, build_unet

DIFFUSERS_VERSION = "0.42.1"  # the release whose layout the fixtures and to_diffusers follow
# UNet2DModel's defaults (diffusers 0.42): a config that leaves a field out means these.
_UNET_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896],
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_train_timesteps": None,
}
# The values the paper's network has; anything else is a network kddpm does not build.
_UNET_REQUIRED: dict[str, Any] = {
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "freq_shift": 1,
    "flip_sin_to_cos": False,
    "mid_block_type": "UNetMidBlock2D",
    "mid_block_scale_factor": 1,
    "downsample_padding": 0,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "act_fn": "silu",
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
}
# Fields that do not change the network (bookkeeping, or what the training used).
_UNET_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "num_train_timesteps"}
# The attention parameter names of diffusers before 0.14, which the Hub's google/ddpm-* files may use.
_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
# kddpm layer-name suffix -> diffusers module name, for residual and attention blocks.
_RES_PARTS = {
    "norm1": "norm1",
    "conv1": "conv1",
    "time": "time_emb_proj",
    "norm2": "norm2",
    "conv2": "conv2",
    "shortcut": "conv_shortcut",
}
_ATTN_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"}
_FIXED_NAMES = {
    "conv_in": "conv_in",
    "time_dense_0": "time_embedding.linear_1",
    "time_dense_1": "time_embedding.linear_2",
    "norm_out": "conv_norm_out",
    "eps": "conv_out",
}


def unet_kwargs_from_config(config: dict[str, Any]) -> dict[str, Any]:
    """``build_unet`` keyword arguments for a diffusers UNet2DModel config, or KddpmError naming
    the first field kddpm's U-Net cannot express."""
    name = config.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise KddpmError(f"_class_name is {name!r}; kddpm converts UNet2DModel (the DDPM U-Net) only.")
    unknown = sorted(set(config) - set(_UNET_DEFAULTS) - _UNET_IGNORED)
    if unknown:
        raise KddpmError(
            f"UNet2DModel config field {unknown[0]} = {config[unknown[0]]!r} is unknown to kddpm, which cannot tell "
            "whether it changes the network; remove it if it is the default."
        )
    c = {**_UNET_DEFAULTS, **config}
    for field, wanted in _UNET_REQUIRED.items():
        if c[field] != wanted:
            raise KddpmError(f"{field} = {c[field]!r} is not supported: the DDPM U-Net has {field} = {wanted!r}.")
    if c["out_channels"] != c["in_channels"]:
        raise KddpmError(
            f"out_channels = {c['out_channels']} differs from in_channels = {c['in_channels']}: kddpm's network "
            "predicts eps of the input's shape (a learned-variance model outputs twice the channels)."
        )
    height, width = _sample_size(c["sample_size"])
    channels = [int(v) for v in c["block_out_channels"]]
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    levels = len(channels)
    if len(down) != levels or len(up) != levels:
        raise KddpmError(
            f"down_block_types ({len(down)}), up_block_types ({len(up)}) and block_out_channels ({levels}) "
            "must have one entry per level."
        )
    for field, types, allowed in (
        ("down_block_types", down, ("DownBlock2D", "AttnDownBlock2D")),
        ("up_block_types", up, ("UpBlock2D", "AttnUpBlock2D")),
    ):
        for block in types:
            if block not in allowed:
                raise KddpmError(f"{field} contains {block!r}; the DDPM U-Net uses {allowed[0]} and {allowed[1]} only.")
    attention_levels = [level for level, block in enumerate(down) if block == "AttnDownBlock2D"]
    up_attention_levels = sorted(levels - 1 - j for j, block in enumerate(up) if block == "AttnUpBlock2D")
    if attention_levels != up_attention_levels:
        raise KddpmError(
            f"down_block_types {down} and up_block_types {up} put attention at different levels; kddpm's U-Net "
            "has attention at the same resolutions on the way down and up."
        )
    base = channels[0]
    if any(ch % base for ch in channels):
        raise KddpmError(
            f"block_out_channels = {channels}: kddpm needs every level's channels a multiple of the first's."
        )
    head_dim = c["attention_head_dim"]
    attention_channels = {channels[level] for level in attention_levels} | {channels[-1]}
    if head_dim is not None and attention_channels != {head_dim}:
        raise KddpmError(
            f"attention_head_dim = {head_dim!r} means multi-head attention; the DDPM U-Net has one head "
            "(attention_head_dim null)."
        )
    time_dim = c["time_embedding_dim"]
    if time_dim is not None and time_dim != 4 * base:
        raise KddpmError(
            f"time_embedding_dim = {time_dim} is not supported: the DDPM U-Net uses 4 x {base} = {4 * base}."
        )
    groups = c["norm_num_groups"]
    if groups is None:
        raise KddpmError("norm_num_groups = None is not supported: the DDPM U-Net uses GroupNorm with 32 groups.")
    if c["attn_norm_num_groups"] not in (None, groups):
        raise KddpmError(
            f"attn_norm_num_groups = {c['attn_norm_num_groups']!r} differs from norm_num_groups = {groups}."
        )
    factor = 2 ** (levels - 1)
    if height % factor or width % factor:
        raise KddpmError(f"sample_size = {c['sample_size']!r} cannot be halved {levels - 1} times.")
    return {
        "image_shape": (height, width, int(c["in_channels"])),
        "base_channels": base,
        "channel_mults": tuple(ch // base for ch in channels),
        "num_res_blocks": int(c["layers_per_block"]),
        "attention_resolutions": tuple(height // 2**level for level in attention_levels),
        "dropout": float(c["dropout"]),
        "norm_groups": int(groups),
        "norm_epsilon": float(c["norm_eps"]),
    }


def _sample_size(value) -> tuple[int, int]:
    if isinstance(value, int) and value > 0:
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value):
        return int(value[0]), int(value[1])
    raise KddpmError(f"sample_size = {value!r}: kddpm needs the image size (an int, or [height, width]).")


def load_diffusers_weights(network: keras.Model, tensors: dict[str, np.ndarray]) -> None:
    """Copies diffusers-named ``tensors`` into a ``build_unet`` network, checking every name and shape."""
    tensors = {_new_attention_name(name): value for name, value in tensors.items()}
    levels = _levels(network)
    unused = dict(tensors)
    for layer in network.layers:
        if not layer.weights:
            continue
        prefix = _diffusers_name(layer.name, levels)
        values = []
        for part, keras_weight in zip(("weight", "bias"), layer.get_weights()):
            name = f"{prefix}.{part}"
            if name not in unused:
                raise KddpmError(
                    f"The weights file has no {name}, which the config's network needs; the weights do not belong "
                    "to this config.json."
                )
            value = _to_keras(np.asarray(unused.pop(name), np.float32), layer)
            if value.shape != keras_weight.shape:
                raise KddpmError(
                    f"{name} has shape {tuple(tensors[name].shape)} but the config's network needs "
                    f"{_torch_shape(keras_weight.shape, layer)}; the weights do not belong to this config.json."
                )
            values.append(value)
        layer.set_weights(values)
    if unused:
        names = sorted(unused)
        raise KddpmError(
            f"The weights file holds {len(names)} tensors the config has no place for ({', '.join(names[:3])}"
            f"{', ...' if len(names) > 3 else ''}); the weights do not belong to this config.json."
        )


def _new_attention_name(name: str) -> str:
    if ".attentions." not in name:
        return name
    module, _, part = name.rpartition(".")
    parent, _, leaf = module.rpartition(".")
    return f"{parent}.{_OLD_ATTENTION_NAMES.get(leaf, leaf)}.{part}"


def unet_architecture(network: keras.Model) -> dict[str, Any]:
    """The ``build_unet`` keyword arguments that rebuild ``network``, read off its layers.

    Works on any network ``build_unet`` made, whatever its layer names (networks built before
    the layers were named included); anything else is refused.
    """
    not_unet = (
        f"The denoiser {network.name!r} is not a network build_unet makes, so the diffusers format (UNet2DModel) "
        "cannot express it"
    )
    layers = {layer.name: layer for layer in network.layers}
    try:
        image_shape = tuple(int(d) for d in network.inputs[0].shape[1:])
        base = int(layers["conv_in"].filters)
        levels = 1 + sum(1 for name in layers if re.fullmatch(r"down_\d+", name))
        level_channels = [int(layers["eps"].kernel.shape[2])]
        level_channels += [int(layers[f"down_{level}"].filters) for level in range(1, levels - 1)]
        if levels > 1:
            level_channels.append(int(layers[f"up_{levels - 1}_conv"].filters))
    except (KeyError, AttributeError, IndexError, TypeError) as error:
        raise KddpmError(f"{not_unet} (no layer {error}).") from None
    if any(ch % base for ch in level_channels):
        raise KddpmError(f"{not_unet} (level channels {level_channels} are not multiples of {base}).")
    norms = [layer for layer in network.layers if isinstance(layer, GroupNorm)]
    dropouts = [layer.rate for layer in network.layers if isinstance(layer, ExampleDropout)]
    concatenations = sum(isinstance(layer, keras.layers.Concatenate) for layer in network.layers)
    if not norms or concatenations % levels:
        raise KddpmError(f"{not_unet}.")
    height, width = image_shape[:2]
    positions = [layer.input[0].shape[1] for layer in network.layers if isinstance(layer, keras.layers.Attention)]
    num_res_blocks = concatenations // levels - 1
    # Each attention resolution has 2 * num_res_blocks + 1 blocks; the middle adds one at the lowest.
    attention_resolutions = tuple(
        height // 2**level
        for level in range(levels)
        if positions.count((height // 2**level) * (width // 2**level)) >= 2 * num_res_blocks + 1
    )
    kwargs = {
        "image_shape": image_shape,
        "base_channels": base,
        "channel_mults": tuple(ch // base for ch in level_channels),
        "num_res_blocks": num_res_blocks,
        "attention_resolutions": attention_resolutions,
        "dropout": float(dropouts[0]) if dropouts else 0.0,
        "norm_groups": norms[0].groups,
        "norm_epsilon": norms[0].epsilon,
    }
    try:
        rebuilt = build_unet(**kwargs, seed=0)
    except KddpmError as error:
        raise KddpmError(f"{not_unet} ({error}).") from None
    if [tuple(w.shape) for w in rebuilt.weights] != [tuple(w.shape) for w in network.weights]:
        raise KddpmError(f"{not_unet} (its weights differ from the U-Net its layers suggest).")
    return kwargs


def check_same_function(network: keras.Model, named: keras.Model, timesteps: int) -> None:
    """The rebuilt network must compute what the model's does: a guard on the weight order."""
    rng = np.random.default_rng(0)
    x_t = rng.standard_normal((1, *network.inputs[0].shape[1:])).astype(np.float32)
    t = np.array([timesteps // 2], np.int32)
    want = np.asarray(network([x_t, t], training=False))
    got = np.asarray(named([x_t, t], training=False))
    if not np.allclose(got, want, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(want).max()))):
        raise KddpmError(
            "The denoiser's layers could not be matched to the U-Net's; it cannot be written in this format."
        )


def diffusers_unet_config(build_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The UNet2DModel config.json of a ``build_unet`` architecture."""
    height, width, channels = build_kwargs["image_shape"]
    mults = build_kwargs["channel_mults"]
    levels = len(mults)
    attention = [height // 2**level in build_kwargs["attention_resolutions"] for level in range(levels)]
    return {
        "_class_name": "UNet2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "add_attention": True,
        "attention_head_dim": None,
        "attn_norm_num_groups": None,
        "block_out_channels": [build_kwargs["base_channels"] * m for m in mults],
        "center_input_sample": False,
        "class_embed_type": None,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "downsample_padding": 0,
        "downsample_type": "conv",
        "dropout": build_kwargs["dropout"],
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "in_channels": channels,
        "layers_per_block": build_kwargs["num_res_blocks"],
        "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2D",
        "norm_eps": build_kwargs["norm_epsilon"],
        "norm_num_groups": build_kwargs["norm_groups"],
        "num_class_embeds": None,
        "num_train_timesteps": None,
        "out_channels": channels,
        "resnet_time_scale_shift": "default",
        "sample_size": height if height == width else [height, width],
        "time_embedding_dim": None,
        "time_embedding_type": "positional",
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "upsample_type": "conv",
    }


def diffusers_tensors(network: keras.Model) -> dict[str, np.ndarray]:
    """A named ``build_unet`` network's weights by diffusers name, in PyTorch's layouts."""
    levels = _levels(network)
    tensors = {}
    for layer in network.layers:
        prefix = _diffusers_name(layer.name, levels) if layer.weights else None
        for part, value in zip(("weight", "bias"), layer.get_weights()):
            tensors[f"{prefix}.{part}"] = np.ascontiguousarray(_to_torch(value, layer), dtype=np.float32)
    return tensors


def _levels(network: keras.Model) -> int:
    return 1 + sum(1 for layer in network.layers if re.fullmatch(r"down_\d+", layer.name))


def _diffusers_name(layer_name: str, levels: int) -> str:
    """The diffusers module of a kddpm layer name, e.g. up_0_res_2_conv1 -> up_blocks.3.resnets.2.conv1."""
    if layer_name in _FIXED_NAMES:
        return _FIXED_NAMES[layer_name]
    match = re.fullmatch(r"(down|up)_(\d+)_(res|attn)_(\d+)_(\w+)", layer_name)
    if match:
        side, level, kind, index, part = match.groups()
        block = f"down_blocks.{level}" if side == "down" else f"up_blocks.{levels - 1 - int(level)}"
        parts = _RES_PARTS if kind == "res" else _ATTN_PARTS
        if part in parts:
            return f"{block}.{'resnets' if kind == 'res' else 'attentions'}.{index}.{parts[part]}"
    match = re.fullmatch(r"mid_res_(\d)_(\w+)", layer_name)
    if match and match.group(2) in _RES_PARTS:
        return f"mid_block.resnets.{match.group(1)}.{_RES_PARTS[match.group(2)]}"
    match = re.fullmatch(r"mid_attn_(\w+)", layer_name)
    if match and match.group(1) in _ATTN_PARTS:
        return f"mid_block.attentions.0.{_ATTN_PARTS[match.group(1)]}"
    match = re.fullmatch(r"down_(\d+)", layer_name)
    if match:
        return f"down_blocks.{match.group(1)}.downsamplers.0.conv"
    match = re.fullmatch(r"up_(\d+)_conv", layer_name)
    if match:
        return f"up_blocks.{levels - 1 - int(match.group(1))}.upsamplers.0.conv"
    raise KddpmError(f"Layer {layer_name!r} has no diffusers counterpart; rebuild the network with build_unet.")


def _to_keras(value: np.ndarray, layer: keras.layers.Layer) -> np.ndarray:
    if isinstance(layer, keras.layers.Conv2D) and value.ndim == 4:
        return np.transpose(value, (2, 3, 1, 0))  # [out, in, kh, kw] -> [kh, kw, in, out]
    if isinstance(layer, keras.layers.Dense) and value.ndim == 2:
        return value.T  # [out, in] -> [in, out]
    return value


def _to_torch(value: np.ndarray, layer: keras.layers.Layer) -> np.ndarray:
    if isinstance(layer, keras.layers.Conv2D) and value.ndim == 4:
        return np.transpose(value, (3, 2, 0, 1))
    if isinstance(layer, keras.layers.Dense) and value.ndim == 2:
        return value.T
    return value


def _torch_shape(keras_shape: tuple[int, ...], layer: keras.layers.Layer) -> tuple[int, ...]:
    return _to_torch(np.empty(keras_shape, np.float32), layer).shape
