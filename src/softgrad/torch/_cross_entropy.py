"""``softgrad.torch.cross_entropy``: PyTorch's cross-entropy, plus z-loss, softcap and lse, in one fused pass.

What is computed is the rule of :mod:`softgrad._cross_entropy_rule` (options, per-row loss,
closed-form gradient, reductions). Layers, bottom up:

* row kernels with one signature and two implementations: PyTorch ops
  (:mod:`softgrad.torch._torch_cross_entropy`, the CPU path and the readable twin) and Triton
  (:mod:`softgrad.torch._triton_cross_entropy`, CUDA), chosen by :func:`softgrad.torch.use_kernel`.
  Their ``forward`` computes each row's loss, its logsumexp and -- in the same pass -- the
  gradient of the *reduced* loss with respect to the logits, so the backward only multiplies
  by ``grad_output``.
* custom operators, so that ``torch.compile`` sees one opaque node per call
  (``fullgraph=True`` works) and never traces into the kernels:
  ``softgrad::cross_entropy`` (functional, returns a fresh gradient buffer; autograd via
  ``register_autograd``), ``softgrad::cross_entropy_inplace_`` (declares that it mutates the
  logits, which receive the gradient; autograd via :class:`_InplaceCrossEntropy`) and
  ``softgrad::cross_entropy_rows_`` (per-row results, gradient in place, no autograd: for
  callers that reduce and differentiate themselves, like ``linear_cross_entropy``'s chunks).
* :func:`cross_entropy` validates, flattens ``(N, C, d1, ...)`` to rows, calls an operator and
  shapes the results; :class:`CrossEntropyLoss` is the ``nn.Module`` form.

Autograd, every mode:

* a plain backward scales the stored gradient by ``grad_output`` in place and hands the buffer
  on (the Triton scale kernel skips rows whose factor is exactly 1, decided on the device, and
  the CPU path skips a scalar factor of 1), so ``loss.backward()`` costs no pass over it; a
  later backward through the same call (``retain_graph=True``, ``gradcheck``) recomputes the
  gradient from the saved logits;
* a backward with ``create_graph=True`` (double backward, Hessians, gradient penalties) builds
  the gradient from differentiable PyTorch ops of the same rule
  (:func:`softgrad.torch._torch_cross_entropy.differentiable_gradient`), so its derivative is
  PyTorch's;
* under forward-mode AD (dual tensors) and ``torch.func`` transforms (``grad``, ``vmap``,
  ``jvp``, ``hessian``, ...) the whole call runs on those differentiable ops
  (:func:`~softgrad.torch._torch_cross_entropy.differentiable_rows`), which the transforms
  handle natively; value checks that need a host read are skipped under the transforms;
* meta and fake tensors run the operators' fake implementations (shapes and dtypes only).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from softgrad import _cross_entropy_rule as _rule
from softgrad.torch import _settings
from softgrad.torch import _torch_cross_entropy as _ops
from softgrad.torch import _validation as _tv
from softgrad.torch._torch_cross_entropy import compute_dtype

__all__ = ["cross_entropy", "CrossEntropyLoss", "CrossEntropyOutput", "sequence_normalizer"]


class CrossEntropyOutput(NamedTuple):
    """What the cross-entropies return with ``return_lse=True`` or any of the same-pass statistics.

    ``loss`` is differentiable; the others are detached (for reuse, metrics and logging). The
    statistics not asked for are None.
    """

    loss: Tensor  #: the loss, z-loss included, as without ``return_lse``
    lse: Tensor  #: per-row logsumexp of the (softcapped) logits, batch shape, float32 (float64 for float64)
    z_loss: Tensor  #: the z-loss part of ``loss``, reduced the same way (zeros when ``z_loss=0``)
    #: 0-d float32: the fraction of non-ignored rows whose argmax is the target (NaN if none counts)
    token_accuracy: Tensor | None = None
    predicted_tokens: Tensor | None = None  #: per-row argmax (int64, batch shape): the first maximal class
    entropy: Tensor | None = None  #: per-row entropy of ``softmax(s)`` (batch shape, float32/float64)


def _statistics(stats: Tensor, target_rows: Tensor, ignore_index: int, batch_shape, *, accuracy: bool,
                predictions: bool, entropy: bool) -> dict:
    """The asked-for same-pass statistics from the kernels' ``(2, N)`` buffer (entropy, argmax)."""
    out = {}
    predicted = stats[1].to(torch.int64)
    if accuracy:
        valid = target_rows != ignore_index
        hits = ((predicted == target_rows) & valid).sum(dtype=torch.float32)
        out["token_accuracy"] = hits / valid.sum(dtype=torch.float32)  # no host read; NaN when no row counts
    if predictions:
        out["predicted_tokens"] = predicted.reshape(batch_shape)
    if entropy:
        out["entropy"] = stats[0].reshape(batch_shape)
    return out


# ----------------------------------------------------------------------------- shared implementation
def _options(ignore_index: int, reduction: str, label_smoothing: float, z_loss: float,
             softcap: float | None) -> _rule.CrossEntropyOptions:
    """The options an operator received as scalars (already validated by the public function)."""
    return _rule.CrossEntropyOptions(ignore_index, reduction, label_smoothing, z_loss, softcap)


