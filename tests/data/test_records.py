"""Records: schema v1 round trip, the particle → split → shard plan, writing, resuming, verifying, repairing.

Most tests use a small fake simulator (random arrays, deterministic in (seed, particle_id)), so
they test the records machinery in seconds; ``test_end_to_end_with_real_simulator`` runs the
real abTEM simulation on a tiny cell.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from ceriakeras.data import records, shards, writer
from ceriakeras.config import ConfigError, DataError, SimulationConfig, StructureConfig
from helpers import CALLS, SMALL, fake_simulator, shard_bytes, slow_simulator


def write(out, count=20, shards=3, seed=5, config=SMALL, **kw):
    kw.setdefault("simulator", fake_simulator)
    kw.setdefault("progress", False)
    return writer.write_dataset(out, count, shards, seed, config, **kw)


# --- schema ------------------------------------------------------------------------------------
def test_serialize_parse_round_trip():
    import tensorflow as tf

    ex = fake_simulator(3, 1, SMALL)[1]
    parsed = records.parse_example(tf.constant(records.serialize_example(ex)))
    np.testing.assert_array_equal(parsed["image"].numpy(), ex.image)
    np.testing.assert_array_equal(parsed["label"].numpy(), ex.label)
    assert parsed["label"].dtype == tf.uint8 and parsed["image"].dtype == tf.float32
    np.testing.assert_allclose(parsed["columns"].numpy(), ex.columns)
    assert int(parsed["height"]) == ex.image.shape[0] and int(parsed["width"]) == ex.image.shape[1]
    assert float(parsed["pixel_size"]) == pytest.approx(0.2)
    assert json.loads(parsed["metadata"].numpy()) == ex.metadata


def test_record_parses_with_plain_tensorflow_by_the_schema():
    """A reader that knows only the design's table (no ceriakeras code) gets the arrays back."""
    import tensorflow as tf

    ex = fake_simulator(0, 0, SMALL)[0]
    spec = {"image": tf.io.FixedLenFeature([], tf.string), "label": tf.io.FixedLenFeature([], tf.string),
            "height": tf.io.FixedLenFeature([], tf.int64), "width": tf.io.FixedLenFeature([], tf.int64),
            "pixel_size": tf.io.FixedLenFeature([], tf.float32),
            "columns": tf.io.VarLenFeature(tf.float32), "metadata": tf.io.FixedLenFeature([], tf.string)}
    f = tf.io.parse_single_example(records.serialize_example(ex), spec)
    h, w = int(f["height"]), int(f["width"])
    image = np.frombuffer(f["image"].numpy(), "<f4").reshape(h, w)
    label = np.frombuffer(f["label"].numpy(), np.uint8).reshape(h, w)
    cols = tf.sparse.to_dense(f["columns"]).numpy().reshape(-1, 3)
    np.testing.assert_array_equal(image, ex.image)
    for x, y, height in cols:  # the label at each column position is its height
        assert label[int(round(y)), int(round(x))] == height


def test_serialization_is_deterministic_and_refuses_bad_labels():
    ex = fake_simulator(2, 2, SMALL)[0]
    assert records.serialize_example(ex) == records.serialize_example(dataclasses.replace(ex))
    with pytest.raises(DataError, match="uint8"):
        records.serialize_example(dataclasses.replace(ex, label=ex.label.astype(np.int32)))


