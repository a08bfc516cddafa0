"""The command line as a user meets it: bad input refused before TensorFlow loads, in one line;
no TensorFlow, absl or CUDA log lines unless --verbose; --help instant and in units."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from ceriakeras.cli.main import main
from ceriakeras.config import SCHEMA_VERSION

REPO = Path(__file__).resolve().parents[2]

# Lines TensorFlow, absl and CUDA print on their own: glog/absl prefixes (I0000 00:00:…), the
# pre-InitializeLog banner, Python-side "WARNING:tensorflow:" / "WARNING:absl:" records.
TF_LOG_LINE = re.compile(
    r"^[IWEF]\d{4} \d\d:\d\d:\d\d|absl::InitializeLog|cuInit|oneDNN|cpu_feature_guard|cudart"
    r"|TensorFlow binary|^(WARNING|ERROR|INFO):(tensorflow|absl)", re.MULTILINE)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def _fake_model(root: Path, pixel_size_A: float) -> Path:
    """A model version folder as the checks see it: a saved_model.pb and assets/ceriakeras.json."""
    version = root / "1"
    (version / "assets").mkdir(parents=True)
    (version / "saved_model.pb").write_bytes(b"")
    (version / "assets" / "ceriakeras.json").write_text(json.dumps(
        {"pixel_size_A": pixel_size_A, "max_height": 12, "label_radius_A": 0.5}))
    return root


def _fake_dataset(root: Path, pixel_size_A: float, counts: dict) -> Path:
    root.mkdir(parents=True)
    (root / "manifest.json").write_text(json.dumps(
        {"schema_version": SCHEMA_VERSION, "splits": {}, "counts": counts, "config": {},
         "pixel_size_A": pixel_size_A}))
    return root


def _bad_inputs(tmp: Path) -> list[tuple[list[str], str]]:
    """(arguments, what the one-line error must say) for every command."""
    ok = tmp / "ok.tif"
    tifffile.imwrite(ok, np.random.default_rng(0).poisson(20, (64, 64)).astype(np.float32))
    damaged = tmp / "damaged.tif"
    damaged.write_bytes(b"II*\x00" + b"\xff" * 60)
    model = _fake_model(tmp / "models" / "at02", 0.2)
    fine_model = _fake_model(tmp / "models" / "at01", 0.1)
    (tmp / "models" / "empty").mkdir()
    done = tmp / "done"
    done.mkdir()
    (done / "columns.csv").write_text("source,frame\n")
    (done / "progress.json").write_text(json.dumps({"complete": True}))
    other = tmp / "other"
    other.mkdir()
    (other / "columns.csv").write_text("source,frame\n")
    out = str(tmp / "out")

    no_manifest = tmp / "no_manifest"
    no_manifest.mkdir()
    data01 = _fake_dataset(tmp / "data01", 0.1, {"train": 4, "validation": 1, "test": 1})
    data02 = _fake_dataset(tmp / "data02", 0.2, {"train": 4, "validation": 0, "test": 1})
    data04 = _fake_dataset(tmp / "data04", 0.4, {"train": 4, "validation": 1, "test": 1})
    evaluated = tmp / "evaluated"
    evaluated.mkdir()
    (evaluated / "metrics.json").write_text("{}")

    run = tmp / "runs" / "r"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": {"pixel_size_A": 0.2}}))
    (run / "checkpoints" / "best.keras").write_bytes(b"")
    untrained = tmp / "runs" / "untrained"
    untrained.mkdir()
    exported = tmp / "exported"
    (exported / "1").mkdir(parents=True)
    bad_truth = tmp / "truth.csv"
    bad_truth.write_text("file,x_px\nok.tif,3\n")
    a_file = tmp / "a_file"
    a_file.write_text("")

    analyze = ["analyze", str(ok), "--model", str(model), "--out", out]
    return [
        (["analyze", str(tmp / "missing.tif"), "--out", out], "does not exist"),
        (["analyze", str(damaged), "--pixel-size", "0.1", "--model", str(model), "--out", out],
         "damaged"),
        (analyze + ["--pixel-size", "0.5"], "outside"),
        (analyze + ["--pixel-size", "-1"], "positive"),
        (["analyze", str(ok), "--pixel-size", "0.15", "--model", str(fine_model), "--out", out],
         "coarser than the model's 0.1 Å"),
        (analyze[:3] + [str(tmp / "no_model"), "--pixel-size", "0.1", "--out", out],
         "does not exist"),
        (analyze[:3] + [str(tmp / "models" / "empty"), "--pixel-size", "0.1", "--out", out],
         "no SavedModel"),
        (analyze[:5] + [str(done), "--pixel-size", "0.1"], "finished analysis"),
        (analyze[:5] + [str(other), "--pixel-size", "0.1"], "columns.csv from another run"),
        (analyze[:5] + [str(a_file), "--pixel-size", "0.1"], "is a file"),
        (["evaluate", "--model", str(model), "--data", str(no_manifest)], "manifest.json is missing"),
        (["evaluate", "--model", str(model), "--data", str(data01), "--out", out], "0.1 Å pixels"),
        (["evaluate", "--model", str(model), "--data", str(data02), "--split", "validation",
          "--out", out], "empty"),
        (["evaluate", "--model", str(model), "--data", str(data02), "--out", str(evaluated)],
         "already holds an evaluation"),
        (["evaluate", "--model", str(model), "--images", str(ok), "--truth", str(bad_truth),
          "--out", out], "lacks the column"),
        (["export", "--run", str(untrained), "--out", str(exported)], "no checkpoints"),
        (["export", "--run", str(tmp / "runs" / "none"), "--out", str(exported)], "does not exist"),
        (["export", "--run", str(run), "--out", str(exported), "--version", "1"], "already exists"),
        (["export", "--run", str(run), "--run", str(run), "--checkpoint", "best", "--checkpoint",
          "last", "--checkpoint", "best", "--out", str(exported)], "3 checkpoints for 2 runs"),
        (["export", "--run", str(run), "--run", str(tmp / "runs" / "none"), "--out",
          str(exported)], "does not exist"),
        (["export", "--run", str(run), "--out", str(exported), "--calibrate", str(data04)],
         "0.4 Å pixels"),
        (["calibrate", "--model", str(fine_model), "--data", f"{data02}:test", "--out",
          str(tmp / "recal")], "0.2 Å pixels"),
        (["calibrate", "--model", str(model), "--data", str(data02), "--out", str(tmp / "recal")],
         "empty"),
        (["calibrate", "--model", str(model), "--data", f"{data02}:test", "--out", str(exported),
          "--version", "1"], "already exists"),
        (["calibrate", "--model", str(tmp / "models" / "empty"), "--data", str(data02),
          "--out", str(tmp / "recal")], "no SavedModel"),
        (["train", "--data", str(no_manifest), "--out", str(tmp / "runs" / "new")], "missing"),
        (["train", "--data", str(data02), "--data", str(data01), "--out",
          str(tmp / "runs" / "new")], f"dataset {data01} has pixel size 0.1 Å"),
        (["train", "--data", str(data02), "--out", str(run)], "already exists"),
        (["train", "--data", str(data02), "--out", str(run), "--resume", "--overwrite"],
         "either --resume or --overwrite"),
        (["train", "--data", str(data02), "--out", str(untrained), "--resume"], "nothing to resume"),
        (["train", "--data", str(data02), "--out", str(tmp / "runs" / "new"), "--init-from",
          str(untrained)], "has no checkpoints/last.keras; name a training run"),
        (["train", "--data", str(data02), "--out", str(run), "--resume", "--init-from", str(run)],
         "either --resume or --init-from"),
        (["train", "--data", str(data02), "--out", str(run), "--overwrite", "--init-from", str(run)],
         "is --out itself"),
        (["train", "--data", str(data02), "--out", str(tmp / "runs" / "new"), "--distill-weight",
          "1.5"], "distill_weight=1.5 must be in [0, 1]"),
        (["train", "--data", str(data02), "--out", str(tmp / "runs" / "new"), "--teacher",
          str(tmp / "models" / "empty")], "no SavedModel"),
        (["train", "--data", str(data02), "--out", str(tmp / "runs" / "new"), "--init-partial",
          str(untrained)], "--init-partial"),
        (["simulate", "--out", str(tmp / "sim"), "--count", "0"], "at least 1"),
        (["simulate", "--out", str(a_file / "sim"), "--count", "4"], "--out"),
    ]


_REFUSE_ALL = """
import json, sys
from click.testing import CliRunner
from ceriakeras.cli.main import main
results = []
for args, _ in json.loads(sys.argv[1]):
    r = CliRunner().invoke(main, args)
    results.append({"args": args, "exit_code": r.exit_code, "stderr": r.stderr,
                    "exception": None if r.exception is None or isinstance(r.exception, SystemExit)
                    else repr(r.exception)})
