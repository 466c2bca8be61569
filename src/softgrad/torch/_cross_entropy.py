"""``softgrad.torch.cross_entropy``: PyTorch's cross-entropy, plus z-loss, softcap and lse, in one fused pass.

Layers, bottom up:

* row kernels with one signature and two implementations: PyTorch ops
  (:mod:`softgrad.torch._torch_cross_entropy`, the CPU path and the readable twin) and Triton
  (:mod:`softgrad.torch._triton_cross_entropy`, CUDA). Their ``forward`` computes each row's
  loss, its logsumexp and -- in the same pass -- the gradient of the *reduced* loss with
  respect to the logits, so the backward only multiplies by ``grad_output``.
* custom operators, so that ``torch.compile`` sees one opaque node per call
  (``fullgraph=True`` works) and never traces into the kernels:
  ``softgrad::cross_entropy`` (functional, returns a fresh gradient buffer; autograd via
  ``register_autograd``), ``softgrad::cross_entropy_inplace_`` (declares that it mutates the
  logits, which receive the gradient; autograd via :class:`_InplaceCrossEntropy`) and
  ``softgrad::cross_entropy_rows_`` (per-row results, gradient in place, no autograd: for
  callers that reduce and differentiate themselves, like ``linear_cross_entropy``'s chunks).
* :func:`cross_entropy` validates, flattens ``(N, C, d1, ...)`` to rows, calls an operator and
  shapes the results; :class:`CrossEntropyLoss` is the ``nn.Module`` form.

Backward cost: the stored gradient is scaled by ``grad_output`` in place. The Triton scale
kernel skips rows whose factor is exactly 1 (decided on the device, no host sync), so a
plain ``loss.backward()`` costs one launch and no pass over the gradient; another factor
(``loss * 3``, gradient accumulation's ``loss / k``, ``reduction="none"``) costs one read and
one write of the gradient. Inside a traced graph the scale is an ordinary out-of-place
multiply that the compiler can fuse.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from typing import Iterator, NamedTuple, Optional

import torch
from torch import Tensor, nn

from softgrad.torch import _torch_cross_entropy

__all__ = ["cross_entropy", "CrossEntropyLoss", "CrossEntropyOutput"]

_REDUCTIONS = ("mean", "sum", "none")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Private switches, changed only through _options() (tests and benchmarks):
#   kernel: which row kernels run: "auto" (Triton on CUDA when it imports, PyTorch ops
#       otherwise), "torch", or "triton[:variant[:block_size[:num_warps]]]";
#   scale_in_place: whether an eager backward scales the stored gradient in place (one
#       backward per call) or out of place (any number of backwards, one more (N, C) buffer);
#   check_values: whether eager calls run the data-dependent checks (one host sync).
_OPTIONS = {"kernel": "auto", "scale_in_place": True, "check_values": True}


class CrossEntropyOutput(NamedTuple):
    """What :func:`cross_entropy` returns with ``return_lse=True``.

    ``loss`` is differentiable; ``lse`` and ``z_loss`` are not (they are for reuse and logging).
    """

    loss: Tensor  #: the loss, z-loss included, as without ``return_lse``
    lse: Tensor  #: per-row logsumexp of the (softcapped) logits, batch shape, float32 (float64 for float64)
    z_loss: Tensor  #: the z-loss part of ``loss``, reduced the same way (zeros when ``z_loss=0``)


# ----------------------------------------------------------------------------- kernel choice
def _triton_module():
    try:
        from softgrad.torch import _triton_cross_entropy
    except ImportError:
        return None
    return _triton_cross_entropy


def _check_kernel_spec(spec: str) -> str:
    parts = spec.split(":")
    if parts[0] not in ("auto", "torch", "triton") or (parts[0] != "triton" and len(parts) > 1) or len(parts) > 4:
        raise ValueError(f"kernel must be 'auto', 'torch' or 'triton[:variant[:block_size[:num_warps]]]', got {spec!r}")
    return spec


@contextlib.contextmanager
def _options(*, kernel: str | None = None, scale_in_place: bool | None = None,
             check_values: bool | None = None) -> Iterator[None]:
    """Override the private switches (see ``_OPTIONS``) for calls made inside the ``with`` block.

    ``kernel`` is ``"auto"``, ``"torch"`` or ``"triton[:variant[:block_size[:num_warps]]]"``,
    e.g. ``"triton:two_pass:4096:8"`` (on CPU tensors Triton runs only under its interpreter).
    ``scale_in_place=False`` lets several backwards run through one call
    (``torch.autograd.gradcheck`` back-propagates twice). ``check_values=False`` skips the
    eager data checks, to measure what their host synchronisation costs.
    """
    new = {"kernel": None if kernel is None else _check_kernel_spec(kernel), "scale_in_place": scale_in_place,
           "check_values": check_values}
    previous = dict(_OPTIONS)
    _OPTIONS.update({k: v for k, v in new.items() if v is not None})
    try:
        yield
    finally:
        _OPTIONS.update(previous)


def _backend(spec: str, device: torch.device):
    """``(kernel module, KernelConfig or None)`` for ``spec`` on ``device``."""
    name, *rest = spec.split(":")
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return _torch_cross_entropy, None
    triton_kernels = _triton_module()
    if triton_kernels is None:
        if name == "auto":
            return _torch_cross_entropy, None
        raise RuntimeError("kernel 'triton' was requested but triton does not import; install softgrad[torch] "
                           "with triton, or use the 'torch' kernel")
    fields = [rest[0] if rest else "auto"] + [int(x) if x else None for x in rest[1:]]
    return triton_kernels, triton_kernels.KernelConfig(*fields)


# ----------------------------------------------------------------------------- shared implementation
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _run(logits: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, reduction: str,
         label_smoothing: float, z_loss: float, softcap: float | None, grad_out: Tensor | None,
         kernel: str) -> tuple[Tensor, Tensor, Tensor]:
    """Reduction factors, the row kernel, the reduction. Returns ``(loss, z_part, lse)`` in the compute dtype.

    ``loss`` is ``mean``: ``sum(ce) / sum of the weights of the non-ignored targets +
    zl * sum(lse^2 over non-ignored rows) / their count`` (PyTorch's denominators; NaN when
    zero), ``sum``: the plain sums, ``none``: per row. The kernel writes the gradient of
    exactly this ``loss`` (for ``none``: of its sum) into ``grad_out``.
    """
    with torch.autocast(logits.device.type, enabled=False):  # all arithmetic here is float32/float64 already
        return _run_rows(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, grad_out,
                         kernel)


def _run_rows(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, grad_out, kernel):
    n_rows, n_cols = logits.shape
    cdt = _compute_dtype(logits.dtype)
    prob_target = target.is_floating_point()
    w = None if weight is None else weight.to(cdt).contiguous()
    if prob_target:
        # PyTorch's mean over probability targets divides by the number of rows
        valid = None
        count = torch.full((), n_rows, dtype=cdt, device=logits.device)
        denom = count
    else:
        valid = target != ignore_index
        count = valid.sum().to(cdt)
        if w is None:
            denom = count
        else:
            hit = valid & (target >= 0) & (target < n_cols)
            denom = (w[torch.where(hit, target, torch.zeros_like(target))] * hit).sum()
    if reduction == "mean":
        zero = torch.zeros((), dtype=cdt, device=logits.device)
        scales = torch.stack([torch.where(denom != 0, 1.0 / denom, zero), torch.where(count != 0, 1.0 / count, zero)])
    else:
        scales = torch.ones(2, dtype=cdt, device=logits.device)
    module, config = _backend(kernel, logits.device)
    ce, lse = module.forward(logits, target, w, scales, ignore_index=ignore_index, label_smoothing=label_smoothing,
                             z_loss=z_loss, softcap=softcap, prob_target=prob_target, grad_out=grad_out,
                             config=config)
    if z_loss:
        z_rows = z_loss * lse * lse
        if valid is not None:
            z_rows = torch.where(valid, z_rows, torch.zeros_like(z_rows))
    else:
        z_rows = torch.zeros_like(lse)
    if reduction == "none":
        return ce + z_rows, z_rows, lse
    if reduction == "sum":
        z_part = z_rows.sum()
        return ce.sum() + z_part, z_part, lse
    z_part = z_rows.sum() / count if z_loss else z_rows.sum()
    return ce.sum() / denom + z_part, z_part, lse


def _fake_outputs(logits: Tensor, reduction: str) -> tuple[Tensor, Tensor, Tensor]:
    cdt = _compute_dtype(logits.dtype)
    shape = (logits.shape[0],) if reduction == "none" else ()
    return (logits.new_empty(shape, dtype=cdt), logits.new_empty(shape, dtype=cdt),
            logits.new_empty((logits.shape[0],), dtype=cdt))


def _scales_in_place(ctx, grad: Tensor | None = None) -> bool:
    """Whether this backward scales the stored gradient in place; raises if it already did once."""
    if not ctx.scale_in_place or torch.compiler.is_compiling() or (grad is not None and type(grad) is not torch.Tensor):
        return False
    if ctx.grad_consumed:
        raise RuntimeError("cross_entropy computes the gradient in the forward and hands it to the first backward; "
                           "a second backward through the same call (retain_graph=True) is not supported. Call "
                           "cross_entropy again, or keep the first gradient.")
    return True


def _scale_stored_grad(ctx, grad: Tensor, grad_loss: Tensor, kernel: str) -> Tensor:
    """``grad * grad_loss`` (a scalar, or one factor per row for ``reduction="none"``).

    Eagerly, on plain tensors, the stored buffer is scaled in place and handed on (no
    second ``(N, C)`` buffer); it can be handed on only once. While a graph is being traced
    (``torch.compile``, ``opcheck``) the product is out of place, for the compiler to fuse.
    """
    if not _scales_in_place(ctx, grad):
        factor = grad_loss if grad_loss.dim() == 0 else grad_loss[:, None]
        return (grad * factor).to(grad.dtype)
    ctx.grad_consumed = True
    module, _ = _backend(kernel, grad.device)
    module.scale_rows_(grad, grad_loss.detach())
    return grad


def _target_grad(logits: Tensor, target: Tensor, weight: Tensor | None, lse: Tensor, grad_loss: Tensor,
                 reduction: str, label_smoothing: float, softcap: float | None) -> Tensor:
    """Gradient with respect to probability targets: ``dloss/dt_c = -(1 - eps) w_c log softmax(s)_c``, scaled."""
    cdt = lse.dtype
    s = logits.to(cdt)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    g = (s - lse[:, None]) * (-(1.0 - label_smoothing))
    if weight is not None:
        g = g * weight.to(cdt)
    factor = grad_loss.to(cdt)
    if reduction == "mean":
        factor = factor / logits.shape[0]
    g = g * (factor if factor.dim() == 0 else factor[:, None])
    return g.to(target.dtype)


# ----------------------------------------------------------------------------- functional operator
@torch.library.custom_op("softgrad::cross_entropy", mutates_args=())
def _cross_entropy_op(logits: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int, reduction: str,
                      label_smoothing: float, z_loss: float, softcap: Optional[float], with_grad: bool,
                      kernel: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(loss, z_part, lse, grad)`` for validated ``(N, C)`` rows; ``grad`` is ``(0,)`` unless ``with_grad``."""
    grad = logits.new_empty(logits.shape) if with_grad else logits.new_empty(0)
    loss, z_part, lse = _run(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
                             grad if with_grad else None, kernel)
    return loss, z_part, lse, grad


