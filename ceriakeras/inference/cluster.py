"""The served model on a dask.distributed cluster: ``ceriakeras analyze --scheduler ADDRESS``.

Only the network runs on the cluster. :func:`ceriakeras.analysis.run.analyze` reads and
resamples the frames, finds the columns and writes every table and picture on this machine, as
with a local model or ``--server``; it hands each batch of frames to :meth:`ClusterModel.predict`,
which sends it to a worker and waits for that worker's probabilities. ``analyze`` keeps up to
:attr:`ClusterModel.concurrent_calls` batches in flight (two per worker) and takes their answers
in input order, so its batches, and hence its tables, are those of a local run.

Each worker process loads the model once, from the same version folder path as this machine's
``--model`` (a shared file system, or a copy at the same path), and keeps it for the next
tasks (:func:`_worker_model`); it checks that its copy's ``assets/ceriakeras.json`` is this
machine's. A worker that dies mid-batch loses nothing: dask runs the batch again on another
worker (its replacement loads the model again).

Only this module's functions that run on a worker import TensorFlow; the client side imports
``distributed`` alone, so an unreachable scheduler is refused before TensorFlow loads.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Self

import numpy as np

from ..config import ConfigError, ModelError
from .served import OPTICS_DESCRIPTIONS, info_sha256, model_version

SCHEDULER_PREFIXES = ("tcp://", "tls://", "inproc://", "ucx://")
"""Address schemes dask.distributed schedulers listen on."""
CONNECT_TIMEOUT_S = 20.0
"""Seconds to wait for the scheduler to answer, and then for its first worker, s."""
CALLS_PER_WORKER = 2
"""Batches in flight per worker: one running, one waiting, so a worker never waits for data."""

_MODELS: dict = {}
"""On a worker: ``{(version folder, info sha256): ServedModel}``, the model loaded once."""
_LOADING = threading.Lock()
LOADS = {"count": 0}
"""On a worker: how many times this process loaded a model (once, unless the model changes)."""


class ClusterModel:
    """A served model run on the workers of a dask cluster, with the interface ``analyze`` expects.

    Parameters
    ----------
    client : distributed.Client
        Connected to the cluster (closed by :meth:`close`).
    version_dir : path
        The model's version folder; every worker loads the model from this path.
    info : dict
        Its ``assets/ceriakeras.json``, read on this machine.
    n_workers : int
        Workers the cluster has now (sets :attr:`concurrent_calls`).
    """

    def __init__(self, client, version_dir, info: dict, *, n_workers: int):
        self.client = client
        self.version_dir = Path(version_dir).resolve()
        self.info = info
        self.info_sha256 = info_sha256(info)
        self.concurrent_calls = max(2, CALLS_PER_WORKER * n_workers)

    @property
    def identity(self) -> dict:
        """What ``progress.json`` records as the model: that of the same folder run locally
        (the probabilities are the same), so either run resumes the other."""
        return {"path": str(self.version_dir), "info_sha256": self.info_sha256}

    @property
    def optics_names(self) -> tuple[str, ...]:
        """The model's per-frame optics outputs, as :attr:`ServedModel.optics_names`."""
        outputs = self.info.get("signature", {}).get("outputs", {})
        return tuple(name for name in OPTICS_DESCRIPTIONS if name in outputs)

    @property
    def has_optics(self) -> bool:
        return bool(self.optics_names)

    def load_on_workers(self) -> None:
        """Load the model on every worker now, so that a worker without it fails before the run.

        Raises
        ------
        ModelError
            A worker has no model at :attr:`version_dir`, or a different one.
        """
        self.client.run(_load_on_worker, str(self.version_dir), self.info_sha256)

    def predict(self, images, *, optics: bool = False):
        """:meth:`ServedModel.predict` of ``images`` on one worker (blocks until it answers).

        Parameters
        ----------
        images : (B, H, W) float
            Frames at the model's pixel size, counts.
        optics : bool
            Also return the per-frame optics estimates.

        Returns
        -------
        probabilities : (B, H, W, C) float32
        height : (B, H, W) int32
        optics : dict of (B,) float32, only with ``optics=True``

        Raises
        ------
        ModelError
            The batch killed the workers that ran it (dask's ``allowed-failures``), or the
            cluster cancelled it (a lost scheduler): rerun the command to resume.
        """
        from concurrent.futures import CancelledError

        from distributed import KilledWorker

        future = self.client.submit(_predict_on_worker, str(self.version_dir), self.info_sha256,
                                    np.asarray(images, np.float32), optics, pure=False)
        try:
            return future.result()
        except KilledWorker:
            raise ModelError("a batch of frames killed every dask worker that ran it (out of "
                             "memory?): give the workers more memory or use a smaller "
                             "--batch-size, then rerun to resume") from None
        except CancelledError:
            raise ModelError(f"the dask cluster at {self.client.scheduler.address} dropped a "
                             "batch (scheduler lost?): rerun the same command to resume") from None
        finally:
            future.release()

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def connect(scheduler: str, *, timeout_s: float | None = None):
    """A ``distributed.Client`` of the scheduler at ``scheduler``, with at least one worker.

    Raises
    ------
    ConfigError
        The address is not a dask address, the scheduler does not answer within ``timeout_s``
        (default :data:`CONNECT_TIMEOUT_S`), or it has no worker by then.
    """
    if not str(scheduler).startswith(SCHEDULER_PREFIXES):
        raise ConfigError(f"--scheduler {scheduler!r} must be an address like tcp://HOST:8786")
    from distributed import Client

    timeout_s = CONNECT_TIMEOUT_S if timeout_s is None else timeout_s
    try:
        client = Client(scheduler, timeout=f"{timeout_s}s", set_as_default=False)
    except (OSError, TimeoutError, ValueError) as err:
        raise ConfigError(
            f"cannot reach the dask scheduler at {scheduler} ({_one_line(err)}): start it with "
            "`dask scheduler` and workers with `dask worker ADDRESS`, or leave out --scheduler"
        ) from None
    try:
        client.wait_for_workers(1, timeout=timeout_s)
    except (OSError, TimeoutError):
        client.close()
        raise ConfigError(f"the dask scheduler at {scheduler} has no worker: start one with "
                          f"`dask worker {scheduler}`") from None
    return client


