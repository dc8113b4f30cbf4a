"""Export: SavedModel for TF Serving, ONNX, and the TensorFlow-free ONNX Runtime sampler."""

import hashlib
import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import keras
import numpy as np
import onnx
import pytest
import tensorflow as tf
from conftest import EXPORT_CLASSES as CLASSES
from conftest import EXPORT_SHAPE, EXPORT_T, tiny_unet

import kddpm.export as export_module
from kddpm import DiffusionModel, KddpmError, NoiseSchedule
from kddpm.export import export_model, export_saved_model
from kddpm.sampling import Sampler, ddim_plan, ddpm_plan, to_uint8

REPO = Path(__file__).resolve().parents[1]
SHAPE = EXPORT_SHAPE
T = EXPORT_T


def load_onnx_sample():
    # As when the script runs: its folder (with grid.py) is on the path.
    if str(REPO / "export") not in sys.path:
        sys.path.append(str(REPO / "export"))
    import onnx_sample

    return onnx_sample


@pytest.fixture
def model(random_ema_model):
    return random_ema_model


@pytest.fixture
def exported(random_ema_exported):
    return random_ema_exported


def run_python(code, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})},
        cwd=REPO,
    )


def tree_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + file.read_bytes())
    return digest.hexdigest()


# --- SavedModel -----------------------------------------------------------------------------


def test_saved_model_layout_and_versions(model, exported):
    base, results = exported
    first = results["saved_model"].path
    assert first == base / "kddpm" / "1"
    assert (first / "saved_model.pb").is_file() and (first / "variables").is_dir()
    assert results["saved_model"].max_abs_diff <= 1e-4
    second = export_saved_model(model, base, "kddpm").path
    assert second == base / "kddpm" / "2"
    with pytest.raises(KddpmError, match="already exists"):
        export_saved_model(model, base, "kddpm", version=2)
    # Nothing but version folders is left where the server polls.
    assert sorted(p.name for p in (base / "kddpm").iterdir()) == ["1", "2"]


