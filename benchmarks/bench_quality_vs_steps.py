"""Quality per network call: FID of DDPM, DDIM and DPM-Solver++ at several step counts.

    python benchmarks/bench_quality_vs_steps.py --model RUN [--samples 2000] [--ddpm-samples 200]
        [--ddim 10,20,50,100] [--dpm 10,15,20,50] [--clip-off-steps 10,20,50,100]
        [--out benchmarks/results/quality_vs_steps.json]

For the model's EMA weights: FID (kddpm's evaluation: the shipped Fashion-MNIST feature network,
against the 10k test split; seed 0) of ``--samples`` images per setting, x0 clipping on, and off
at ``--clip-off-steps``; DDPM-1000 with ``--ddpm-samples`` (its FID is comparable only with rows
of the same N). Wall time per 1,000 images of sampling alone. Then the compiled loop's ms per step
for DDIM and DPM-Solver++ at batch 1 and 64, alternating, in the same run. Writes the JSON and a
PNG plot (FID against network calls, one line per sampler; matplotlib, ``pip install matplotlib``)
beside it, and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np

from kddpm.features import feature_extractor, reference_features
from kddpm.loading import load_diffusion_model
from kddpm.metrics import feature_statistics, frechet_distance_from_stats
from kddpm.sampling import Sampler, make_plan, to_uint8


def score(model, extractor, real, sampler, steps, clip_x0, samples, batch_size, raw_eps=False):
    if raw_eps:
        return raw_eps_score(model, extractor, real, steps, samples, batch_size)
    if sampler != "ddpm":
        # Trace the loop first (a 1-step plan, the same function), so that the time is sampling alone.
        model.sample(min(samples, batch_size), seed=0, sampler=sampler, steps=1, clip_x0=clip_x0)
    started = time.perf_counter()
    images = model.sample(
        samples, seed=0, sampler=sampler, steps=None if sampler == "ddpm" else steps, clip_x0=clip_x0,
        batch_size=batch_size,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    fid = frechet_distance_from_stats(*feature_statistics(extractor(to_uint8(images))), real["mu"], real["sigma"])
    return {
        "sampler": sampler,
        "steps": steps,
        "network_calls": steps,
        "clip_x0": clip_x0,
        "samples": samples,
        "fid": fid,
        "seconds_per_1000": 1000 * seconds / samples,
    }


def raw_eps_score(model, extractor, real, steps, samples, batch_size):
    """Clipped DDIM keeping the network's eps in its direction term (kddpm's step before it
    recomputed eps from the clipped x0; diffusers' DDIMScheduler default), for comparison."""
    from bench_guidance import raw_eps_ddim

    plan = raw_eps_ddim(model.plan("ddim", steps, clip_x0=True))
    runner = Sampler(model.ema_denoiser, model.image_shape)
    started = time.perf_counter()
    images = np.concatenate([
        runner.sample(plan, min(batch_size, samples - i), seed=0, first_image=i).numpy()
        for i in range(0, samples, batch_size)
    ])  # fmt: skip
    seconds = time.perf_counter() - started
    fid = frechet_distance_from_stats(*feature_statistics(extractor(to_uint8(images))), real["mu"], real["sigma"])
    return {
        "sampler": "ddim", "steps": steps, "network_calls": steps, "clip_x0": True, "raw_eps": True,
        "samples": samples, "fid": fid, "seconds_per_1000": 1000 * seconds / samples,
    }  # fmt: skip


def step_times(model, batch: int, rounds: int = 3, steps: int = 20) -> dict[str, list[float]]:
    """ms per reverse step of the compiled loop, DDIM and DPM-Solver++ alternating."""
    runner = Sampler(model.ema_denoiser, model.image_shape, num_classes=model.num_classes)
    plans = {name: make_plan(model.schedule, name, steps) for name in ("ddim", "dpm++2m")}
    for plan in plans.values():
        runner.sample(plan, batch, seed=0).numpy()  # compile
    times: dict[str, list[float]] = {name: [] for name in plans}
    for _ in range(rounds):
        for name, plan in plans.items():
            started = time.perf_counter()
            runner.sample(plan, batch, seed=1).numpy()
            times[name].append(1000 * (time.perf_counter() - started) / steps)
    return times


