"""export/web/: the page samples in a real browser (Debian's Chromium, headless) from a given x_T,
and gets the images export/onnx_sample.py gets from the same x_T.

The page is served from 127.0.0.1 by a small server that also takes the page's report (a POST of
the images). It needs `npm ci --prefix export/web` (onnxruntime-web) and Chromium; where either is
missing the tests are skipped, unless KDDPM_REQUIRE_BROWSER=1 (as .ci/run sets), where they fail.
"""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import EXPORT_SHAPE

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from browser import CHROMIUM, RUNTIME, Site  # noqa: E402


def require_browser():
    missing = [
        what for what, ok in (("chromium", CHROMIUM), ("npm ci --prefix export/web", RUNTIME.is_file())) if not ok
    ]
    if missing:
        message = f"the browser test needs {' and '.join(missing)}"
        if os.environ.get("KDDPM_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)


def numpy_client(model_path, x_T, **options):
    if str(REPO / "export") not in sys.path:
        sys.path.append(str(REPO / "export"))
    import onnx_sample

    session = onnx_sample.open_session(model_path)
    return onnx_sample.sample(session, x_T=x_T, sampler="dpm++2m", steps=20, **options)


@pytest.mark.slow
def test_the_page_samples_the_numpy_clients_images(random_ema_exported, tmp_path):
    require_browser()
    _, results = random_ema_exported
    x_T = np.random.default_rng(0).standard_normal((4, *EXPORT_SHAPE)).astype(np.float32)
    site = Site(tmp_path / "site", results["onnx"].path, {"x_T": x_T.ravel().tolist()})
    try:
        report = site.browse(tmp_path)
    finally:
        site.close()
    assert report["plan"]["sampler"] == "dpm++2m" and report["plan"]["steps"] == 20  # kddpm's default
    images = np.asarray(report["images"], np.float32).reshape(x_T.shape)
    expected = numpy_client(results["onnx"].path, x_T)
    assert np.abs(images - expected).max() < 1e-3
    assert np.abs(expected - x_T).max() > 0.1  # the comparison is of a sampled result, not of x_T


@pytest.mark.slow
def test_the_page_samples_a_class_with_guidance(random_conditional_exported, tmp_path):
    require_browser()
    path = random_conditional_exported["onnx"].path
    x_T = np.random.default_rng(1).standard_normal((3, *EXPORT_SHAPE)).astype(np.float32)
    labels = [0, 2, 3]  # 3: the null label
    inputs = {"x_T": x_T.ravel().tolist(), "labels": labels, "guidance": 2.0}
    site = Site(tmp_path / "site", path, inputs)
    try:
        report = site.browse(tmp_path)
    finally:
        site.close()
    images = np.asarray(report["images"], np.float32).reshape(x_T.shape)
    expected = numpy_client(path, x_T, labels=np.asarray(labels), guidance_scale=2.0)
    unguided = numpy_client(path, x_T, labels=np.asarray(labels), guidance_scale=0.0)
    assert np.abs(images - expected).max() < 1e-3 and np.abs(images - unguided).max() > 1e-2
