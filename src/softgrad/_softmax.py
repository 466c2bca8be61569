"""Softmax, log-softmax, log-sum-exp, the softmax Jacobian and its backward pass.

Each function validates its input (:mod:`softgrad._validation`), brings it to
C-contiguous ``(N, C)`` rows with the class axis last, calls the kernel of the same
name in the active backend (:func:`softgrad._backend.kernels`) and restores the
caller's layout and dtype. Inputs are never modified.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from softgrad import _validation as _v
from softgrad._backend import kernels as _kernels


def softmax(logits: Any, axis: int = -1) -> np.ndarray:
    r"""Numerically stable softmax along ``axis``.

    .. math::

        \mathrm{softmax}(z)_k = \frac{e^{z_k}}{\sum_j e^{z_j}} = e^{z_k - \mathrm{lse}(z)}

    Computed as ``exp(z - lse(z))`` with ``lse`` shifted by the row maximum, so it never
    overflows; ``-inf`` logits get probability exactly 0.

    Args:
        logits: array-like of shape ``(..., C, ...)``, float16/32/64; ``-inf`` allowed.
        axis: the class axis (default last).

    Returns:
        Array of the logits' shape and dtype; every slice along ``axis`` sums to 1.

    Raises:
        TypeError: ``logits`` is not floating (integer, bool, complex), or ``axis`` not int.
        ValueError: ``logits`` has NaN/+inf, is empty, is a scalar, has a slice that is
            entirely ``-inf``; ``axis`` out of range.

    Examples:
        >>> softmax([1.0, 1.0, -np.inf])
        array([0.5, 0.5, 0. ])
        >>> softmax(np.array([[1000.0, 0.0]]), axis=1).round(6)
        array([[1., 0.]])
    """
    rows, layout = _v.logits_rows(logits, axis)
    out = np.empty_like(rows)
    _kernels().softmax(rows, out)
    return layout.from_rows(out)


def log_softmax(logits: Any, axis: int = -1) -> np.ndarray:
    r"""Numerically stable log-softmax along ``axis``.

    .. math::

        \mathrm{log\_softmax}(z)_k = z_k - \log \sum_j e^{z_j}

    Computed as ``z - lse(z)`` (never as ``log(softmax(z))``, which underflows to
    ``-inf`` for very negative logits).

    Args:
        logits: array-like of shape ``(..., C, ...)``, float16/32/64; ``-inf`` allowed.
        axis: the class axis (default last).

    Returns:
        Array of the logits' shape and dtype (``-inf`` where the logit is ``-inf``).

    Raises:
        TypeError, ValueError: as :func:`softmax`.

    Examples:
        >>> log_softmax([0.0, 0.0]).round(6)
        array([-0.693147, -0.693147])
        >>> log_softmax([0.0, -1e4])
        array([     0., -10000.])
    """
    rows, layout = _v.logits_rows(logits, axis)
    out = np.empty_like(rows)
    _kernels().log_softmax(rows, out)
    return layout.from_rows(out)


def logsumexp(logits: Any, axis: int = -1, keepdims: bool = False) -> np.ndarray:
    r"""Stable :math:`\log \sum_k e^{z_k}` along ``axis``.

    .. math::

        \mathrm{lse}(z) = m + \log \sum_k e^{z_k - m}, \qquad m = \max_k z_k

    Args:
        logits: array-like of shape ``(..., C, ...)``, float16/32/64; ``-inf`` allowed.
        axis: the axis reduced (default last).
        keepdims: keep the reduced axis with length 1.

    Returns:
        Array of the logits' shape without ``axis`` (or with it of length 1 when
        ``keepdims``), in the logits' dtype; a 0-d array for 1-D input.

    Raises:
        TypeError, ValueError: as :func:`softmax`.

    Examples:
        >>> round(float(logsumexp([1e4, 1e4])), 6)  # 1e4 + log 2, no overflow
        10000.693147
        >>> logsumexp(np.zeros((2, 3)), axis=0, keepdims=True).shape
        (1, 3)
    """
    rows, layout = _v.logits_rows(logits, axis)
    out = np.empty(rows.shape[0], dtype=rows.dtype)
    _kernels().logsumexp(rows, out)
    result = layout.from_batch(out)
    if keepdims:
        result = np.expand_dims(result, layout.axis)
    return result


def softmax_jacobian(logits: Any, axis: int = -1) -> np.ndarray:
    r"""The Jacobian of softmax, :math:`J_{ij} = \partial S_i / \partial z_j = S_i(\delta_{ij} - S_j)`.

    Derivation (quotient rule on :math:`S_i = e^{z_i} / \sum_k e^{z_k}`): for
    :math:`i = j`, :math:`S_i - S_i^2`; for :math:`i \ne j`, :math:`-S_i S_j`.

    Args:
        logits: array-like of shape ``(..., C, ...)`` with the class axis at ``axis``.
        axis: the class axis (default last).

    Returns:
        Array of shape ``batch + (C, C)`` where ``batch`` is the logits' shape without
        ``axis`` (the class axis moves to the end and becomes two axes), logits' dtype.
        ``J`` is symmetric and each of its rows sums to 0.

    Raises:
        TypeError, ValueError: as :func:`softmax`.

    Examples:
        >>> softmax_jacobian([0.0, 0.0])
        array([[ 0.25, -0.25],
               [-0.25,  0.25]])
    """
    rows, layout = _v.logits_rows(logits, axis)
    a = np.empty_like(rows)
    _kernels().softmax(rows, a)
    C = layout.num_classes
    a = a.astype(np.float64)
    jac = a[:, :, None] * (np.eye(C)[None] - a[:, None, :])
    return jac.reshape(layout.batch_shape + (C, C)).astype(layout.dtype)


def softmax_backward(grad_probs: Any, probs: Any, axis: int = -1) -> np.ndarray:
    r"""Gradient with respect to the logits given ``dL/da`` and ``a = softmax(z)``.

    .. math::

        \frac{\partial L}{\partial z_k} = a_k \Big(g_k - \sum_j g_j a_j\Big),
        \qquad g = \partial L / \partial a

    This is the vector-Jacobian product :math:`J^\top g` without forming the
    ``C x C`` Jacobian (``J`` is symmetric).

    Args:
        grad_probs: upstream gradient ``g``, any shape, float16/32/64, finite.
        probs: softmax output ``a`` of the same shape, finite.
        axis: the class axis (default last).

    Returns:
        Array of the common shape; dtype is the wider of the two inputs' dtypes.

    Raises:
        TypeError: a non-floating input, or ``axis`` not int.
        ValueError: non-finite entries, empty input, shape mismatch, ``axis`` out of range.

    Examples:
        >>> softmax_backward([1.0, 0.0], [0.5, 0.5])
        array([ 0.25, -0.25])
    """
    a = _v.as_float_array(probs, "probs")
    g = _v.as_float_array(grad_probs, "grad_probs")
    if g.shape != a.shape:
        raise ValueError(f"grad_probs must have the shape of probs {a.shape}, got {g.shape}")
    ax = _v.normalize_axis(axis, a.ndim)
    if a.size == 0:
        raise ValueError(f"probs is empty (shape {a.shape})")
    layout = _v.RowLayout(a.shape, ax, np.result_type(a.dtype, g.dtype))
    a_rows = layout.to_rows(a)
    g_rows = layout.to_rows(g)
    out = np.empty_like(a_rows)
    _kernels().softmax_backward(g_rows, a_rows, out)
    return layout.from_rows(out)
