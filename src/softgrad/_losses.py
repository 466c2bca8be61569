"""Losses on softmax outputs and their gradients.

``cross_entropy`` / ``softmax_cross_entropy`` follow ``torch.nn.functional.cross_entropy``
for every option. The per-row work happens in the backend's ``cross_entropy_index`` /
``cross_entropy_probs`` kernels; the reductions (``mean``/``sum``) and their
denominators are O(N) and are done here, passed to the kernel as ``grad_scale``.

Deliberate differences from PyTorch (documented in the functions):

* probability targets: a term with target (times weight) exactly 0 contributes 0 even
  where the logit is ``-inf`` (``0 * log 0 = 0``); PyTorch returns NaN there;
* ``reduction="mean"`` over zero total weight (every target ignored, or all selected
  weights 0): the loss is NaN, as in PyTorch, and the gradient is all zeros.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from softgrad import _validation as _v
from softgrad._backend import kernels as _kernels


def _grad_scale(reduction: str, denom: float) -> float:
    """Factor on each row's gradient: ``1/denom`` for a mean (0 when ``denom`` is 0), else 1."""
    if reduction != "mean":
        return 1.0
    return 1.0 / denom if denom != 0.0 else 0.0


def _reduce(loss_rows: np.ndarray, reduction: str, denom: float, layout: _v.RowLayout):
    """Per-row float64 losses -> the caller's result in the caller's dtype."""
    if reduction == "none":
        return layout.from_batch(loss_rows)
    if reduction == "sum":
        return layout.dtype.type(loss_rows.sum())
    return layout.dtype.type(loss_rows.sum() / denom if denom != 0.0 else np.nan)


def _cross_entropy_rows(logits, target, weight, ignore_index, reduction, label_smoothing,
                        axis, with_grad):
    """Validate, run the kernel, reduce. Returns ``(loss, grad rows or None, layout)``."""
    reduction = _v.check_reduction(reduction)
    label_smoothing = _v.check_label_smoothing(label_smoothing)
    ignore_index = _v.check_int(ignore_index, "ignore_index")
    rows, layout = _v.logits_rows(logits, axis)
    N, C = rows.shape
    kind, tgt = _v.class_target(target, layout, ignore_index)
    if kind == "probs" and ignore_index != -100:
        raise ValueError("ignore_index is not supported with probability targets (as in PyTorch); "
                         f"leave it at -100, got {ignore_index}")
    w = _v.class_weight(weight, C, rows.dtype)
    loss_rows = np.zeros(N, dtype=np.float64)
    grad = np.empty_like(rows) if with_grad else None

    if kind == "index":
        valid = tgt != ignore_index
        # PyTorch's mean divides by the summed weight of the non-ignored targets.
        if w is None:
            denom = float(valid.sum())
        else:
            denom = float(w.astype(np.float64)[tgt[valid]].sum())
    else:
        # For probability targets PyTorch's mean divides by the number of rows.
        denom = float(N)
    grad_scale = np.full(N, _grad_scale(reduction, denom), dtype=np.float64)

    k = _kernels()
    if kind == "index":
        k.cross_entropy_index(rows, tgt, w, ignore_index, label_smoothing, grad_scale, loss_rows, grad)
    else:
        k.cross_entropy_probs(rows, tgt, w, label_smoothing, grad_scale, loss_rows, grad)

    return _reduce(loss_rows, reduction, denom, layout), grad, layout