heavy = sorted(m for m in ("tensorflow", "keras", "abtem", "dask.distributed") if m in sys.modules)
print(json.dumps({"results": results, "heavy": heavy}))
"""


def test_bad_input_is_refused_in_one_line_before_tensorflow_loads(tmp_path):
    cases = _bad_inputs(tmp_path)
    proc = subprocess.run([sys.executable, "-c", _REFUSE_ALL, json.dumps(cases)], cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    for (args, expected), result in zip(cases, out["results"]):
        where = f"ceriakeras {' '.join(args)}: {result}"
        assert result["exception"] is None, where
        assert result["exit_code"] == 2, where
        lines = result["stderr"].strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), where
        assert expected in lines[0], where
    assert out["heavy"] == [], f"imported while refusing bad input: {out['heavy']}"


def test_verbose_is_accepted_before_and_after_the_command(tmp_path):
    runner = CliRunner()
    for args in (["--verbose", "analyze", str(tmp_path / "x.tif"), "--out", str(tmp_path)],
                 ["analyze", "--verbose", str(tmp_path / "x.tif"), "--out", str(tmp_path)]):
        result = runner.invoke(main, args)
        assert result.exit_code == 2 and "x.tif does not exist" in result.stderr


def test_help_of_every_command_names_units():
    runner = CliRunner()
    top = runner.invoke(main, ["--help"])
    assert top.exit_code == 0 and "--verbose" in top.output and "e⁻/Å²" in top.output
    expected = {"simulate": ["Å"], "train": ["crops per step"], "export": ["e-/Å²", "count of images"],
                "analyze": ["Å", "frames", "Ce atoms"], "evaluate": ["e-/Å²", "count of images"],
                "calibrate": ["count of images"]}
    for command, units in expected.items():
        result = runner.invoke(main, [command, "--help"])
        assert result.exit_code == 0, result.output
        text = " ".join(result.output.split())  # the help is wrapped to the terminal
        assert "--verbose" in text
        for unit in units:
            assert unit in text, f"{command} --help lacks {unit!r}"


_HELP_IMPORTS = """
import sys
from click.testing import CliRunner
from ceriakeras.cli.main import main
for command in ([], ["simulate"], ["train"], ["export"], ["analyze"], ["evaluate"],
                ["calibrate"]):
    assert CliRunner().invoke(main, command + ["--help"]).exit_code == 0
