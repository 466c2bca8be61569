"""Losses on softmax outputs and their gradients.

``cross_entropy`` / ``softmax_cross_entropy`` follow ``torch.nn.functional.cross_entropy``
for every option, plus the z-loss and logit softcapping of ``softgrad.torch.cross_entropy``:
the rule (options, per-row formula, reductions, and the zero-coefficient convention that
is our one deliberate difference from PyTorch) is :mod:`softgrad._cross_entropy_rule`. The
per-row work happens in the backend's ``cross_entropy_index`` / ``cross_entropy_probs``
kernels; the reductions and their denominators are O(N) and are done here, passed to the
kernel as the per-row factors ``kappa`` (``grad_scale``) and ``zeta`` (``z_scale``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from softgrad import _cross_entropy_rule as _rule
from softgrad import _validation as _v
from softgrad._backend import kernels as _kernels


def _grad_scale(reduction: str, denom: float) -> float:
    """Factor on each row's gradient: ``1/denom`` for a mean (0 when ``denom`` is 0), else 1."""
    return _rule.reduction_factors(reduction, float(denom), float(denom))[0]


def _reduce(loss_rows: np.ndarray, reduction: str, denom: float, layout: _v.RowLayout):
    """Per-row float64 losses -> the caller's result in the caller's dtype."""
    loss, _ = _rule.reduce_rows(loss_rows, np.zeros_like(loss_rows), reduction, float(denom), float(denom))
    if reduction == "none":
        return layout.from_batch(loss)
    return layout.dtype.type(loss)