# --- the plan ----------------------------------------------------------------------------------
def test_plan_splits_by_particle_and_counts_images():
    config = dataclasses.replace(SMALL, optics_per_exit_wave=3)
    plan = shards.plan_shards(301, 4, config)
    particles = [p for s in plan for p in s.particles]
    assert sorted(particles) == list(range(101))          # ceil(301 / 3), each exactly once
    assert sum(s.images for s in plan) == 301
    assert shards.images_of_particle(100, 301, 3) == 1    # the last particle gives the remainder
    split_of = {p: s.split for s in plan for p in s.particles}
    for p, split in split_of.items():                      # the split depends on the particle only
        assert split == shards.split_of_particle(p, config.split_fractions)
    n = {sp: sum(1 for v in split_of.values() if v == sp) for sp in records.SPLITS}
    assert abs(n["train"] - 80.8) <= 2 and abs(n["validation"] - 10.1) <= 2 and abs(n["test"] - 10.1) <= 2
    train = [s for s in plan if s.split == "train"]
    assert len(train) == 4 and {s.of for s in train} == {4}
    assert max(len(s.particles) for s in train) - min(len(s.particles) for s in train) <= 1
    assert all(list(s.particles) == sorted(s.particles) for s in plan)
    assert [s.name for s in plan if s.split == "validation"] == ["validation-00000-of-00001.tfrecord.gz"]
    # a larger dataset keeps every earlier particle in the same split
    bigger = shards.plan_shards(900, 4, config)
    split_big = {p: s.split for s in bigger for p in s.particles}
    assert all(split_big[p] == split_of[p] for p in split_of)


# --- writing, reading, resuming ------------------------------------------------------------------
def test_write_dataset_manifest_and_records(tmp_path):
    out = tmp_path / "ds"
    manifest = write(out, save_structures=True, command="ceriakeras simulate --out ds")
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["schema_version"] == 1 and manifest["count"] == 20 and manifest["seed"] == 5
    assert sum(manifest["counts"].values()) == 20 and manifest["particles"] == 10
    assert manifest["optics_per_exit_wave"] == 2 and manifest["command"] == "ceriakeras simulate --out ds"
    assert manifest["config"]["cell_size_A"] == 16.0 and "tensorflow" in manifest["versions"]
    assert not (out / ".progress.json").exists() and not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    seen_particles: dict[int, str] = {}
    hist = np.zeros(SMALL.max_height + 1, np.int64)
    defocus = []
    for split in records.SPLITS:
        paths = records.shard_paths(out, split)
        n = 0
        for path in paths:
            for rec in records.iter_shard(path):
                meta = json.loads(rec["metadata"])
                assert seen_particles.setdefault(meta["particle_id"], split) == split  # one split each
                defocus.append(meta["defocus_nm"])
                if split == "train":
                    hist += np.bincount(rec["label"].ravel(), minlength=len(hist))
                n += 1
        assert n == manifest["counts"][split] == manifest["splits"][split]["examples"]
    assert manifest["label_histogram"] == hist.tolist()
    assert manifest["parameter_ranges"]["defocus_nm"] == [min(defocus), max(defocus)]
    lo, hi = manifest["parameter_ranges"]["diameter_A"]
    assert SMALL.structure.diameter_range_A[0] <= lo <= hi <= SMALL.structure.diameter_range_A[1]
    assert len(list((out / "structures").glob("particle-*.xyz"))) == 10
    import ase.io

    atoms = ase.io.read(out / "structures" / "particle-000000.xyz")
    assert atoms.get_chemical_symbols()[0] == "Ce"
    assert records.verify_dataset(out)["counts"] == manifest["counts"]


def test_rerun_resumes_and_never_leaves_partial_shards(tmp_path):
    clean = tmp_path / "clean"
    write(clean)
    out = tmp_path / "ds"

    def failing(pid, seed, config):
        if pid == 6:
            raise RuntimeError("simulated crash")
        return fake_simulator(pid, seed, config)

    with pytest.raises(RuntimeError, match="simulated crash"):
        write(out, simulator=failing)
    finished = shard_bytes(out)
    assert 0 < len(finished) < len(shard_bytes(clean))
    for name, data in finished.items():       # whatever is under a final name is complete
        assert data == (clean / name).read_bytes()
    assert not (out / "manifest.json").exists()
    CALLS.clear()
    write(out)
    done = {p for name in finished for s in shards.plan_shards(20, 3, SMALL) if s.name == name
            for p in s.particles}
    assert CALLS and not done & set(CALLS)     # finished shards were not simulated again
    assert shard_bytes(out) == shard_bytes(clean)
    assert json.loads((out / "manifest.json").read_text())["splits"] == \
        json.loads((clean / "manifest.json").read_text())["splits"]
    CALLS.clear()
    write(out)                                  # a finished dataset: nothing to do
    assert CALLS == []


