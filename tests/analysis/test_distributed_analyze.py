"""``analyze --scheduler``: the network on a dask cluster's workers gives a local run's tables.

A LocalCluster of two worker processes (one thread each) runs a tiny exported U-Net
(``helpers.export_tiny_model``) on a small noisy series; ``columns.csv``, ``frames.csv`` and
``events.csv`` must be byte-identical to those of a local run, with and without tracks, when a
worker is killed mid-run, and when a local run interrupted halfway is resumed on the cluster.
"""

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ceriakeras.config import AnalyzeConfig, ConfigError, ModelError
from ceriakeras.inference import cluster

TABLES = ("columns.csv", "frames.csv", "events.csv")
PIXEL_A = 0.1  # the series' pixel size, Å (the tiny model works at 0.2 Å)


def noisy_series(n_frames=12, size_px=256, seed=0) -> np.ndarray:
    """(N, H, W) counts: Gaussian blobs on a drifting 3.8 Å grid over 40 counts of vacuum, Poisson."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size_px, 0:size_px] * PIXEL_A
    frames = []
    for k in range(n_frames):
        expected = np.ones((size_px, size_px))
        for gx in range(6):
            for gy in range(6):
                x, y = 3.0 + 3.8 * gx + 0.05 * k, 3.0 + 3.8 * gy + 0.03 * k
                expected += 0.4 * (1 + (gx + gy) % 4) * np.exp(
                    -((xx - x) ** 2 + (yy - y) ** 2) / (2 * 0.3**2))
        frames.append(rng.poisson(40 * expected))
    return np.stack(frames).astype(np.float32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny model's version folder and a 12-frame series (``series.npy``)."""
    from helpers import export_tiny_model

    root = tmp_path_factory.mktemp("distributed")
    model = export_tiny_model(root)
    series = root / "series.npy"
    np.save(series, noisy_series())
    return model, series, root


def config(tracks: bool, tta: bool = False) -> AnalyzeConfig:
    return AnalyzeConfig(batch_size=2, movie=False, tracks=tracks, test_time_augmentation=tta)


def run(setup, out, *, tracks=True, tta=False, **kwargs) -> dict:
    from ceriakeras.analysis.run import analyze

    model, series, _ = setup
    kwargs.setdefault("model", model)
    return analyze([series], out, pixel_size_A=PIXEL_A, config=config(tracks, tta),
                   progress=False, **kwargs)


def tables(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in TABLES if (out / name).exists()}


@pytest.fixture(scope="module")
def local_tables(setup):
    """The local run's tables, with tracks (True), without (False), with --tta ("tta")."""
    _, _, root = setup
    result = {}
    for tracks in (True, False, "tta"):
        out = root / f"local-{tracks}"
        run(setup, out, tracks=tracks is True, tta=tracks == "tta")
        result[tracks] = tables(out)
    assert result[True]["columns.csv"].count(b"\n") > 12 * 10  # columns found in every frame
    return result


def local_cluster():
    from distributed import LocalCluster

    return LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                        dashboard_address=None, host="127.0.0.1", silence_logs=logging.ERROR)


@pytest.fixture(scope="module")
def scheduler():
    """The address of a LocalCluster of 2 worker processes, shared by the tests that kill none."""
    with local_cluster() as lc:
        yield lc.scheduler_address


@pytest.mark.slow
def test_two_workers_give_the_local_tables_byte_for_byte(setup, local_tables, scheduler,
                                                         tmp_path):
    from ceriakeras.inference.served import load_served_model

    model, series, _ = setup
    for tracks in (True, False, "tta"):
        summary = run(setup, tmp_path / f"cluster-{tracks}", tracks=tracks is True,
                      tta=tracks == "tta", scheduler=scheduler)
        assert summary["frames_analysed"] == 12
        assert tables(tmp_path / f"cluster-{tracks}") == local_tables[tracks]
    # the probabilities themselves are bit-identical to the local model's
    frames = np.load(series)[:2].reshape(2, 128, 2, 128, 2).sum(axis=(2, 4))
    with cluster.cluster_model(scheduler, model) as remote:
        assert remote.concurrent_calls == 4
        remote_p, remote_h = remote.predict(frames)
    local_p, local_h = load_served_model(model).predict(frames)
    assert remote_p.dtype == local_p.dtype and np.array_equal(remote_p, local_p)
    assert np.array_equal(remote_h, local_h)
    from distributed import Client

    with Client(scheduler) as client:  # each worker process loaded the model once, for all 4 connections
        assert list(client.run(lambda: cluster.LOADS["count"]).values()) == [1, 1]
    with pytest.raises(ModelError, match="differs from this machine's"):
        cluster._worker_model(str(model), "0" * 64)  # what a worker with another model says