def test_signatures_as_saved_model_cli_prints_them(exported):
    _base, results = exported
    cli = Path(sys.executable).with_name("saved_model_cli")
    shown = subprocess.run(
        [str(cli), "show", "--dir", str(results["saved_model"].path), "--all"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    ).stdout
    blocks = dict(re.findall(r"signature_def\['(\w+)'\]:(.*?)(?=signature_def\[|\Z)", shown, re.S))
    assert {"serving_default", "sample", "sample_from_noise"} <= set(blocks)

    def tensors(block, kind):
        found = re.findall(rf"{kind}\['(\w+)'\] tensor_info:\s+dtype: (\w+)\s+shape: \(([^)]*)\)", block)
        return {name: (dtype, shape.replace(" ", "")) for name, dtype, shape in found}

    assert tensors(blocks["serving_default"], "inputs") == {
        "x_t": ("DT_FLOAT", "-1,8,8,1"),
        "t": ("DT_INT32", "-1"),
    }
    assert tensors(blocks["serving_default"], "outputs") == {"eps": ("DT_FLOAT", "-1,8,8,1")}
    options = {"seed": ("DT_INT64", "-1"), "sampler": ("DT_STRING", "-1"), "steps": ("DT_INT32", "-1")}
    assert tensors(blocks["sample"], "inputs") == {"num_images": ("DT_INT32", "-1"), **options}
    assert tensors(blocks["sample_from_noise"], "inputs") == {"x_T": ("DT_FLOAT", "-1,8,8,1"), **options}
    for name in ("sample", "sample_from_noise"):
        assert tensors(blocks[name], "outputs") == {"images": ("DT_UINT8", "-1,8,8,1")}


# Decodes TF Serving REST row-format requests the way the server does (one list per named
# input, stacked over instances, cast to the signature's dtype) and calls the signature.
SERVE_ROWS = """
import json, sys
import numpy as np
import tensorflow as tf

def predict(loaded, request):
    signature = loaded.signatures[request["signature_name"]]
    specs = signature.structured_input_signature[1]
    instances = request["instances"]
    feeds = {
        name: tf.constant(np.array([row[name] for row in instances]), dtype=spec.dtype)
        for name, spec in specs.items()
    }
    return {name: value.numpy() for name, value in signature(**feeds).items()}
"""


def test_saved_model_in_a_fresh_process_matches_keras(model, exported, tmp_path):
    _base, results = exported
    rng = np.random.default_rng(1)
    x_t = rng.standard_normal((3, *SHAPE)).astype(np.float32)
    t = np.array([0, 17, T - 1], dtype=np.int32)
    x_T = rng.standard_normal((2, *SHAPE)).astype(np.float32)
    requests = {
        "eps": {
            "signature_name": "serving_default",
            "instances": [{"x_t": x.tolist(), "t": int(s)} for x, s in zip(x_t, t)],
        },
        "ddim": {
            "signature_name": "sample",
            "instances": [{"num_images": 3, "seed": 9, "sampler": "ddim", "steps": 7}],
        },
        "ddpm": {
            "signature_name": "sample",
            "instances": [{"num_images": 2, "seed": 4, "sampler": "ddpm", "steps": 0}],
        },
        "from_noise": {
            "signature_name": "sample_from_noise",
            "instances": [{"x_T": x.tolist(), "seed": 3, "sampler": "ddim", "steps": 5} for x in x_T],
        },
    }
    (tmp_path / "requests.json").write_text(json.dumps(requests))
    result = run_python(
        SERVE_ROWS
        + f"""
loaded = tf.saved_model.load({str(results["saved_model"].path)!r})
requests = json.load(open({str(tmp_path / "requests.json")!r}))
answers = {{key: predict(loaded, request) for key, request in requests.items()}}
np.savez({str(tmp_path / "answers.npz")!r}, **{{key: list(a.values())[0] for key, a in answers.items()}})
assert not any(name.startswith("kddpm") for name in sys.modules), "kddpm was imported"
"""
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answers = np.load(tmp_path / "answers.npz")

    keras_eps = keras.ops.convert_to_numpy(model.ema_denoiser([x_t, t]))
    assert np.abs(answers["eps"] - keras_eps).max() <= 1e-4
    for key, (num, seed, sampler, steps) in {"ddim": (3, 9, "ddim", 7), "ddpm": (2, 4, "ddpm", None)}.items():
        assert answers[key].dtype == np.uint8 and answers[key].shape == (num, *SHAPE)
        expected = to_uint8(model.sample(num, seed=seed, sampler=sampler, steps=steps))
        assert np.abs(answers[key].astype(int) - expected).max() <= 1, key
    from_noise = to_uint8(Sampler(model.ema_denoiser, SHAPE).sample(model.plan("ddim", 5), x_T=x_T))
    assert np.abs(answers["from_noise"].astype(int) - from_noise).max() <= 1


def test_saved_model_rejects_bad_requests(exported):
    _base, results = exported
    loaded = tf.saved_model.load(str(results["saved_model"].path))
    serve, sample = loaded.signatures["serving_default"], loaded.signatures["sample"]
    x = tf.zeros((2, *SHAPE))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"x_t must be \[B, 8, 8, 1\]"):
        serve(x_t=tf.zeros((2, 9, 8, 1)), t=tf.constant([1, 2]))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"t must be \[B\]"):
        serve(x_t=x, t=tf.constant([1, 2, 3]))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"x_T must be \[B, 8, 8, 1\]"):
        loaded.signatures["sample_from_noise"](
            x_T=tf.zeros((1, 8, 8, 3)),
            seed=tf.constant([0], tf.int64),
            sampler=tf.constant(["ddim"]),
            steps=tf.constant([2]),
        )
    with pytest.raises((tf.errors.InvalidArgumentError, TypeError), match="expected to be a int32 tensor"):
        serve(x_t=x, t=tf.constant([1.0, 2.0]))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"t must be in \[0, 40\)"):
        serve(x_t=x, t=tf.constant([1, T]))
    options = {"seed": tf.constant([0], tf.int64), "num_images": tf.constant([1])}
    with pytest.raises(
        tf.errors.InvalidArgumentError, match="sampler must be ddpm, ddim, dpm\\+\\+2m or dpm\\+\\+2m_sde, got"
    ):
        sample(sampler=tf.constant(["euler"]), steps=tf.constant([5]), **options)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"DDIM steps must be in \[1, 40\]"):
        sample(sampler=tf.constant(["ddim"]), steps=tf.constant([-1]), **options)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"DPM-Solver\+\+ steps must be in \[1, 39\]"):
        sample(sampler=tf.constant(["dpm++2m"]), steps=tf.constant([T]), **options)
    with pytest.raises(tf.errors.InvalidArgumentError, match="DDPM takes all 40 steps"):
        sample(sampler=tf.constant(["ddpm"]), steps=tf.constant([20]), **options)