print(sorted(m for m in ("tensorflow", "keras", "abtem", "scipy", "skimage", "matplotlib")
             if m in sys.modules))
"""


def test_help_imports_no_heavy_library():
    proc = subprocess.run([sys.executable, "-c", _HELP_IMPORTS], env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.slow
def test_tensorflow_log_lines_appear_only_with_verbose(tmp_path):
    from ceriakeras.inference.served import default_model_path

    try:
        default_model_path()
    except Exception as err:  # pragma: no cover - the shipped model is in the repository
        pytest.skip(str(err))
    image = tmp_path / "frame.tif"
    tifffile.imwrite(image, np.random.default_rng(1).poisson(20, (64, 64)).astype(np.float32))
    stderr = {}
    for flag in ([], ["--verbose"]):
        out = tmp_path / f"out{len(flag)}"
        proc = subprocess.run(
            [sys.executable, "-m", "ceriakeras.cli.main", *flag, "analyze", str(image), "--pixel-size",
             "0.1", "--out", str(out), "--quiet"],
            cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        assert (out / "summary.json").is_file()
        stderr[bool(flag)] = proc.stderr
    assert not TF_LOG_LINE.search(stderr[False]), stderr[False]
    # --verbose leaves TensorFlow alone: its start-up lines (at its default log level) show
    assert TF_LOG_LINE.search(stderr[True]), stderr[True]


@pytest.mark.slow
def test_training_prints_no_tensorflow_lines_without_verbose(tmp_path):
    """Training's first step logs a C++ ``E0000 … oneDNN supports DT_UINT8 …`` notice on CPUs
    without AVX-512; like the start-up lines it stays off the terminal unless ``--verbose``."""
    from helpers import TINY, make_synthetic_dataset

    from ceriakeras.config import to_dict

    data = make_synthetic_dataset(tmp_path / "data")
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(to_dict(TINY)))
    proc = subprocess.run(
        [sys.executable, "-m", "ceriakeras.cli.main", "train", "--data", str(data), "--out",
         str(tmp_path / "run"), "--config", str(config), "--quiet"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run" / "checkpoints" / "last.keras").is_file()
    assert not TF_LOG_LINE.search(proc.stderr), proc.stderr
