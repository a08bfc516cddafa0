"""End-to-end test of ``ceriakeras analyze --server URL`` (:mod:`ceriakeras.inference.remote`)
against a loopback stand-in for TF Serving.

The TF Serving binary (``tensorflow_model_server`` / the ``tensorflow/serving`` container) is
not on PyPI, so it cannot run here. In its place, a small HTTP server on 127.0.0.1 (a thread,
a bounded number of requests) loads the exported SavedModel with ``tf.saved_model.load``,
executes its own ``serving_default`` signature, and speaks TF Serving's documented REST predict
format (``POST /v1/models/NAME[/versions/N]:predict``, row format ``instances`` →
``predictions``, columnar ``inputs`` → ``outputs``, errors as ``{"error": …}`` with an HTTP error
status). The client's ``columns.csv`` must equal what ``analyze`` writes with the local model.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
CLI = "import sys; from ceriakeras.cli import main; sys.argv[0] = 'ceriakeras'; main()"
MODEL_NAME = "tiny"
PIXEL_A = 0.2


# --- the stand-in server -----------------------------------------------------------------------
class _StandInHandler(http.server.BaseHTTPRequestHandler):
    """TF Serving's REST predict API over one loaded SavedModel version."""

    def log_message(self, *args):  # keep test output quiet
        pass

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _servable_not_found(self, name: str, version: str | None) -> None:
        which = f"Specific({name}, {version})" if version else f"Latest({name})"
        self._answer(404, {"error": f"Servable not found for request: {which}"})

    def do_GET(self):
        """Model status API: ``GET /v1/models/NAME[/versions/N]``."""
        srv = self.server
        srv.requests += 1
        match = re.fullmatch(r"/v1/models/([^/:]+)(?:/versions/(\d+))?", self.path)
        if not match or match[1] != srv.model_name or (match[2] and int(match[2]) != srv.version):
            return self._servable_not_found(*(match.groups() if match else (self.path, None)))
        self._answer(200, {"model_version_status": [{
            "version": str(srv.version), "state": "AVAILABLE",
            "status": {"error_code": "OK", "error_message": ""}}]})

    def do_POST(self):
        """Predict API: ``POST /v1/models/NAME[/versions/N]:predict``."""
        import tensorflow as tf

        srv = self.server
        srv.requests += 1
        data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        match = re.fullmatch(r"/v1/models/([^/:]+)(?:/versions/(\d+))?:predict", self.path)
        if not match:
            return self._answer(404, {"error": f"Malformed request: POST {self.path}"})
        name, version = match[1], match[2]
        if name != srv.model_name or (version is not None and int(version) != srv.version):
            return self._servable_not_found(name, version)
        try:
            body = json.loads(data)
        except ValueError as err:
            return self._answer(400, {"error": f"JSON Parse error: {err}"})
        signature = srv.model.signatures.get(body.get("signature_name", "serving_default"))
        if signature is None:
            return self._answer(400, {"error": f"Serving signature name: \"{body.get('signature_name')}\" "
                                               "not found in signature def"})
        if ("instances" in body) == ("inputs" in body):
            return self._answer(400, {"error": "JSON Value: must have one of 'instances' or 'inputs'"})
        if "instances" in body:
            rows = body["instances"]
            image = [r["image"] if isinstance(r, dict) else r for r in rows]
        else:
            image = body["inputs"]["image"] if isinstance(body["inputs"], dict) else body["inputs"]
        outputs = signature(image=tf.constant(np.asarray(image, dtype=np.float32)))
        outputs = {k: v.numpy() for k, v in outputs.items()}
        if "instances" in body:
            n = len(next(iter(outputs.values())))
            return self._answer(200, {"predictions": [{k: v[i].tolist() for k, v in outputs.items()}
                                                      for i in range(n)]})
        return self._answer(200, {"outputs": {k: v.tolist() for k, v in outputs.items()}})


@pytest.fixture()
def stand_in_server(served_model):
    """A loopback TF Serving stand-in on a free port; yields its URL; serves ≤ 20 requests."""
    import tensorflow as tf

    version_dir, _ = served_model
    server = http.server.HTTPServer(("127.0.0.1", 0), _StandInHandler)
    server.timeout = 0.2
    server.model = tf.saved_model.load(str(version_dir))
    server.model_name, server.version, server.requests = MODEL_NAME, int(version_dir.name), 0
    stop = threading.Event()

    def serve():
        while not stop.is_set() and server.requests < 20:
            server.handle_request()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", server
    stop.set()
    thread.join(timeout=10)
    server.server_close()


# --- the model and the frames ------------------------------------------------------------------
@pytest.fixture(scope="module")
def served_model(tmp_path_factory):
    """A tiny untrained U-Net, exported by the project's own export code as saved_models/tiny/1."""
    from helpers import export_tiny_model

    root = tmp_path_factory.mktemp("serve")
    return export_tiny_model(root, pixel_size_A=PIXEL_A, name=MODEL_NAME), root


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    """A two-frame TIFF series: Poisson counts of a lattice of dark blobs (vacuum 40 counts)."""
    import tifffile

    yy, xx = np.mgrid[:72, :88].astype(float)
    clean = np.ones_like(xx)
    for cy in range(8, 72, 17):
        for cx in range(8, 88, 17):
            clean -= 0.3 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 2.0 ** 2))
    rng = np.random.default_rng(0)
    series = rng.poisson(40.0 * clean, size=(2,) + clean.shape).astype(np.float32)
    path = tmp_path_factory.mktemp("frames") / "series.tif"
    tifffile.imwrite(path, series)
    return path