@_cross_entropy_op.register_fake
def _(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, with_grad, kernel):
    grad = logits.new_empty(logits.shape) if with_grad else logits.new_empty(0)
    return (*_fake_outputs(logits, reduction), grad)


def _setup_context(ctx, inputs, output):
    logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, with_grad, kernel = inputs
    loss, z_part, lse, grad = output
    ctx.mark_non_differentiable(z_part, lse, grad)
    ctx.set_materialize_grads(False)
    ctx.with_grad, ctx.kernel, ctx.reduction = with_grad, kernel, reduction
    ctx.label_smoothing, ctx.softcap = label_smoothing, softcap
    ctx.grad_consumed = False
    ctx.scale_in_place = _OPTIONS["scale_in_place"]
    ctx.target_grad = target.is_floating_point() and target.requires_grad
    if ctx.target_grad:
        ctx.save_for_backward(grad, logits, target, weight, lse)
    else:
        ctx.save_for_backward(grad)


def _backward(ctx, grad_loss, _grad_z, _grad_lse, _grad_grad):
    if grad_loss is None:
        return (None,) * 10
    if ctx.needs_input_grad[0]:
        _scales_in_place(ctx)  # a second backward raises here, before autograd's saved-tensor check does
    saved = ctx.saved_tensors
    grad_logits = grad_target = None
    if ctx.target_grad and ctx.needs_input_grad[1]:
        _, logits, target, weight, lse = saved
        grad_target = _target_grad(logits, target, weight, lse, grad_loss, ctx.reduction, ctx.label_smoothing,
                                   ctx.softcap)
    if ctx.needs_input_grad[0]:
        if not ctx.with_grad:
            raise RuntimeError("softgrad::cross_entropy was called with with_grad=False on logits that require grad")
        grad_logits = _scale_stored_grad(ctx, saved[0], grad_loss, ctx.kernel)
    return (grad_logits, grad_target) + (None,) * 8


