"""Hostile inputs (issue 24): every bad input, damaged model and odd path of the sweep is refused
by the real CLI, in a subprocess, with exit status 2, one line on stderr, no traceback, no
TensorFlow (the refusal's CPU time is bounded) and ``--out`` as it was.

One table, :data:`CASES`, drives those; separate tests cover what is not a refusal: the lock on
``--out`` (the second of two runs is refused, the first ends as a lone run would), duplicated
inputs, a file name that is not UTF-8, a cut ImageJ stack, and the smaller points of the issue.
docs/reliability.md lists the cases with what the user sees.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from ceriakeras.config import SCHEMA_VERSION, ConfigError, InputError, ModelError

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2",
       "CUDA_VISIBLE_DEVICES": "", "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}
CLI = [sys.executable, "-c",
       "import sys; from ceriakeras.cli.main import main; sys.argv[0] = 'ceriakeras'; main()"]
CPU_LIMIT_S = 2.0
"""CPU seconds (user + system) a refusal may take: far below TensorFlow's import (> 4 s)."""
WALL_LIMIT_S = 20.0
"""Wall-clock bound, generous because the test machine may be loaded."""


def run_cli(*args, cwd) -> tuple[subprocess.CompletedProcess, float, float]:
    """The CLI in a subprocess: (result, wall seconds, CPU seconds of the child)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    result = subprocess.run([*CLI, *map(os.fsdecode, args)], cwd=cwd, env=ENV, check=False,
                            capture_output=True, timeout=600)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result, wall, cpu


def snapshot(path: Path):
    """Every file under ``path`` with its bytes (None if ``path`` does not exist)."""
    if not os.path.lexists(path):
        return None
    if path.is_file():
        return path.read_bytes()
    return {p.relative_to(path).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(path.rglob("*"))}


def hostile_tiff(path: Path, pages: int = 20000, side: int = 64) -> Path:
    """A classic TIFF of ``pages`` page directories (about 2.5 MB) whose image data all lie
    1 GB past the end of the file."""
    entries = [(256, 3, side), (257, 3, side), (258, 3, 16), (259, 3, 1), (262, 3, 1),
               (273, 4, 0), (277, 3, 1), (278, 3, side), (279, 4, side * side * 2)]
    ifd_size = 2 + 12 * len(entries) + 4
    out = bytearray(b"II*\0" + struct.pack("<I", 8))
    for i in range(pages):
        out += struct.pack("<H", len(entries))
        for tag, typ, value in entries:
            if tag == 273:
                value = (8 + pages * ifd_size + 10**9 + i * side * side * 2) & 0xFFFFFFFF
            out += struct.pack("<HHII", tag, typ, 1, value)
        out += struct.pack("<I", 8 + (i + 1) * ifd_size if i + 1 < pages else 0)
    path.write_bytes(bytes(out))
    return path


def imagej_stack(path: Path, frames: int = 8, side: int = 64, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    stack = rng.poisson(100, (frames, side, side)).astype(np.uint16)
    tifffile.imwrite(path, stack, imagej=True, resolution=(10, 10),
                     metadata={"unit": "angstrom", "axes": "TYX"})
    return path


def page_stack(path: Path, frames: int = 8, side: int = 64, seed: int = 0) -> Path:
    """A plain multi-page TIFF written page by page (each page's directory before its data)."""
    rng = np.random.default_rng(seed)
    with tifffile.TiffWriter(path) as tif:
        for frame in rng.poisson(100, (frames, side, side)).astype(np.uint16):
            tif.write(frame, contiguous=False, metadata=None)
    return path


def flip(path: Path, at: int) -> None:
    """Invert the byte at offset ``at`` of ``path``."""
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def cut(path: Path) -> None:
    """Keep the first half of ``path``."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edit_info(version: Path, change) -> None:
    """Apply ``change`` to a model version's ``assets/ceriakeras.json`` (a dict)."""
    info_path = version / "assets" / "ceriakeras.json"
    info = json.loads(info_path.read_text())
    change(info)
    info_path.write_text(json.dumps(info))


def damaged_models(w: Path, model: Path) -> None:
    """Copies of ``model`` under ``w/models/``, each damaged in one way."""
    def variant(name, change):
        target = w / "models" / name
        shutil.copytree(model, target)
        change(target)

    variant("pb_flipped", lambda t: flip(t / "saved_model.pb", 200))
    variant("pb_cut", lambda t: cut(t / "saved_model.pb"))
    variant("pb_cut_unrecorded", lambda t: (cut(t / "saved_model.pb"),
                                            edit_info(t, lambda i: i.pop("files_sha256"))))
    variant("variables_cut", lambda t: cut(next((t / "variables").glob("variables.data-*"))))
    variant("variables_missing", lambda t: (t / "variables" / "variables.index").unlink())
    variant("max_height_3", lambda t: edit_info(t, lambda i: i.update(max_height=3)))
    variant("calibration_nan", lambda t: edit_info(t, lambda i: i.update(confidence_calibration={
        "map": "platt", "dose_e_per_A2": [20.0, 200.0], "slope": [1.0, float("nan")],
        "intercept": [0.0, 0.0], "n_images": 48})))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Inputs, damaged model copies, bad configs and runs, made once for the table."""
    pytest.importorskip("keras")
    return build_world(tmp_path_factory.mktemp("hostile"))


def build_world(w: Path) -> Path:
    """Make the table's inputs in the folder ``w`` (a tiny model exported with Keras)."""
    from helpers import export_tiny_model

    model = export_tiny_model(w)
    rng = np.random.default_rng(0)
    good = rng.poisson(100, (64, 64)).astype(np.float32)
    np.save(w / "good.npy", good)
    for name, value in (("nan", np.nan), ("inf", np.inf), ("negative", -5.0)):
        bad = good.copy()
        bad[3, 4] = value
        np.save(w / f"{name}.npy", bad)
    hostile_tiff(w / "pages.tif")
    os.mkfifo(w / "pipe.tif")
    os.symlink("loop_b.tif", w / "loop_a.tif")
    os.symlink("loop_a.tif", w / "loop_b.tif")
    os.symlink("gone.tif", w / "dangling.tif")
    (w / "file.txt").write_text("not a folder\n")

    damaged_models(w, model)
    (w / "data").mkdir()  # a dataset as the checks see it: its manifest
    (w / "data" / "manifest.json").write_text(json.dumps(
        {"schema_version": SCHEMA_VERSION, "splits": {}, "config": {}, "pixel_size_A": 0.2,
         "counts": {"train": 4, "validation": 4, "test": 4}}))
    configs = {
        "threshold_high.toml": 'threshold = "high"\n',
        "list.json": "[1, 2, 3]\n",
        "min_distance_nan.toml": "min_distance_A = nan\n",
        "unknown_key.toml": "min_distanse_A = 2.0\n",
        "structure_5.toml": "structure = 5\n",
        "energy_string.toml": '[optics]\nenergy_keV = "300"\n',
        "epochs_ten.toml": 'epochs = "ten"\n',
        "learning_rate_nan.json": '{"learning_rate": NaN}\n',
    }
    for name, text in configs.items():
        (w / name).write_text(text)

    run = w / "runs" / "tiny"  # made by export_tiny_model
    cut_run = w / "runs" / "cut"
    shutil.copytree(run, cut_run)
    for name in ("best.keras", "last.keras"):
        cut(cut_run / "checkpoints" / name)
    nan_run = w / "runs" / "nan"
    shutil.copytree(run, nan_run)
    (nan_run / "checkpoints" / "best.keras").unlink()
    (nan_run / "state.json").write_text(json.dumps(
        {"epoch": 1, "checkpoint": "last.keras", "best_epoch": 0, "best_val_loss": float("inf")}))
    for name, files in (("earlier_frames", ["frames.csv"]), ("earlier_summary", ["summary.json"]),
                        ("earlier_overlay", ["overlays/good_00000.png"]),
                        ("earlier_movie", ["good_movie.mp4"])):
        for f in files:
            (w / name / f).parent.mkdir(parents=True, exist_ok=True)
            (w / name / f).write_bytes(b"earlier result")
    return w


M = "models/{}"
A = ("analyze", "--pixel-size", "0.1", "--quiet")
CASES = [  # id, arguments (``{model}`` = the tiny model), --out, words the one line must hold
    ("analyze --out under a file", (*A, "good.npy", "--model", "{model}"), "file.txt/out",
     "lies under the file"),
    ("analyze --out is a file", (*A, "good.npy", "--model", "{model}"), "file.txt", "is a file"),
    ("analyze --server and --scheduler", (*A, "good.npy", "--model", "{model}", "--server",
                                          "http://127.0.0.1:9", "--scheduler", "tcp://127.0.0.1:9"),
     "o", "not both"),
    ("bit-flipped saved_model.pb", (*A, "good.npy", "--model", M.format("pb_flipped")), "o",
     "differs from the sha256"),
    ("cut saved_model.pb", (*A, "good.npy", "--model", M.format("pb_cut")), "o",
     "differs from the sha256"),
    ("cut saved_model.pb, no hashes recorded",
     (*A, "good.npy", "--model", M.format("pb_cut_unrecorded")), "o", "not a SavedModel"),
    ("cut variables", (*A, "good.npy", "--model", M.format("variables_cut")), "o",
     "differs from the sha256"),
    ("missing variables", (*A, "good.npy", "--model", M.format("variables_missing")), "o",
     "is missing"),
    ("tampered max_height", (*A, "good.npy", "--model", M.format("max_height_3")), "o",
     "max_height=3"),
    ("tampered calibration", (*A, "good.npy", "--model", M.format("calibration_nan")), "o",
     "not finite"),
    ('config threshold = "high"', (*A, "good.npy", "--model", "{model}", "--config",
                                   "threshold_high.toml"), "o", "'threshold' must be a number"),
    ("config is a JSON list", (*A, "good.npy", "--model", "{model}", "--config", "list.json"),
     "o", "not a list"),
    ("config min_distance_A = nan", (*A, "good.npy", "--model", "{model}", "--config",
                                     "min_distance_nan.toml"), "o", "finite"),
    ("config unknown key", (*A, "good.npy", "--model", "{model}", "--config",
                            "unknown_key.toml"), "o", "unknown config key"),
    ("NaN pixels", (*A, "nan.npy", "--model", "{model}"), "o", "NaN"),
    ("infinite pixels", (*A, "inf.npy", "--model", "{model}"), "o", "infinite"),
    ("negative pixels", (*A, "negative.npy", "--model", "{model}"), "o", "negative"),
    ("TIFF declaring 20 000 pages past its end", (*A, "pages.tif", "--model", "{model}"), "o",
     "20000 page"),
    ("FIFO input", (*A, "pipe.tif", "--model", "{model}"), "o", "named pipe"),
    ("symlink loop", (*A, "loop_a.tif", "--model", "{model}"), "o", "loop of symbolic links"),
    ("dangling symlink", (*A, "dangling.tif", "--model", "{model}"), "o", "missing file"),
    ("earlier frames.csv", (*A, "good.npy", "--model", "{model}"), "earlier_frames",
     "already holds results"),
    ("earlier summary.json", (*A, "good.npy", "--model", "{model}"), "earlier_summary",
     "already holds results"),
    ("earlier overlays", (*A, "good.npy", "--model", "{model}"), "earlier_overlay",
     "already holds results"),
    ("earlier movie", (*A, "good.npy", "--model", "{model}"), "earlier_movie",
     "already holds results"),
    ("analyze --batch-size 100000", (*A, "good.npy", "--model", "{model}", "--batch-size",
                                     "100000"), "o", "batch_size=100000"),
    ("simulate --pixel-size inf", ("simulate", "--count", "4", "--pixel-size", "inf"), "o",
     "finite"),
    ("simulate --count 10^12", ("simulate", "--count", str(10**12), "--shards", "4"), "o",
     "more than 10,000,000"),
    ("simulate --count 1e12 (not an integer)", ("simulate", "--count", "1e12"), "o",
     "not a valid integer"),
    ("analyze with an unknown option", ("analyze", "good.npy", "--colour"), "o",
     "No such option"),
    ("simulate --shards 10^9", ("simulate", "--count", "100", "--shards", str(10**9)), "o",
     "more than 10,000"),
    ("simulate config structure = 5", ("simulate", "--count", "4", "--config",
                                       "structure_5.toml"), "o", "'structure' must be a table"),
    ('simulate config energy_keV = "300"', ("simulate", "--count", "4", "--config",
                                            "energy_string.toml"), "o", "optics.energy_keV"),
    ('train config epochs = "ten"', ("train", "--data", "nodata", "--config", "epochs_ten.toml"),
     "o", "'epochs' must be a whole number"),
    ("train learning_rate NaN", ("train", "--data", "nodata", "--config",
                                 "learning_rate_nan.json"), "o", "learning_rate"),
    ("train --init-from a cut .keras", ("train", "--data", "nodata", "--init-from", "runs/cut"),
     "o", "cut or damaged"),
    ("train --out is a file", ("train", "--data", "nodata"), "file.txt", "file"),
    ("train --resume from a cut .keras", ("train", "--data", "nodata", "--resume"), "runs/cut",
     "cut or damaged"),
    ("export --out is a file", ("export", "--run", "runs/tiny"), "file.txt", "is a file"),
    ("export a cut .keras", ("export", "--run", "runs/cut"), "o", "cut or damaged"),
    ("export a run that never reached a finite loss", ("export", "--run", "runs/nan"), "o",
     "finite validation loss"),
    ("calibrate a model with tampered max_height",
     ("calibrate", "--model", M.format("max_height_3"), "--data", "data"), "o", "max_height=3"),
    ("evaluate a bit-flipped model", ("evaluate", "--model", M.format("pb_flipped"), "--data",
                                      "data"), "o", "differs from the sha256"),
]


@pytest.mark.parametrize("args, out, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_input_is_refused_in_one_line_and_leaves_out_alone(world, args, out, words):
    model = str(Path(world / "saved_models" / "tiny" / "1").relative_to(world))
    args = [a.format(model=model) for a in args]
    before = snapshot(world / out)
    result, wall, cpu = run_cli(*args, "--out", out, cwd=world)
    stderr = result.stderr.decode("utf-8", "backslashreplace")
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert result.returncode == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    assert words in lines[0], lines[0]
    assert cpu < CPU_LIMIT_S and wall < WALL_LIMIT_S, (cpu, wall)
    assert snapshot(world / out) == before


def test_a_second_run_into_a_locked_out_is_refused_naming_the_holder(world, tmp_path):
    from ceriakeras.io.outlock import locked_out_dir

    out = tmp_path / "locked"
    with locked_out_dir(out):
        (out / "marker").write_text("first run's file")
        before = snapshot(out)
        result, _, cpu = run_cli("analyze", world / "good.npy", "--pixel-size", "0.1", "--model",
                                 world / "saved_models" / "tiny" / "1", "--out", out, cwd=world)
        after = snapshot(out)
    stderr = result.stderr.decode()
    assert result.returncode == 2 and stderr.count("\n") == 1, stderr
    assert "in use by another run" in stderr and f"pid {os.getpid()}" in stderr, stderr
    assert after == before and cpu < CPU_LIMIT_S
    with locked_out_dir(out):  # released when the block ends
        pass


def test_lock_creates_no_file_and_a_refused_fresh_run_leaves_no_folder(tmp_path):
    from ceriakeras.io.outlock import locked_out_dir

    with locked_out_dir(tmp_path / "a") as out:
        assert list(out.iterdir()) == []
    with pytest.raises(ConfigError), locked_out_dir(tmp_path / "b", fresh_names=("config.json",)):
        (tmp_path / "b" / "config.json").write_text("{}")
        raise ConfigError("refused after writing the run's config")
    assert not (tmp_path / "b").exists()
    with pytest.raises(ConfigError), locked_out_dir(tmp_path / "new" / "deeper" / "out"):
        raise ConfigError("refused")
    assert not (tmp_path / "new").exists()
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "result.csv").write_text("kept")
    with pytest.raises(ConfigError), locked_out_dir(tmp_path / "c", fresh_names=("config.json",)):
        raise ConfigError("refused")
    assert (tmp_path / "c" / "result.csv").read_text() == "kept"


@pytest.mark.slow
def test_two_concurrent_analyze_runs_second_refused_first_as_a_lone_run(world, tmp_path):
    series = imagej_stack(tmp_path / "series.tif", frames=24, side=96, seed=3)
    model = world / "saved_models" / "tiny" / "1"
    common = ["analyze", series, "--model", model, "--quiet", "--no-movie"]
    first = subprocess.Popen([*CLI, *map(str, common),
                              "--out", str(tmp_path / "both")], cwd=tmp_path, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (tmp_path / "both" / "progress.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    second, _, _ = run_cli(*common, "--out", tmp_path / "both", cwd=tmp_path)
    _, first_err = first.communicate(timeout=600)
    assert first.returncode == 0, first_err.decode()
    assert second.returncode == 2 and "in use by another run" in second.stderr.decode()
    lone, _, _ = run_cli(*common, "--out", tmp_path / "lone", cwd=tmp_path)
    assert lone.returncode == 0, lone.stderr.decode()
    for name in ("columns.csv", "frames.csv"):
        assert (tmp_path / "both" / name).read_bytes() == (tmp_path / "lone" / name).read_bytes()


@pytest.mark.slow
def test_the_same_input_twice_is_analysed_once_with_a_note(world, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(world / "good.npy", folder / "a.npy")
    result, _, _ = run_cli("analyze", folder / "a.npy", folder / "a.npy", folder, "--pixel-size",
                           "0.1", "--model", world / "saved_models" / "tiny" / "1", "--quiet",
                           "--out", tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    assert "given twice" in result.stderr.decode()
    frames = (tmp_path / "out" / "frames.csv").read_text().splitlines()
    assert len(frames) == 2  # header and one frame
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["frames_total"] == 1 and summary["frames_not_recognised"] >= 0


@pytest.mark.slow
def test_a_file_name_that_is_not_utf8_is_kept_byte_for_byte(world, tmp_path):
    name = b"frame-\xff\xfe.npy"
    path = os.fsencode(tmp_path) + b"/" + name
    shutil.copy(world / "good.npy", path)
    result, _, _ = run_cli("analyze", os.fsdecode(name), "--pixel-size", "0.1", "--model",
                           world / "saved_models" / "tiny" / "1", "--quiet", "--out", "out",
                           cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert b"Traceback" not in result.stderr
    assert (tmp_path / "out" / "frames.csv").read_bytes().splitlines()[1].startswith(name + b",0,")
    rows = (tmp_path / "out" / "columns.csv").read_bytes().splitlines()[1:]
    assert all(row.startswith(name + b",0,") for row in rows)
    assert b"\\xff\\xfe" in result.stdout  # shown escaped on the terminal


def test_a_non_utf8_name_in_an_error_is_one_escaped_line(tmp_path):
    (tmp_path / "x").write_text("")
    result, _, _ = run_cli("analyze", os.fsdecode(b"missing-\xff.tif"), "--out", "o", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == b"error: input missing-\\xff.tif does not exist\n"


def test_a_cut_imagej_stack_keeps_its_whole_frames_as_a_plain_stack_does(tmp_path):
    from ceriakeras.io.series import open_series

    for make in (imagej_stack, page_stack):
        whole = make(tmp_path / f"{make.__name__}.tif")
        data = whole.read_bytes()
        cut = tmp_path / f"{make.__name__}-cut.tif"
        with tifffile.TiffFile(whole) as tif:
            last = tif.pages[7].dataoffsets[0]
        cut.write_bytes(data[:last + 64 * 64])  # half of the last frame
        with open_series(whole, 0.1) as series:
            expected = [f.image for f in series.frames()]
        with open_series(cut, 0.1) as series:
            frames = list(series.frames())
        assert len(frames) == 8, make.__name__
        for frame, image in zip(frames[:7], expected):
            assert frame.error is None and np.array_equal(frame.image, image)
        assert frames[7].image is None and frames[7].error


def test_a_tiff_whose_pages_lie_past_its_end_is_refused_fast(tmp_path):
    from ceriakeras.io.series import open_series
    from ceriakeras.io.tiffcheck import whole_pages

    path = hostile_tiff(tmp_path / "pages.tif")
    assert whole_pages(path)[:2] == (0, 20000)
    t0 = time.process_time()
    with pytest.raises(InputError, match="20000 page"):
        open_series(path, 0.1)
    assert time.process_time() - t0 < 1.0
    # one whole page, then hundreds past the end: damage, not a cut file
    assert whole_pages(page_stack(tmp_path / "ok.tif"))[:2] == (8, 8)


@pytest.mark.parametrize("text, words", [
    ('threshold = "high"', "'threshold' must be a number"),
    ("min_distance_A = nan", "'min_distance_A' is nan"),
    ("min_distance_A = inf", "'min_distance_A' is inf"),
    ("batch_size = 2.0", "'batch_size' must be a whole number"),
    ("movie = 1", "'movie' must be true or false"),
    ("bogus = 1", "unknown config key 'bogus'"),
])
def test_analyze_config_values_are_checked_by_type(tmp_path, text, words):
    from ceriakeras.config import AnalyzeConfig, load_config

    (tmp_path / "c.toml").write_text(text + "\n")
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        load_config(AnalyzeConfig, tmp_path / "c.toml")


def test_nested_and_list_config_values_are_checked_by_type(tmp_path):
    from ceriakeras.config import SimulationConfig, TrainConfig, from_dict, load_config

    with pytest.raises(ConfigError, match="'structure' must be a table"):
        from_dict(SimulationConfig, {"structure": 5})
    with pytest.raises(ConfigError, match="'optics.energy_keV' must be a number"):
        from_dict(SimulationConfig, {"optics": {"energy_keV": "300"}})
    with pytest.raises(ConfigError, match="list of 3 values"):
        from_dict(SimulationConfig, {"split_fractions": [0.5, 0.5]})
    with pytest.raises(ConfigError, match="'pixel_size_A' is inf"):
        load_config(SimulationConfig, None, pixel_size_A=float("inf"))
    with pytest.raises(ConfigError, match="learning_rate"):
        from_dict(TrainConfig, {"learning_rate": float("nan")})
    with pytest.raises(ConfigError, match="learning_rate=5"):
        load_config(TrainConfig, None).__class__(learning_rate=5.0).validate()
    (tmp_path / "l.json").write_text("[]")
    with pytest.raises(ConfigError, match="not a list"):
        load_config(TrainConfig, tmp_path / "l.json")
    assert load_config(SimulationConfig) == SimulationConfig()  # the defaults pass


def test_shipped_model_records_its_files_and_passes_the_check():
    from ceriakeras.inference.served import read_info
    from ceriakeras.modelcheck import (
        check_model_files,
        files_sha256,
        probabilities_depth,
    )

    version = REPO / "saved_models" / "ceria110" / "6"
    info = read_info(version)
    assert info["files_sha256"] == files_sha256(version)
    assert probabilities_depth(version / "saved_model.pb") == info["max_height"] + 1
    check_model_files(version, info)


def test_calibration_tables_are_checked():
    from ceriakeras.modelcheck import check_calibration_table

    good = {"map": "platt", "dose_e_per_A2": [20, 200], "slope": [1, 1], "intercept": [0, 0]}
    check_calibration_table(good, "t")
    for bad, words in (({**good, "dose_e_per_A2": [200, 20]}, "increasing"),
                       ({**good, "slope": [1]}, "one slope"),
                       ({**good, "intercept": [0, "x"]}, "not a calibration table"),
                       ({**good, "map": "magic"}, "unknown map")):
        with pytest.raises(ModelError, match=words):
            check_calibration_table(bad, "t")


def test_a_cut_keras_checkpoint_is_refused_before_keras(tmp_path):
    import zipfile

    from ceriakeras.modelcheck import check_keras_archive

    path = tmp_path / "c.keras"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("config.json", "{}")
        z.writestr("model.weights.h5", b"\0" * 4096)
    check_keras_archive(path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ModelError, match="cut or damaged"):
        check_keras_archive(path)


def test_stale_temporaries_of_a_killed_run_are_removed(tmp_path):
    from ceriakeras.analysis.outguard import earlier_results, remove_stale_temporaries

    (tmp_path / "overlays").mkdir()
    stale = [tmp_path / ".a_movie.mp4.x1y2.tmp", tmp_path / ".frames.csv.abc.tmp",
             tmp_path / "overlays" / ".a_00001.png.q.tmp"]
    other = tmp_path / ".notes.txt.k.tmp"
    for path in [*stale, other]:
        path.write_bytes(b"")
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted(stale)
    assert other.exists() and not any(p.exists() for p in stale)
    assert earlier_results(tmp_path) == []


def test_a_resumed_run_that_analysed_nothing_prints_no_speed():
    from ceriakeras.analysis.run import format_summary

    summary = {"frames_analysed": 3, "frames_total": 3, "frames_skipped": 0,
               "resumed_at_frame": 3, "columns_per_frame": 1.0, "mean_height": 2.0,
               "frames_per_second": 0.0, "frames_analysed_now": 0, "inputs": [],
               "out_dir": "o", "skipped": []}
    text = format_summary(summary)
    assert "0.00 frames/s" not in text and "analysed before" in text


def test_a_refused_simulate_leaves_no_progress_file(tmp_path):
    from helpers import SMALL

    from ceriakeras.data.records import PROGRESS_NAME
    from ceriakeras.data.writer import write_dataset

    def refusing(particle_id, seed, config):
        raise ConfigError("the particle does not fit the cell")

    with pytest.raises(ConfigError):
        write_dataset(tmp_path / "d", 4, 1, 0, SMALL, progress=False, simulator=refusing)
    assert not (tmp_path / "d" / PROGRESS_NAME).exists()


def test_small_warnings_calibration_on_one_image_and_simulate_without_splits(monkeypatch):
    import importlib

    from click.testing import CliRunner

    cli_main = importlib.import_module("ceriakeras.cli.main")
    cli_training = importlib.import_module("ceriakeras.cli.training")
    runner = CliRunner()
    monkeypatch.setattr("ceriakeras.data.writer.write_dataset", lambda *a, **k: {
        "counts": {"train": 2, "validation": 0, "test": 0}, "particles": 1,
        "splits": {"train": {"shards": [{}]}}})
    with runner.isolated_filesystem():
        result = runner.invoke(cli_main.main, ["simulate", "--out", "d", "--count", "2"])
    assert result.exit_code == 0, result.output
    assert "no validation and no test split" in result.output
    calls = []
    monkeypatch.setattr(cli_training.click, "echo", lambda msg="", err=False: calls.append((msg, err)))
    cli_training.echo_calibration({"confidence_calibration": {
        "map": "platt", "split": "validation", "n_images": 1, "data_dir": "d",
        "dose_e_per_A2": [200.0], "slope": [1.0], "intercept": [0.0], "ece_before": [0.0],
        "ece_after": [0.0]}})
    assert any(err and "1 image(s)" in msg for msg, err in calls)


def test_an_error_after_a_progress_bar_starts_on_its_own_line():
    import io

    from tqdm.auto import tqdm

    from ceriakeras.cli.startup import end_progress_bars

    log = io.StringIO()
    bar = tqdm(total=10, file=log)
    bar.update(3)
    end_progress_bars()
    assert log.getvalue().endswith("\n")


@pytest.mark.slow
def test_training_that_never_reaches_a_finite_loss_is_refused_and_not_exported(tmp_path,
                                                                               monkeypatch):
    pytest.importorskip("keras")
    import keras
    from helpers import TINY, make_synthetic_dataset

    from ceriakeras.nn.plan import check_export
    from ceriakeras.nn import train as train_module

    compile_model = train_module.compile_model

    def diverged(y_true, y_pred):  # the loss of a diverged run
        return keras.ops.mean(y_pred) * np.nan

    def nan_loss(model, config, optimizer=None):
        model = compile_model(model, config, optimizer)
        model.compile(optimizer=model.optimizer, loss=diverged)
        return model

    monkeypatch.setattr(train_module, "compile_model", nan_loss)
    data = make_synthetic_dataset(tmp_path / "data", count=8)
    with pytest.raises(ModelError, match="never reached a finite validation loss"):
        train_module.train(data, tmp_path / "run", TINY, progress=False)
    assert not (tmp_path / "run" / "checkpoints" / "best.keras").exists()
    if (tmp_path / "run" / "checkpoints" / "last.keras").exists():
        with pytest.raises(ModelError, match="finite validation loss"):
            check_export(tmp_path / "run", tmp_path / "models")
