"""Reliability: processes killed with SIGKILL and rerun, writes that fail, physics checks on
the CLI, safe model loading (no pickle), and outputs only under the folder the user named.

Faults tried elsewhere: records (truncated / corrupt shards, manifest, --repair, killed dask
worker, killed write_dataset) in test_records.py; analyze interrupted in-process in
test_analyze.py; the readers under hypothesis in test_io.py. docs/reliability.md lists them all.
"""

from __future__ import annotations

import ast
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ceriakeras.data import records, writer
from ceriakeras.cli.main import main
from ceriakeras.config import AnalyzeConfig, ModelError, OpticsConfig, to_dict
from ceriakeras.io.files import atomic_path, write_text_atomic
from helpers import export_tiny_model

keras = pytest.importorskip("keras")

from helpers import fake_simulator  # noqa: E402
from helpers import TINY, make_synthetic_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "",
       "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ceriakeras.cli.main", *args]


def kill_when(proc: subprocess.Popen, ready, *, delay_s: float, timeout_s: float = 180) -> bool:
    """SIGKILL ``proc`` ``delay_s`` after ``ready()`` turns true; False if it ended first."""
    deadline = time.monotonic() + timeout_s
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(delay_s)
    alive = proc.poll() is None
    if alive:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    return alive


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return export_tiny_model(tmp_path_factory.mktemp("models"))


# --- 1. SIGKILL, then rerun -------------------------------------------------------------------
@pytest.mark.slow
def test_train_killed_after_a_checkpoint_resumes_from_it(tmp_path):
    data = make_synthetic_dataset(tmp_path / "data", count=12)
    config = tmp_path / "tiny.json"
    epochs, steps = 8, 3
    # patience ≥ epochs: early stopping counts over resumes (RunEarlyStopping), and a tiny
    # model whose best epoch is early would otherwise stop before the last epoch
    config.write_text(json.dumps({**to_dict(TINY), "epochs": epochs, "steps_per_epoch": steps,
                                  "early_stopping_patience": epochs}))
    run = tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(run), "--config", str(config), "--quiet"]
    proc = subprocess.Popen(cli(*args), env=ENV, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    delay = float(np.random.default_rng().uniform(0.0, 1.5))
    killed = kill_when(proc, lambda: (run / "state.json").exists(), delay_s=delay)
    assert killed, "training ended before it could be killed: give it more epochs"
    done = json.loads((run / "state.json").read_text())["epoch"]
    assert 1 <= done < epochs
    checkpoint = run / "checkpoints" / json.loads((run / "state.json").read_text())["checkpoint"]
    assert checkpoint.is_file(), "state.json names a complete checkpoint"

    resumed = subprocess.run(cli(*args, "--resume"), env=ENV, cwd=REPO, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"after epoch {done}" in resumed.stdout
    assert f"{epochs} epoch(s) (resumed after epoch {done})" in resumed.stdout

    state = json.loads((run / "state.json").read_text())
    assert state["epoch"] == epochs
    rows = (run / "log.csv").read_text().strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == [str(e) for e in range(epochs)], \
        "each epoch logged exactly once"
    import ceriakeras.nn.train  # noqa: F401  (registers the layers and metrics load_model needs)

    last = keras.saving.load_model(run / "checkpoints" / "last.keras", safe_mode=True)
    assert int(last.optimizer.iterations.numpy()) == epochs * steps, "no step lost or repeated"
    assert [p.name for p in (run / "checkpoints").glob("epoch-*.keras")] == \
        [f"epoch-{epochs:04d}.keras"]
    assert not list(run.rglob("*.tmp")) and not list(run.rglob(".*partial*"))


def _series(path: Path, n_frames: int, seed: int = 0) -> None:
    import tifffile

    yy, xx = np.mgrid[:64, :64].astype(float)
    clean = np.ones_like(xx)
    for cy in range(6, 64, 16):
        for cx in range(6, 64, 16):
            clean -= 0.3 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 2.0 ** 2))
    rng = np.random.default_rng(seed)
    frames = rng.poisson(40.0 * clean, size=(n_frames,) + clean.shape).astype(np.float32)
    tifffile.imwrite(path, frames, imagej=True, resolution=(1 / 0.01, 1 / 0.01),
                     metadata={"unit": "nm", "axes": "TYX"})   # 0.1 Å pixels


