"""Training on several machines: two CPU worker processes on loopback under
MultiWorkerMirroredStrategy (``TF_CONFIG``), each running ``ceriakeras train``.

Keras 3's ``fit`` fails under this strategy (keras-team/keras#20585), so ``train`` drives the
model (here the context U-Net, whose optics output adds a second loss) with its own
distributed step (:func:`ceriakeras.nn.train.fit_multi_worker`) when ``TF_CONFIG`` is set. Only
the chief writes the run folder; the other worker writes its copies to a private temporary
folder (``TMPDIR`` here), which lets the test compare the two replicas.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from ceriakeras.config import to_dict  # noqa: E402
from helpers import CONTEXT, make_synthetic_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
EPOCHS, STEPS = 2, 3


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (bound together, then released)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def all_weights(path: Path) -> tuple[list[np.ndarray], int]:
    model = keras.saving.load_model(path, safe_mode=True)
    return [np.asarray(w) for w in model.weights], int(model.optimizer.iterations.numpy())


@pytest.mark.slow
def test_two_workers_train_the_same_replica(tmp_path):
    data = make_synthetic_dataset(tmp_path / "data", count=12)
    config = tmp_path / "tiny.json"
    # the context U-Net: its two outputs (probabilities and optics) go through the custom step
    config.write_text(json.dumps({**to_dict(CONTEXT), "epochs": EPOCHS, "steps_per_epoch": STEPS}))
    run = tmp_path / "run"
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for index in range(2):
        private = tmp_path / f"tmp{index}"
        private.mkdir()
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "",
               "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1",
               "TMPDIR": str(private),
               "TF_CONFIG": json.dumps({"cluster": cluster,
                                        "task": {"type": "worker", "index": index}})}
        cmd = [sys.executable, "-m", "ceriakeras.cli.main", "train", "--data", str(data), "--out",
               str(run), "--config", str(config), "--quiet"]
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]

    # the chief (worker 0) wrote the run; worker 1 wrote nothing there
    state = json.loads((run / "state.json").read_text())
    assert state["epoch"] == EPOCHS
    assert f"{EPOCHS} epoch(s)" in outputs[0]
    rows = (run / "log.csv").read_text().strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == [str(e) for e in range(EPOCHS)]
    worker_copies = list((tmp_path / "tmp1").glob("ceriakeras-worker-*/checkpoints/last.keras"))
    assert len(worker_copies) == 1, outputs[1][-2000:]
    assert not list((tmp_path / "tmp0").iterdir()), "the chief needs no private folder"

    # both replicas: the same weights (initial broadcast + all-reduced gradients), all steps done
    chief, chief_steps = all_weights(run / "checkpoints" / "last.keras")
    other, other_steps = all_weights(worker_copies[0])
    assert chief_steps == other_steps == EPOCHS * STEPS
    assert len(chief) == len(other)
    for a, b in zip(chief, other):
        np.testing.assert_array_equal(a, b)
    assert all(np.isfinite(w).all() for w in chief)