_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- in-place operator
@torch.library.custom_op("softgrad::cross_entropy_inplace_", mutates_args=("logits",))
def _cross_entropy_inplace_op(logits: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                              reduction: str, label_smoothing: float, z_loss: float, softcap: Optional[float],
                              kernel: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, z_part, lse)``; the gradient (for ``grad_output = 1``) overwrites ``logits``."""
    return _run(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, logits, kernel)


@_cross_entropy_inplace_op.register_fake
def _(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, kernel):
    return _fake_outputs(logits, reduction)


class _InplaceCrossEntropy(torch.autograd.Function):
    """Autograd for ``softgrad::cross_entropy_inplace_``: the gradient lives in the logits' own buffer."""

    @staticmethod
    def forward(ctx, logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, kernel):
        loss, z_part, lse = torch.ops.softgrad.cross_entropy_inplace_(
            logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, kernel)
        ctx.mark_non_differentiable(z_part, lse)
        ctx.set_materialize_grads(False)
        ctx.kernel = kernel
        ctx.grad_consumed = False
        ctx.scale_in_place = _OPTIONS["scale_in_place"]
        # saved after the operator bumped the version counter: if anything else writes to
        # the logits before the backward, autograd's version check raises. Detached (sharing
        # the version counter), so the gradient handed on is a plain tensor, not part of the graph.
        ctx.save_for_backward(logits.detach())
        return loss, z_part, lse

    @staticmethod
    def backward(ctx, grad_loss, _grad_z, _grad_lse):
        if grad_loss is None:
            return (None,) * 9
        _scales_in_place(ctx)
        (grad,) = ctx.saved_tensors
        return (_scale_stored_grad(ctx, grad, grad_loss, ctx.kernel),) + (None,) * 8