def test_saved_model_defaults_are_kddpms(model, exported):
    """sampler "" and steps 0 stand for the defaults (TF Serving has no optional inputs): the
    images model.sample draws when given nothing but the seed, with the model's clipping."""
    loaded = tf.saved_model.load(str(exported[1]["saved_model"].path))
    images = loaded.signatures["sample"](
        num_images=tf.constant([2]), seed=tf.constant([3], tf.int64), sampler=tf.constant([""]), steps=tf.constant([0])
    )["images"].numpy()
    expected = to_uint8(model.sample(2, seed=3))
    assert np.abs(images.astype(int) - expected).max() <= 1
    explicit = loaded.signatures["sample"](
        num_images=tf.constant([2]), seed=tf.constant([3], tf.int64), sampler=tf.constant(["dpm++2m"]),
        steps=tf.constant([20]),
    )["images"].numpy()  # fmt: skip
    np.testing.assert_array_equal(images, explicit)


def test_deployment_clients_default_to_kddpms_choices():
    from kddpm import defaults

    onnx_sample = load_onnx_sample()
    for name in ("SAMPLERS", "DEFAULT_SAMPLER", "DEFAULT_STEPS", "DEFAULT_GUIDANCE", "DYNAMIC_THRESHOLD_QUANTILE"):
        assert getattr(onnx_sample, name) == getattr(defaults, name), name
    rest_client = importlib.util.module_from_spec(
        spec := importlib.util.spec_from_file_location("rest_client", REPO / "export" / "rest_client.py")
    )
    spec.loader.exec_module(rest_client)
    assert inspect.signature(rest_client.request_samples).parameters["sampler"].default == defaults.DEFAULT_SAMPLER


def test_a_failed_export_leaves_no_version_and_keeps_the_old_ones(model, tmp_path, monkeypatch):
    first = export_saved_model(model, tmp_path).path
    before = tree_digest(first)

    class HalfWritten:
        def write_out(self, filepath, **kwargs):
            Path(filepath, "saved_model.pb").write_bytes(b"half")
            raise OSError("disk full")

    monkeypatch.setattr(export_module, "serving_archive", lambda *args, **kwargs: HalfWritten())
    with pytest.raises(OSError, match="disk full"):
        export_saved_model(model, tmp_path)
    monkeypatch.undo()
    # The parity check failing after a complete write must not publish the version either.
    monkeypatch.setattr(export_module, "_keras_eps", lambda network, x_t, t: np.ones((len(t), *SHAPE), np.float32))
    with pytest.raises(KddpmError, match=r"differs from the Keras model by"):
        export_saved_model(model, tmp_path)
    assert [p.name for p in (tmp_path / "kddpm").iterdir()] == ["1"]
    assert tree_digest(first) == before


# --- ONNX -----------------------------------------------------------------------------------


def test_onnx_file_is_checked_named_dynamic_and_carries_the_schedule(model, exported):
    _base, results = exported
    path = results["onnx"].path
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 15
    inputs = {i.name: i for i in proto.graph.input}
    assert set(inputs) == {"x_t", "t"} and [o.name for o in proto.graph.output] == ["eps"]
    batch_dim = inputs["x_t"].type.tensor_type.shape.dim[0]
    assert not batch_dim.HasField("dim_value")  # dynamic batch
    assert [d.dim_value for d in inputs["x_t"].type.tensor_type.shape.dim[1:]] == list(SHAPE)
    metadata = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(metadata["kddpm.schedule"]) == model.schedule.get_config()
    assert json.loads(metadata["kddpm.image_shape"]) == list(SHAPE) and metadata["kddpm.timesteps"] == str(T)

    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(2)
    for batch in (1, 5, 8):
        x_t = rng.standard_normal((batch, *SHAPE)).astype(np.float32)
        t = rng.integers(0, T, batch).astype(np.int32)
        (eps,) = session.run(["eps"], {"x_t": x_t, "t": t})
        keras_eps = keras.ops.convert_to_numpy(model.ema_denoiser([x_t, t]))
        assert np.abs(keras_eps).max() > 0.1  # the comparison means something
        assert np.abs(eps - keras_eps).max() <= 1e-4
    assert results["onnx"].max_abs_diff <= 1e-4


