"""The scoring runner's metrics process: pure metrics that hold the interpreter, off its lock.

The runner computes pure metrics (functions of the heatmaps and the ground truth) in a second
thread while the next batch is explained. That overlaps well when the metric is tensor code,
which releases Python's global interpreter lock, but not when it is interpreter-bound: Quantus
checks every batch of attributions with ``set(a_batch.flatten().tolist())`` before its
complexity metrics, and while that holds the lock the network's thread waits between its
operations. :class:`MetricsProcess` runs such work (``offload(fn, *args)``: NumPy arrays in,
NumPy arrays out) in one forked helper process instead, so it runs on another core.

The helper is started, from the runner's main thread and before its other threads, only
where it pays off and is safe: on Linux (``fork``), for a single-process run on the CPU,
with at least :data:`MIN_BATCHES` batches and a metric that offloads. Elsewhere
:func:`run_here` calls the function in place; the values are the same either way. If the
helper dies, the work it was given is done in place and the run goes on.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

__all__: list[str] = []

#: ``offload(fn, *args) -> fn(*args)``
Offload = Callable[..., Any]

#: batches a run must have for the helper process (its start and stop cost about as much as
#: the interpreter time it saves on a few batches)
MIN_BATCHES = 8


def run_here(fn: Callable[..., Any], *args: Any) -> Any:
    """Call ``fn(*args)`` in this thread (no metrics process)."""
    return fn(*args)


def _ignore_interrupts() -> None:
    # Ctrl-C reaches the whole process group: the runner stops and closes the helper, which
    # must not print a traceback of its own
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def can_fork() -> bool:
    """Whether this platform starts helper processes by ``fork`` (Linux)."""
    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


class MetricsProcess:
    """One forked helper process for interpreter-bound metric work; callable as ``offload``.

    Use :meth:`start`, call the instance as ``offload(fn, *args)`` from any thread, and
    :meth:`close` it (also on errors). ``fn`` must be a module-level function and ``args``
    picklable.
    """

    def __init__(self, pool: ProcessPoolExecutor | None) -> None:
        self._pool = pool

    @classmethod
    def start(cls, wanted: bool) -> MetricsProcess:
        """Fork the helper now (from the calling thread) if ``wanted`` and possible."""
        if not wanted or not can_fork():
            return cls(None)
        pool = ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("fork"), initializer=_ignore_interrupts
        )
        try:
            # fork now, before the runner's own threads start
            pool.submit(os.getpid).result()
        except (BrokenProcessPool, OSError):
            pool.shutdown(wait=False, cancel_futures=True)
            return cls(None)
        return cls(pool)

    @property
    def active(self) -> bool:
        """Whether a helper process does the work (else :func:`run_here`)."""
        return self._pool is not None

    def pid(self) -> int | None:
        """The helper's process id (``None`` without one)."""
        pool = self._pool
        if pool is None:
            return None
        return pool.submit(os.getpid).result()

    def __call__(self, fn: Callable[..., Any], *args: Any) -> Any:
        pool = self._pool
        if pool is None:
            return fn(*args)
        try:
            future = pool.submit(fn, *args)
        except (BrokenProcessPool, RuntimeError):
            return self._lost(fn, args)
        try:
            return future.result()
        except BrokenProcessPool:
            # the helper died (killed, out of memory): do this and later work here
            return self._lost(fn, args)

    def _lost(self, fn: Callable[..., Any], args: tuple) -> Any:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        return fn(*args)

    def close(self) -> None:
        """Stop the helper: it exits once it has read the stop signal (the run does not
        wait for that; no work is pending when the runner closes it)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