# ----------------------------------------------------------------------------- rows operator (chunked callers)
@torch.library.custom_op("softgrad::cross_entropy_rows_", mutates_args=("logits",))
def _cross_entropy_rows_op(logits: Tensor, target: Tensor, row_scale: Optional[Tensor], ignore_index: int,
                           label_smoothing: float, z_loss: float, softcap: Optional[float], with_grad: bool,
                           kernel: str) -> tuple[Tensor, Tensor]:
    """Per-row ``(ce, lse)`` for class-index targets without class weights, in the compute dtype.

    For callers that reduce themselves (``linear_cross_entropy``'s chunks). ``ce`` excludes the
    z-loss; ``ignore_index`` rows get 0. With ``with_grad`` the gradient of
    ``sum_i row_scale_i (ce_i + z_loss lse_i^2)`` (over rows that are not ignored; ``row_scale``
    ``(N,)``, ones when None) overwrites ``logits`` in their own dtype; without it nothing is written.
    """
    cdt = _compute_dtype(logits.dtype)
    module, config = _backend(kernel, logits.device)
    with torch.autocast(logits.device.type, enabled=False):
        return module.forward(logits, target, None, torch.ones(2, dtype=cdt, device=logits.device),
                              ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
                              softcap=softcap, prob_target=False, grad_out=logits if with_grad else None,
                              row_scale=row_scale, config=config)