def cross_entropy(logits: Any, target: Any, *, weight: Any = None, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0, axis: int = -1):
    r"""Cross-entropy between ``softmax(logits)`` and ``target``, as PyTorch computes it.

    With :math:`p = \mathrm{log\_softmax}(z)`, smoothing :math:`\varepsilon`, class
    weights :math:`w` (ones when ``None``) and ``C`` classes, the loss of one row is

    .. math::

        \text{index target } y:\quad
        \ell = (1-\varepsilon)\, w_y (-p_y) + \frac{\varepsilon}{C} \sum_c w_c (-p_c)

        \text{probability target } t:\quad
        \ell = -\sum_c w_c \big((1-\varepsilon) t_c + \varepsilon / C\big) p_c

    Rows whose index target equals ``ignore_index`` have loss 0. ``reduction="mean"``
    divides the summed loss by :math:`\sum_i w_{y_i}` over non-ignored rows for index
    targets, and by the number of rows for probability targets (PyTorch's convention).
    A mean over zero total weight (e.g. every target ignored) returns NaN, as PyTorch does.

    Args:
        logits: ``(N, C)`` with ``axis=-1``, or any shape with the class axis at ``axis``
            (``(N, C, d1, ...)`` with ``axis=1`` as in PyTorch); float16/32/64; ``-inf`` allowed.
        target: integer class indices of the logits' shape without ``axis``, each in
            ``[0, C)`` or equal to ``ignore_index``; or float class probabilities of
            the logits' shape (non-negative, finite; ``ignore_index`` must stay at its
            default, as PyTorch requires).
        weight: optional ``(C,)`` float per-class weights.
        ignore_index: index target value that contributes neither loss nor gradient.
        reduction: ``"none"`` (per-row losses, shape of the logits without ``axis``),
            ``"mean"`` or ``"sum"`` (a scalar).
        label_smoothing: :math:`\varepsilon \in [0, 1]`.
        axis: the class axis.

    Returns:
        The loss in the logits' dtype: a NumPy scalar, or an array for ``"none"``.

    Raises:
        TypeError: non-floating ``logits``/``weight``, a target that is neither integer
            nor floating, non-int ``ignore_index``/``axis``, non-real ``label_smoothing``.
        ValueError: NaN/+inf logits, empty logits, an all ``-inf`` slice, a label out of
            range, a target or weight of the wrong shape, negative probability targets,
            a non-default ``ignore_index`` with probability targets,
            unknown ``reduction``, ``label_smoothing`` outside ``[0, 1]``.

    Examples:
        >>> float(cross_entropy(np.zeros((2, 4)), [1, 3]))  # log 4
        1.3862943611198906
        >>> cross_entropy([[0.0, 0.0], [0.0, 0.0]], [0, -100], reduction="none").round(4)
        array([0.6931, 0.    ])
    """
    loss, _, _ = _cross_entropy_rows(logits, target, weight, ignore_index, reduction,
                                     label_smoothing, axis, with_grad=False)
    return loss


def softmax_cross_entropy(logits: Any, target: Any, *, weight: Any = None, ignore_index: int = -100,
                          reduction: str = "mean", label_smoothing: float = 0.0, axis: int = -1):
    r"""Cross-entropy and its gradient with respect to the logits, in one pass.

    The loss is exactly :func:`cross_entropy` with the same options. The gradient uses
    the fused closed form (no Jacobian): for an unweighted, unsmoothed index target,
    :math:`\partial \ell / \partial z = \mathrm{softmax}(z) - e_y`; in general

    .. math::

        \frac{\partial \ell}{\partial z} =
        \Big((1-\varepsilon) w_y + \frac{\varepsilon}{C}\sum_c w_c\Big) a
        - (1-\varepsilon) w_y e_y - \frac{\varepsilon}{C} w

    (index targets; for probability targets :math:`(\sum_c w_c t'_c)\, a - w \odot t'`),
    scaled by the reduction: ``1/denominator`` for ``"mean"``, 1 for ``"sum"``.
    With ``reduction="none"`` the gradient returned is that of the **sum** of the
    per-row losses (each row's gradient unscaled). Ignored rows get a zero gradient;
    a mean over zero total weight gives a NaN loss and a zero gradient.

    Args:
        logits, target, weight, ignore_index, reduction, label_smoothing, axis:
            as :func:`cross_entropy`.

    Returns:
        ``(loss, grad_logits)``: the loss as :func:`cross_entropy` returns it, and the
        gradient with the logits' shape and dtype.

    Raises:
        TypeError, ValueError: as :func:`cross_entropy`.

    Examples:
        >>> loss, grad = softmax_cross_entropy([[0.0, 0.0]], [1])
        >>> grad
        array([[ 0.5, -0.5]])
    """
    loss, grad, layout = _cross_entropy_rows(logits, target, weight, ignore_index, reduction,
                                             label_smoothing, axis, with_grad=True)
    return loss, layout.from_rows(grad)


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
        The worked example of seed 003 (``z = [1, 2, 3, 0, 1]``, label 3):

        >>> loss, grad = softmax_mse(np.array([1.0, 2, 3, 0, 1]), 3)
        >>> grad.round(8)
        array([-0.00969502, -0.01434905,  0.0496989 , -0.01595981, -0.00969502])
    """
    rows, layout = _v.logits_rows(logits, axis)
    N, C = rows.shape
    kind, tgt = _v.class_target(target, layout, None)
    if kind == "index":
        y = np.zeros((N, C), dtype=rows.dtype)
        y[np.arange(N), tgt] = 1.0
    else:
        y = tgt
    k = _kernels()
    a = np.empty_like(rows)
    k.softmax(rows, a)
    diff = a.astype(np.float64) - y
    M = float(N * C)
    loss = layout.dtype.type((diff * diff).sum() / M)
    grad_a = (2.0 / M * diff).astype(rows.dtype)
    grad = np.empty_like(rows)
    k.softmax_backward(grad_a, a, grad)
    return loss, layout.from_rows(grad)