@pytest.mark.slow
def test_a_killed_worker_loses_nothing(setup, local_tables, tmp_path):
    """One worker process is SIGKILLed once the first batch is written; dask runs its batch
    again elsewhere and the tables are complete and identical."""
    from distributed import Client

    out = tmp_path / "killed"
    with local_cluster() as lc, Client(lc) as client:
        pids = list(client.run(os.getpid).values())
        killed = []

        def killer():
            deadline = time.time() + 60
            while time.time() < deadline:
                csv = out / "columns.csv"
                if csv.exists() and csv.read_bytes().count(b"\n") > 1:  # a batch is written
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])
                    return
                time.sleep(0.01)

        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        summary = run(setup, out, scheduler=lc.scheduler_address)
        thread.join(5)
    assert killed
    assert summary["frames_analysed"] == 12
    assert tables(out) == local_tables[True]


@pytest.mark.slow
def test_a_local_run_interrupted_halfway_resumes_on_the_cluster(setup, local_tables, scheduler,
                                                                tmp_path):
    from ceriakeras.inference.served import load_model

    model, _, _ = setup
    served, identity = load_model(model)

    class Interrupted:  # the same model, with the local identity; stops after 3 batches
        info, calls = served.info, 0

        def __init__(self):
            self.identity = identity

        def predict(self, images, **kwargs):
            Interrupted.calls += 1
            if Interrupted.calls > 3:
                raise KeyboardInterrupt
            return served.predict(images, **kwargs)

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run(setup, out, model=Interrupted())
    summary = run(setup, out, scheduler=scheduler)
    assert 0 < summary["resumed_at_frame"] < 12
    assert tables(out) == local_tables[True]


def test_an_unreachable_scheduler_is_one_line_before_tensorflow(tmp_path):
    """``analyze --scheduler`` with nobody listening: exit 2, one line, TensorFlow never loaded
    (the shipped model's folder is checked, not loaded)."""
    np.save(tmp_path / "series.npy", noisy_series(2))
    script = textwrap.dedent(f"""
        import sys
        from ceriakeras.cli.main import main
        from ceriakeras.inference import cluster
        cluster.CONNECT_TIMEOUT_S = 2
        sys.argv = ["ceriakeras", "analyze", {str(tmp_path / "series.npy")!r}, "--pixel-size",
                    "0.1", "--out", {str(tmp_path / "out")!r},
                    "--scheduler", "tcp://127.0.0.1:9"]
        try:
            main()
        except SystemExit as exit:
            print("exit", exit.code, "tensorflow" in sys.modules, "keras" in sys.modules)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env=env, check=False)
    assert done.stdout.strip().splitlines()[-1] == "exit 2 False False"
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "cannot reach the dask scheduler at tcp://127.0.0.1:9" in lines[0]


def test_a_scheduler_address_must_be_a_dask_address():
    with pytest.raises(ConfigError, match="tcp://HOST:8786"):
        cluster.connect("localhost:8786")


def test_a_cluster_runs_a_model_folder_not_a_model_object():
    class Remote:
        def __init__(self):
            self.info = {"pixel_size_A": 0.2, "max_height": 16, "label_radius_A": 0.5}

        def predict(self, images):
            raise AssertionError

    with pytest.raises(ConfigError, match="give --model a folder"):
        cluster.cluster_model("tcp://127.0.0.1:9", Remote())


def test_a_worker_without_the_model_folder_says_where_it_must_be(tmp_path):
    with pytest.raises(ModelError, match="same path"):
        cluster._worker_model(str(tmp_path / "nowhere" / "1"), "0" * 64)


@pytest.mark.parametrize("failure", ["killed", "cancelled"])
def test_a_batch_the_cluster_cannot_finish_is_one_line(failure):
    from distributed import KilledWorker
    from distributed.client import FutureCancelledError

    class Future:
        def result(self):
            if failure == "killed":
                raise KilledWorker("predict-1", None, 3)
            raise FutureCancelledError("predict-1", "lost")

        def release(self):
            pass

    class Client:
        scheduler = type("Rpc", (), {"address": "tcp://127.0.0.1:8786"})()

        def submit(self, *args, **kwargs):
            return Future()

    remote = cluster.ClusterModel(Client(), "saved_models/m/1", {}, n_workers=1)
    with pytest.raises(ModelError, match="rerun"):
        remote.predict(np.zeros((1, 8, 8)))
