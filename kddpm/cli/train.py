"""``kddpm train``: a preset's model trained with model.fit, resumable, on any strategy."""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path

from kddpm.cli.common import (
    GRID_IMAGES,
    add_grid_scale,
    add_verb,
    plural,
    positive,
    refuse_unused,
    save_atomically,
    writable_output,
)
from kddpm.defaults import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS
from kddpm.errors import KddpmError
from kddpm.progress import fit_verbosity

STEPS_PER_EPOCH = 200


def add_parser(verbs, common) -> None:
    from kddpm.presets import PRESETS

    presets = "\n".join(f"  {p.name:8s} {p.description}" for p in PRESETS.values())
    train = add_verb(
        verbs,
        common,
        "train",
        "train a model",
        f"Train a DDPM with model.fit; a run folder gets the model, backups, checkpoints, TensorBoard logs and "
        f"sample grids. Run the same command again to resume an interrupted run.\n\npresets:\n{presets}",
        [
            "kddpm train --preset tiny --out runs/try                 # a one-minute check",
            "kddpm train --preset demo                                # the 15-minute CPU demo",
            "kddpm train --data my_images/ --preset demo --steps 5000",
            "kddpm train --preset demo --conditional --out runs/demo-conditional",
        ],
    )
    train.add_argument(
        "--data", default="fashion_mnist", help="'fashion_mnist' (default, bundled), 'tfds:NAME' or a folder of images"
    )
    train.add_argument(
        "--data-dir",
        help="where Fashion-MNIST's IDX files or tensorflow-datasets data live (default: the usual places, "
        "docs/data.md)",
    )
    train.add_argument(
        "--preset", default="demo", choices=sorted(PRESETS), help="model size and settings (default: demo)"
    )
    train.add_argument(
        "--image-size",
        type=image_size,
        metavar="H[xW]",
        help="train at this image size, resizing (centre crop) or padding the data to it, with the preset's "
        "widths (default: the preset's size)",
    )
    train.add_argument(
        "--channels",
        type=int,
        choices=[1, 3],
        help="1 (grey) or 3 (colour): convert the images to it (default: the data's own, e.g. 3 for a folder of "
        "colour photos)",
    )
    length = train.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps (default: the preset's), rounded up to whole epochs")
    length.add_argument("--epochs", type=int, help="passes over the data, instead of --steps (default: use --steps)")
    train.add_argument(
        "--steps-per-epoch",
        type=int,
        help=f"with --steps: steps between backups, checkpoints and grids (default {STEPS_PER_EPOCH})",
    )
    train.add_argument("--batch-size", type=int, help="global batch size (default: the preset's)")
    train.add_argument("--lr", type=float, help="peak learning rate (default: the preset's)")
    train.add_argument("--seed", type=int, default=0, help="seed of weights, data order, noise and samples (default 0)")
    train.add_argument("--out", help="run folder (default: runs/PRESET)")
    train.add_argument("--overwrite", action="store_true", help="replace a finished run in --out (default: refuse)")
    train.add_argument("--grid-every", type=int, default=5, help="write a sample grid every N epochs (default 5)")
    add_grid_scale(train)
    train.add_argument(
        "--eval-every",
        type=int,
        help="FID and KID of EMA samples every N epochs, printed and in TensorBoard (default: off)",
    )
    train.add_argument("--eval-samples", type=int, help="with --eval-every: samples per evaluation (default 1000)")
    train.add_argument(
        "--eval-reference",
        help="with --eval-every: real images (default fashion_mnist:test for Fashion-MNIST shapes)",
    )
    train.add_argument(
        "--conditional",
        action="store_true",
        help="train a class-conditional model on the data's labels (Fashion-MNIST, tfds with labels, a folder "
        "with class sub-folders), for kddpm sample --class",
    )
    train.add_argument(
        "--label-dropout",
        type=float,
        help="with --conditional: share of labels replaced by the null label, for classifier-free guidance "
        "(default 0.1)",
    )
    train.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="folders of images: leave out files that cannot be decoded (counted) instead of stopping (default: stop)",
    )
    train.add_argument(
        "--strategy",
        choices=["auto", "default", "mirrored", "multiworker"],
        default="auto",
        help="tf.distribute strategy; auto: mirrored on several GPUs, else default; multiworker reads TF_CONFIG",
    )
    train.add_argument(
        "--mixed-precision",
        choices=["auto", "off", "bfloat16", "float16"],
        default="off",
        help="compute the network in 16 bits (weights, loss and sampler stay float32); "
        "auto: bfloat16 where the CPU or GPU computes it natively, else off (default: off)",
    )
    train.add_argument(
        "--jit",
        choices=["auto", "on", "off"],
        default="auto",
        help="XLA-compile the train step; auto: Keras' choice, on for a single GPU, off on CPU (default auto)",
    )
    train.add_argument(
        "--deterministic",
        action="store_true",
        help="make GPU kernels deterministic (tf.config.experimental.enable_op_determinism; slower); "
        "CPU runs are already repeatable (default: off)",
    )
    train.set_defaults(run=run, check=check_arguments)