@pytest.mark.slow
def test_analyze_killed_mid_series_then_rerun_equals_an_uninterrupted_run(tmp_path, tiny_model):
    from ceriakeras.analysis.run import analyze

    n_frames = 120
    series = tmp_path / "series.tif"
    _series(series, n_frames)
    out = tmp_path / "out"
    args = ["analyze", str(series), "--model", str(tiny_model), "--out", str(out),
            "--batch-size", "2", "--overlay-every", "1000", "--quiet"]
    proc = subprocess.Popen(cli(*args), env=ENV, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    delay = float(np.random.default_rng().uniform(0.0, 0.5))
    killed = kill_when(proc, lambda: (out / "progress.json").exists(), delay_s=delay)
    assert killed, "analyze ended before it could be killed: give it more frames"
    assert not (out / "summary.json").exists()

    rerun = subprocess.run(cli(*args), env=ENV, cwd=REPO, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    rows = (out / "columns.csv").read_text().splitlines()
    frames = [int(r.split(",")[1]) for r in rows[1:]]
    assert sorted(set(frames)) == list(range(n_frames)), "every frame present"
    assert frames == sorted(frames), "each frame's rows once, in order (no duplicated block)"

    analyze([series], tmp_path / "ref", model=str(tiny_model),
            config=AnalyzeConfig(batch_size=2, overlay_every=1000), progress=False)
    assert (out / "columns.csv").read_text() == (tmp_path / "ref" / "columns.csv").read_text()
    assert (out / "frames.csv").read_text() == (tmp_path / "ref" / "frames.csv").read_text()


# --- 2. a write that fails ---------------------------------------------------------------------
def test_disk_full_inside_an_atomic_write_leaves_the_old_file_and_no_partial(tmp_path):
    target = tmp_path / "columns.csv"
    write_text_atomic(target, "old, complete\n")
    with pytest.raises(OSError) as err:
        with atomic_path(target) as tmp:
            tmp.write_text("half a ta")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
    assert err.value.errno == errno.ENOSPC
    assert target.read_text() == "old, complete\n"
    assert [p.name for p in tmp_path.iterdir()] == ["columns.csv"]
    with pytest.raises(OSError):
        with atomic_path(tmp_path / "new.csv") as tmp:
            tmp.write_text("half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert [p.name for p in tmp_path.iterdir()] == ["columns.csv"]


def test_disk_full_while_simulate_writes_a_shard_is_one_line_and_leaves_no_shard(
        tmp_path, monkeypatch):
    """``fsync`` of a finished shard's temporary file fails with ENOSPC (how a full disk shows
    up with delayed allocation): one line, exit 2, no shard or manifest under a final name;
    the same command afterwards completes the dataset."""
    monkeypatch.setattr(writer, "_default_simulator", lambda: fake_simulator)
    real_fsync = os.fsync

    def full_disk_fsync(fd):
        name = os.readlink(f"/proc/self/fd/{fd}")
        if ".tfrecord.gz" in name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk_fsync)
    out = tmp_path / "ds"
    legacy = Path(__file__).resolve().parents[2] / "configs" / "legacy_fast.toml"  # a 16 Å cell
    args = ["simulate", "--out", str(out), "--count", "8", "--shards", "2", "--cell-size", "16",
            "--config", str(legacy), "--optics-per-exit-wave", "2", "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1
    assert "No space left on device" in result.output and "rerun" in result.output
    assert not list(out.glob("*.tfrecord.gz")) and not (out / "manifest.json").exists()
    assert not list(out.rglob("*.tmp"))
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert CliRunner().invoke(main, args).exit_code == 0
    records.verify_dataset(out)


def test_unwritable_output_of_analyze_is_one_line(tmp_path, monkeypatch, tiny_model):
    _series(tmp_path / "s.tif", 2)
    real_replace = os.replace

    def read_only(src, dst, *a, **kw):
        if Path(dst).parent == tmp_path / "out":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dst))
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", read_only)
    result = CliRunner().invoke(main, ["analyze", str(tmp_path / "s.tif"), "--model",
                                       str(tiny_model), "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: Permission denied") and result.output.count("\n") == 1
    assert not list((tmp_path / "out").rglob("*.tmp"))
    assert not (tmp_path / "out" / "progress.json").exists()


# --- 3. physics on the command line -----------------------------------------------------------
@pytest.mark.parametrize("toml, message", [
    ("[optics]\ndefocus_range_nm = [-1.2e-8, 1.2e-8]\n", "defocus_range_nm.*the unit is nm"),
    ("[optics]\ndefocus_range_nm = [0.0, 5e-9]\n", "defocus_range_nm.*the unit is nm"),
    ("[optics]\nfocal_spread_range_nm = [2e-9, 6e-9]\n", "focal_spread_range_nm.*the unit is nm"),
    ("[optics]\nmax_astigmatism_nm = 2e-9\n", "max_astigmatism_nm.*the unit is nm"),
    ("[optics]\ncs_range_um = [-2.5e-5, 2.5e-5]\n", "cs_range_um.*the unit is µm"),
    ("[optics]\nc5_range_mm = [0.0, 0.000005]\n", "c5_range_mm.*the unit is mm"),
    ("[optics]\nenergy_keV = 300000\n", "energy_keV=300000.*keV"),
    ("[optics]\nfocal_spread_range_nm = [-2, 6]\n", "focal_spread_range_nm"),
    ("[structure]\ndiameter_range_A = [1.5e-9, 5e-9]\n", "diameter_range_A"),
    ("pixel_size_A = -0.2\n", "pixel_size_A"),
    ("label_radius_A = 5e-11\n", "label_radius_A"),
])
def test_simulate_config_physics_is_checked(tmp_path, monkeypatch, toml, message):
    import re

    monkeypatch.setattr(writer, "_default_simulator", lambda: fake_simulator)
    path = tmp_path / "c.toml"
    path.write_text(toml)
    result = CliRunner().invoke(main, ["simulate", "--out", str(tmp_path / "x"), "--count", "4",
                                       "--config", str(path), "--quiet"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1
    assert re.search(message, result.output), result.output
    assert not (tmp_path / "x").exists()


def test_defaults_and_the_envelope_edges_pass_the_unit_checks():
    OpticsConfig().validate()
    OpticsConfig(defocus_range_nm=(0.0, 0.0), cs_range_um=(0.0, 0.0), c5_range_mm=(0.0, 0.0),
                 focal_spread_range_nm=(0.0, 0.0), max_astigmatism_nm=0.0).validate()
    OpticsConfig(defocus_range_nm=(-0.5, 0.5), energy_keV=200.0).validate()


@pytest.mark.parametrize("command, message", [
    (["simulate", "--out", "{t}/x", "--count", "4", "--pixel-size", "-0.2"], "--pixel-size"),
    (["simulate", "--out", "{t}/x", "--count", "4", "--cell-size", "0"], "--cell-size"),
    (["train", "--data", "{t}/d", "--out", "{t}/r", "--batch-size", "0"], "--batch-size 0"),
    (["train", "--data", "{t}/d", "--out", "{t}/r", "--config", "{t}/dose.json"],
     "dose_range_e_per_A2"),
    (["train", "--data", "{t}/d", "--out", "{t}/r", "--config", "{t}/vdose.json"],
     "validation dose -50"),
    (["train", "--data", "{t}/d", "--out", "{t}/r", "--config", "{t}/pixel.json"],
     "pixel_size_A=2e-11.*ångström"),
    (["analyze", "{t}/s.tif", "--out", "{t}/o", "--pixel-size", "-0.1"], "--pixel-size -0.1"),
    (["analyze", "{t}/s.tif", "--out", "{t}/o", "--pixel-size", "1e-11", "--model", "{m}"],
     "1e-11"),
    (["analyze", "{t}/s.tif", "--out", "{t}/o", "--config", "{t}/dist.json"], "min_distance_A"),
    (["evaluate", "--model", "{t}", "--data", "{t}", "--doses", "50,-5"], "dose -5 e-/Å² must be a positive"),
    (["evaluate", "--model", "{t}", "--data", "{t}", "--doses", "0"], "dose 0 e-/Å² must be a positive"),
])
def test_cli_refuses_unphysical_numbers_in_one_line(tmp_path, tiny_model, command, message):
    import re

    (tmp_path / "dose.json").write_text(json.dumps({"pipeline": {"dose_range_e_per_A2": [-20, 200]}}))
    (tmp_path / "vdose.json").write_text(json.dumps({"pipeline": {"validation_doses_e_per_A2": [-50]}}))
    (tmp_path / "pixel.json").write_text(json.dumps({"model": {"pixel_size_A": 2e-11}}))
    (tmp_path / "dist.json").write_text(json.dumps({"min_distance_A": -2}))
    _series(tmp_path / "s.tif", 1)
    args = [a.replace("{t}", str(tmp_path)).replace("{m}", str(tiny_model)) for a in command]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert re.search(re.escape(message) if "*" not in message else message, result.output), \
        result.output
    assert result.output.startswith("error: ") or "Invalid value" in result.output
    if result.output.startswith("error: "):
        assert len(lines) == 1
    assert not (tmp_path / "x").exists() and not (tmp_path / "r").exists()
    assert not (tmp_path / "o" / "columns.csv").exists()


# --- 4. models: safe loading, no pickle ---------------------------------------------------------
def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def test_no_pickle_anywhere_and_np_load_refuses_pickles():
    sources = sorted((REPO / "ceriakeras").rglob("*.py")) + sorted((REPO / "scripts").rglob("*.py"))
    np_loads = []
    for path in sources:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                for bad in ("pickle", "cPickle", "dill", "joblib", "cloudpickle", "shelve",
                            "marshal"):
                    assert not any(n.split(".")[0] == bad for n in names), f"{path}: {bad}"
        for call in _calls(tree):
            func = call.func
            if isinstance(func, ast.Attribute) and func.attr in ("load", "loads") and \
                    isinstance(func.value, ast.Name) and func.value.id in ("np", "numpy"):
                kw = {k.arg: k.value for k in call.keywords}
                assert "allow_pickle" in kw and isinstance(kw["allow_pickle"], ast.Constant) \
                    and kw["allow_pickle"].value is False, f"{path}:{call.lineno}"
                np_loads.append(f"{path.name}:{call.lineno}")
            if isinstance(func, ast.Attribute) and func.attr == "load_model":
                kw = {k.arg: k.value for k in call.keywords}
                if "safe_mode" in kw:
                    assert isinstance(kw["safe_mode"], ast.Constant) and kw["safe_mode"].value
            if isinstance(func, ast.Attribute) and func.attr == "enable_unsafe_deserialization":
                pytest.fail(f"{path}:{call.lineno} turns Keras' safe mode off")
    assert np_loads, "the .npy reader is found (else this test checks nothing)"


def test_a_pickled_npy_is_refused(tmp_path):
    from ceriakeras.config import InputError
    from ceriakeras.io.series import open_series

    path = tmp_path / "objects.npy"
    np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(InputError):
        with open_series(path, pixel_size_A=0.1) as series:
            list(series.frames())


def _lambda_run(tmp_path: Path) -> Path:
    inp = keras.Input((None, None, 1))
    out = keras.layers.Lambda(lambda x: x * 2.0)(inp)
    model = keras.Model(inp, out)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    model.save(run / "checkpoints" / "best.keras")
    model.save(run / "checkpoints" / "last.keras")
    (run / "config.json").write_text(json.dumps(to_dict(TINY)))
    (run / "metrics.json").write_text("{}")
    return run


def test_keras_file_with_a_lambda_layer_is_refused(tmp_path):
    from ceriakeras.nn.export import export_run

    run = _lambda_run(tmp_path)
    with pytest.raises(ValueError, match="safe_mode"):
        keras.saving.load_model(run / "checkpoints" / "last.keras", safe_mode=True)
    with pytest.raises(ModelError, match="safe mode"):
        export_run(run, tmp_path / "saved")
    assert not (tmp_path / "saved" / "1").exists()
    result = CliRunner().invoke(main, ["export", "--run", str(run), "--out", str(tmp_path / "s2")])
    assert result.exit_code == 2 and result.output.startswith("error: ")
    assert "safe mode" in result.output and result.output.count("\n") == 1


# --- 5. outputs only under --out -----------------------------------------------------------------
def _snapshot(root: Path, skip: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")
            if p.is_file() and skip not in p.parents}


@pytest.mark.slow
def test_train_analyze_evaluate_write_only_under_out(tmp_path, monkeypatch, tiny_model):
    work = tmp_path / "work"
    work.mkdir()
    data = make_synthetic_dataset(work / "data", count=12)
    _series(work / "s.tif", 3)
    monkeypatch.chdir(work)
    runner = CliRunner()
    config = work / "tiny.json"
    config.write_text(json.dumps({**to_dict(TINY), "steps_per_epoch": 1}))
    for name, args in [
        ("train", ["train", "--data", str(data), "--config", str(config), "--quiet"]),
        ("analyze", ["analyze", str(work / "s.tif"), "--model", str(tiny_model), "--quiet"]),
        ("evaluate", ["evaluate", "--model", str(tiny_model), "--data", str(data), "--split",
                      "validation", "--doses", "200", "--no-baseline"]),
    ]:
        out = work / f"out-{name}"
        before = _snapshot(work, out)
        result = runner.invoke(main, [*args, "--out", str(out)])
        assert result.exit_code == 0, (name, result.output)
        assert _snapshot(work, out) == before, f"{name} wrote outside --out"
        assert any(out.rglob("*")), f"{name} wrote nothing under --out"