def _run_client(*args: str) -> subprocess.CompletedProcess:
    """``ceriakeras analyze --quiet ARGS`` in a fresh process (this checkout's package)."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=path)
    return subprocess.run([sys.executable, "-c", CLI, "analyze", "--quiet", *args],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


# --- tests -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_client_csv_equals_analyze_with_the_local_model(served_model, stand_in_server, frames, tmp_path):
    from ceriakeras.analysis.run import analyze

    version_dir, root = served_model
    url, server = stand_in_server
    model_dir = version_dir.parent
    remote_out, local_out = tmp_path / "remote", tmp_path / "local"
    done = _run_client(str(frames), "--server", url, "--model-name", MODEL_NAME, "--model",
                       str(model_dir), "--out", str(remote_out), "--pixel-size", str(PIXEL_A),
                       "--batch-size", "1")
    assert done.returncode == 0, done.stderr
    assert server.requests == 3   # the status check, then one predict per frame (batch size 1)
    analyze([str(frames)], local_out, model=str(model_dir), pixel_size_A=PIXEL_A, progress=False)
    remote_csv = (remote_out / "columns.csv").read_text()
    local_csv = (local_out / "columns.csv").read_text()
    assert remote_csv.splitlines()[0] == ("source,frame,x_px,y_px,x_A,y_A,height,confidence,recognised,"
                                          "track,track_height,track_confidence")
    assert len(remote_csv.splitlines()) > 2          # columns found in both frames' rows
    assert {row.split(",")[1] for row in remote_csv.splitlines()[1:]} == {"0", "1"}
    assert remote_csv == local_csv


@pytest.mark.slow
def test_stand_in_answers_columnar_requests_like_row_requests(served_model, stand_in_server):
    """The columnar format of docs/serving.md gives the same numbers as the row format."""
    import urllib.request

    version_dir, _ = served_model
    url, _ = stand_in_server
    frame = np.random.default_rng(1).poisson(40.0, (1, 32, 40, 1)).astype(np.float32)

    def post(body):
        req = urllib.request.Request(f"{url}/v1/models/{MODEL_NAME}/versions/{version_dir.name}:predict",
                                     data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=60) as answer:
            return json.loads(answer.read())

    row = post({"signature_name": "serving_default", "instances": [{"image": frame[0].tolist()}]})
    col = post({"signature_name": "serving_default", "inputs": {"image": frame.tolist()}})
    probabilities = np.asarray(row["predictions"][0]["probabilities"])
    assert probabilities.shape == (32, 40, json.loads(
        (version_dir / "assets" / "ceriakeras.json").read_text())["max_height"] + 1)
    assert np.allclose(probabilities.sum(-1), 1.0, atol=1e-5)
    assert np.array_equal(probabilities, np.asarray(col["outputs"]["probabilities"])[0])
    assert np.array_equal(np.asarray(row["predictions"][0]["height"]), probabilities.argmax(-1))


@pytest.mark.slow
def test_an_error_answer_is_one_line_and_a_non_zero_exit(served_model, stand_in_server, frames, tmp_path):
    version_dir, _ = served_model
    url, _ = stand_in_server
    done = _run_client(str(frames), "--server", url, "--model-name", "no_such_model", "--model",
                       str(version_dir.parent), "--out", str(tmp_path / "out"), "--pixel-size", str(PIXEL_A))
    assert done.returncode != 0
    lines = _error_lines(done.stderr)
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    assert "404" in lines[0] and "Servable not found" in lines[0]


def test_a_server_that_is_down_is_one_line_and_a_non_zero_exit(tmp_path):
    import tifffile

    with socket.socket() as s:        # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    version_dir = tmp_path / "saved_models" / MODEL_NAME / "1"
    (version_dir / "assets").mkdir(parents=True)
    (version_dir / "saved_model.pb").write_bytes(b"")   # only the assets are read before the call
    (version_dir / "assets" / "ceriakeras.json").write_text(json.dumps(
        {"pixel_size_A": PIXEL_A, "max_height": 16, "label_radius_A": 0.5}))
    frame = tmp_path / "frame.tif"
    tifffile.imwrite(frame, np.full((32, 32), 40, np.float32))
    done = _run_client(str(frame), "--server", f"http://127.0.0.1:{port}", "--model-name", MODEL_NAME,
                       "--model", str(version_dir.parent), "--out", str(tmp_path / "out"),
                       "--pixel-size", str(PIXEL_A))
    assert done.returncode != 0
    lines = _error_lines(done.stderr)
    assert len(lines) == 1 and "cannot reach TF Serving" in lines[0], done.stderr


def test_a_server_url_without_a_known_scheme_is_refused_before_any_call(tmp_path):
    from ceriakeras.inference.remote import ServingError, remote_model

    version_dir = tmp_path / "saved_models" / MODEL_NAME / "3"
    (version_dir / "assets").mkdir(parents=True)
    (version_dir / "saved_model.pb").write_bytes(b"")
    (version_dir / "assets" / "ceriakeras.json").write_text(json.dumps(
        {"pixel_size_A": PIXEL_A, "max_height": 16, "label_radius_A": 0.5}))
    with pytest.raises(ServingError, match="http://"):
        remote_model("localhost:8501", version_dir.parent)


def test_model_name_without_a_server_is_one_line_and_exit_2(tmp_path):
    from click.testing import CliRunner

    from ceriakeras.cli.main import main

    np.save(tmp_path / "f.npy", np.full((32, 32), 40.0, np.float32))
    res = CliRunner().invoke(main, ["analyze", str(tmp_path / "f.npy"), "--model-name", MODEL_NAME,
                                    "--out", str(tmp_path / "out"), "--quiet"])
    assert res.exit_code == 2
    assert "--model-name goes with --server" in res.output and res.output.count("\n") == 1