def image_size(text: str) -> tuple[int, int]:
    """'64' or '64x48' -> (64, 64) or (64, 48)."""
    parts = text.lower().split("x")
    try:
        size = tuple(int(part) for part in parts)
    except ValueError:
        size = ()
    if len(size) not in (1, 2) or min(size, default=0) < 1:
        raise argparse.ArgumentTypeError(f"--image-size takes H or HxW in pixels (64, 64x48), not {text!r}")
    return (size[0], size[-1])


def check_arguments(args: argparse.Namespace) -> None:
    """Every check that needs no data, model or TensorFlow, before anything is loaded."""
    positive(args, "steps", "epochs", "batch_size", "steps_per_epoch", "grid_every", "grid_scale")
    positive(args, "eval_every", "eval_samples")
    if args.epochs:
        refuse_unused(
            args, {"steps_per_epoch": None}, "with --epochs an epoch is one pass over the data; use --steps to set both"
        )
    if not args.eval_every:
        refuse_unused(args, {"eval_samples": None, "eval_reference": None}, "they go with --eval-every N")
    if not args.conditional:
        refuse_unused(args, {"label_dropout": None}, "it goes with --conditional")
    elif args.label_dropout is not None and not 0.0 <= args.label_dropout < 1.0:
        raise KddpmError(f"--label-dropout must be in [0, 1), got {args.label_dropout}.")