def _cross_entropy_rows(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
                        axis, with_grad, grad_out=None):
    """Validate, run the kernel, reduce. Returns ``(loss, gradient or None, layout)``.

    The gradient is ``grad_out`` itself when given (written directly when the layout allows,
    see :meth:`softgrad._validation.RowLayout.rows_view`), else ``(N, C)`` rows. The logits'
    values are checked by the kernel, in its one pass over them.
    """
    opts = _rule.CrossEntropyOptions.checked(ignore_index=ignore_index, reduction=reduction,
                                             label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    rows, layout = _v.logits_rows(logits, axis, check_values=False)
    N, C = rows.shape
    kind, tgt = _v.class_target(target, layout, opts.ignore_index)
    opts.check_target_kind(kind == "probs")
    w = _v.class_weight(weight, C, rows.dtype)
    view = None
    if grad_out is not None:
        _v.check_out(grad_out, layout.shape, layout.dtype, "grad_out",
                     {"logits": logits, "target": target, "weight": weight})
        view = layout.rows_view(grad_out)
    count, denom = _rule.denominators(tgt, w, ignore_index=opts.ignore_index, prob_target=kind == "probs",
                                      num_classes=C)
    kappa, zeta = _rule.reduction_factors(opts.reduction, count, denom)
    loss_rows = np.zeros(N, dtype=np.float64)
    lse = np.empty(N, dtype=np.float64)
    grad = (np.empty_like(rows) if view is None else view) if with_grad else None
    extra = dict(z_loss=opts.z_loss, z_scale=np.full(N, zeta), softcap=opts.softcap, lse_out=lse)
    k = _kernels()
    if kind == "index":
        n_bad = k.cross_entropy_index(rows, tgt, w, opts.ignore_index, opts.label_smoothing, np.full(N, kappa),
                                      loss_rows, grad, **extra)
        valid = tgt != opts.ignore_index
    else:
        n_bad = k.cross_entropy_probs(rows, tgt, w, opts.label_smoothing, np.full(N, kappa), loss_rows, grad,
                                      **extra)
        valid = None
    _v.check_invalid_rows(n_bad, rows)
    if grad_out is not None:
        if view is None:
            np.copyto(grad_out, layout.from_rows(grad))
        grad = grad_out
    loss, _ = _rule.reduce_rows(loss_rows, _rule.z_loss_rows(lse, opts.z_loss, valid), opts.reduction, count, denom)
    loss = layout.from_batch(loss) if opts.reduction == "none" else layout.dtype.type(loss)
    return loss, grad, layout


def cross_entropy(logits: Any, target: Any, *, weight: Any = None, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
                  softcap: float | None = None, axis: int = -1):
    r"""Cross-entropy between ``softmax(logits)`` and ``target``, as PyTorch computes it.

    Per row, with scores :math:`s = c \tanh(z / c)` (only with ``softcap=c``; else
    :math:`s = z`), :math:`p = \mathrm{log\_softmax}(s)`, smoothing :math:`\varepsilon`,
    class weights :math:`w` (ones when ``None``), z-loss :math:`\zeta` and ``C`` classes:

    .. math::

        \text{index target } y:\quad
        \ell = (1-\varepsilon)\, w_y (-p_y) + \frac{\varepsilon}{C} \sum_c w_c (-p_c)
               + \zeta \operatorname{lse}(s)^2

        \text{probability target } t:\quad
        \ell = -\sum_c w_c \big((1-\varepsilon) t_c + \varepsilon / C\big) p_c
               + \zeta \operatorname{lse}(s)^2

    With ``z_loss=0`` and ``softcap=None`` this is ``torch.nn.functional.cross_entropy``
    for every option. Rows whose index target equals ``ignore_index`` contribute 0.
    ``reduction="mean"`` divides the summed cross-entropy by :math:`\sum_i w_{y_i}` over
    non-ignored rows for index targets, by the number of rows for probability targets
    (PyTorch's convention), and the z-loss by the number of non-ignored rows; a mean over zero
    total weight (e.g. every target ignored) returns NaN, as PyTorch does. A term whose
    coefficient is exactly 0 counts 0 even where a logit is ``-inf`` (PyTorch gives NaN; the
    rule is stated in :mod:`softgrad._cross_entropy_rule`).

    Args:
        logits: ``(N, C)`` with ``axis=-1``, or any shape with the class axis at ``axis``
            (``(N, C, d1, ...)`` with ``axis=1`` as in PyTorch); float16/32/64; ``-inf`` allowed.
        target: integer class indices of the logits' shape without ``axis``, each in
            ``[0, C)`` or equal to ``ignore_index``; or float class probabilities of
            the logits' shape (non-negative, finite; ``ignore_index`` must stay at its
            default, as PyTorch requires).
        weight: optional ``(C,)`` float per-class weights.
        ignore_index: index target value that contributes neither loss nor gradient.
        reduction: ``"mean"`` or ``"sum"`` (a scalar), or ``"none"`` (per-row losses, shape
            of the logits without ``axis``).
        label_smoothing: :math:`\varepsilon \in [0, 1]`.
        z_loss: :math:`\zeta \ge 0` (PaLM's auxiliary loss).
        softcap: ``c > 0`` applies :math:`c \tanh(z / c)` to the logits first (Gemma 2), or None.
        axis: the class axis.

    Returns:
        The loss in the logits' dtype: a NumPy scalar, or an array for ``"none"``.

    Raises:
        TypeError: non-floating ``logits``/``weight``, a target that is neither integer
            nor floating, non-int ``ignore_index``/``axis``, non-real ``label_smoothing``,
            ``z_loss`` or ``softcap``.
        ValueError: NaN/+inf logits, empty logits, an all ``-inf`` slice, a label out of
            range, a target or weight of the wrong shape, negative probability targets,
            a non-default ``ignore_index`` with probability targets, ``ignore_index`` outside
            int64, unknown ``reduction``, ``label_smoothing`` outside ``[0, 1]``, a negative or
            non-finite ``z_loss``, a non-positive or non-finite ``softcap``.

    Examples:
        >>> float(cross_entropy(np.zeros((2, 4)), [1, 3]))  # log 4
        1.3862943611198906
        >>> cross_entropy([[0.0, 0.0], [0.0, 0.0]], [0, -100], reduction="none").round(4)
        array([0.6931, 0.    ])
        >>> float(cross_entropy([[-np.inf, 0.0]], [0], weight=[0.0, 1.0], reduction="sum"))  # 0 * inf counts 0
        0.0
    """
    loss, _, _ = _cross_entropy_rows(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                                     softcap, axis, with_grad=False)
    return loss


def softmax_cross_entropy(logits: Any, target: Any, *, weight: Any = None, ignore_index: int = -100,
                          reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
                          softcap: float | None = None, axis: int = -1, grad_out: np.ndarray | None = None):
    r"""Cross-entropy and its gradient with respect to the logits, in one pass.

    The loss is exactly :func:`cross_entropy` with the same options. The gradient uses
    the fused closed form (no Jacobian): for an unweighted, unsmoothed index target,
    :math:`\partial \ell / \partial z = \mathrm{softmax}(z) - e_y`; in general, with
    :math:`a = \mathrm{softmax}(s)` and :math:`u` the class coefficients (:math:`w` for index
    targets, :math:`w_c((1-\varepsilon) t_c + \varepsilon / C)` for probability targets)

    .. math::

        \frac{\partial \ell}{\partial z} =
        \big(\alpha\, a - \beta\, e_y - \gamma\, u\big) \odot \big(1 - \tanh^2(z / c)\big)

    with :math:`\alpha = \kappa((1-\varepsilon) w_y + \frac{\varepsilon}{C}\sum_c w_c) + 2\zeta'
    \zeta \operatorname{lse}`, :math:`\beta = \kappa (1-\varepsilon) w_y`,
    :math:`\gamma = \kappa \varepsilon / C` (probability targets: :math:`\alpha = \kappa \sum_c u_c +
    2\zeta'\zeta\operatorname{lse}`, :math:`\beta = 0`, :math:`\gamma = \kappa`), the last factor only
    with a softcap, and the reduction's factors :math:`\kappa` (``1/denominator`` for ``"mean"``)
    and :math:`\zeta'` (``1/count`` for ``"mean"``), 1 otherwise.
    With ``reduction="none"`` the gradient returned is that of the **sum** of the
    per-row losses (each row's gradient unscaled). Ignored rows get a zero gradient;
    a mean over zero total weight gives a NaN loss and a zero gradient.

    The logits' values are checked inside the kernel's pass (no separate validation pass).
    With ``grad_out``, a float32/float64 gradient along the last axis is written straight
    into it, so repeated calls allocate nothing of the logits' size; other layouts go
    through a temporary. Argument errors are raised before ``grad_out`` is written; a
    ``ValueError`` about the logits' values (NaN, ``+inf``, an all ``-inf`` slice) is found
    during the pass and leaves ``grad_out`` holding unspecified values.

    Args:
        logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, axis:
            as :func:`cross_entropy`.
        grad_out: optional buffer for the gradient: a writeable, C-contiguous ndarray of the
            logits' shape and dtype that shares no memory with ``logits``, ``target`` or
            ``weight`` (the gradient does not overwrite the logits here: a value error found
            mid-pass would leave them destroyed).

    Returns:
        ``(loss, grad_logits)``: the loss as :func:`cross_entropy` returns it, and the
        gradient with the logits' shape and dtype (``grad_out`` when given).

    Raises:
        TypeError: as :func:`cross_entropy`; ``grad_out`` not an ndarray of the logits' dtype.
        ValueError: as :func:`cross_entropy`; ``grad_out`` of the wrong shape, not
            C-contiguous, read-only, or sharing memory with an input.

    Examples:
        >>> loss, grad = softmax_cross_entropy([[0.0, 0.0]], [1])
        >>> grad
        array([[ 0.5, -0.5]])
    """
    loss, grad, layout = _cross_entropy_rows(logits, target, weight, ignore_index, reduction, label_smoothing,
                                             z_loss, softcap, axis, with_grad=True, grad_out=grad_out)
    return loss, grad if grad_out is not None else layout.from_rows(grad)


def cross_entropy_from_probs(probs: Any, target: Any, *, reduction: str = "mean",
                             ignore_index: int = -100, axis: int = -1, eps: float | None = None):
    r"""Cross-entropy of given probabilities and its gradient ``-y / a``.

    .. math::

        E = -\sum_c y_c \log a_c, \qquad \frac{\partial E}{\partial a_c} = -\frac{y_c}{a_c}

    Clamp: ``a`` is replaced by ``max(a, eps)`` in both the loss and the gradient, so
    ``a_c = 0`` gives the finite loss ``-y_c log(eps)`` and gradient ``-y_c / eps``
    instead of ``inf``/NaN. The default ``eps`` is the smallest normal number of the
    compute dtype (``numpy.finfo(dtype).tiny``), which leaves every ``a_c >= eps``
    untouched. Entries with ``y_c = 0`` contribute 0 to the loss and gradient.

    Args:
        probs: probabilities ``a`` of shape ``(..., C, ...)`` (class axis at ``axis``),
            float16/32/64, finite, non-negative.
        target: integer class indices (the shape without ``axis``; ``ignore_index``
            allowed) or float class probabilities of ``probs``' shape.
        reduction: ``"none"``, ``"mean"`` (over non-ignored rows) or ``"sum"``.
        ignore_index: index target value that contributes neither loss nor gradient.
        axis: the class axis.
        eps: clamp floor, a float in ``(0, 1]``; ``None`` for ``finfo(dtype).tiny``.

    Returns:
        ``(loss, grad_probs)``: loss in ``probs``' dtype (scalar, or per-row array for
        ``"none"``) and ``dE/da`` of ``probs``' shape and dtype, scaled by the reduction
        (``"none"``: gradient of the summed losses). A mean over zero rows is NaN.

    Raises:
        TypeError: non-floating ``probs``; bad target dtype; non-real ``eps``.
        ValueError: negative or non-finite ``probs``, shape mismatch, label out of
            range, unknown ``reduction``, ``eps`` outside ``(0, 1]``.

    Examples:
        >>> loss, grad = cross_entropy_from_probs([[0.25, 0.75]], [1])
        >>> round(float(loss), 6), grad
        (0.287682, array([[ 0.        , -1.33333333]]))
    """
    reduction = _v.check_reduction(reduction)
    ignore_index = _v.check_int(ignore_index, "ignore_index")
    a_in = _v.as_float_array(probs, "probs")
    ax = _v.normalize_axis(axis, a_in.ndim)
    if a_in.size == 0:
        raise ValueError(f"probs is empty (shape {a_in.shape}); need at least one row and one class")
    layout = _v.RowLayout(a_in.shape, ax, a_in.dtype)
    a = layout.to_rows(a_in)
    if (a < 0).any():
        raise ValueError("probs contains negative entries")
    if eps is None:
        eps = float(np.finfo(a.dtype).tiny)
    elif isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating)):
        raise TypeError(f"eps must be a float in (0, 1], got {type(eps).__name__}")
    elif not 0.0 < float(eps) <= 1.0:
        raise ValueError(f"eps must be in (0, 1], got {eps}")
    N, C = a.shape
    kind, tgt = _v.class_target(target, layout, ignore_index)
    if kind == "index":
        valid = tgt != ignore_index
        y = np.zeros((N, C), dtype=np.float64)
        y[np.flatnonzero(valid), tgt[valid]] = 1.0
        denom = float(valid.sum())
    else:
        y = tgt.astype(np.float64)
        denom = float(N)
    a_safe = np.maximum(a.astype(np.float64), float(eps))
    loss_rows = -np.where(y == 0.0, 0.0, y * np.log(a_safe)).sum(axis=1)
    scale = _grad_scale(reduction, denom)
    grad = (0.0 - y / a_safe) * scale  # 0.0 - x keeps y == 0 entries at +0.0
    return _reduce(loss_rows, reduction, denom, layout), layout.from_rows(grad)


