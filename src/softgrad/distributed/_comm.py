"""The one place where softgrad.distributed calls ``torch.distributed``.

Every collective of the package goes through :func:`all_reduce`, :func:`all_gather_object` or
:func:`broadcast` here, for three reasons:

* **Clear failures.** A collective that fails -- a peer exited or crashed (gloo: "Connection
  reset by peer"), or did not arrive within the process group's ``timeout`` (gloo: "Timed out
  waiting ... for recv operation") -- raises :class:`CollectiveError` naming the operation,
  what it carried, this rank and the group size, with the backend's message chained.
* **Accounting.** Inside :func:`record_collectives` every call appends a
  :class:`CollectiveRecord` (operation, dtype, elements, bytes this rank contributes); the
  tests use it to prove that vocabulary-parallel communication is ``O(N)`` and the benchmark
  to report bytes per step.
* **Devices.** NCCL only moves CUDA tensors; :func:`comm_device` says where a buffer built
  from NumPy data (the data-parallel classifier) must live for the group's backend.
"""

from __future__ import annotations

import contextlib
import pickle
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

__all__ = ["CollectiveError", "CollectiveRecord", "record_collectives", "resolve_group"]


class CollectiveError(RuntimeError):
    """A collective of softgrad.distributed failed: a peer exited, crashed or timed out.

    Raised on the surviving ranks within the process group's timeout (set with
    ``torch.distributed.init_process_group(timeout=...)``; gloo reports a peer that exited
    at once). The backend's own exception is chained as ``__cause__``.
    """


@dataclass(frozen=True)
class CollectiveRecord:
    """One collective call as seen by this rank."""

    op: str  #: "all_reduce:sum", "all_reduce:max", "all_gather_object" or "broadcast"
    what: str  #: what the buffer holds, e.g. "row max"
    dtype: str  #: element dtype ("object" for pickled objects)
    numel: int  #: elements this rank contributes
    nbytes: int  #: bytes this rank contributes (for all_gather_object: its pickle, not the gathered result)


_RECORDERS: list[list[CollectiveRecord]] = []


@contextlib.contextmanager
def record_collectives() -> Iterator[list[CollectiveRecord]]:
    """Collect a :class:`CollectiveRecord` for every collective this process issues inside the block.

    Examples:
        >>> with record_collectives() as log:
        ...     pass
        >>> log
        []
    """
    log: list[CollectiveRecord] = []
    _RECORDERS.append(log)
    try:
        yield log
    finally:
        _RECORDERS.remove(log)


def _note(op: str, what: str, dtype: str, numel: int, nbytes: int) -> None:
    for log in _RECORDERS:
        log.append(CollectiveRecord(op, what, dtype, int(numel), int(nbytes)))


def resolve_group(group) -> tuple[object, int, int]:
    """``(group, rank in it, its size)``; ``None`` means the default (world) group.

    Raises:
        RuntimeError: ``torch.distributed`` is unavailable or not initialised.
        ValueError: this process is not a member of ``group``.
    """
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build")
    if not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: call torch.distributed.init_process_group(...) first "
            "(torchrun sets the environment for init_process_group('gloo' or 'nccl'))")
    if group is None:
        group = dist.group.WORLD
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("group: this process is not a member of the given process group")
    return group, rank, dist.get_world_size(group)


def comm_device(group) -> torch.device:
    """Where host data must be put to be communicated over ``group``: CUDA for NCCL, else CPU."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _fail(op: str, what: str, group, exc: BaseException) -> CollectiveError:
    try:
        where = f"rank {dist.get_rank(group)} of {dist.get_world_size(group)}"
    except RuntimeError:  # the group itself may be gone
        where = "this rank"
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return CollectiveError(
        f"softgrad.distributed: {op} of {what} failed on {where}: another rank exited, crashed, or did not "
        f"reach this collective within the process group's timeout (init_process_group(timeout=...)); "
        f"check the other ranks' output. Backend said: {first_line}")


_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def all_reduce(tensor: torch.Tensor, op: str, group, what: str) -> torch.Tensor:
    """In-place ``all_reduce`` (``op`` is ``"sum"``, ``"max"`` or ``"min"``) of a contiguous tensor; returns it."""
    _note(f"all_reduce:{op}", what, str(tensor.dtype).removeprefix("torch."), tensor.numel(),
          tensor.numel() * tensor.element_size())
    try:
        dist.all_reduce(tensor, op=_OPS[op], group=group)
    except RuntimeError as exc:
        raise _fail(f"all_reduce({op})", what, group, exc) from exc
    return tensor


def all_gather_object(obj, group, world_size: int, what: str) -> list:
    """Every rank's picklable ``obj``, in rank order (for small metadata only: it is pickled)."""
    out = [None] * world_size
    if _RECORDERS:
        size = len(pickle.dumps(obj))
        _note("all_gather_object", what, "object", size, size)
    try:
        dist.all_gather_object(out, obj, group=group)
    except RuntimeError as exc:
        raise _fail("all_gather_object", what, group, exc) from exc
    return out


def broadcast(tensor: torch.Tensor, src_rank: int, group, what: str) -> torch.Tensor:
    """In-place ``broadcast`` from group rank ``src_rank``; returns ``tensor``."""
    _note("broadcast", what, str(tensor.dtype).removeprefix("torch."), tensor.numel(),
          tensor.numel() * tensor.element_size())
    try:
        dist.broadcast(tensor, src=dist.get_global_rank(group, src_rank), group=group)
    except RuntimeError as exc:
        raise _fail("broadcast", what, group, exc) from exc
    return tensor
