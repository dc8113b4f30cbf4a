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

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np

from kddpm.defaults import DYNAMIC_THRESHOLD_QUANTILE
from kddpm.errors import KddpmError
from kddpm.model import DiffusionModel
from kddpm.schedule import NoiseSchedule
from kddpm.unet import ExampleDropout, GroupNorm, build_unet

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
TORCH_WEIGHTS_FILE = "diffusion_pytorch_model.bin"
DIFFUSERS_VERSION = "0.42.1"  # the release whose layout the fixtures and to_diffusers follow
# diffusers clamps its dynamic threshold to [1, sample_max_value]; this stands for "no cap".
UNCAPPED_SAMPLE_MAX = 1e9

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

_SCHEDULER_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "variance_type": "fixed_small",
    "clip_sample": True,
    "prediction_type": "epsilon",
    "thresholding": False,
    "clip_sample_range": 1.0,
    "rescale_betas_zero_snr": False,
}
_VARIANCE_TYPES = {
    "fixed_small": "beta_tilde",
    "fixed_small_log": "beta_tilde",
    "fixed_large": "beta",
    "fixed_large_log": "beta",
}
# Fields of a scheduler config that sampling over all T steps does not read.
_SCHEDULER_IGNORED = {
    "_class_name",
    "_diffusers_version",
    "_name_or_path",
    "_use_default_values",
    "timestep_spacing",
    "steps_offset",
    "sample_max_value",
    "dynamic_thresholding_ratio",
    "tensor_format",
    "set_alpha_to_one",
    "variance_type_str",
}
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


# --- Loading ---------------------------------------------------------------------------------


def from_diffusers(path: str | os.PathLike, log: Callable[[str], Any] | None = None) -> DiffusionModel:
    """A kddpm ``DiffusionModel`` holding a diffusers DDPM checkpoint.

    path: a pipeline folder as ``DDPMPipeline.save_pretrained`` writes it (``model_index.json``,
    ``unet/``, ``scheduler/``) or a bare model folder (``config.json`` + weights, optional
    ``scheduler_config.json`` beside them, as the Hub's google/ddpm-* repositories hold them).
    The weights go into both the trained and the EMA network (published weights are EMA
    weights); EMA warm-up is off, so that fine-tuning starts its average from them. The
    scheduler becomes the model's schedule, default DDPM variance (fixed_small: beta_tilde,
    fixed_large: beta) and default clip_x0 (clip_sample). Without a scheduler config the
    paper's linear schedule is used and ``log`` (default: a warning) says so.

    Anything outside the DDPM family of UNet2DModel is refused with the field and its value.
    """
    say = log or (lambda line: warnings.warn(line, stacklevel=3))
    unet_dir, scheduler_file = _locate(Path(path))
    config = _read_json(unet_dir / "config.json")
    build_kwargs = unet_kwargs_from_config(config)
    tensors = _read_weights(unet_dir)
    network = build_unet(**build_kwargs, seed=0)
    load_diffusers_weights(network, tensors)

    if scheduler_file is None:
        say(
            f"No scheduler config found with {path} (scheduler/scheduler_config.json or scheduler_config.json); "
            "using the paper's linear schedule, 1e-4 to 0.02 over T = 1000, beta_tilde variance and clip_x0."
        )
        scheduler: dict[str, Any] = {}
    else:
        scheduler = _read_json(scheduler_file)
    schedule, variance, clip_x0 = schedule_from_config(scheduler, source=scheduler_file)
    return DiffusionModel(network, schedule, ema_warmup=False, variance=variance, clip_x0=clip_x0)


