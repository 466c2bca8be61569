"""Which row kernels ``softgrad.torch`` runs, and whether eager calls check values: thread-safe settings.

The settings live in a :class:`contextvars.ContextVar`: :func:`use_kernel` and
:func:`use_value_checks` change them inside a ``with`` block for the calling thread (or asyncio
task) only, and every other thread keeps its own. A call records the kernel it chose, so
its backward uses the same one whichever thread runs it. :func:`row_kernels` is the one place
that turns the setting into a kernel module; ``softgrad.distributed`` calls it too.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from dataclasses import dataclass, replace
from typing import Iterator

import torch

__all__ = ["get_kernel", "use_kernel", "value_checks_enabled", "use_value_checks", "row_kernels"]


@dataclass(frozen=True)
class _Settings:
    kernel: str = "auto"
    check_values: bool = True


_SETTINGS: contextvars.ContextVar[_Settings] = contextvars.ContextVar("softgrad_torch_settings",
                                                                       default=_Settings())
_TRITON_VARIANTS = ("auto", "one_pass", "two_pass")


def _check_kernel(kernel: str) -> str:
    """``kernel`` if it is ``"auto"``, ``"torch"`` or ``"triton[:variant[:block_size[:num_warps]]]"``."""
    if not isinstance(kernel, str):
        raise TypeError(f"kernel must be a str, got {type(kernel).__name__}")
    parts = kernel.split(":")
    ok = (parts[0] in ("auto", "torch") and len(parts) == 1) or (
        parts[0] == "triton" and len(parts) <= 4 and (len(parts) < 2 or parts[1] in _TRITON_VARIANTS)
        and all(p.isdigit() or p == "" for p in parts[2:]))
    if not ok:
        raise ValueError("kernel must be 'auto', 'torch' or 'triton[:variant[:block_size[:num_warps]]]' with "
                         f"variant in {_TRITON_VARIANTS}, got {kernel!r}")
    return kernel


def get_kernel() -> str:
    """The row-kernel setting of the calling thread (``"auto"`` unless :func:`use_kernel` says otherwise).

    Inside ``torch.compile`` the setting is read once, when the graph is traced, and the
    compiled graph keeps it.

    >>> get_kernel()
    'auto'
    """
    return _get_kernel_for_tracing() if torch.compiler.is_compiling() else _SETTINGS.get().kernel


def _assume_constant_result(fn):
    """``torch.compiler.assume_constant_result(fn)`` without importing ``torch._dynamo`` here.

    The decorator imports ``torch._dynamo`` (about a second, half of ``import softgrad.torch``)
    only to set a marker attribute on ``fn``; until Dynamo is loaded the same marker is set
    directly. ``tests/torch/test_settings.py`` checks that it is the one torch's decorator sets.
    """
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def _get_kernel_for_tracing() -> str:
    return _SETTINGS.get().kernel


@contextlib.contextmanager
def use_kernel(kernel: str) -> Iterator[None]:
    """Run ``softgrad.torch`` (and ``softgrad.distributed``) calls inside the block on ``kernel``.

    ``kernel`` is ``"auto"`` (Triton on CUDA when it imports, PyTorch ops otherwise),
    ``"torch"`` (PyTorch ops everywhere) or ``"triton[:variant[:block_size[:num_warps]]]"``
    (the Triton kernels; ``variant`` is ``auto``, ``one_pass`` or ``two_pass``, e.g.
    ``"triton:two_pass:4096:8"``; on CPU tensors Triton runs only under its interpreter,
    ``TRITON_INTERPRET=1``). The choice applies to the calling thread only.

    Raises:
        TypeError, ValueError: ``kernel`` is not one of these forms.

    >>> with use_kernel("torch"):
    ...     get_kernel()
    'torch'
    """
    token = _SETTINGS.set(replace(_SETTINGS.get(), kernel=_check_kernel(kernel)))
    try:
        yield
    finally:
        _SETTINGS.reset(token)


def value_checks_enabled() -> bool:
    """Whether eager calls in this thread run the data-dependent checks (one host synchronisation each)."""
    return _SETTINGS.get().check_values


@contextlib.contextmanager
def use_value_checks(enabled: bool) -> Iterator[None]:
    """Turn the eager data-dependent checks on or off inside the block (calling thread only).

    With the checks off, no host synchronisation happens, and invalid inputs (a target class
    outside ``[0, C)``, NaN/``+inf`` logits, rows entirely ``-inf``) give NaN losses instead of a
    ``ValueError`` -- what happens inside ``torch.compile`` anyway.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    token = _SETTINGS.set(replace(_SETTINGS.get(), check_values=enabled))
    try:
        yield
    finally:
        _SETTINGS.reset(token)


def _triton_module():
    try:
        from softgrad.torch import _triton_cross_entropy
    except ImportError:
        return None
    return _triton_cross_entropy


def row_kernels(device: torch.device, kernel: str | None = None):
    """``(kernel module, Triton KernelConfig or None)`` for tensors on ``device``.

    ``kernel`` defaults to the calling thread's setting (:func:`get_kernel`). The module has
    the functions ``forward``, ``row_stats``, ``grad_pass`` and ``scale_rows_`` of
    :mod:`softgrad.torch._torch_cross_entropy`.

    Raises:
        RuntimeError: ``"triton"`` was asked for and triton does not import.
    """
    from softgrad.torch import _torch_cross_entropy

    name, *rest = (get_kernel() if kernel is None else _check_kernel(kernel)).split(":")
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return _torch_cross_entropy, None
    triton_kernels = _triton_module()
    if triton_kernels is None:
        if name == "auto":
            return _torch_cross_entropy, None
        raise RuntimeError("kernel 'triton' was requested but triton does not import; install triton, or use the "
                           "'torch' kernel")
    fields = [rest[0] if rest else "auto"] + [int(x) if x else None for x in rest[1:]]
    return triton_kernels, triton_kernels.KernelConfig(*fields)