def run(args: argparse.Namespace) -> int:
    import keras

    from kddpm.callbacks import (
        EvaluateEvery,
        NonFiniteLossError,
        SampleGrid,
        StopOnNonFiniteLoss,
        Throughput,
        TrainingBackup,
        TrainingClock,
        read_backup_state,
    )
    from kddpm.data import distributed_dataset, image_source, load_dataset
    from kddpm.presets import get_preset
    from kddpm.training import (
        class_grid_labels,
        create_model,
        is_chief,
        make_optimizer,
        make_strategy,
        set_precision,
        write_grid,
    )

    preset = get_preset(args.preset)
    label_dropout = 0.1 if args.label_dropout is None else args.label_dropout
    # The strategy comes first: MultiWorkerMirroredStrategy must exist before other TF work.
    strategy = make_strategy(args.strategy)
    if args.deterministic:
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    chief = is_chief(strategy)
    out = Path(args.out or f"runs/{preset.name}")
    model_path = out / "model.keras"
    backup_dir = out / "backup"
    if model_path.exists() and not args.overwrite:
        raise KddpmError(f"{out} already holds a trained model; choose another --out or pass --overwrite.")
    if chief:
        writable_output(out)  # a read-only --out fails now, not after the first epoch
    batch_size = args.batch_size or preset.batch_size
    if batch_size % strategy.num_replicas_in_sync:
        raise KddpmError(
            f"--batch-size {batch_size} is the global batch and must divide evenly over "
            f"{plural(strategy.num_replicas_in_sync, 'replica')}."
        )
    if args.overwrite and chief and model_path.exists():
        shutil.rmtree(backup_dir, ignore_errors=True)  # a finished run's backup must not be resumed
    state = read_backup_state(backup_dir)
    start_step = state["step"] if state else 0

    print(f"Precision: {set_precision(args.mixed_precision)}")
    source = image_source(args.data, "train", args.data_dir, args.channels, skip_bad_images=args.skip_bad_images)
    print(f"Data: {source.description}")
    # The network is built for the data's channels (a colour folder trains a colour model) at
    # the preset's size, unless --channels and --image-size say otherwise.
    height, width = args.image_size or preset.image_shape[:2]
    image_shape = (height, width, args.channels or source.channels or preset.image_shape[2])
    class_names = None
    if args.conditional:
        if not source.class_names:
            raise KddpmError(
                f"--conditional needs labels and {args.data} has none; use a folder with one sub-folder of images "
                "per class, Fashion-MNIST or a tfds dataset with a 'label' feature."
            )
        class_names = source.class_names
        print(f"Classes: {len(class_names)} ({', '.join(class_names)}); label dropout {label_dropout}")
    if args.epochs:
        if not source.size:
            raise KddpmError("The size of this dataset is unknown; give --steps instead of --epochs.")
        steps_per_epoch, epochs = max(1, source.size // batch_size), args.epochs
    else:
        steps = args.steps or preset.train_steps
        steps_per_epoch = min(args.steps_per_epoch or STEPS_PER_EPOCH, steps)
        epochs = math.ceil(steps / steps_per_epoch)
    settings = {
        "preset": preset.name,
        "data": args.data,
        "batch_size": batch_size,
        "seed": args.seed,
        "steps_per_epoch": steps_per_epoch,
        "precision": keras.mixed_precision.global_policy().name,
        "skip_bad_images": args.skip_bad_images,
        "conditional": args.conditional,
        "label_dropout": label_dropout if args.conditional else None,
        "image_shape": list(image_shape),
    }
    if state:
        _check_resume_settings(state.get("settings", {}), settings, backup_dir)
    pipeline = dict(
        image_shape=image_shape,
        channels=args.channels,
        flip=preset.flip,
        repeat=True,
        seed=args.seed,
        skip_batches=start_step,
        labels=args.conditional,
    )
    if strategy.num_replicas_in_sync > 1:
        # Each worker reads and decodes only its share of every global batch.
        data = distributed_dataset(strategy, source, batch_size, **pipeline)
    else:
        data = load_dataset(source, batch_size=batch_size, **pipeline)

    with strategy.scope():
        model = create_model(
            preset, seed=args.seed, class_names=class_names, label_dropout=label_dropout, image_shape=image_shape
        )
        jit = {"auto": "auto", "on": True, "off": False}[args.jit]
        model.compile(optimizer=make_optimizer(args.lr or preset.learning_rate, preset.warmup_steps), jit_compile=jit)
    print(
        f"Model: preset {preset.name} at {'x'.join(map(str, image_shape))}, "
        f"{model.denoiser.count_params():,} parameters; "
        f"{plural(epochs, 'epoch')} x {plural(steps_per_epoch, 'step')} of {batch_size} images; "
        f"{plural(strategy.num_replicas_in_sync, 'replica')}"
    )
    if state:
        print(f"Resuming from step {start_step} (epoch {state['epoch']}) of {backup_dir / 'latest.weights.h5'}")
    # Only the chief writes the run; other workers write where Keras expects them to, a
    # directory of their own that is removed at the end.
    write_dir = out if chief else Path(tempfile.mkdtemp(prefix="kddpm-worker-"))
    write_dir.mkdir(parents=True, exist_ok=True)
    # The grids use kddpm's default sampler, steps, clipping and guidance, as kddpm sample does.
    grid_settings = {}
    grid_images, grid_columns = GRID_IMAGES, None
    if class_names:
        # One row per class.
        labels, grid_columns = class_grid_labels(len(class_names), GRID_IMAGES)
        grid_images = len(labels)
        grid_settings.update(labels=labels)
    throughput = Throughput(batch_size)
    callbacks = [
        StopOnNonFiniteLoss(),  # first, so that nothing after it saves broken weights
        TrainingBackup(backup_dir, write_dir=write_dir / "backup", settings=settings),
        keras.callbacks.ModelCheckpoint(write_dir / "checkpoints" / "last.keras"),
        keras.callbacks.TensorBoard(write_dir / "logs"),
        throughput,
        TrainingClock(epochs),
    ]
    if args.eval_every and chief:
        # Before TensorBoard, which then writes the FID and KID it adds to the epoch's logs.
        evaluation = EvaluateEvery(
            args.eval_every, args.eval_samples or 1000, reference=args.eval_reference, seed=args.seed
        )
        callbacks.insert(3, evaluation)
    if chief:
        grids = SampleGrid(
            out / "samples",
            every=args.grid_every,
            num_images=grid_images,
            seed=args.seed,
            grid_scale=args.grid_scale,
            columns=grid_columns,
            row_labels=class_names,
            log_dir=out / "logs",
            **grid_settings,
        )
        callbacks.append(grids)
    started = time.time()
    try:
        history = model.fit(
            data, epochs=epochs, steps_per_epoch=steps_per_epoch, callbacks=callbacks, verbose=fit_verbosity()
        )
    except KeyboardInterrupt:
        saved = read_backup_state(backup_dir)
        where = f"from step {saved['step']} (the last epoch's backup)" if saved else "from the start"
        raise KeyboardInterrupt(f"training resumes {where}: run the same command again.") from None
    except NonFiniteLossError as error:
        saved = read_backup_state(backup_dir)
        kept = f"the backup of step {saved['step']} is kept" if saved else "no backup had been written yet"
        raise KddpmError(
            f"{error}; training stopped, {kept} and {model_path} was not written. "
            "Lower --lr (or use --mixed-precision off) and run the same command again to resume."
        ) from None
    train_seconds = time.time() - started
    save_atomically(model, model_path if chief else write_dir / "model.keras")
    if not chief:
        shutil.rmtree(write_dir, ignore_errors=True)
        print("Worker finished; the chief wrote the run.")
        return 0
    # The finished model supersedes the backup; removed only now, so a crash before the
    # save above still resumes.
    shutil.rmtree(backup_dir, ignore_errors=True)
    rows = f", one row per class, guidance {DEFAULT_GUIDANCE}" if class_names else ""
    print(f"Sampling a {grid_images}-image grid ({DEFAULT_SAMPLER}, {DEFAULT_STEPS[DEFAULT_SAMPLER]} steps{rows})")
    images = model.sample(grid_images, seed=args.seed, progress=True, **grid_settings)
    grid = write_grid(images, out / "samples" / "final.png", args.grid_scale, grid_columns, class_names)
    losses = history.history.get("loss") or [float("nan")]
    trained = epochs * steps_per_epoch - start_step
    speed = throughput.images_per_second()
    rate = f", {speed:.1f} images/s" if math.isfinite(speed) else " (too few steps to measure images/s)"
    print(f"Trained {plural(trained, 'step')} in {train_seconds / 60:.1f} min, final loss {losses[-1]:.4f}{rate}")
    print(f"Model: {model_path}  Samples: {grid}  Logs: {out / 'logs'}")
    return 0


# The flag that sets each stored setting, for messages.
_SETTING_FLAGS = {
    "preset": "--preset",
    "data": "--data",
    "batch_size": "--batch-size",
    "seed": "--seed",
    "steps_per_epoch": "--steps-per-epoch (or --epochs, --steps)",
    "precision": "--mixed-precision",
    "skip_bad_images": "--skip-bad-images",
    "conditional": "--conditional",
    "label_dropout": "--label-dropout",
}


def _check_resume_settings(stored: dict, current: dict, backup_dir: Path) -> None:
    """Refuses to resume a backup with a setting that would change the data order, the noise or the steps."""
    from kddpm.callbacks import mismatched_settings
    from kddpm.errors import KddpmError

    mismatches = mismatched_settings(stored, current)
    if mismatches:
        name, before, now = mismatches[0]
        raise KddpmError(
            f"The backup in {backup_dir} was made with {_SETTING_FLAGS.get(name, name)} = {before!r}, this command "
            f"gives {now!r}; resuming would not continue the same run. Rerun with the backup's value, or use "
            "another --out (--lr, --steps, --epochs, --grid-every, --grid-scale, --jit and --strategy may change)."
        )