def _batch_factors(target: Tensor, weight: Tensor | None, opts: _rule.CrossEntropyOptions, prob_target: bool,
                   n_cols: int, cdt: torch.dtype):
    """``(count, denom, scales)``: the rule's denominators and ``scales = (kappa, zeta)``, on the device."""
    count, denom = _rule.denominators(target, weight, ignore_index=opts.ignore_index, prob_target=prob_target,
                                      num_classes=n_cols, dtype=cdt)
    kappa, zeta = _rule.reduction_factors(opts.reduction, count, denom)
    return count, denom, torch.stack([kappa, zeta]).to(cdt)


def _reduce(ce: Tensor, lse: Tensor, target: Tensor, opts: _rule.CrossEntropyOptions, prob_target: bool,
            count: Tensor, denom: Tensor, row_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    valid = None if prob_target else target != opts.ignore_index
    return _rule.reduce_rows(ce, _rule.z_loss_rows(lse, opts.z_loss, valid), opts.reduction, count, denom,
                             row_scale)


def _run(logits: Tensor, target: Tensor, weight: Tensor | None, opts: _rule.CrossEntropyOptions,
         grad_out: Tensor | None, kernel: str, row_scale: Tensor | None = None,
         stats_out: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The row kernel and the reduction: ``(loss, z_part, lse)`` in the compute dtype.

    The kernel writes the gradient of exactly this ``loss`` (for ``"none"``: of its sum) into
    ``grad_out``, and the same-pass statistics into ``stats_out`` ``(2, N)`` if given.
    ``row_scale`` ``(N,)`` holds the rule's per-row factors (token weights / normaliser).
    """
    with _tv.autocast_off(logits.device):  # all arithmetic here is float32/float64 already
        n_cols = logits.shape[1]
        cdt = compute_dtype(logits.dtype)
        prob_target = target.is_floating_point()
        w = None if weight is None else weight.to(cdt).contiguous()
        count, denom, scales = _batch_factors(target, w, opts, prob_target, n_cols, cdt)
        module, config = _settings.row_kernels(logits.device, kernel)
        ce, lse = module.forward(logits, target, w, scales, ignore_index=opts.ignore_index,
                                 label_smoothing=opts.label_smoothing, z_loss=opts.z_loss, softcap=opts.softcap,
                                 prob_target=prob_target, grad_out=grad_out, row_scale=row_scale,
                                 stats_out=stats_out, config=config)
        loss, z_part = _reduce(ce, lse, target, opts, prob_target, count, denom, row_scale)
        return loss, z_part, lse


def _differentiable_stats(logits: Tensor, softcap: float | None) -> Tensor:
    """The ``(2, N)`` statistics (entropy, argmax) from PyTorch ops, detached: for the differentiable path."""
    with torch.no_grad():
        cdt = compute_dtype(logits.dtype)
        s, _ = _ops._scores(logits.detach().to(cdt), softcap)
        log_p = torch.log_softmax(s, dim=1)
        p = log_p.exp()
        entropy = -torch.where(p == 0, torch.zeros_like(p), p * log_p).sum(dim=1)
        return torch.stack([entropy, s.argmax(dim=1).to(cdt)])


def _run_differentiable(logits: Tensor, target: Tensor, weight: Tensor | None,
                        opts: _rule.CrossEntropyOptions,
                        row_scale: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_run` on out-of-place PyTorch ops that every autograd mode and ``torch.func`` transform handles."""
    n_cols = logits.shape[1]
    cdt = compute_dtype(logits.dtype)
    prob_target = target.is_floating_point()
    w = None if weight is None else weight.to(cdt)
    count, denom, _ = _batch_factors(target.detach(), w, opts, prob_target, n_cols, cdt)
    ce, lse = _ops.differentiable_rows(logits, target, w, ignore_index=opts.ignore_index,
                                       label_smoothing=opts.label_smoothing, softcap=opts.softcap,
                                       prob_target=prob_target)
    loss, z_part = _reduce(ce, lse, target, opts, prob_target, count, denom, row_scale)
    return loss, z_part.detach(), lse.detach()


def _fake_outputs(logits: Tensor, reduction: str) -> tuple[Tensor, Tensor, Tensor]:
    cdt = compute_dtype(logits.dtype)
    shape = (logits.shape[0],) if reduction == "none" else ()
    return (logits.new_empty(shape, dtype=cdt), logits.new_empty(shape, dtype=cdt),
            logits.new_empty((logits.shape[0],), dtype=cdt))


def _row_factor(grad_loss: Tensor) -> Tensor:
    """``grad_output`` shaped to multiply ``(N, C)`` rows: a scalar, or one factor per row for ``"none"``."""
    return grad_loss if grad_loss.dim() == 0 else grad_loss[:, None]


def _target_grad(logits: Tensor, target: Tensor, weight: Tensor | None, lse: Tensor, kappa: Tensor,
                 grad_loss: Tensor, label_smoothing: float, softcap: float | None) -> Tensor:
    """Gradient with respect to probability targets: ``d ce/d t_c = -(1 - eps) w_c (s_c - lse)``, times kappa.

    Out-of-place ops: differentiable with respect to ``logits``, ``lse`` and ``grad_loss`` when
    those carry a graph (double backward passes a differentiable ``lse``).
    """
    cdt = lse.dtype
    s = logits.to(cdt)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    g = (s - lse[:, None]) * (-(1.0 - label_smoothing))
    if weight is not None:
        g = g * weight.to(cdt)
    return (g * _row_factor(grad_loss.to(cdt) * kappa)).to(target.dtype)


def _differentiable_backward(ctx, logits: Tensor, target: Tensor, weight: Tensor | None, row_scale: Tensor | None,
                             grad_loss: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """The backward for ``create_graph=True``: gradients built from differentiable ops of the rule."""
    opts = ctx.opts
    cdt = compute_dtype(logits.dtype)
    prob_target = target.is_floating_point()
    w = None if weight is None else weight.to(cdt)
    _, _, scales = _batch_factors(target.detach(), w, opts, prob_target, logits.shape[1], cdt)
    kappa, zeta = scales[0], scales[1]
    if row_scale is not None:
        kappa, zeta = kappa * row_scale, zeta * row_scale
    grad_logits = grad_target = None
    if ctx.needs_input_grad[0]:
        g = _ops.differentiable_gradient(logits, target, w, kappa, zeta, ignore_index=opts.ignore_index,
                                         label_smoothing=opts.label_smoothing, z_loss=opts.z_loss,
                                         softcap=opts.softcap, prob_target=prob_target)
        grad_logits = (g * _row_factor(grad_loss.to(cdt))).to(logits.dtype)
    if prob_target and ctx.needs_input_grad[1]:
        _, lse = _ops.differentiable_rows(logits, target, w, ignore_index=opts.ignore_index,
                                          label_smoothing=opts.label_smoothing, softcap=opts.softcap,
                                          prob_target=True)
        grad_target = _target_grad(logits, target, w, lse, kappa, grad_loss, opts.label_smoothing, opts.softcap)
    return grad_logits, grad_target


def _traced(grad: Tensor) -> bool:
    """Whether the backward is being traced (``torch.compile``, ``opcheck``): scale out of place there."""
    return torch.compiler.is_compiling() or type(grad) is not torch.Tensor


# ----------------------------------------------------------------------------- functional operator
def _stats_buffer(logits: Tensor, with_stats: bool) -> Tensor:
    """``(2, N)`` in the compute dtype for the kernels' statistics, or ``(0,)``."""
    cdt = compute_dtype(logits.dtype)
    return logits.new_empty((2, logits.shape[0]) if with_stats else (0,), dtype=cdt)


@torch.library.custom_op("softgrad::cross_entropy", mutates_args=())
def _cross_entropy_op(logits: Tensor, target: Tensor, weight: Optional[Tensor], row_scale: Optional[Tensor],
                      ignore_index: int, reduction: str, label_smoothing: float, z_loss: float,
                      softcap: Optional[float], with_grad: bool, with_stats: bool,
                      kernel: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss, z_part, lse, grad, stats)`` for validated ``(N, C)`` rows.

    ``grad`` is ``(0,)`` unless ``with_grad``; ``stats`` is ``(2, N)`` (entropy, argmax) with
    ``with_stats``, else ``(0,)``. ``row_scale`` ``(N,)``: the rule's per-row factors or None.
    """
    grad = logits.new_empty(logits.shape) if with_grad else logits.new_empty(0)
    stats = _stats_buffer(logits, with_stats)
    opts = _options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    loss, z_part, lse = _run(logits, target, weight, opts, grad if with_grad else None, kernel, row_scale,
                             stats if with_stats else None)
    return loss, z_part, lse, grad, stats


@_cross_entropy_op.register_fake
def _(logits, target, weight, row_scale, ignore_index, reduction, label_smoothing, z_loss, softcap, with_grad,
      with_stats, kernel):
    grad = logits.new_empty(logits.shape) if with_grad else logits.new_empty(0)
    return (*_fake_outputs(logits, reduction), grad, _stats_buffer(logits, with_stats))


def _setup_context(ctx, inputs, output):
    (logits, target, weight, row_scale, ignore_index, reduction, label_smoothing, z_loss, softcap, with_grad,
     _with_stats, kernel) = inputs
    loss, z_part, lse, grad, stats = output
    ctx.mark_non_differentiable(z_part, lse, grad, stats)
    ctx.set_materialize_grads(False)
    ctx.with_grad, ctx.kernel = with_grad, kernel
    ctx.opts = _options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    ctx.grad_consumed = False
    # the logits are kept (a reference, not a copy) for a second backward and for double backward
    if _traced(grad):  # a traced graph saves every tensor it needs
        ctx.save_for_backward(logits, target, weight, row_scale, lse, grad)
        ctx.stored_grad = None
    else:
        # eager: the buffer is held outside save_for_backward, because the first backward scales
        # it in place and hands it on (no copy); a saved tensor would then fail autograd's
        # version check in any later backward, which instead recomputes from the saved logits
        ctx.save_for_backward(logits, target, weight, row_scale, lse)
        ctx.stored_grad = grad


def _logits_grad(ctx, grad: Tensor, logits: Tensor, target: Tensor, weight: Tensor | None,
                 row_scale: Tensor | None, grad_loss: Tensor) -> Tensor:
    """``grad * grad_output``: the stored buffer scaled in place the first time, recomputed after that.

    While a graph is traced the product is out of place, for the compiler to fuse.
    """
    if not ctx.grad_consumed and _traced(grad):
        return (grad * _row_factor(grad_loss)).to(grad.dtype)
    module, _ = _settings.row_kernels(logits.device, ctx.kernel)
    if ctx.grad_consumed:
        # an earlier backward through this call handed the stored buffer on: recompute into a new one
        grad = torch.empty_like(logits)
        _run(logits, target, weight, ctx.opts, grad, ctx.kernel, row_scale)
    ctx.grad_consumed, ctx.stored_grad = True, None
    module.scale_rows_(grad, grad_loss.detach())
    return grad


def _backward(ctx, grad_loss, _grad_z, _grad_lse, _grad_grad, _grad_stats):
    nones = (None,) * 10
    if grad_loss is None:
        return (None, None) + nones
    logits, target, weight, row_scale, lse, *saved_grad = ctx.saved_tensors
    grad = saved_grad[0] if saved_grad else ctx.stored_grad
    if ctx.needs_input_grad[0] and not ctx.with_grad:
        raise RuntimeError("softgrad::cross_entropy was called with with_grad=False on logits that require grad")
    if torch.is_grad_enabled():  # create_graph=True: a gradient that can be differentiated again
        return _differentiable_backward(ctx, logits, target, weight, row_scale, grad_loss) + nones
    grad_logits = grad_target = None
    if target.is_floating_point() and ctx.needs_input_grad[1]:
        cdt = lse.dtype
        w = None if weight is None else weight.to(cdt)
        _, _, scales = _batch_factors(target, w, ctx.opts, True, logits.shape[1], cdt)
        kappa = scales[0] if row_scale is None else scales[0] * row_scale
        grad_target = _target_grad(logits, target, w, lse, kappa, grad_loss, ctx.opts.label_smoothing,
                                   ctx.opts.softcap)
    if ctx.needs_input_grad[0]:
        grad_logits = _logits_grad(ctx, grad, logits, target, weight, row_scale, grad_loss)
    return (grad_logits, grad_target) + nones


_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- in-place operator
@torch.library.custom_op("softgrad::cross_entropy_inplace_", mutates_args=("logits",))
def _cross_entropy_inplace_op(logits: Tensor, target: Tensor, weight: Optional[Tensor], row_scale: Optional[Tensor],
                              ignore_index: int, reduction: str, label_smoothing: float, z_loss: float,
                              softcap: Optional[float], with_stats: bool,
                              kernel: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(loss, z_part, lse, stats)``; the gradient (for ``grad_output = 1``) overwrites ``logits``."""
    opts = _options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    stats = _stats_buffer(logits, with_stats)
    return (*_run(logits, target, weight, opts, logits, kernel, row_scale, stats if with_stats else None), stats)


@_cross_entropy_inplace_op.register_fake
def _(logits, target, weight, row_scale, ignore_index, reduction, label_smoothing, z_loss, softcap, with_stats,
      kernel):
    return (*_fake_outputs(logits, reduction), _stats_buffer(logits, with_stats))


class _InplaceCrossEntropy(torch.autograd.Function):
    """Autograd for ``softgrad::cross_entropy_inplace_``: the gradient lives in the logits' own buffer."""

    @staticmethod
    def forward(ctx, logits, target, weight, row_scale, ignore_index, reduction, label_smoothing, z_loss, softcap,
                with_stats, kernel):
        loss, z_part, lse, stats = torch.ops.softgrad.cross_entropy_inplace_(
            logits, target, weight, row_scale, ignore_index, reduction, label_smoothing, z_loss, softcap,
            with_stats, kernel)
        ctx.mark_non_differentiable(z_part, lse, stats)
        ctx.set_materialize_grads(False)
        ctx.kernel = kernel
        ctx.grad_consumed = False
        # saved after the operator bumped the version counter: if anything else writes to
        # the logits before the backward, autograd's version check raises. Detached (sharing
        # the version counter), so the gradient handed on is a plain tensor, not part of the graph.
        ctx.save_for_backward(logits.detach())
        return loss, z_part, lse, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_z, _grad_lse, _grad_stats):
        if grad_loss is None:
            return (None,) * 11
        if torch.is_grad_enabled():
            raise RuntimeError("cross_entropy(inplace_backward=True) overwrote the logits with their gradient, so "
                               "a backward with create_graph=True (double backward) cannot differentiate it again; "
                               "use inplace_backward=False")
        (grad,) = ctx.saved_tensors
        if _traced(grad):
            return ((grad * _row_factor(grad_loss)).to(grad.dtype),) + (None,) * 10
        if ctx.grad_consumed:
            raise RuntimeError("cross_entropy(inplace_backward=True) overwrote the logits with their gradient and "
                               "handed it to the first backward; a second backward through the same call "
                               "(retain_graph=True) has no logits to recompute it from. Use "
                               "inplace_backward=False, which allows any number of backwards.")
        ctx.grad_consumed = True
        module, _ = _settings.row_kernels(grad.device, ctx.kernel)
        module.scale_rows_(grad, grad_loss.detach())
        return (grad,) + (None,) * 10


# ----------------------------------------------------------------------------- rows operator (chunked callers)
@torch.library.custom_op("softgrad::cross_entropy_rows_", mutates_args=("logits",))
def _cross_entropy_rows_op(logits: Tensor, target: Tensor, weight: Optional[Tensor], scales: Optional[Tensor],
                           row_scale: Optional[Tensor], ignore_index: int, label_smoothing: float, z_loss: float,
                           softcap: Optional[float], with_grad: bool, with_stats: bool,
                           kernel: str) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row ``(ce, lse, stats)`` for class-index targets, in the compute dtype.

    For callers that reduce themselves (``linear_cross_entropy``'s chunks). ``ce`` excludes the
    z-loss; ``ignore_index`` rows get 0; ``weight`` ``(C,)`` compute dtype or None. With
    ``with_grad`` the gradient of ``sum_i r_i (kappa w_{y_i} ce_i' + zeta z_loss lse_i^2)`` --
    ``(kappa, zeta) = scales`` (ones when None), ``r = row_scale`` (ones when None) -- overwrites
    ``logits`` in their own dtype; without it nothing is written. ``stats`` is ``(2, N)``
    (entropy, argmax) with ``with_stats``, else ``(0,)``.
    """
    cdt = compute_dtype(logits.dtype)
    module, config = _settings.row_kernels(logits.device, kernel)
    stats = _stats_buffer(logits, with_stats)
    if scales is None:
        scales = torch.ones(2, dtype=cdt, device=logits.device)
    with _tv.autocast_off(logits.device):
        ce, lse = module.forward(logits, target, weight, scales, ignore_index=ignore_index,
                                 label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, prob_target=False,
                                 grad_out=logits if with_grad else None, row_scale=row_scale,
                                 stats_out=stats if with_stats else None, config=config)
    return ce, lse, stats


@_cross_entropy_rows_op.register_fake
def _(logits, target, weight, scales, row_scale, ignore_index, label_smoothing, z_loss, softcap, with_grad,
      with_stats, kernel):
    cdt = compute_dtype(logits.dtype)
    n = logits.shape[0]
    return logits.new_empty((n,), dtype=cdt), logits.new_empty((n,), dtype=cdt), _stats_buffer(logits, with_stats)


# ----------------------------------------------------------------------------- validation
def _validate(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, return_lse,
              inplace_backward) -> tuple[bool, _rule.CrossEntropyOptions]:
    """Check types, shapes and options (no data-dependent checks); return ``(prob_target, options)``."""
    _tv.check_tensor(logits, "logits")
    _tv.check_tensor(target, "target")
    _tv.check_float(logits, "logits")
    if logits.dim() == 0:
        raise ValueError("logits must have shape (C,), (N, C) or (N, C, d1, ...), got a 0-d tensor")
    if logits.numel() == 0:
        raise ValueError(f"logits is empty (shape {tuple(logits.shape)}); need at least one row and one class")
    num_classes = logits.shape[0] if logits.dim() == 1 else logits.shape[1]
    batch_shape = () if logits.dim() == 1 else (logits.shape[0],) + tuple(logits.shape[2:])
    _tv.check_same_device(target, "target", logits, "logits")
    prob_target = target.is_floating_point()
    if prob_target:
        if target.shape != logits.shape:
            raise ValueError(f"target holds class probabilities (dtype {target.dtype}) and must have the logits' "
                             f"shape {tuple(logits.shape)}, got {tuple(target.shape)}")
    else:
        if target.dtype == torch.bool or target.is_complex():
            raise TypeError(f"target must hold integer class indices or float probabilities, got {target.dtype}")
        _tv.check_index_dtype(target)
        if tuple(target.shape) != batch_shape:
            raise ValueError(f"target must have shape {batch_shape} (the logits' shape without the class dimension), "
                             f"got {tuple(target.shape)}")
    _tv.check_weight(weight, num_classes, logits, "logits")
    opts = _rule.CrossEntropyOptions.checked(ignore_index=ignore_index, reduction=reduction,
                                             label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    opts.check_target_kind(prob_target)
    _tv.check_flags(return_lse=return_lse, inplace_backward=inplace_backward)
    return prob_target, opts


def _check_targets(target_rows: Tensor, weight: Tensor | None, n_cols: int, ignore_index: int,
                   prob_target: bool, extra: Tensor | None = None) -> bool:
    """Data-dependent checks of the targets and weights, read back with one host synchronisation.

    ``extra`` (a 0-d bool tensor) travels in the same read; its value is returned.
    """
    if prob_target:
        bad_target = (target_rows < 0).any() | ~torch.isfinite(target_rows).all()
    else:
        bad_target = (((target_rows < 0) | (target_rows >= n_cols)) & (target_rows != ignore_index)).any()
    false = torch.zeros((), dtype=torch.bool, device=target_rows.device)
    bad_weight = ~torch.isfinite(weight).all() if weight is not None else false
    flags = torch.stack([bad_target, bad_weight, false if extra is None else extra]).tolist()
    if flags[0]:
        if prob_target:
            raise ValueError("target (class probabilities) contains negative, NaN or infinite entries")
        bad = ((target_rows < 0) | (target_rows >= n_cols)) & (target_rows != ignore_index)
        value = int(target_rows[bad][0])
        raise ValueError(f"target contains class index {value} outside [0, {n_cols}) or "
                         f"ignore_index={ignore_index}")
    if flags[1]:
        raise ValueError("weight contains NaN or infinite entries")
    return bool(flags[2])


def _check_values(target_rows: Tensor, weight: Tensor | None, lse: Tensor, n_cols: int, ignore_index: int,
                  prob_target: bool) -> None:
    """Targets, weights and logits (through their lse), all read back with one host synchronisation."""
    bad_rows = ~torch.isfinite(lse)
    if _check_targets(target_rows, weight, n_cols, ignore_index, prob_target, extra=bad_rows.any()):
        first = int(bad_rows.nonzero()[0, 0])
        raise ValueError(f"logits contain NaN or +inf, or a row that is entirely -inf ({int(bad_rows.sum())} "
                         f"row(s), first at flattened row {first}); the softmax of such a row is undefined")


def row_factors(token_weight, normalizer, opts: _rule.CrossEntropyOptions, batch_shape, like: Tensor):
    """Validate ``token_weight``/``normalizer``; return the rule's ``(row_scale (N,) or None, kernel options)``.

    With a normaliser the kernels reduce by ``"sum"`` and every row carries ``rho_i / n_i``
    (:mod:`softgrad._cross_entropy_rule`, "Token weights and normalisers").
    """
    cdt = compute_dtype(like.dtype)
    n_rows = 1
    for size in batch_shape:
        n_rows *= size
    rho = None
    if token_weight is not None:
        _tv.check_tensor(token_weight, "token_weight")
        if not token_weight.is_floating_point():
            raise TypeError(f"token_weight must be a floating-point tensor, got {token_weight.dtype}")
        if tuple(token_weight.shape) != tuple(batch_shape):
            raise ValueError(f"token_weight must have the batch shape {tuple(batch_shape)} (one weight per row), got "
                             f"{tuple(token_weight.shape)}")
        _tv.check_same_device(token_weight, "token_weight", like, "the logits")
        if token_weight.requires_grad and torch.is_grad_enabled():
            raise ValueError("token_weight requires grad, but the loss has no gradient with respect to it; pass "
                             "token_weight.detach() (DFT-style weights are detached probabilities)")
        rho = token_weight.reshape(-1).to(cdt)
    if normalizer is None:
        return rho, opts
    if opts.reduction != "mean":
        raise ValueError(f"normalizer replaces the mean's denominator and needs reduction='mean', got "
                         f"reduction={opts.reduction!r}")
    if isinstance(normalizer, Tensor):
        if normalizer.requires_grad and torch.is_grad_enabled():
            raise ValueError("normalizer requires grad; pass normalizer.detach()")
        if normalizer.is_complex() or normalizer.dtype == torch.bool:
            raise TypeError(f"normalizer must be a real tensor, got {normalizer.dtype}")
        _tv.check_same_device(normalizer, "normalizer", like, "the logits")
        if normalizer.dim() == 0:
            n = normalizer.to(cdt)
        elif tuple(normalizer.shape) == tuple(batch_shape):
            n = normalizer.reshape(-1).to(cdt)
        else:
            raise ValueError(f"normalizer must be a number, a 0-d tensor or one per row of the batch shape "
                             f"{tuple(batch_shape)}, got shape {tuple(normalizer.shape)}")
    else:
        if not _rule._is_real(normalizer) or not (float(normalizer) > 0 and float(normalizer) < float("inf")):
            raise ValueError(f"normalizer must be a finite number > 0 (or a tensor), got {normalizer!r}")
        n = torch.tensor(float(normalizer), dtype=cdt, device=like.device)
    ones = torch.ones(n_rows, dtype=cdt, device=like.device)
    # a row with n_i = 0 (a sequence with nothing that counts: its rows are all ignored) gets factor 0
    scale = torch.where(n != 0, (ones if rho is None else rho) / torch.where(n != 0, n, 1.0), 0.0)
    return scale, _rule.CrossEntropyOptions(
        opts.ignore_index, "sum", opts.label_smoothing, opts.z_loss, opts.softcap)


def sequence_normalizer(sequence_ids: Tensor, target: Tensor, *, ignore_index: int = -100) -> Tensor:
    """Per-row normalisers that make ``reduction="mean"`` the mean of per-sequence means of a packed batch.

    Row ``i`` of sequence ``q`` gets ``n_i = (tokens of q that count) * (sequences with a token that
    counts)``, so ``sum_i loss_i / n_i`` averages each sequence's mean loss with equal weight,
    whatever the sequences' lengths. Device ops only (no host synchronisation).

    Args:
        sequence_ids: integer ids of the rows' sequences, the target's shape, values in ``[0, N)``
            with ``N`` the number of rows (e.g. ``cumsum`` of sequence starts).
        target: the class-index targets (rows equal to ``ignore_index`` do not count).
        ignore_index: as in :func:`cross_entropy`.

    Returns:
        A float32 tensor of the target's shape, for ``normalizer=``.

    Examples:
        >>> ids = torch.tensor([0, 0, 0, 1])            # a 3-token and a 1-token sequence
        >>> sequence_normalizer(ids, torch.tensor([4, 2, -100, 7]))
        tensor([4., 4., 4., 2.])
    """
    _tv.check_tensor(sequence_ids, "sequence_ids")
    _tv.check_tensor(target, "target")
    if sequence_ids.shape != target.shape:
        raise ValueError(f"sequence_ids must have the target's shape {tuple(target.shape)}, got "
                         f"{tuple(sequence_ids.shape)}")
    if sequence_ids.is_floating_point() or sequence_ids.dtype == torch.bool:
        raise TypeError(f"sequence_ids must be an integer tensor, got {sequence_ids.dtype}")
    ids = sequence_ids.reshape(-1).to(torch.int64)
    valid = (target.reshape(-1) != ignore_index).to(torch.float32)
    counts = torch.zeros(ids.shape[0], dtype=torch.float32, device=ids.device).scatter_add_(0, ids, valid)
    n_sequences = (counts > 0).sum().to(torch.float32)
    return (counts[ids] * n_sequences).reshape(target.shape)


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
    token_weight: Tensor | None = None,
    normalizer: float | Tensor | None = None,
    return_lse: bool = False,
    return_token_accuracy: bool = False,
    return_predicted_tokens: bool = False,
    return_entropy: bool = False,
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
    coefficient is exactly 0 counts 0 even where a logit is ``-inf`` (PyTorch gives NaN there;
    the rule is stated once in :mod:`softgrad._cross_entropy_rule`).

    The gradient is computed in the forward pass, in the same pass over the logits, in
    closed form (:math:`\partial \ell / \partial s = \alpha a - \beta e_y - \gamma u`,
    times :math:`1 - \tanh^2(z/c)` under a softcap); the backward multiplies it by
    ``grad_output``. On CUDA the work is one Triton kernel launch (float32 arithmetic for
    float16/bfloat16/float32 logits); on CPU it is PyTorch ops (:func:`softgrad.torch.use_kernel`
    chooses). ``torch.compile`` (with ``fullgraph=True``) sees a custom operator and does not
    break the graph. Every autograd mode works: any number of backwards through one call,
    double backward (``create_graph=True``: Hessians, gradient penalties, ``gradgradcheck``),
    forward-mode AD, ``torch.func`` transforms and meta/fake tensors (see the module docstring).
    The functional form keeps a reference to the logits until the graph is freed (for those
    modes), as PyTorch's own cross-entropy keeps its log-softmax output.

    Args:
        logits: ``(N, C)``, ``(C,)`` or ``(N, C, d1, ...)`` (classes on dimension 1, as in
            PyTorch); float16, bfloat16, float32 or float64; ``-inf`` entries allowed.
        target: class indices (any integer dtype but uint64) of shape ``(N,)``, ``()`` or
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
        token_weight: optional per-row weights :math:`\rho` of the batch shape (floating, no
            gradient): row :math:`i`'s loss and gradient are multiplied by :math:`\rho_i`
            (loss masks, DFT-style scaling); the ``"mean"`` denominators do not change.
        normalizer: optional denominator :math:`n` replacing the mean's (``reduction="mean"``
            only): the loss is :math:`\sum_i \rho_i \ell_i / n_i`, ``n`` a positive number, a 0-d
            tensor (e.g. Hugging Face's ``num_items_in_batch`` under gradient accumulation) or
            one per row of the batch shape (e.g. from :func:`sequence_normalizer`: the mean of
            per-sequence means of a packed batch). No host synchronisation.
        return_lse: also return the per-row ``lse`` and the z-loss part, as a
            :class:`CrossEntropyOutput` named tuple ``(loss, lse, z_loss, ...)``.
        return_token_accuracy, return_predicted_tokens, return_entropy: also return, from the same
            pass over the logits and detached, the fraction of non-ignored rows whose argmax is the
            target (class-index targets), the per-row argmax and the per-row entropy
            :math:`-\sum_k a_k \log a_k` of ``softmax(s)``, in the :class:`CrossEntropyOutput`.
        inplace_backward: write the gradient into the logits' own memory instead of a new
            ``(N, C)`` buffer. When a gradient is computed (``logits.requires_grad`` and grad
            mode on) the forward **overwrites every element of** ``logits`` with
            :math:`\partial\, \text{loss} / \partial\, \text{logits}` for ``grad_output = 1``
            (in the logits' dtype), and the backward scales that buffer by ``grad_output`` and
            hands it on as the logits' gradient. The targets and weights are checked before
            anything is overwritten; invalid logits (NaN, ``+inf``, a row entirely ``-inf``) are
            found by the kernel, so their ``ValueError`` comes after the overwrite. Without a
            gradient nothing is overwritten. Needs C-contiguous ``(N, C)`` or ``(C,)`` logits
            that are not a leaf requiring grad; allows one backward, without ``create_graph``;
            if another operation saved the logits for its own backward, autograd raises its
            usual "modified by an inplace operation" error instead of computing a wrong
            gradient. Ignored under forward-mode AD and ``torch.func`` transforms.

    Returns:
        The loss in the logits' dtype (float32 under autocast for float16/bfloat16 logits, as
        PyTorch): a scalar, or the batch shape for ``reduction="none"``. With
        ``return_lse=True`` a :class:`CrossEntropyOutput` ``(loss, lse, z_loss)``.

    Raises:
        TypeError: a non-tensor ``logits``/``target``/``weight``; logits not
            float16/bfloat16/float32/float64; a bool, complex or uint64 target; non-int
            ``ignore_index``; non-real ``label_smoothing``/``z_loss``/``softcap``; non-bool flags.
        ValueError: a 0-d or empty ``logits``; ``target`` or ``weight`` of the wrong shape or
            device; a non-default ``ignore_index`` with probability targets; ``ignore_index``
            outside int64; unknown ``reduction``; ``label_smoothing`` outside ``[0, 1]``; negative
            or non-finite ``z_loss``; non-positive or non-finite ``softcap``; ``weight`` that
            requires grad; ``inplace_backward`` on logits it cannot overwrite. In eager mode also
            (one host synchronisation, after the kernel): a target class outside ``[0, C)`` that is
            not ``ignore_index``; negative or non-finite probability targets or weights; logits
            with NaN or ``+inf``, or a row entirely ``-inf``. Inside a compiled graph, under
            ``torch.func`` transforms, on meta/fake tensors and with
            :func:`softgrad.torch.use_value_checks` off, these data checks are skipped and such
            rows give a NaN loss.
        RuntimeError: a second backward or a ``create_graph=True`` backward through a call with
            ``inplace_backward=True``.

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
        >>> h = torch.autograd.functional.hessian(lambda x: cross_entropy(x, y), z)  # double backward
        >>> bool(torch.allclose(h, torch.autograd.functional.hessian(lambda x: F.cross_entropy(x, y), z)))
        True
    """
    prob_target, opts = _validate(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
                                  return_lse, inplace_backward)
    _tv.check_flags(return_token_accuracy=return_token_accuracy, return_predicted_tokens=return_predicted_tokens,
                    return_entropy=return_entropy)
    if return_token_accuracy and prob_target:
        raise ValueError("return_token_accuracy needs class-index targets; with probability targets compare "
                         "predicted_tokens (return_predicted_tokens=True) with your own labels")
    num_classes = logits.shape[0] if logits.dim() == 1 else logits.shape[1]
    batch_shape = () if logits.dim() == 1 else (logits.shape[0],) + tuple(logits.shape[2:])
    row_scale, opts_k = row_factors(token_weight, normalizer, opts, batch_shape, logits)
    with_stats = return_token_accuracy or return_predicted_tokens or return_entropy
    if logits.dim() <= 2:
        rows = logits.reshape(-1, num_classes)
        target_rows = target.reshape(-1, num_classes) if prob_target else target.reshape(-1)
    else:  # (N, C, d1, ...): classes last, one row per (n, d1, ...)
        rows = logits.movedim(1, -1).reshape(-1, num_classes)
        target_rows = target.movedim(1, -1).reshape(-1, num_classes) if prob_target else target.reshape(-1)
    target_rows = target_rows.contiguous() if prob_target else target_rows.to(torch.int64).contiguous()
    check = _tv.values_checkable(logits)
    stats = None
    if _tv.functorch_active() or _tv.has_tangent(logits, target, weight):
        loss, z_part, lse = _run_differentiable(rows, target_rows, weight, opts_k, row_scale)
        if with_stats:
            stats = _differentiable_stats(rows, opts.softcap)
    else:
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        with_grad = torch.is_grad_enabled() and logits.requires_grad
        kernel = _settings.get_kernel()
        op_args = (opts_k.ignore_index, opts_k.reduction, opts_k.label_smoothing, opts_k.z_loss, opts_k.softcap)
        if inplace_backward and with_grad:
            if logits.dim() > 2 or not logits.is_contiguous():
                raise ValueError("inplace_backward=True needs C-contiguous logits of shape (N, C) or (C,) to "
                                 f"overwrite, got shape {tuple(logits.shape)} with strides {logits.stride()}")
            if logits.is_leaf:
                raise ValueError("inplace_backward=True would overwrite a leaf tensor that requires grad; "
                                 "pass logits computed from it (or inplace_backward=False)")
            if prob_target and target.requires_grad:
                raise ValueError("inplace_backward=True overwrites the logits that the gradient for the probability "
                                 "target needs; use inplace_backward=False")
            if check:  # before the logits are overwritten: a bad target must leave them intact
                _check_targets(target_rows, weight, num_classes, opts.ignore_index, prob_target)
            loss, z_part, lse, stats = _InplaceCrossEntropy.apply(rows, target_rows, weight, row_scale, *op_args,
                                                                  with_stats, kernel)
        else:
            loss, z_part, lse, _, stats = _cross_entropy_op(rows, target_rows, weight, row_scale, *op_args, with_grad,
                                                            with_stats, kernel)
    if check:
        _check_values(target_rows, weight, lse, num_classes, opts.ignore_index, prob_target)
    out_dtype = logits.dtype
    if logits.dtype in (torch.float16, torch.bfloat16) and _tv.autocast_enabled(logits.device):
        out_dtype = torch.float32  # autocast runs cross_entropy in float32
    if opts.reduction == "none":
        loss, z_part = loss.reshape(batch_shape), z_part.reshape(batch_shape)
    loss = loss.to(out_dtype)
    if not (return_lse or with_stats):
        return loss
    extra = {} if not with_stats else _statistics(stats, target_rows, opts.ignore_index, batch_shape,
                                                  accuracy=return_token_accuracy,
                                                  predictions=return_predicted_tokens, entropy=return_entropy)
    return CrossEntropyOutput(loss, lse.reshape(batch_shape), z_part.to(out_dtype), **extra)


class CrossEntropyLoss(nn.Module):
    """``nn.Module`` form of :func:`cross_entropy`; ``forward(logits, target)``.

    Every keyword of :func:`cross_entropy` is a constructor argument, validated there;
    ``weight`` is stored as a buffer, so ``.to(device)`` moves it with the module.

    Examples:
        >>> loss_fn = CrossEntropyLoss(label_smoothing=0.1, z_loss=1e-4)
        >>> loss_fn(torch.randn(6, 5), torch.randint(0, 5, (6,))).shape
        torch.Size([])
    """

    def __init__(self, *, weight: Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None,
                 return_lse: bool = False, return_token_accuracy: bool = False, return_predicted_tokens: bool = False,
                 return_entropy: bool = False, inplace_backward: bool = False) -> None:
        super().__init__()
        _rule.CrossEntropyOptions.checked(ignore_index=ignore_index, reduction=reduction,
                                          label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
        _tv.check_flags(return_lse=return_lse, inplace_backward=inplace_backward,
                        return_token_accuracy=return_token_accuracy, return_predicted_tokens=return_predicted_tokens,
                        return_entropy=return_entropy)
        self.statistics = dict(return_token_accuracy=return_token_accuracy,
                               return_predicted_tokens=return_predicted_tokens, return_entropy=return_entropy)
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
                             inplace_backward=self.inplace_backward, **self.statistics)

    def extra_repr(self) -> str:
        return (f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, softcap={self.softcap}")