def _locate(path: Path) -> tuple[Path, Path | None]:
    """The U-Net's folder and the scheduler config (or None) of a pipeline or bare model folder."""
    if not path.is_dir():
        raise KddpmError(
            f"{path} is not a folder; give a diffusers pipeline folder (model_index.json, unet/, scheduler/) "
            "or a model folder (config.json + diffusion_pytorch_model.safetensors)."
        )
    if (path / "unet" / "config.json").is_file():
        scheduler = path / "scheduler" / "scheduler_config.json"
        return path / "unet", scheduler if scheduler.is_file() else None
    if (path / "config.json").is_file():
        scheduler = path / "scheduler_config.json"
        return path, scheduler if scheduler.is_file() else None
    raise KddpmError(
        f"{path} is not a diffusers model: it has neither unet/config.json (a pipeline folder) nor config.json "
        "(a model folder); download the whole repository, e.g. "
        "huggingface_hub.snapshot_download('google/ddpm-cifar10-32')."
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise KddpmError(f"Cannot read {path} ({error}); download it again.") from None
    if not isinstance(value, dict):
        raise KddpmError(f"{path} holds a JSON {type(value).__name__}, not a config object; download it again.")
    return value


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


def _read_weights(unet_dir: Path) -> dict[str, np.ndarray]:
    """The U-Net's tensors by diffusers name, as numpy arrays."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = unet_dir / WEIGHTS_FILE
    if path.is_file():
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as error:
            raise KddpmError(
                f"Cannot read {path} ({error}); the file is damaged or truncated: download it again."
            ) from None
    if (unet_dir / TORCH_WEIGHTS_FILE).is_file():
        return _read_torch_weights(unet_dir / TORCH_WEIGHTS_FILE)
    raise KddpmError(f"{unet_dir} has config.json but no {WEIGHTS_FILE}; download the weights file too.")


def _read_torch_weights(path: Path) -> dict[str, np.ndarray]:
    """A PyTorch pickle of the weights, read with torch when it happens to be installed."""
    try:
        import torch
    except ImportError:
        raise KddpmError(
            f"{path} is a PyTorch pickle and kddpm reads safetensors without torch; convert it where torch is "
            'installed: python -c "import torch; from safetensors.torch import save_file; '
            f"save_file(torch.load('{path}', map_location='cpu'), '{path.with_name(WEIGHTS_FILE)}')\"."
        ) from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {name: tensor.detach().float().numpy() for name, tensor in state.items()}


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


def schedule_from_config(config: dict[str, Any], source: Path | None = None) -> tuple[NoiseSchedule, str, bool | str]:
    """(schedule, default variance, default clip_x0) of a diffusers scheduler config.

    diffusers' dynamic thresholding clamps its threshold s to [1, sample_max_value]: with
    sample_max_value 1 that is plain clipping (clip_x0 True); with no cap (at least
    ``UNCAPPED_SAMPLE_MAX``, as ``to_diffusers`` writes) it is kddpm's 'dynamic'.
    """
    where = f" in {source}" if source else ""
    unknown = sorted(set(config) - set(_SCHEDULER_DEFAULTS) - _SCHEDULER_IGNORED)
    if unknown:
        raise KddpmError(f"Scheduler field {unknown[0]} = {config[unknown[0]]!r}{where} is not one kddpm knows.")
    c = {**_SCHEDULER_DEFAULTS, **config}
    for field, wanted in (("prediction_type", "epsilon"), ("rescale_betas_zero_snr", False)):
        if c[field] != wanted:
            raise KddpmError(f"{field} = {c[field]!r}{where} is not supported; kddpm's DDPM has {field} = {wanted!r}.")
    clip_x0: bool | str = bool(c["clip_sample"])
    if c["thresholding"]:
        if c["dynamic_thresholding_ratio"] != DYNAMIC_THRESHOLD_QUANTILE:
            raise KddpmError(
                f"dynamic_thresholding_ratio = {c['dynamic_thresholding_ratio']!r}{where} is not supported; kddpm's "
                f"dynamic thresholding uses the {DYNAMIC_THRESHOLD_QUANTILE} quantile."
            )
        if c["sample_max_value"] <= 1.0:
            clip_x0 = True  # s clamped to [1, 1]: plain clipping
        elif c["sample_max_value"] >= UNCAPPED_SAMPLE_MAX:
            clip_x0 = "dynamic"
        else:
            raise KddpmError(
                f"sample_max_value = {c['sample_max_value']!r}{where} caps the dynamic threshold, which kddpm's "
                "dynamic thresholding (Imagen's, uncapped) does not."
            )
    if c["clip_sample"] and c["clip_sample_range"] != 1.0:
        raise KddpmError(
            f"clip_sample_range = {c['clip_sample_range']!r}{where} is not supported; kddpm clips to [-1, 1]."
        )
    variance = _VARIANCE_TYPES.get(c["variance_type"])
    if variance is None:
        raise KddpmError(
            f"variance_type = {c['variance_type']!r}{where} is not supported; kddpm samples with fixed variances "
            f"({', '.join(_VARIANCE_TYPES)})."
        )
    timesteps = int(c["num_train_timesteps"])
    if c["trained_betas"] is not None:
        betas = np.asarray(c["trained_betas"], np.float64)
        if betas.shape != (timesteps,):
            raise KddpmError(f"trained_betas{where} has {betas.size} values, not num_train_timesteps = {timesteps}.")
        schedule = NoiseSchedule.from_betas(betas)
    elif c["beta_schedule"] == "linear":
        schedule = NoiseSchedule.linear(timesteps, c["beta_start"], c["beta_end"])
    elif c["beta_schedule"] == "scaled_linear":
        schedule = NoiseSchedule.scaled_linear(timesteps, c["beta_start"], c["beta_end"])
    elif c["beta_schedule"] == "squaredcos_cap_v2":
        schedule = NoiseSchedule.cosine(timesteps, s=0.008)
    else:
        raise KddpmError(
            f"beta_schedule = {c['beta_schedule']!r}{where} is not supported; use linear, scaled_linear, "
            "squaredcos_cap_v2 or trained_betas."
        )
    return schedule, variance, clip_x0


# --- Writing ---------------------------------------------------------------------------------


def to_diffusers(model: DiffusionModel, path: str | os.PathLike, use_ema: bool = True, overwrite: bool = False) -> Path:
    """Writes ``model`` as a ``DDPMPipeline.save_pretrained`` folder and returns its path.

    The folder holds ``model_index.json``, ``unet/config.json``, ``unet/diffusion_pytorch_model.
    safetensors`` (the EMA weights unless ``use_ema=False``) and ``scheduler/scheduler_config.json``;
    ``diffusers.DDPMPipeline.from_pretrained(path)`` loads it. A model the format cannot express
    is refused before anything is written; an existing folder is replaced only with
    ``overwrite=True``. The folder is written beside its place and renamed into it.
    """
    path = Path(path)
    if model.num_classes is not None:
        raise KddpmError(
            f"This model is class-conditional ({model.num_classes} classes with a null label for guidance); "
            "DDPMPipeline has no class labels, so the diffusers format cannot express it."
        )
    if path.exists() and not overwrite:
        raise KddpmError(f"{path} already exists; choose another --out or pass overwrite=True (--overwrite).")
    network = model.ema_denoiser if use_ema else model.denoiser
    build_kwargs = unet_architecture(network)
    named = build_unet(**build_kwargs, seed=0)
    named.set_weights(network.get_weights())
    _check_same_function(network, named, model.schedule.timesteps)
    unet_config = diffusers_unet_config(build_kwargs)
    tensors = diffusers_tensors(named)
    scheduler_config = diffusers_scheduler_config(model)

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        from safetensors.numpy import save_file

        (partial / "unet").mkdir()
        (partial / "scheduler").mkdir()
        _write_json(partial / "model_index.json", _model_index())
        _write_json(partial / "unet" / "config.json", unet_config)
        save_file(tensors, str(partial / "unet" / WEIGHTS_FILE), metadata={"format": "pt"})
        _write_json(partial / "scheduler" / "scheduler_config.json", scheduler_config)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(partial, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(partial, path)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return path


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


def _check_same_function(network: keras.Model, named: keras.Model, timesteps: int) -> None:
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


def diffusers_scheduler_config(model: DiffusionModel) -> dict[str, Any]:
    """The DDPMScheduler config of ``model``'s schedule and sampling defaults."""
    schedule = model.schedule
    config: dict[str, Any] = {
        "_class_name": "DDPMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": schedule.timesteps,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "variance_type": {"beta_tilde": "fixed_small", "beta": "fixed_large"}[model.variance],
        "clip_sample": model.clip_x0 is True,
        "clip_sample_range": 1.0,
        "prediction_type": "epsilon",
        "thresholding": model.clip_x0 == "dynamic",
        "dynamic_thresholding_ratio": DYNAMIC_THRESHOLD_QUANTILE,
        "sample_max_value": UNCAPPED_SAMPLE_MAX if model.clip_x0 == "dynamic" else 1.0,
        "timestep_spacing": "leading",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }
    if schedule.kind in ("linear", "scaled_linear"):
        config.update(beta_schedule=schedule.kind, **schedule.params)
    elif schedule.kind == "cosine" and math.isclose(schedule.params["s"], 0.008):
        config["beta_schedule"] = "squaredcos_cap_v2"
    else:  # any other schedule, exactly, as its betas
        config["trained_betas"] = schedule.betas.tolist()
    return config


def _model_index() -> dict[str, Any]:
    return {
        "_class_name": "DDPMPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", "DDPMScheduler"],
        "unet": ["diffusers", "UNet2DModel"],
    }


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


# --- Names and layouts -----------------------------------------------------------------------


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
