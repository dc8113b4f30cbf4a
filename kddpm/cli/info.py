"""``kddpm info``: what a saved model is, in a few lines."""

from __future__ import annotations

import argparse

from kddpm.cli.common import add_verb


def add_parser(verbs, common) -> None:
    info = add_verb(
        verbs,
        common,
        "info",
        "describe a saved model: shape, size, schedule, classes, training, sampling defaults",
        "Print what a saved model is: image shape, parameters, noise schedule, classes, batches trained, the "
        "sampling defaults kddpm sample uses for it, its precision and the kddpm version that wrote it.",
        ["kddpm info runs/demo", "kddpm info cifar10.keras"],
    )
    info.add_argument("model", help="run folder or .keras file")
    info.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import kddpm
    from kddpm.defaults import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS, clip_name
    from kddpm.loading import load_diffusion_model, model_config, model_file

    path = model_file(args.model)
    config = model_config(path)
    model = load_diffusion_model(path)
    height, width, channels = model.image_shape
    trainable = sum(int(w.numpy().size) for w in model.denoiser.trainable_weights)
    schedule = model.schedule
    shown = {k: v for k, v in schedule.get_config().items() if k not in ("kind", "timesteps", "betas")}
    details = ", ".join(f"{k} {v:g}" for k, v in shown.items())
    lines = [
        f"Model: {path}",
        f"Images: {height}x{width}x{channels}, in [-1, 1]",
        f"Network: {trainable:,} parameters (the EMA copy has as many)",
        f"Schedule: {schedule.kind}, T = {schedule.timesteps}" + (f", {details}" if details else ""),
    ]
    if model.num_classes:
        names = ", ".join(model.class_names or [str(c) for c in range(model.num_classes)])
        lines.append(f"Classes: {model.num_classes} ({names}); label dropout {model.label_dropout}")
    else:
        lines.append("Classes: none (unconditional)")
    lines.append(f"Trained: {int(model.batches_seen.numpy()):,} batches; EMA decay {model.ema_decay}")
    guidance = f", guidance {DEFAULT_GUIDANCE}" if model.num_classes else ""
    lines.append(
        f"Sampling defaults: {DEFAULT_SAMPLER}, {DEFAULT_STEPS[DEFAULT_SAMPLER]} steps, clip x0 "
        f"{clip_name(model.clip_x0)}{guidance}; DDPM variance {model.variance}"
    )
    lines.append(f"Precision: {model.denoiser.dtype_policy.name}")
    lines.append(
        f"Written by: kddpm {config.get('kddpm_version', '0.1 or earlier')} (this is kddpm {kddpm.__version__})"
    )
    print("\n".join(lines))
    return 0