def softmax_mse(logits: Any, target: Any, *, axis: int = -1):
    r"""Mean squared error between ``softmax(logits)`` and a target, and its gradient.

    With :math:`a = \mathrm{softmax}(z)` and ``M`` the total number of entries
    (rows times classes), the loss is :math:`L = \frac{1}{M}\sum (a - y)^2`.
    Backward in two closed-form steps: :math:`g = \partial L/\partial a = 2(a - y)/M`,
    then :math:`\partial L/\partial z = a \odot (g - \langle g, a\rangle)` per row
    (:func:`softgrad.softmax_backward`).

    Args:
        logits: shape ``(..., C, ...)`` with the class axis at ``axis``, float16/32/64.
        target: integer class indices (one-hot; the shape without ``axis``) or float
            class probabilities of the logits' shape.
        axis: the class axis.

    Returns:
        ``(loss, grad_logits)``: scalar loss and gradient of the logits' shape, both in
        the logits' dtype.

    Raises:
        TypeError, ValueError: as :func:`cross_entropy` (no ``ignore_index`` here).

    Examples:
        The worked example of the step-by-step softmax derivation (README [D]):
        ``z = [1, 2, 3, 0, 1]``, label 3.

        >>> loss, grad = softmax_mse(np.array([1.0, 2, 3, 0, 1]), 3)
        >>> grad.round(8)
        array([-0.00969502, -0.01434905,  0.0496989 , -0.01595981, -0.00969502])
    """
    rows, layout = _v.logits_rows(logits, axis, check_values=False)
    N, C = rows.shape
    kind, tgt = _v.class_target(target, layout, None)
    if kind == "index":
        y = np.zeros((N, C), dtype=rows.dtype)
        y[np.arange(N), tgt] = 1.0
    else:
        y = tgt
    k = _kernels()
    a = np.empty_like(rows)
    _v.check_invalid_rows(k.softmax(rows, a), rows)
    diff = a.astype(np.float64) - y
    M = float(N * C)
    loss = layout.dtype.type((diff * diff).sum() / M)
    grad_a = (2.0 / M * diff).astype(rows.dtype)
    grad = np.empty_like(rows)
    k.softmax_backward(grad_a, a, grad)
    return loss, layout.from_rows(grad)
