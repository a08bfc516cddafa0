"""``ceriakeras simulate``: writes, resumes, repairs, and refuses bad input with one line and exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ceriakeras.data import records, writer
from ceriakeras.cli.main import main
from helpers import fake_simulator, shard_bytes

LEGACY = str(Path(__file__).resolve().parents[2] / "configs" / "legacy_fast.toml")
TINY = ["--config", LEGACY, "--cell-size", "16", "--optics-per-exit-wave", "2", "--quiet"]


@pytest.fixture
def fake(monkeypatch):
    """Run the command on the fast fake simulator (in this process)."""
    monkeypatch.setattr(writer, "_default_simulator", lambda: fake_simulator)


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_simulate_writes_resumes_and_repairs(tmp_path, fake):
    out = str(tmp_path / "ds")
    result = run("simulate", "--out", out, "--count", "20", "--shards", "2", "--seed", "3", *TINY)
    assert result.exit_code == 0, result.output
    assert "20 images of 10 particles" in result.output
    manifest = records.read_manifest(out)
    assert manifest["count"] == 20 and manifest["seed"] == 3 and manifest["config"]["cell_size_A"] == 16.0
    assert manifest["command"].startswith("ceriakeras ") or manifest["command"] == "ceriakeras simulate"
    good = shard_bytes(Path(out))
    again = run("simulate", "--out", out, "--count", "20", "--shards", "2", "--seed", "3", *TINY)
    assert again.exit_code == 0 and shard_bytes(Path(out)) == good
    victim = records.shard_paths(out, "train")[0]
    victim.unlink()
    broken = run("simulate", "--out", out, "--count", "20", "--shards", "2", "--seed", "3", *TINY)
    assert broken.exit_code == 2 and "--repair" in broken.output and victim.name in broken.output
    repaired = run("simulate", "--out", out, "--repair", "--quiet")   # settings from the manifest
    assert repaired.exit_code == 0, repaired.output
    assert shard_bytes(Path(out)) == good
    records.verify_dataset(out)


@pytest.mark.parametrize("args, message", [
    (["--count", "0"], "--count 0 must be at least 1"),
    (["--count", "-5"], "--count -5 must be at least 1"),
    ([], "--count N"),
    (["--count", "4", "--pixel-size", "-0.2"], "--pixel-size -0.2 Å must be a positive"),
    (["--count", "4", "--cell-size", "5000"], "cell_size_A=5000.0 must be in"),
    (["--count", "4", "--pixel-size", "0.15"], "integer multiple"),
    (["--count", "4", "--workers", "2", "--scheduler", "tcp://127.0.0.1:1"], "either --workers or --scheduler"),
    (["--count", "4", "--scheduler", "localhost"], "tcp://HOST"),
    (["--count", "4", "--repair", "--overwrite"], "give one of them"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, fake, args, message):
    result = run("simulate", "--out", str(tmp_path / "x"), *args, "--quiet")
    assert result.exit_code == 2
    assert message in result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1
    assert not list(Path(tmp_path).rglob("*.tfrecord.gz"))


def test_unknown_config_key_and_out_of_range_physics(tmp_path, fake):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"optics": {"defocus_rang_nm": [-5, 5]}}))
    result = run("simulate", "--out", str(tmp_path / "x"), "--count", "4", "--config", str(bad))
    assert result.exit_code == 2 and "unknown config key 'optics.defocus_rang_nm'" in result.output
    metres = tmp_path / "metres.toml"
    metres.write_text("[optics]\ndefocus_range_nm = [-12e-9, 12e-9]\ncs_range_um = [-25000, 25000]\n")
    result = run("simulate", "--out", str(tmp_path / "x"), "--count", "4", "--config", str(metres))
    assert result.exit_code == 2 and "cs_range_um" in result.output


def test_unwritable_folder_and_other_parameters(tmp_path, fake):
    (tmp_path / "file").write_text("not a folder")
    result = run("simulate", "--out", str(tmp_path / "file" / "ds"), "--count", "4", *TINY)
    assert result.exit_code == 2 and "choose a writable --out" in result.output
    out = str(tmp_path / "ds")
    assert run("simulate", "--out", out, "--count", "4", "--shards", "1", *TINY).exit_code == 0
    result = run("simulate", "--out", out, "--count", "6", "--shards", "1", *TINY)
    assert result.exit_code == 2 and "other parameters (count 4 here, 6 asked)" in result.output
    assert "another --out" in result.output
    result = run("simulate", "--out", out, "--count", "6", "--shards", "1", "--overwrite", *TINY)
    assert result.exit_code == 0 and records.read_manifest(out)["count"] == 6


@pytest.mark.slow
def test_done_when_command_with_real_simulator(tmp_path):
    """The issue's check, with the real simulator on a 32 Å cell: shards, manifest, resume."""
    out = tmp_path / "X"
    small = tmp_path / "small.toml"
    small.write_text('preset = "legacy"\n[structure]\ndiameter_range_A = [12.0, 18.0]\n')
    cmd = [sys.executable, "-m", "ceriakeras.cli.main", "simulate", "--out", str(out), "--count", "6",
           "--shards", "2", "--seed", "3", "--cell-size", "32", "--optics-per-exit-wave", "4",
           "--config", str(small), "--preview", "1", "--quiet"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    manifest = records.verify_dataset(out)
    assert sum(manifest["counts"].values()) == 6 and manifest["particles"] == 2
    assert "--count 6" in manifest["command"] and (out / "preview" / "example-00000.png").exists()
    for split in records.SPLITS:
        for path in records.shard_paths(out, split):
            for rec in records.iter_shard(path):
                meta = json.loads(rec["metadata"])
                assert "defocus_nm" in meta and "cs_um" in meta
                for x, y, h in rec["columns"]:
                    assert rec["label"][int(round(y)), int(round(x))] == h
    before = shard_bytes(out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*.tfrecord.gz")}
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0 and shard_bytes(out) == before
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.tfrecord.gz")} == mtimes   # not redone