def plot(rows, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib); no plot written.")
        return None
    figure, axes = plt.subplots(figsize=(7, 4.5))
    styles = {"ddim": ("tab:blue", "DDIM"), "dpm++2m": ("tab:red", "DPM-Solver++(2M)"), "ddpm": ("black", "DDPM")}
    for sampler, (color, label) in styles.items():
        for clip_x0, dash in ((True, "-"), (False, "--")):
            chosen = sorted(
                (r for r in rows if r["sampler"] == sampler and r["clip_x0"] == clip_x0 and not r.get("raw_eps")),
                key=lambda r: r["steps"],
            )
            if chosen:
                n = chosen[0]["samples"]
                axes.plot([r["network_calls"] for r in chosen], [r["fid"] for r in chosen], dash, marker="o",
                          color=color, label=f"{label}, clip {'on' if clip_x0 else 'off'} (N={n})")  # fmt: skip
    axes.set_xscale("log")
    axes.set_xlabel("network calls per image")
    axes.set_ylabel("FID (Fashion-MNIST features, vs test split)")
    axes.set_title("Quality per network call")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--ddpm-samples", type=int, default=200, help="0: leave DDPM out")
    parser.add_argument("--ddim", default="10,20,50,100")
    parser.add_argument("--dpm", default="10,15,20,50")
    parser.add_argument("--clip-off-steps", default="10,20,50,100", help="steps also measured without clipping")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--out", default="benchmarks/results/quality_vs_steps.json")
    parser.add_argument("--also", help="a JSON this benchmark wrote earlier: its rows join the table and the plot")
    parser.add_argument("--no-step-times", action="store_true", help="skip the ms-per-step comparison")
    parser.add_argument(
        "--raw-eps-steps", default="", help="DDIM steps also measured with the raw-eps clipped step (comparison)"
    )
    args = parser.parse_args()
    model = load_diffusion_model(args.model)
    extractor = feature_extractor("fashion_mnist")
    real = reference_features(extractor, "fashion_mnist:test", model.image_shape)
    clip_off = {int(s) for s in args.clip_off_steps.split(",") if s}
    settings = [("ddim", int(s)) for s in args.ddim.split(",") if s] + [
        ("dpm++2m", int(s)) for s in args.dpm.split(",") if s
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    earlier = json.loads(Path(args.also).read_text()) if args.also else {"rows": [], "step_ms": {}}

    def save():
        out.write_text(json.dumps({"model": str(args.model), "rows": rows, "step_ms": step_ms}, indent=2) + "\n")

    step_ms: dict = dict(earlier.get("step_ms", {}))
    for sampler, steps in settings:
        for clip_x0 in (True, False) if steps in clip_off else (True,):
            rows.append(score(model, extractor, real, sampler, steps, clip_x0, args.samples, args.batch_size))
            print(json.dumps(rows[-1]), flush=True)
            save()
    for steps in (int(s) for s in args.raw_eps_steps.split(",") if s):
        rows.append(score(model, extractor, real, "ddim", steps, True, args.samples, args.batch_size, raw_eps=True))
        print(json.dumps(rows[-1]), flush=True)
        save()
    if args.ddpm_samples:
        rows.append(
            score(model, extractor, real, "ddpm", model.schedule.timesteps, True, args.ddpm_samples, args.batch_size)
        )
        print(json.dumps(rows[-1]), flush=True)
        save()
    for batch in () if args.no_step_times else (1, 64):
        step_ms[str(batch)] = step_times(model, batch)
        print(f"batch {batch}: ms per step {step_ms[str(batch)]}", flush=True)
    rows = earlier["rows"] + rows
    save()
    picture = plot(rows, out.with_suffix(".png"))

    print("\n| sampler | network calls | clip x0 | N | FID | sampling time per 1,000 images |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        name = {"ddim": "DDIM", "dpm++2m": "DPM-Solver++(2M)", "ddpm": "DDPM"}[row["sampler"]]
        name += " (raw eps, before)" if row.get("raw_eps") else ""
        print(f"| {name} | {row['network_calls']} | {'on' if row['clip_x0'] else 'off'} | {row['samples']} | "
              f"{row['fid']:.2f} | {row['seconds_per_1000']:.0f} s |")  # fmt: skip
    if not step_ms:
        print(f"\nResults: {out}" + (f"  Plot: {picture}" if picture else ""))
        return
    print("\n| batch | DDIM ms/step (median) | DPM-Solver++ ms/step (median) | ratio |")
    print("| --- | --- | --- | --- |")
    for batch, times in step_ms.items():
        ddim, dpm = np.median(times["ddim"]), np.median(times["dpm++2m"])
        print(f"| {batch} | {ddim:.1f} | {dpm:.1f} | {dpm / ddim:.3f} |")
    print(f"\nResults: {out}" + (f"  Plot: {picture}" if picture else ""))


if __name__ == "__main__":
    main()
