"""Run a function on several freshly spawned processes joined in one process group (tests, benchmarks).

``launch(fn, world_size, *args)`` starts ``world_size`` processes with the ``spawn`` start
method, joins them with ``torch.distributed.init_process_group`` through a ``file://`` store
in a fresh temporary directory (no TCP port to choose, so runs in parallel never collide),
calls ``fn(rank, world_size, *args)`` in each and returns one :class:`WorkerResult` per rank.
Nothing can hang: each worker's collectives time out after ``pg_timeout`` seconds, and the
parent kills every worker still running ``timeout`` seconds after the start.

``fn`` and ``args`` are pickled by reference, so ``fn`` must be a module-level function of an
importable module; the result must be picklable (return NumPy arrays or numbers, not tensors
that need a process group). ``env`` is set in the children before anything is imported there
(thread counts: ``OMP_NUM_THREADS``, ``NUMBA_NUM_THREADS``, ...).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
import queue as queue_module
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["WorkerResult", "WorkersFailed", "launch", "run_workers"]

# One thread per worker by default: the workers share the machine's cores.
SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                     "NUMBA_NUM_THREADS": "1"}


@dataclass
class WorkerResult:
    """What one rank did: its return value, or the exception it raised, or that it never reported."""

    rank: int
    ok: bool  #: ``fn`` returned normally
    value: Any = None  #: what ``fn`` returned
    error: str | None = None  #: ``"ExceptionType: message"``, or why there is no result
    traceback: str | None = None  #: the worker's formatted traceback
    exitcode: int | None = None  #: the process's exit code (None if it had to be killed)
    seconds: float | None = None  #: wall time of ``fn`` in the worker


class WorkersFailed(RuntimeError):
    """At least one rank raised, died or ran out of time; ``results`` holds every rank's outcome."""

    def __init__(self, results: list[WorkerResult]):
        self.results = results
        lines = []
        for r in results:
            if not r.ok:
                lines.append(f"rank {r.rank}: {r.error} (exit code {r.exitcode})")
                if r.traceback:
                    lines.append(r.traceback.rstrip())
        super().__init__("distributed workers failed:\n" + "\n".join(lines))


def _worker(rank: int, world_size: int, init_method: str, backend: str, pg_timeout: float, payload: bytes,
            results) -> None:
    start = time.perf_counter()
    try:
        import torch
        import torch.distributed as dist

        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=pg_timeout))
        try:
            fn, args = pickle.loads(payload)
            value = fn(rank, world_size, *args)
        finally:
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
        message = (rank, True, pickle.dumps(value), None, None, time.perf_counter() - start)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
        message = (rank, False, None, f"{type(exc).__name__}: {exc}", traceback.format_exc(),
                   time.perf_counter() - start)
    results.put(message)


@contextlib.contextmanager
def _environment(env: dict[str, str]):
    """Set ``env`` in this process while children are started (spawned children copy it), then restore it."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def launch(fn: Callable, world_size: int, *args, backend: str = "gloo", timeout: float = 120.0,
           pg_timeout: float = 60.0, env: dict[str, str] | None = None) -> list[WorkerResult]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes in one process group.

    Args:
        fn: a module-level function ``fn(rank, world_size, *args)``.
        world_size: number of processes, ``>= 1``.
        *args: picklable arguments passed to every rank.
        backend: ``"gloo"`` (CPU) or ``"nccl"`` (one GPU per rank).
        timeout: seconds after which the parent kills the workers still running.
        pg_timeout: the process group's collective timeout, seconds.
        env: environment for the children (default: one thread per library).

    Returns:
        ``[WorkerResult]`` in rank order; a worker that raised has ``ok=False`` and its
        traceback; one that died or was killed without reporting has ``ok=False`` and
        ``error`` saying so.

    Raises:
        ValueError: ``world_size < 1`` or non-positive timeouts.
    """
    import multiprocessing as mp

    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not (timeout > 0 and pg_timeout > 0):
        raise ValueError(f"timeout and pg_timeout must be > 0, got {timeout} and {pg_timeout}")
    payload = pickle.dumps((fn, args))
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    tmp = tempfile.mkdtemp(prefix="softgrad-dist-")
    init_method = "file://" + os.path.join(tmp, "store")
    procs = [ctx.Process(target=_worker, args=(rank, world_size, init_method, backend, pg_timeout, payload, results),
                         daemon=True) for rank in range(world_size)]
    outcomes: dict[int, WorkerResult] = {}
    killed: set[int] = set()
    deadline = time.monotonic() + timeout
    try:
        with _environment(SINGLE_THREAD_ENV if env is None else env):
            for p in procs:
                p.start()
        while len(outcomes) < world_size and time.monotonic() < deadline:
            try:
                rank, ok, value, error, tb, seconds = results.get(timeout=0.2)
            except queue_module.Empty:
                # a worker that died without reporting (os._exit, a signal, a C++ abort) will never report
                if all(p.exitcode is not None for p in procs):
                    with contextlib.suppress(queue_module.Empty):
                        while True:
                            rank, ok, value, error, tb, seconds = results.get(timeout=0.5)
                            outcomes[rank] = WorkerResult(rank, ok, pickle.loads(value) if ok else None, error, tb,
                                                          seconds=seconds)
                    break
                continue
            outcomes[rank] = WorkerResult(rank, ok, pickle.loads(value) if ok else None, error, tb, seconds=seconds)
        for p in procs:
            p.join(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
    finally:
        for rank, p in enumerate(procs):
            if p.is_alive():
                killed.add(rank)
                p.kill()
                p.join(timeout=5.0)
        results.close()
        shutil.rmtree(tmp, ignore_errors=True)
    out = []
    for rank, p in enumerate(procs):
        r = outcomes.get(rank)
        if r is None:
            why = (f"no result within {timeout:g} s; killed" if rank in killed
                   else f"the process exited with code {p.exitcode} without reporting a result")
            r = WorkerResult(rank, False, error=why)
        r.exitcode = p.exitcode
        out.append(r)
    return out


def run_workers(fn: Callable, world_size: int, *args, **kwargs) -> list:
    """:func:`launch`, then every rank's return value in rank order; raises :class:`WorkersFailed` otherwise."""
    results = launch(fn, world_size, *args, **kwargs)
    if not all(r.ok for r in results):
        raise WorkersFailed(results)
    return [r.value for r in results]