def test_onnx_parity_failure_is_loud_and_writes_nothing(model, tmp_path, monkeypatch, capsys):
    from kddpm import cli

    model_file = tmp_path / "model.keras"
    model.save(model_file)
    monkeypatch.setattr(export_module, "_keras_eps", lambda network, x_t, t: np.full((len(t), *SHAPE), 0.5, np.float32))
    code = cli.main(["export", "--model", str(model_file), "--format", "onnx", "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert code == 2
    assert re.search(r"ONNX Runtime's output differs from the Keras model by \d", error), error
    assert not list((tmp_path / "out").glob("*.onnx*"))


@pytest.mark.slow
def test_format_all_publishes_nothing_when_onnx_fails(model, tmp_path, monkeypatch, capsys):
    """The SavedModel passes its check, ONNX fails its own: no new version goes live, and a retry
    does not add one either."""
    from kddpm import cli

    model_file = tmp_path / "model.keras"
    model.save(model_file)
    base = tmp_path / "out"
    assert cli.main(["export", "--model", str(model_file), "--format", "saved_model", "--out", str(base)]) == 0
    version_1 = {p.relative_to(base): p.read_bytes() for p in (base / "kddpm" / "1").rglob("*") if p.is_file()}

    def failing_onnx_parity(model, network, serialized):
        raise KddpmError("ONNX Runtime's output differs from the Keras model by 0.5 (> 0.0001); nothing was written.")

    monkeypatch.setattr(export_module, "_onnx_parity", failing_onnx_parity)
    for _ in range(2):
        code = cli.main(["export", "--model", str(model_file), "--format", "all", "--out", str(base)])
        assert code == 2 and "ONNX Runtime's output differs" in capsys.readouterr().err
        assert sorted(p.name for p in (base / "kddpm").iterdir()) == ["1"]  # no version 2, no partial folder
        assert not list(base.glob("*.onnx*")) and not list(base.glob(".*"))
    assert {p.relative_to(base): p.read_bytes() for p in (base / "kddpm" / "1").rglob("*") if p.is_file()} == version_1
    monkeypatch.undo()
    assert cli.main(["export", "--model", str(model_file), "--format", "all", "--out", str(base)]) == 0
    assert sorted(p.name for p in (base / "kddpm").iterdir()) == ["1", "2"] and (base / "kddpm.onnx").is_file()


def test_export_refuses_bad_input_and_damages_nothing(model, exported, tmp_path):
    base, results = exported
    with pytest.raises(KddpmError, match="No model at"):
        export_model(tmp_path / "missing.keras", tmp_path / "a")
    plain = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    plain.save(tmp_path / "plain.keras")
    with pytest.raises(KddpmError, match="not a kddpm DiffusionModel"):
        export_model(tmp_path / "plain.keras", tmp_path / "a")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(KddpmError, match="Cannot create the output folder"):
        export_model(model, tmp_path / "a_file" / "sub", "saved_model")
    onnx_before = results["onnx"].path.read_bytes()
    versions_before = sorted(p.name for p in (base / "kddpm").iterdir())
    # The ONNX file exists: refused before anything, the SavedModel included, is written.
    with pytest.raises(KddpmError, match="already exists; pass overwrite"):
        export_model(model, base, "all")
    assert results["onnx"].path.read_bytes() == onnx_before
    assert sorted(p.name for p in (base / "kddpm").iterdir()) == versions_before
    with pytest.raises(KddpmError, match="Unknown export format"):
        export_model(model, base, "tflite")


# --- The ONNX Runtime sampler ---------------------------------------------------------------


def test_onnx_sampler_schedule_matches_the_library():
    onnx_sample = load_onnx_sample()
    for schedule in (NoiseSchedule.linear(1000), NoiseSchedule.cosine(500), NoiseSchedule.linear(T, 1e-3, 0.05)):
        np.testing.assert_allclose(onnx_sample.betas_of(schedule.get_config()), schedule.betas, rtol=1e-12)


@pytest.mark.parametrize(
    "settings",
    [
        dict(sampler="ddpm", clip_x0=False),
        dict(sampler="ddpm", variance="beta", clip_x0=True),
        dict(sampler="ddpm", clip_x0="dynamic"),
        dict(sampler="ddim", steps=9, eta=0.0, clip_x0=False),
        dict(sampler="ddim", steps=13, eta=0.7, clip_x0=True),
        dict(sampler="ddim", steps=9, eta=0.0, clip_x0="dynamic"),
    ],
    ids=["ddpm", "ddpm-beta-clip", "ddpm-dynamic", "ddim", "ddim-eta-clip", "ddim-dynamic"],
)
def test_onnx_sampler_matches_the_tf_sampler(model, exported, settings):
    import onnxruntime

    onnx_sample = load_onnx_sample()
    session = onnxruntime.InferenceSession(str(exported[1]["onnx"].path), providers=["CPUExecutionProvider"])
    if settings["sampler"] == "ddpm":
        plan = ddpm_plan(model.schedule, settings.get("variance", "beta_tilde"), settings["clip_x0"])
    else:
        plan = ddim_plan(model.schedule, settings["steps"], settings["eta"], settings["clip_x0"])
    rng = np.random.default_rng(8)
    x_T = rng.standard_normal((3, *SHAPE)).astype(np.float32)
    noise = rng.standard_normal((plan.num_steps, 3, *SHAPE)).astype(np.float32)
    reference = Sampler(model.ema_denoiser, SHAPE).sample(plan, x_T=x_T, noise=noise).numpy()
    images = onnx_sample.sample(session, x_T=x_T, noise=noise, **settings)
    assert np.abs(reference).max() > 0.5
    np.testing.assert_allclose(images, reference, atol=1e-3, rtol=0)


def fake_tensorflow(tmp_path: Path) -> dict[str, str]:
    """An environment in which ``import tensorflow`` fails."""
    blocker = tmp_path / "no_tensorflow" / "tensorflow"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('tensorflow is not available here')\n")
    return {"PYTHONPATH": str(blocker.parent)}


def test_onnx_sampler_script_runs_without_tensorflow(exported, tmp_path):
    out = tmp_path / "grid.png"
    # The folder as a deployer copies it (plain cp -r), away from the repository.
    subprocess.run(["cp", "-r", str(REPO / "export"), str(tmp_path / "deploy")], check=True)
    script = tmp_path / "deploy" / "onnx_sample.py"
    env = {**os.environ, **fake_tensorflow(tmp_path)}
    check = subprocess.run([sys.executable, "-c", "import tensorflow"], env=env, capture_output=True)
    assert check.returncode != 0  # the blocker works
    args = ["--model", str(exported[1]["onnx"].path), "--num", "5", "--sampler", "ddim", "--steps", "4"]
    done = subprocess.run(
        [sys.executable, str(script), *args, "--out", str(out)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == f"Samples: {out}"
    from PIL import Image

    grid = np.asarray(Image.open(out))
    # kddpm's grid: 3 columns of 8-px images enlarged 22x (the smallest scale reaching 512 px), 2-px gaps.
    assert grid.shape == (2 * 176 + 2, 3 * 176 + 4) and grid.dtype == np.uint8 and grid.std() > 0
    done = subprocess.run(
        [sys.executable, str(script), *args, "--out", str(out), "--grid-scale", "1"], env=env, capture_output=True
    )
    assert done.returncode == 0 and np.asarray(Image.open(out)).shape == (2 * 8 + 2, 3 * 8 + 4)
    assert "step 4/4" in done.stderr.decode()  # the progress counter, a plain line in a log
    keras_file = tmp_path / "model.keras"
    keras_file.write_bytes(b"PK\x03\x04" + b"\0" * 60)
    done = subprocess.run([sys.executable, str(script), "--model", str(keras_file)], env=env, capture_output=True)
    assert done.returncode == 2 and "is a .keras model (a zip archive), not an ONNX file" in done.stderr.decode()


def test_onnx_sampler_rejects_a_file_without_kddpm_metadata(exported, tmp_path):
    proto = onnx.load(str(exported[1]["onnx"].path))
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    script = REPO / "export" / "onnx_sample.py"
    env = {**os.environ, **fake_tensorflow(tmp_path)}
    for model_path, message in ((bare, "no kddpm metadata"), (tmp_path / "none.onnx", "No ONNX file at")):
        done = subprocess.run(
            [sys.executable, str(script), "--model", str(model_path), "--out", str(tmp_path / "x.png")],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "x.png").exists()


# --- The REST client, against a loopback stand-in for TF Serving ----------------------------


def test_rest_client_round_trip(model, exported, tmp_path):
    namespace = {}
    exec(SERVE_ROWS, namespace)
    loaded = tf.saved_model.load(str(exported[1]["saved_model"].path))
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append(self.path)
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            (images,) = namespace["predict"](loaded, request).values()
            body = json.dumps({"predictions": images.tolist()}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        sys.path.insert(0, str(REPO / "export"))
        import rest_client

        url = f"http://127.0.0.1:{server.server_port}"
        images = rest_client.request_samples(url, "kddpm", 4, "ddim", 6, seed=2)
    finally:
        sys.path.remove(str(REPO / "export"))
        server.shutdown()
    assert seen == ["/v1/models/kddpm:predict"]
    expected = to_uint8(model.sample(4, seed=2, sampler="ddim", steps=6))
    assert images.dtype == np.uint8 and np.abs(images.astype(int) - expected).max() <= 1


def test_a_mixed_precision_model_is_exported_in_float32(tmp_path):
    from kddpm.training import set_precision

    try:
        set_precision("bfloat16")
        model = DiffusionModel(tiny_unet(SHAPE), NoiseSchedule.linear(T))
    finally:
        set_precision("off")
    rng = np.random.default_rng(6)
    model.ema_denoiser.set_weights(
        [rng.normal(0, 0.2, w.shape).astype(np.float32) for w in model.ema_denoiser.get_weights()]
    )
    results = {r.format: r for r in export_model(model, tmp_path, "all")}
    assert results["saved_model"].max_abs_diff <= 1e-4 and results["onnx"].max_abs_diff <= 1e-4
    x_t = rng.standard_normal((4, *SHAPE)).astype(np.float32)
    t = np.array([0, 5, 20, T - 1], np.int32)
    served = tf.saved_model.load(str(results["saved_model"].path)).signatures["serving_default"]
    eps = served(x_t=tf.constant(x_t), t=tf.constant(t))["eps"].numpy()
    bf16_eps = keras.ops.convert_to_numpy(model.ema_denoiser([x_t, t]))
    # The export computes in float32: close to the bfloat16 network, not equal to it.
    assert 0 < np.abs(eps - bf16_eps).max() < 0.05 * np.abs(bf16_eps).max()


# --- Class-conditional models ---------------------------------------------------------------

# TF Serving's REST columnar format, which a conditional request uses: each named input as it is,
# cast to the signature's dtype; the answer's "outputs" is the value itself when there is one output.
SERVE_COLUMNS = """
import numpy as np
import tensorflow as tf

def predict(loaded, request):
    signature = loaded.signatures[request["signature_name"]]
    specs = signature.structured_input_signature[1]
    if "instances" in request:  # the row format: one list per named input, stacked over instances
        rows = request["instances"]
        feeds = {name: tf.constant(np.array([r[name] for r in rows]), dtype=spec.dtype) for name, spec in specs.items()}
        return {"predictions": next(iter(signature(**feeds).values())).numpy().tolist()}
    feeds = {name: tf.constant(np.array(request["inputs"][name]), dtype=spec.dtype) for name, spec in specs.items()}
    outputs = [value.numpy().tolist() for value in signature(**feeds).values()]
    return {"outputs": [v.decode() if isinstance(v, bytes) else v for v in outputs[0]]}
"""


class ServingStandIn:
    """A loopback stand-in for TF Serving's REST API (row and columnar requests) over a loaded SavedModel."""

    def __init__(self, saved_model_path):
        namespace = {}
        exec(SERVE_COLUMNS, namespace)
        loaded = tf.saved_model.load(str(saved_model_path))

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                body = json.dumps(namespace["predict"](loaded, request)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        sys.path.insert(0, str(REPO / "export"))
        import rest_client

        return rest_client

    def __exit__(self, *exc):
        sys.path.remove(str(REPO / "export"))
        self.server.shutdown()


@pytest.fixture
def conditional(random_conditional_model):
    return random_conditional_model


@pytest.fixture
def conditional_exported(random_conditional_exported):
    return random_conditional_exported


def test_conditional_saved_model_signatures_take_labels_and_guidance(conditional, conditional_exported):
    loaded = tf.saved_model.load(str(conditional_exported["saved_model"].path))
    serve = loaded.signatures["serving_default"]
    assert set(serve.structured_input_signature[1]) == {"x_t", "t", "label"}
    rng = np.random.default_rng(3)
    x_t = rng.standard_normal((4, *SHAPE)).astype(np.float32)
    t = np.array([0, 5, 20, 39], np.int32)
    label = np.array([0, 1, 2, 3], np.int32)  # 3: the null label
    eps = serve(x_t=tf.constant(x_t), t=tf.constant(t), label=tf.constant(label))["eps"].numpy()
    np.testing.assert_allclose(eps, conditional.ema_denoiser([x_t, t, label]), atol=1e-5)
    sample = loaded.signatures["sample"]
    for guidance in (0.0, 2.5):
        images = sample(
            num_images=tf.constant([3]),
            seed=tf.constant([4], tf.int64),
            sampler=tf.constant(["ddim"]),
            steps=tf.constant([6]),
            labels=tf.constant([2, 0, 2]),
            guidance_scale=tf.constant([guidance]),
        )["images"].numpy()
        expected = to_uint8(
            conditional.sample(3, seed=4, sampler="ddim", steps=6, labels=[2, 0, 2], guidance_scale=guidance)
        )
        assert np.abs(images.astype(int) - expected).max() <= 1
    names = loaded.signatures["class_names"](index=tf.constant([0]))["names"].numpy()
    assert [n.decode() for n in names] == CLASSES
    for labels, guidance, message in (
        ([0, 4, 1], 1.0, "labels must be class indices"),
        ([0, 1], 1.0, "one class per image"),
        ([0, 1, 2], -1.0, "guidance_scale must be >= 0"),
    ):
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            sample(
                num_images=tf.constant([3]),
                seed=tf.constant([0], tf.int64),
                sampler=tf.constant(["ddim"]),
                steps=tf.constant([3]),
                labels=tf.constant(labels),
                guidance_scale=tf.constant([guidance]),
            )


def test_conditional_rest_client_asks_by_class(conditional, conditional_exported, tmp_path):
    serving = ServingStandIn(conditional_exported["saved_model"].path)
    with serving as rest_client:
        names = rest_client.class_names(serving.url, "cond")
        images = rest_client.request_samples(
            serving.url, "cond", 2, "ddim", 5, seed=1, labels=[1, 1], guidance_scale=3.0
        )
        options = ["--url", serving.url, "--model", "cond", "--num", "2", "--steps", "5", "--seed", "1"]
        done = rest_client.main([*options, "--class", "DOT", "--guidance", "3", "--out", str(tmp_path / "r.png")])
    assert names == CLASSES and done == 0 and (tmp_path / "r.png").is_file()
    expected = to_uint8(conditional.sample(2, seed=1, sampler="ddim", steps=5, labels="dot", guidance_scale=3.0))
    assert np.abs(images.astype(int) - expected).max() <= 1


@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_conditional_onnx_sampler_matches_the_tf_sampler(conditional, conditional_exported, guidance):
    import onnxruntime

    onnx_sample = load_onnx_sample()
    session = onnxruntime.InferenceSession(str(conditional_exported["onnx"].path), providers=["CPUExecutionProvider"])
    metadata = onnx_sample.read_metadata(session)
    assert metadata["num_classes"] == 3 and metadata["class_names"] == CLASSES
    assert [i.name for i in session.get_inputs()] == ["x_t", "t", "label"]
    # The ONNX sampler clips as the metadata says: as the model does by default.
    assert metadata["clip_x0"] is True and conditional.clip_x0 is True
    plan = ddim_plan(conditional.schedule, 7, 0.5, clip_x0=True)
    rng = np.random.default_rng(9)
    x_T = rng.standard_normal((3, *SHAPE)).astype(np.float32)
    noise = rng.standard_normal((plan.num_steps, 3, *SHAPE)).astype(np.float32)
    labels = np.array([0, 2, 3], np.int32)
    runner = Sampler(conditional.ema_denoiser, SHAPE, num_classes=3)
    reference = runner.sample(plan, x_T=x_T, noise=noise, labels=labels, guidance_scale=guidance).numpy()
    images = onnx_sample.sample(
        session, sampler="ddim", steps=7, eta=0.5, x_T=x_T, noise=noise, labels=labels, guidance_scale=guidance
    )
    np.testing.assert_allclose(images, reference, atol=1e-3, rtol=0)


def test_conditional_onnx_sampler_script_by_class_name(conditional_exported, tmp_path):
    shutil.copytree(REPO / "export", tmp_path / "deploy", symlinks=False)
    env = {**os.environ, **fake_tensorflow(tmp_path)}
    command = [
        sys.executable,
        str(tmp_path / "deploy" / "onnx_sample.py"),
        "--model",
        str(conditional_exported["onnx"].path),
    ]
    done = subprocess.run(
        [
            *command,
            "--class",
            "ring",
            "--class",
            "bar",
            "--num",
            "4",
            "--steps",
            "3",
            "--guidance",
            "2",
            "--out",
            str(tmp_path / "g.png"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == f"Samples: {tmp_path / 'g.png'}"
    bad = subprocess.run(
        [*command, "--class", "cat", "--out", str(tmp_path / "x.png")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "Unknown class 'cat'; this model's classes are ring, dot, bar" in bad.stderr


# --- DPM-Solver++ in the exports ------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["dpm++2m", "dpm++2m_sde"])
def test_saved_model_samples_with_dpm_solver(model, exported, sampler):
    loaded = tf.saved_model.load(str(exported[1]["saved_model"].path))
    images = loaded.signatures["sample"](
        num_images=tf.constant([3]),
        seed=tf.constant([6], tf.int64),
        sampler=tf.constant([sampler]),
        steps=tf.constant([8]),
    )["images"].numpy()
    expected = to_uint8(model.sample(3, seed=6, sampler=sampler, steps=8))
    assert np.abs(images.astype(int) - expected).max() <= 1
    with pytest.raises(
        tf.errors.InvalidArgumentError, match="sampler must be ddpm, ddim, dpm\\+\\+2m or dpm\\+\\+2m_sde"
    ):
        loaded.signatures["sample"](
            num_images=tf.constant([1]),
            seed=tf.constant([0], tf.int64),
            sampler=tf.constant(["euler"]),
            steps=tf.constant([8]),
        )


@pytest.mark.parametrize(
    "sampler, clip_x0", [("dpm++2m", False), ("dpm++2m", True), ("dpm++2m", "dynamic"), ("dpm++2m_sde", False)]
)
def test_onnx_sampler_runs_dpm_solver_like_the_tf_sampler(model, exported, sampler, clip_x0):
    import onnxruntime

    from kddpm.sampling import make_plan

    onnx_sample = load_onnx_sample()
    session = onnxruntime.InferenceSession(str(exported[1]["onnx"].path), providers=["CPUExecutionProvider"])
    plan = make_plan(model.schedule, sampler, 9, clip_x0=clip_x0)
    rng = np.random.default_rng(4)
    x_T = rng.standard_normal((3, *SHAPE)).astype(np.float32)
    noise = rng.standard_normal((plan.num_steps, 3, *SHAPE)).astype(np.float32)
    reference = Sampler(model.ema_denoiser, SHAPE).sample(plan, x_T=x_T, noise=noise).numpy()
    images = onnx_sample.sample(session, sampler=sampler, steps=9, clip_x0=clip_x0, x_T=x_T, noise=noise)
    np.testing.assert_allclose(images, reference, atol=1e-3, rtol=0)
