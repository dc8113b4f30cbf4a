"""export/web/: the page samples in a real browser (Debian's Chromium, headless) from a given x_T,
and gets the images export/onnx_sample.py gets from the same x_T.

The page is served from 127.0.0.1 by a small server that also takes the page's report (a POST of
the images). It needs `npm ci --prefix export/web` (onnxruntime-web) and Chromium; where either is
missing the tests are skipped, unless KDDPM_REQUIRE_BROWSER=1 (as .ci/run sets), where they fail.
"""

import http.server
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import EXPORT_SHAPE

REPO = Path(__file__).resolve().parents[1]
WEB = REPO / "export" / "web"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
RUNTIME = WEB / "node_modules" / "onnxruntime-web" / "dist" / "ort.wasm.min.js"


def require_browser():
    missing = [
        what for what, ok in (("chromium", CHROMIUM), ("npm ci --prefix export/web", RUNTIME.is_file())) if not ok
    ]
    if missing:
        message = f"the browser test needs {' and '.join(missing)}"
        if os.environ.get("KDDPM_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)


class Site:
    """The page, its runtime and a model on 127.0.0.1, and the reports the page POSTs."""

    def __init__(self, folder: Path, model: Path, inputs: dict):
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("index.html", "app.js"):
            shutil.copy(WEB / name, folder / name)
        (folder / "node_modules").symlink_to(WEB / "node_modules")
        shutil.copy(model, folder / "model.onnx")
        (folder / "input.json").write_text(json.dumps(inputs))
        self.reports = []
        received = threading.Event()
        reports = self.reports

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(folder), **kwargs)

            def do_POST(self):
                reports.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()
                received.set()

            def log_message(self, *args):
                pass

        self.received = received
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/index.html"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def browse(self, tmp_path, query="?input=input.json&report=/report", timeout=240, screenshot=None):
        """Opens the page in headless Chromium until it reports (or, with screenshot, takes one)."""
        args = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                f"--user-data-dir={tmp_path / 'profile'}", "--window-size=900,900"]  # fmt: skip
        if screenshot:
            args += [f"--screenshot={screenshot}", "--virtual-time-budget=60000"]
        browser = subprocess.Popen([*args, self.url + query], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            if screenshot:
                browser.wait(timeout=timeout)
                return None
            assert self.received.wait(timeout), "the page did not report within the time limit"
            report = self.reports[-1]
            assert "error" not in report, f"the page failed: {report['error']}"
            return report
        finally:
            browser.kill()
            browser.wait()

    def close(self):
        self.server.shutdown()


def numpy_client(model_path, x_T, **options):
    import sys

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
