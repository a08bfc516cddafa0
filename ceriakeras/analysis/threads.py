"""Thread plumbing of ``analyze``: a producer thread, an ordered worker thread, the cores' share.

The run's stages (read and resample, the model, columns and writing) run at once, joined by
short queues, so memory stays flat while every core is busy.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator

_END = object()


def share_cores(workers: int) -> bool:
    """Give each of ``workers`` model calls running at once an equal share of the cores.

    TensorFlow runs one call on all cores by default, and on a few cores a U-Net keeps them only
    about two-thirds busy; ``workers`` calls of one core each (on 2 cores) keep both busy.
    Sets TensorFlow's intra-op threads to ``cores // workers`` and its inter-op threads to
    ``workers``; this works only before TensorFlow has started in this process.

    Returns
    -------
    bool
        Whether the setting took (False: TensorFlow was already running, or ``workers`` ≤ 1).
    """
    if workers <= 1:
        return False
    import tensorflow as tf

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        tf.config.threading.set_intra_op_parallelism_threads(max(1, (cores or 1) // workers))
        tf.config.threading.set_inter_op_parallelism_threads(workers)
    except RuntimeError:  # TensorFlow already started here: its settings stay
        return False
    return True


def in_thread(make_iterator, maxsize: int) -> Iterator:
    """Run the iterator ``make_iterator()`` in a thread; yield its items here, in order.

    At most ``maxsize`` items wait; an exception in the thread is raised here. Leaving the
    loop early stops the thread at its next item.
    """
    q: queue.Queue = queue.Queue(maxsize)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce():
        try:
            for entry in make_iterator():
                if not put((None, entry)):
                    return
            put((None, _END))
        except BaseException as err:  # handed to the consumer
            put((err, None))

    thread = threading.Thread(target=produce, name="analyze-reader", daemon=True)
    thread.start()
    try:
        while True:
            err, entry = q.get()
            if err is not None:
                raise err
            if entry is _END:
                return
            yield entry
    finally:
        stop.set()
        thread.join()


class Worker:
    """A thread that calls ``fn(job)`` for each submitted job, in order.

    ``submit`` blocks while ``maxsize`` jobs wait and raises the worker's error, if it had
    one; ``close`` waits for the queued jobs to be done (and raises that error).
    """

    def __init__(self, fn, maxsize: int):
        self.fn, self.error = fn, None
        self.queue: queue.Queue = queue.Queue(maxsize)
        self.thread = threading.Thread(target=self._work, name="analyze-writer", daemon=True)
        self.thread.start()

    def _work(self):
        while True:
            job = self.queue.get()
            if job is _END:
                return
            if self.error is None:
                try:
                    self.fn(job)
                except BaseException as err:  # handed to the submitter
                    self.error = err

    def submit(self, job) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queue.put(job, timeout=0.1)
                return
            except queue.Full:
                pass

    def close(self, raise_error: bool = True) -> None:
        self.queue.put(_END)
        self.thread.join()
        if raise_error and self.error is not None:
            raise self.error
