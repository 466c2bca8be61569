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
import numbers

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


def autocast_head(hidden: Tensor, weight: Tensor, bias: Tensor | None):
    """``(hidden, weight, bias)`` in the autocast dtype when autocast is on for ``hidden``'s device, else as given.

    A linear head's matmul then runs in the autocast dtype, as ``nn.Linear``'s would; the casts
    are ordinary autograd ops, so float32 master weights get float32 gradients.
    """
    if not autocast_enabled(hidden.device):
        return hidden, weight, bias
    low = torch.get_autocast_dtype(hidden.device.type)
    return hidden.to(low), weight.to(low), None if bias is None else bias.to(low)


def check_linear_head(hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None) -> None:
    """Types, shapes, dtypes and devices of a linear head ``hidden (N, D) or (B, T, D)``, ``weight (V, D)``,
    ``target hidden.shape[:-1]`` and ``bias (V,)`` or None (``linear_cross_entropy``, ``linear_logprobs``)."""
    check_tensor(hidden, "hidden")
    check_tensor(weight, "weight")
    check_tensor(target, "target")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    check_float(hidden, "hidden")
    if hidden.dim() < 2 or hidden.shape[-1] == 0:
        raise ValueError(f"hidden must have shape (N, D) or (B, T, D) with D >= 1, got {tuple(hidden.shape)}")
    if hidden.numel() == 0:
        raise ValueError(f"hidden has no rows (shape {tuple(hidden.shape)}); need at least one")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape (V, {hidden.shape[-1]}) with V >= 1, got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if bias is not None and (tuple(bias.shape) != (weight.shape[0],) or bias.dtype != hidden.dtype):
        raise ValueError(f"bias must have shape ({weight.shape[0]},) and dtype {hidden.dtype}, "
                         f"got {tuple(bias.shape)} {bias.dtype}")
    for name, value in (("weight", weight), ("target", target), ("bias", bias)):
        check_same_device(value, name, hidden, "hidden")
    check_index_dtype(target)
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"target shape {tuple(target.shape)} must equal hidden.shape[:-1] = "
                         f"{tuple(hidden.shape[:-1])}")


def check_chunk_size(chunk_size) -> None:
    """``chunk_size`` is None or a positive int."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