@_cross_entropy_rows_op.register_fake
def _(logits, target, row_scale, ignore_index, label_smoothing, z_loss, softcap, with_grad, kernel):
    cdt = _compute_dtype(logits.dtype)
    return logits.new_empty((logits.shape[0],), dtype=cdt), logits.new_empty((logits.shape[0],), dtype=cdt)


# ----------------------------------------------------------------------------- validation
def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _validate(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, return_lse,
              inplace_backward) -> bool:
    """Check types, shapes and options (no data-dependent checks); return whether targets are probabilities."""
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    if logits.dim() == 0:
        raise ValueError("logits must have shape (C,), (N, C) or (N, C, d1, ...), got a 0-d tensor")
    if logits.numel() == 0:
        raise ValueError(f"logits is empty (shape {tuple(logits.shape)}); need at least one row and one class")
    num_classes = logits.shape[0] if logits.dim() == 1 else logits.shape[1]
    batch_shape = () if logits.dim() == 1 else (logits.shape[0],) + tuple(logits.shape[2:])
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {logits.device}")
    prob_target = target.is_floating_point()
    if prob_target:
        if target.shape != logits.shape:
            raise ValueError(f"target holds class probabilities (dtype {target.dtype}) and must have the logits' "
                             f"shape {tuple(logits.shape)}, got {tuple(target.shape)}")
    else:
        if target.dtype == torch.bool or target.is_complex():
            raise TypeError(f"target must hold integer class indices or float probabilities, got {target.dtype}")
        if tuple(target.shape) != batch_shape:
            raise ValueError(f"target must have shape {batch_shape} (the logits' shape without the class dimension), "
                             f"got {tuple(target.shape)}")
    if weight is not None:
        if not isinstance(weight, Tensor):
            raise TypeError(f"weight must be a torch.Tensor or None, got {type(weight).__name__}")
        if not weight.is_floating_point():
            raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
        if tuple(weight.shape) != (num_classes,):
            raise ValueError(f"weight must have shape ({num_classes},) (one entry per class), got {tuple(weight.shape)}")
        if weight.device != logits.device:
            raise ValueError(f"weight is on {weight.device} but logits are on {logits.device}")
        if weight.requires_grad and torch.is_grad_enabled():
            raise ValueError("weight requires grad, but cross_entropy has no gradient with respect to the class "
                             "weights (neither has PyTorch's); pass weight.detach()")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if prob_target and ignore_index != -100:
        raise ValueError("ignore_index is not supported with probability targets (as in PyTorch); "
                         f"leave it at -100, got {ignore_index}")
    if not isinstance(reduction, str) or reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not _is_real(label_smoothing):
        raise TypeError(f"label_smoothing must be a float in [0, 1], got {type(label_smoothing).__name__}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if not _is_real(z_loss):
        raise TypeError(f"z_loss must be a float >= 0, got {type(z_loss).__name__}")
    if not (z_loss >= 0.0 and math.isfinite(z_loss)):
        raise ValueError(f"z_loss must be a finite float >= 0, got {z_loss}")
    if softcap is not None:
        if not _is_real(softcap):
            raise TypeError(f"softcap must be None or a float > 0, got {type(softcap).__name__}")
        if not (softcap > 0.0 and math.isfinite(softcap)):
            raise ValueError(f"softcap must be None or a finite float > 0, got {softcap}")
    for name, value in (("return_lse", return_lse), ("inplace_backward", inplace_backward)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return prob_target


def _check_values(logits_rows: Tensor, target_rows: Tensor, weight: Tensor | None, lse: Tensor, ignore_index: int,
                  prob_target: bool) -> None:
    """Data-dependent checks, all read back with one host synchronisation (eager mode only)."""
    n_cols = logits_rows.shape[1]
    if prob_target:
        bad_target = (target_rows < 0).any() | ~torch.isfinite(target_rows).all()
    else:
        bad_target = (((target_rows < 0) | (target_rows >= n_cols)) & (target_rows != ignore_index)).any()
    bad_weight = ~torch.isfinite(weight).all() if weight is not None else torch.zeros((), dtype=torch.bool,
                                                                                        device=lse.device)
    bad_rows = ~torch.isfinite(lse)
    flags = torch.stack([bad_target, bad_weight, bad_rows.any()]).tolist()
    if flags[0]:
        if prob_target:
            raise ValueError("target (class probabilities) contains negative, NaN or infinite entries")
        bad = ((target_rows < 0) | (target_rows >= n_cols)) & (target_rows != ignore_index)
        value = int(target_rows[bad][0])
        raise ValueError(f"target contains class index {value} outside [0, {n_cols}) or "
                         f"ignore_index={ignore_index}")
    if flags[1]:
        raise ValueError("weight contains NaN or infinite entries")
    if flags[2]:
        first = int(bad_rows.nonzero()[0, 0])
        raise ValueError(f"logits contain NaN or +inf, or a row that is entirely -inf ({int(bad_rows.sum())} "
                         f"row(s), first at flattened row {first}); the softmax of such a row is undefined")


# ----------------------------------------------------------------------------- public API
def cross_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_lse: bool = False,
    inplace_backward: bool = False,
) -> Tensor | CrossEntropyOutput:
    r"""Cross-entropy of ``softmax(logits)`` and ``target``, as ``torch.nn.functional.cross_entropy``, fused.

    With ``z_loss=0`` and ``softcap=None`` the value and the gradient are PyTorch's, for every
    option. Per row, with :math:`s = c \tanh(z / c)` (only with ``softcap=c``; else
    :math:`s = z`), :math:`\operatorname{lse} = \log \sum_k e^{s_k}`, log-probabilities
    :math:`p = s - \operatorname{lse}`, smoothing :math:`\varepsilon`, class weights :math:`w`
    (ones when ``None``) and ``C`` classes:

    .. math::

        \text{index target } y:\quad
        \ell = (1-\varepsilon)\, w_y (-p_y) + \frac{\varepsilon}{C} \sum_k w_k (-p_k)
               + \zeta \operatorname{lse}^2

        \text{probability target } t:\quad
        \ell = -\sum_k w_k \big((1-\varepsilon) t_k + \varepsilon / C\big) p_k + \zeta \operatorname{lse}^2

    where :math:`\zeta` is ``z_loss`` (PaLM's auxiliary loss). Rows whose target equals
    ``ignore_index`` contribute nothing. ``reduction="mean"`` divides the cross-entropy by
    :math:`\sum_i w_{y_i}` over non-ignored rows (by the number of rows for probability
    targets), PyTorch's convention, and the z-loss by the number of non-ignored rows; a mean
    over zero total weight is NaN (as in PyTorch) with a zero gradient. A term whose
    coefficient is exactly 0 counts 0 even where a logit is ``-inf`` (PyTorch gives NaN there).

    The gradient is computed in the forward pass, in the same pass over the logits, in
    closed form (:math:`\partial \ell / \partial s = a \cdot (\ldots) - \text{target terms}`,
    times :math:`1 - \tanh^2(z/c)` under a softcap); the backward multiplies it by
    ``grad_output``. On CUDA the work is one Triton kernel launch (float32 arithmetic for
    float16/bfloat16/float32 logits); on CPU it is PyTorch ops. ``torch.compile`` (with
    ``fullgraph=True``) sees a custom operator and does not break the graph.

    Args:
        logits: ``(N, C)``, ``(C,)`` or ``(N, C, d1, ...)`` (classes on dimension 1, as in
            PyTorch); float16, bfloat16, float32 or float64; ``-inf`` entries allowed.
        target: class indices (any integer dtype) of shape ``(N,)``, ``()`` or
            ``(N, d1, ...)``, each in ``[0, C)`` or equal to ``ignore_index``; or class
            probabilities (floating) of the logits' shape, non-negative (rows need not sum
            to 1). Probability targets that require grad receive a gradient.
        weight: optional ``(C,)`` floating per-class weights (no gradient).
        ignore_index: the index target of rows that contribute neither loss nor gradient
            (must stay -100 with probability targets, as in PyTorch).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-row losses of the batch shape).
        label_smoothing: :math:`\varepsilon \in [0, 1]`, PyTorch's definition.
        z_loss: :math:`\zeta \ge 0`; adds :math:`\zeta \operatorname{lse}^2` per non-ignored row.
        softcap: ``c > 0`` applies :math:`c \tanh(z / c)` to the logits first (Gemma 2); the
            loss, ``lse`` and the gradient are those of the capped logits.
        return_lse: also return the per-row ``lse`` and the z-loss part, as a
            :class:`CrossEntropyOutput` named tuple ``(loss, lse, z_loss)``.
        inplace_backward: write the gradient into the logits' own memory instead of a new
            ``(N, C)`` buffer. When a gradient is computed (``logits.requires_grad`` and grad
            mode on) the forward **overwrites every element of** ``logits`` with
            :math:`\partial\, \text{loss} / \partial\, \text{logits}` for ``grad_output = 1``
            (in the logits' dtype; overwritten even if the call then raises ``ValueError``),
            and the backward scales that buffer by ``grad_output`` and hands it on as the
            logits' gradient. Without a gradient nothing is overwritten. Needs C-contiguous
            ``(N, C)`` or ``(C,)`` logits that are not a leaf requiring grad; if another
            operation saved the logits for its own backward, autograd raises its usual
            "modified by an inplace operation" error instead of computing a wrong gradient.

    Returns:
        The loss in the logits' dtype (float32 under autocast for float16/bfloat16 logits, as
        PyTorch): a scalar, or the batch shape for ``reduction="none"``. With
        ``return_lse=True`` a :class:`CrossEntropyOutput` ``(loss, lse, z_loss)``.

    Raises:
        TypeError: a non-tensor ``logits``/``target``/``weight``; logits not
            float16/bfloat16/float32/float64; a bool or complex target; non-int
            ``ignore_index``; non-real ``label_smoothing``/``z_loss``/``softcap``; non-bool flags.
        ValueError: a 0-d or empty ``logits``; ``target`` or ``weight`` of the wrong shape or
            device; a non-default ``ignore_index`` with probability targets; unknown
            ``reduction``; ``label_smoothing`` outside ``[0, 1]``; negative or non-finite
            ``z_loss``; non-positive ``softcap``; ``weight`` that requires grad;
            ``inplace_backward`` on logits it cannot overwrite. In eager mode also (one host
            synchronisation, after the kernel): a target class outside ``[0, C)`` that is not
            ``ignore_index``; negative or non-finite probability targets or weights; logits with
            NaN or ``+inf``, or a row entirely ``-inf``. Inside a compiled graph these data
            checks are skipped and such rows give a NaN loss.

    Examples:
        >>> import torch.nn.functional as F
        >>> g = torch.Generator().manual_seed(0)
        >>> z = torch.randn(4, 10, generator=g, dtype=torch.float64, requires_grad=True)
        >>> y = torch.tensor([1, 0, -100, 9])
        >>> loss = cross_entropy(z, y, label_smoothing=0.1)
        >>> bool(torch.allclose(loss, F.cross_entropy(z, y, label_smoothing=0.1)))
        True
        >>> out = cross_entropy(z, y, z_loss=1e-4, return_lse=True)
        >>> out.lse.shape, bool(torch.allclose(out.lse, torch.logsumexp(z, 1)))
        (torch.Size([4]), True)
        >>> cross_entropy(torch.zeros(1, 4), torch.tensor([2]))  # log 4
        tensor(1.3863)
    """
    prob_target = _validate(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
                            return_lse, inplace_backward)
    num_classes = logits.shape[0] if logits.dim() == 1 else logits.shape[1]
    batch_shape = () if logits.dim() == 1 else (logits.shape[0],) + tuple(logits.shape[2:])
    if logits.dim() <= 2:
        rows = logits.reshape(-1, num_classes)
        target_rows = target.reshape(-1, num_classes) if prob_target else target.reshape(-1)
    else:  # (N, C, d1, ...): classes last, one row per (n, d1, ...)
        rows = logits.movedim(1, -1).reshape(-1, num_classes)
        target_rows = target.movedim(1, -1).reshape(-1, num_classes) if prob_target else target.reshape(-1)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    target_rows = target_rows.contiguous() if prob_target else target_rows.to(torch.int64).contiguous()
    opts = (int(ignore_index), reduction, float(label_smoothing), float(z_loss),
            None if softcap is None else float(softcap), _OPTIONS["kernel"])
    with_grad = torch.is_grad_enabled() and logits.requires_grad
    if inplace_backward and with_grad:
        if logits.dim() > 2 or not logits.is_contiguous():
            raise ValueError("inplace_backward=True needs C-contiguous logits of shape (N, C) or (C,) to overwrite, "
                             f"got shape {tuple(logits.shape)} with strides {logits.stride()}")
        if logits.is_leaf:
            raise ValueError("inplace_backward=True would overwrite a leaf tensor that requires grad; "
                             "pass logits computed from it (or inplace_backward=False)")
        if prob_target and target.requires_grad:
            raise ValueError("inplace_backward=True overwrites the logits that the gradient for the probability "
                             "target needs; use inplace_backward=False")
        loss, z_part, lse = _InplaceCrossEntropy.apply(rows, target_rows, weight, *opts)
    else:
        loss, z_part, lse, _ = _cross_entropy_op(rows, target_rows, weight, *opts[:5], with_grad, opts[5])
    if _OPTIONS["check_values"] and not torch.compiler.is_compiling() and not (
            logits.is_cuda and torch.cuda.is_current_stream_capturing()):
        _check_values(rows, target_rows, weight, lse, int(ignore_index), prob_target)
    out_dtype = logits.dtype
    if logits.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(logits.device.type):
        out_dtype = torch.float32  # autocast runs cross_entropy in float32
    if reduction == "none":
        loss, z_part = loss.reshape(batch_shape), z_part.reshape(batch_shape)
    loss = loss.to(out_dtype)
    if not return_lse:
        return loss
    return CrossEntropyOutput(loss, lse.reshape(batch_shape), z_part.to(out_dtype))


class CrossEntropyLoss(nn.Module):
    """``nn.Module`` form of :func:`cross_entropy`; ``forward(logits, target)``.

    Every keyword of :func:`cross_entropy` is a constructor argument; ``weight`` is stored as
    a buffer, so ``.to(device)`` moves it with the module.

    Examples:
        >>> loss_fn = CrossEntropyLoss(label_smoothing=0.1, z_loss=1e-4)
        >>> loss_fn(torch.randn(6, 5), torch.randint(0, 5, (6,))).shape
        torch.Size([])
    """

    def __init__(self, *, weight: Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None,
                 return_lse: bool = False, inplace_backward: bool = False) -> None:
        super().__init__()
        if not isinstance(reduction, str) or reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.return_lse = return_lse
        self.inplace_backward = inplace_backward

    def forward(self, logits: Tensor, target: Tensor) -> Tensor | CrossEntropyOutput:
        return cross_entropy(logits, target, weight=self.weight, ignore_index=self.ignore_index,
                             reduction=self.reduction, label_smoothing=self.label_smoothing, z_loss=self.z_loss,
                             softcap=self.softcap, return_lse=self.return_lse,
                             inplace_backward=self.inplace_backward)

    def extra_repr(self) -> str:
        return (f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, softcap={self.softcap}")