def test_other_parameters_are_refused_unless_overwrite(tmp_path):
    out = tmp_path / "ds"
    write(out)
    with pytest.raises(ConfigError, match="other parameters.*seed 5 here, 6 asked.*--overwrite"):
        write(out, seed=6)
    with pytest.raises(ConfigError, match="cell_size_A"):
        write(out, config=dataclasses.replace(SMALL, cell_size_A=20.0))
    write(out, seed=6, overwrite=True)
    assert records.read_manifest(out)["seed"] == 6
    assert records.verify_dataset(out)


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="count"):
        write(tmp_path / "a", count=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a folder|cannot write"):
        write(tmp_path / "file")
    with pytest.raises(ConfigError, match="cannot write"):
        write(tmp_path / "file" / "sub")
    with pytest.raises(ConfigError, match="cell_size_A"):
        write(tmp_path / "b", config=dataclasses.replace(SMALL, cell_size_A=-3.0))


# --- faults: truncation, flipped bytes, manifest disagreement, repair ----------------------------
def test_truncated_shard_is_named_and_repaired(tmp_path):
    out = tmp_path / "ds"
    write(out)
    good = shard_bytes(out)
    victim = records.shard_paths(out, "train")[1]
    victim.write_bytes(good[victim.name][: len(good[victim.name]) // 2])
    with pytest.raises(DataError, match=f"{victim.name}.*--repair"):
        records.verify_dataset(out)
    with pytest.raises(DataError, match=f"{victim.name}.*--repair"):
        write(out)                              # a plain rerun does not hide the damage
    CALLS.clear()
    write(out, repair=True)
    assert shard_bytes(out) == good
    plan = {s.name: s for s in shards.plan_shards(20, 3, SMALL)}
    assert sorted(CALLS) == sorted(plan[victim.name].particles)   # only the bad shard redone
    records.verify_dataset(out)


def test_flipped_byte_in_gzip_shard_is_caught(tmp_path):
    out = tmp_path / "ds"
    write(out)
    victim = records.shard_paths(out, "test")[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    with pytest.raises(DataError, match=victim.name):
        records.verify_dataset(out)
    with pytest.raises(DataError, match=f"{victim.name}.*corrupt"):
        list(records.iter_shard(victim))        # the GZIP / record checksums see it too
    write(out, repair=True)
    records.verify_dataset(out)


def test_manifest_disagreeing_with_shards(tmp_path):
    out = tmp_path / "ds"
    write(out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["counts"]["train"] += 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="manifest.json.*train.*--repair"):
        records.verify_dataset(out)
    manifest["counts"]["train"] -= 1
    manifest["splits"]["train"]["shards"][0]["examples"] += 1
    manifest["splits"]["train"]["examples"] += 1
    manifest["counts"]["train"] += 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="train-00000.*holds .* examples, the manifest says"):
        records.verify_dataset(out)


def test_missing_dataset_and_other_schema_version(tmp_path):
    with pytest.raises(DataError, match="does not exist.*ceriakeras simulate"):
        records.read_manifest(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="manifest.json is missing"):
        records.read_manifest(tmp_path / "empty")
    out = tmp_path / "ds"
    write(out, count=4, shards=1)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["schema_version"] = 2
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="schema version 2.*regenerate"):
        records.read_manifest(out)


def test_preview_pngs(tmp_path):
    out = tmp_path / "ds"
    write(out, count=6, shards=1, preview=2)
    pngs = sorted((out / "preview").glob("*.png"))
    assert [p.name for p in pngs] == ["example-00000.png", "example-00001.png"]
    import matplotlib.image

    img = matplotlib.image.imread(pngs[0])
    assert img.shape[1] > 2.5 * img.shape[0]    # three panels side by side


# --- workers, dask, kills ----------------------------------------------------------------------
def test_dask_local_cluster_gives_identical_bytes(tmp_path):
    write(tmp_path / "one", count=12, shards=2)
    write(tmp_path / "two", count=12, shards=2, workers=2)
    assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "two")
    assert (records.read_manifest(tmp_path / "one")["splits"]
            == records.read_manifest(tmp_path / "two")["splits"])


@pytest.mark.slow
def test_killed_dask_worker_loses_nothing(tmp_path):
    """A LocalCluster of two worker processes; one is SIGKILLed mid-run; the data are complete."""
    import threading

    from distributed import Client, LocalCluster

    write(tmp_path / "ref", count=40, shards=3)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      host="127.0.0.1") as cluster, Client(cluster) as client:
        pids = list(client.run(os.getpid).values())
        killed = []

        def killer():
            while not list((tmp_path / "dask").glob("train-*.tfrecord.gz")):
                time.sleep(0.05)
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        write(tmp_path / "dask", count=40, shards=3, scheduler=cluster.scheduler_address,
              simulator=slow_simulator)
        thread.join(5)
    assert killed
    assert shard_bytes(tmp_path / "dask") == shard_bytes(tmp_path / "ref")
    records.verify_dataset(tmp_path / "dask")


