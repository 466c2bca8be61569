"""A rank that times out or exits makes the others fail with a clear error within a bounded time.

One spawn of two gloo processes plays both failures in turn:

1. rank 1 stays alive but does not join a collective on a subgroup created with a 2 s
   timeout: rank 0's ``vocab_parallel_cross_entropy`` must raise ``CollectiveError`` after
   about 2 s (not hang);
2. both ranks meet again on the world group, then rank 1 exits (``os._exit``) without a word:
   rank 0's next call must raise ``CollectiveError`` at once (gloo sees the closed connection).

The launcher's own safety nets are tested too: a rank that dies is reported with its exit
code, a rank that raises with its traceback, one that never finishes is killed.
"""

from __future__ import annotations

import datetime
import os
import time

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from softgrad.distributed._launch import WorkersFailed, launch, run_workers  # noqa: E402

SUBGROUP_TIMEOUT_S = 2.0
# what "within a bounded time" means here: the group's timeout plus slack for a loaded 2-core machine
BOUND_S = SUBGROUP_TIMEOUT_S + 6.0


def _call(group=None):
    from softgrad.distributed import vocab_parallel_cross_entropy

    rank = torch.distributed.get_rank()
    z = torch.randn(4, 3 + rank, dtype=torch.float64)
    return vocab_parallel_cross_entropy(z, torch.tensor([0, 1, 2, 3]), group=group)


def _timeout_then_exit(rank, world):
    import torch.distributed as dist

    from softgrad.distributed import CollectiveError

    sub = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=SUBGROUP_TIMEOUT_S))
    _call()  # both ranks healthy: the world group works
    out = {}
    if rank == 1:
        time.sleep(SUBGROUP_TIMEOUT_S + 2.0)  # alive, but never joins rank 0's collective on `sub`
    else:
        start = time.monotonic()
        try:
            _call(group=sub)
        except CollectiveError as exc:
            out["timeout"] = (time.monotonic() - start, str(exc))
    dist.barrier()  # the world group is unaffected by the subgroup's timeout
    if rank == 1:
        os._exit(3)  # dies without reporting, and without closing anything cleanly
    start = time.monotonic()
    try:
        for _ in range(50):  # the first call may still find the peer's socket open for an instant
            _call()
            time.sleep(0.1)
    except CollectiveError as exc:
        out["exit"] = (time.monotonic() - start, str(exc))
    return out


def test_survivor_raises_collective_error_on_timeout_and_on_exit():
    results = launch(_timeout_then_exit, 2, timeout=90, pg_timeout=30)
    survivor, dead = results
    assert survivor.ok, survivor.traceback
    assert not dead.ok and dead.exitcode == 3
    assert "exited with code 3 without reporting" in dead.error
    seconds, message = survivor.value["timeout"]
    assert SUBGROUP_TIMEOUT_S * 0.9 <= seconds <= BOUND_S, seconds
    assert "all_reduce(max) of logits_shard layout and checks failed on rank 0 of 2" in message
    assert "timeout" in message and "Backend said" in message
    seconds, message = survivor.value["exit"]
    assert seconds <= BOUND_S, seconds
    assert "failed on rank 0 of 2" in message and "exited, crashed" in message


def _raise_or_hang(rank, world):
    if rank == 0:
        raise ArithmeticError("deliberate failure on rank 0")
    time.sleep(3600)  # never finishes (and is in no collective): only the launcher's timeout ends it


def test_launcher_reports_exceptions_and_kills_what_does_not_finish():
    # the timeout counts from the spawn, so it also covers rank 0's start-up (importing torch
    # and joining the group), which takes well over 8 s on a loaded 2-core machine
    start = time.monotonic()
    with pytest.raises(WorkersFailed, match="rank 0: ArithmeticError: deliberate failure on rank 0") as info:
        run_workers(_raise_or_hang, 2, timeout=20)
    assert time.monotonic() - start < 45
    raised, stuck = info.value.results
    assert not raised.ok and "Traceback" in raised.traceback and raised.exitcode == 0
    assert not stuck.ok and stuck.error == "no result within 20 s; killed"


def test_launcher_rejects_bad_arguments():
    with pytest.raises(ValueError, match="world_size"):
        launch(_raise_or_hang, 0)
    with pytest.raises(ValueError, match="timeout"):
        launch(_raise_or_hang, 1, timeout=0)
