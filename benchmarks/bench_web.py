"""The browser page's speed next to the Python ONNX client's, and its screenshot.

    python benchmarks/bench_web.py --model exported/kddpm.onnx [--num 16] [--screenshot docs/figures/web_page.png]

Serves export/web/ on 127.0.0.1 (after `npm ci --prefix export/web`), opens it in headless Chromium
with the page's test hook (a seeded numpy x_T of --num images, kddpm's default DPM-Solver++(2M) 20
steps) and prints the seconds the page reports for sampling (the model already loaded, the predicted
x_0 drawn at every step), then times export/onnx_sample.py's numpy loop on the same x_T, and checks
the two agree. With --screenshot, saves the page as a visitor sees it after sampling.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tools"), str(REPO / "export")]

import onnx_sample  # noqa: E402
from browser import CHROMIUM, RUNTIME, Site  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="an ONNX file written by kddpm export")
    parser.add_argument("--num", type=int, default=16)
    parser.add_argument("--screenshot", help="PNG to save the page to after sampling")
    args = parser.parse_args()
    if not CHROMIUM or not RUNTIME.is_file():
        raise SystemExit("error: needs chromium (apt-get install chromium) and npm ci --prefix export/web")
    session = onnx_sample.open_session(args.model)
    shape = onnx_sample.read_metadata(session)["image_shape"]
    x_T = np.random.default_rng(0).standard_normal((args.num, *shape)).astype(np.float32)
    with tempfile.TemporaryDirectory() as folder:
        site = Site(Path(folder) / "site", Path(args.model), {"x_T": x_T.ravel().tolist()})
        try:
            report = site.browse(Path(folder))
            if args.screenshot:
                site.browse(
                    Path(folder), query="?input=input.json&screenshot", screenshot=Path(args.screenshot).resolve()
                )
        finally:
            site.close()
    started = time.perf_counter()
    expected = onnx_sample.sample(session, x_T=x_T)
    numpy_seconds = time.perf_counter() - started
    difference = float(np.abs(np.asarray(report["images"]).reshape(x_T.shape) - expected).max())
    print(f"| client | {args.num} images, DPM-Solver++(2M) 20 steps |\n| --- | --- |")
    print(f"| Chromium {CHROMIUM}, onnxruntime-web (WebAssembly, 1 thread) | {report['seconds']:.1f} s |")
    print(f"| export/onnx_sample.py (numpy + onnxruntime) | {numpy_seconds:.1f} s |")
    print(f"\nLargest difference between the two: {difference:.2g}")
    if args.screenshot:
        print(f"Screenshot: {args.screenshot}")


if __name__ == "__main__":
    main()