@pytest.mark.slow
def test_sigkill_then_rerun_is_complete(tmp_path):
    """``write_dataset`` in a subprocess killed with SIGKILL after its first shard, then rerun."""
    out = tmp_path / "ds"
    script = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).parents[1])!r}]
        import test_records as t
        t.write({str(out)!r}, count=24, shards=4, simulator=t.slow_simulator)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 120
        while not list(out.glob("train-*.tfrecord.gz")) and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(float(np.random.default_rng().uniform(0, 0.8)))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out / "manifest.json").exists()
    write(out, count=24, shards=4)
    write(tmp_path / "ref", count=24, shards=4)
    assert shard_bytes(out) == shard_bytes(tmp_path / "ref")
    records.verify_dataset(out)


@pytest.mark.slow
def test_end_to_end_with_real_simulator(tmp_path):
    """Two particles through abTEM on a tiny cell; labels sit on their columns, metadata has optics."""
    config = SimulationConfig.legacy(cell_size_A=32.0, optics_per_exit_wave=2,
                                     structure=StructureConfig(diameter_range_A=(12.0, 18.0)))
    out = tmp_path / "real"
    manifest = writer.write_dataset(out, 3, 1, 3, config, progress=False)
    assert sum(manifest["counts"].values()) == 3 and manifest["particles"] == 2
    for split in records.SPLITS:
        for path in records.shard_paths(out, split):
            for rec in records.iter_shard(path):
                meta = json.loads(rec["metadata"])
                assert "defocus_nm" in meta and "cs_um" in meta
                assert rec["image"].shape == (160, 160)
                for x, y, h in rec["columns"]:
                    assert rec["label"][int(round(y)), int(round(x))] == h
    assert manifest["parameter_ranges"]["defocus_nm"][0] >= -12.0
    records.verify_dataset(out)


def test_manifest_without_the_newer_fields_keeps_its_old_settings(tmp_path):
    """A manifest written before vacuum_for_delocalisation / multislice_margin_A existed was made
    without them: --repair reads them as their old values, not as the new defaults (issue 23)."""
    out = tmp_path / "old"
    writer.write_dataset(out, 4, 1, 3, SMALL, progress=False, simulator=fake_simulator)
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("vacuum_for_delocalisation", "multislice_margin_A"):
        del manifest["config"][key]
    (out / "manifest.json").write_text(json.dumps(manifest))
    config = writer.dataset_parameters(out)[3]
    assert config == SMALL and SimulationConfig().multislice_margin_A is not None
