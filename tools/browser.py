"""The browser page (export/web/) on 127.0.0.1 in headless Chromium: what its test and its
benchmark share.

``Site(folder, model, inputs)`` serves a copy of the page with ``model`` as model.onnx and
``inputs`` (the page's test hook: {x_T, labels, guidance, plan}) as input.json, and collects what
the page POSTs back; ``site.browse(...)`` opens it until it reports.
"""

from __future__ import annotations

import http.server
import json
import shutil
import subprocess
import threading
from pathlib import Path

WEB = Path(__file__).resolve().parents[1] / "export" / "web"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
RUNTIME = WEB / "node_modules" / "onnxruntime-web" / "dist" / "ort.wasm.min.js"


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
