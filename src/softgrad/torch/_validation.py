"""Checks shared by every ``softgrad.torch`` and ``softgrad.distributed`` function.

The options of a cross-entropy are checked by
:meth:`softgrad._cross_entropy_rule.CrossEntropyOptions.checked` (the same checks and messages
as the NumPy API); this module checks tensors: types, dtypes, shapes, devices, flags. Each
check raises ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, bad value)
naming the argument. Whether the data-dependent checks may run at all is
:func:`values_checkable`.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from softgrad.torch import _settings

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(value, name: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_float(value: Tensor, name: str) -> None:
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {value.dtype}")


def check_index_dtype(target: Tensor, name: str = "target") -> None:
    """Integer class indices: any integer dtype that fits int64 (uint64 does not: it would wrap)."""
    if target.dtype == torch.bool or target.is_complex() or target.is_floating_point():
        raise TypeError(f"{name} must hold integer class indices, got {target.dtype}")
    if target.dtype == getattr(torch, "uint64", None):
        raise TypeError(f"{name} is uint64, whose values above 2**63 - 1 would wrap when read as int64 class "
                        "indices; convert it to int64 first")


def check_same_device(value: Tensor | None, name: str, reference: Tensor, reference_name: str) -> None:
    if value is not None and value.device != reference.device:
        raise ValueError(f"{name} is on {value.device} but {reference_name} is on {reference.device}")


def check_weight(weight, num_classes: int | None, reference: Tensor, reference_name: str) -> None:
    """Class weights: a floating ``(C,)`` tensor (any 1-D length when ``num_classes`` is None) without grad."""
    if weight is None:
        return
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor or None, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
    if num_classes is not None and tuple(weight.shape) != (num_classes,):
        raise ValueError(f"weight must have shape ({num_classes},) (one entry per class), got {tuple(weight.shape)}")
    if num_classes is None and weight.dim() != 1:
        raise ValueError(f"weight must be 1-D: the full (V,) class weights or this rank's (V_shard,) slice, got "
                         f"shape {tuple(weight.shape)}")
    check_same_device(weight, "weight", reference, reference_name)
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("weight requires grad, but the cross-entropy has no gradient with respect to the class "
                         "weights (neither has PyTorch's); pass weight.detach()")


def check_flags(**flags) -> None:
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def functorch_active() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vmap``, ``jvp``, ...) is running (never while compiling)."""
    return not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None


def has_tangent(*tensors: Tensor | None) -> bool:
    """Whether any of ``tensors`` is a dual tensor of forward-mode AD (``torch.autograd.forward_ad``)."""
    import torch.autograd.forward_ad as fwad

    if torch.compiler.is_compiling():
        return False
    if fwad._current_level < 0:
        return False
    return any(t is not None and fwad.unpack_dual(t).tangent is not None for t in tensors)


def _is_fake(t: Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type == "meta" or is_fake(t)


def values_checkable(t: Tensor) -> bool:
    """Whether the data-dependent checks (one host synchronisation) may run for inputs like ``t``.

    Not inside ``torch.compile`` or CUDA-graph capture, not on meta or fake tensors, not under a
    ``torch.func`` transform, and not when :func:`softgrad.torch.use_value_checks` turned them off.
    """
    if torch.compiler.is_compiling() or not _settings.value_checks_enabled():
        return False
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return not (_is_fake(t) or functorch_active())


def autocast_enabled(device: torch.device) -> bool:
    """``torch.is_autocast_enabled`` for ``device``'s type, False for types autocast does not know (meta)."""
    try:
        return torch.is_autocast_enabled(device.type)
    except RuntimeError:  # "unknown device type for autocast"
        return False


def autocast_off(device: torch.device):
    """A context with autocast disabled on ``device`` (a no-op for types autocast does not know, such as meta)."""
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()