def cluster_model(scheduler: str, model=None) -> ClusterModel:
    """The model folder ``model`` (None: the shipped model) run on the cluster at ``scheduler``,
    loaded on every worker.

    Raises
    ------
    ConfigError
        ``model`` is not a folder, or the scheduler cannot be reached (:func:`connect`).
    ModelError
        The model folder is missing here or on a worker.
    """
    if model is not None and not isinstance(model, (str, Path)):
        raise ConfigError("--scheduler runs a model folder on the workers: give --model a folder "
                          "(not --server)")
    version_dir, info = model_version(model)
    client = connect(scheduler)
    n_workers = len(client.scheduler_info().get("workers", {}))
    remote = ClusterModel(client, version_dir, info, n_workers=n_workers)
    try:
        remote.load_on_workers()
    except BaseException:
        remote.close()
        raise
    return remote


def _worker_model(path: str, sha256: str):
    """The model at ``path`` in this worker process, loaded on the first call, then reused."""
    key = (path, sha256)
    with _LOADING:
        served = _MODELS.get(key)
        if served is None:
            from .served import load_served_model

            if not Path(path).is_dir():
                raise ModelError(f"a dask worker has no model at {path}: give every worker the "
                                 "model folder at the same path (or a shared file system)")
            served = load_served_model(path)
            if info_sha256(served.info) != sha256:
                raise ModelError(f"the model at {path} on a dask worker differs from this "
                                 "machine's (assets/ceriakeras.json): copy the same folder there")
            _MODELS.clear()  # one model per worker process
            _MODELS[key] = served
            LOADS["count"] += 1
    return served


def _load_on_worker(path: str, sha256: str) -> None:
    """Runs on every worker (``client.run``): load the model now."""
    _worker_model(path, sha256)


def _predict_on_worker(path: str, sha256: str, images: np.ndarray, optics: bool):
    """Runs on a worker: the model's answer for one batch (see :meth:`ClusterModel.predict`)."""
    return _worker_model(path, sha256).predict(images, optics=optics)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
