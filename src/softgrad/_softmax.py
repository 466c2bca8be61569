"""Softmax, log-softmax, log-sum-exp, the softmax Jacobian and its backward pass.

Each function validates its arguments (:mod:`softgrad._validation`), brings the input to
C-contiguous ``(N, C)`` rows with the class axis last, calls the kernel of the same
name in the active backend (:func:`softgrad._backend.kernels`) and restores the
caller's layout and dtype. The kernel checks the logits' values in its own pass and
returns the count of invalid rows, so no separate pass reads the logits. Inputs are
never modified; they may be read-only or memory-mapped.

Output buffers (``out=``): a writeable, C-contiguous array of exactly the result's
shape and dtype that shares no memory with an input; argument errors are raised before
anything is written. With the class axis last and a float32/float64 result the kernel
writes straight into ``out`` (nothing of the input's size is allocated); otherwise the
result goes through a temporary. A ``ValueError`` about the logits' values (NaN,
``+inf``, an all ``-inf`` slice) is found during the pass, so ``out`` then holds
unspecified values.

SciPy (``scipy.special``): ``softmax``, ``log_softmax`` and ``logsumexp`` take
``axis=None`` and tuples of axes, and ``logsumexp`` takes ``b`` and ``return_sign``, as
SciPy's do. Differences, by design: the default ``axis`` is ``-1`` (SciPy's is None);
integer, bool and complex input raise ``TypeError`` (SciPy promotes them); NaN and
``+inf`` logits raise ``ValueError`` (SciPy returns NaN / ``inf``), as does an all
``-inf`` slice for ``softmax``/``log_softmax`` (SciPy returns NaN); ``logsumexp`` of a
negative weighted sum without ``return_sign`` raises (SciPy returns NaN); a 1-D input's
``logsumexp`` is a 0-d array (SciPy returns a NumPy scalar).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from softgrad import _validation as _v
from softgrad._backend import kernels as _kernels


def _logits_kernel(kernel, logits: Any, axis: Any, out: Any) -> np.ndarray:
    """Validate, run a ``(logits, out (N, C))`` kernel, raise on invalid rows, return the result."""
    rows, layout = _v.logits_rows(logits, axis, check_values=False, axes_ok=True)
    if out is not None:
        _v.check_out(out, layout.shape, layout.dtype, "out", {"logits": logits})
    view = None if out is None else layout.rows_view(out)
    result_rows = np.empty_like(rows) if view is None else view
    _v.check_invalid_rows(kernel(rows, result_rows), rows)
    if view is not None:
        return out
    result = layout.from_rows(result_rows)
    if out is None:
        return result
    np.copyto(out, result)
    return out


def softmax(logits: Any, axis: Any = -1, *, out: np.ndarray | None = None) -> np.ndarray:
    r"""Numerically stable softmax along ``axis``.

    .. math::

        \mathrm{softmax}(z)_k = \frac{e^{z_k}}{\sum_j e^{z_j}} = e^{z_k - \mathrm{lse}(z)}

    Computed as ``exp(z - lse(z))`` with ``lse`` shifted by the row maximum, so it never
    overflows; ``-inf`` logits get probability exactly 0.

    Args:
        logits: array-like of shape ``(..., C, ...)``, float16/32/64; ``-inf`` allowed.
        axis: the class axis (default last); a tuple of axes, or None for all of them,
            makes each slice span those axes (SciPy's convention).
        out: optional result buffer (see the module docstring): the logits' shape and dtype.

    Returns:
        Array of the logits' shape and dtype (``out`` when given); every slice along
        ``axis`` sums to 1.

    Raises:
        TypeError: ``logits`` is not floating (integer, bool, complex), ``axis`` is not an
            int, tuple of ints or None, ``out`` is not an ndarray of the logits' dtype.
        ValueError: ``logits`` has NaN/+inf, is empty, is a scalar (with an int ``axis``),
            has a slice that is entirely ``-inf``; ``axis`` out of range or repeated;
            ``out`` of the wrong shape, not C-contiguous, read-only, or sharing memory
            with ``logits``.

    Examples:
        >>> softmax([1.0, 1.0, -np.inf])
        array([0.5, 0.5, 0. ])
        >>> softmax(np.array([[1000.0, 0.0]]), axis=1).round(6)
        array([[1., 0.]])
        >>> softmax(np.zeros((2, 2)), axis=None)
        array([[0.25, 0.25],
               [0.25, 0.25]])
    """
    return _logits_kernel(_kernels().softmax, logits, axis, out)


def log_softmax(logits: Any, axis: Any = -1, *, out: np.ndarray | None = None) -> np.ndarray:
    r"""Numerically stable log-softmax along ``axis``.

    .. math::

        \mathrm{log\_softmax}(z)_k = z_k - \log \sum_j e^{z_j}

    Computed as ``z - lse(z)`` (never as ``log(softmax(z))``, which underflows to
    ``-inf`` for very negative logits).

    Args:
        logits: array-like of shape ``(..., C, ...)``, float16/32/64; ``-inf`` allowed.
        axis: the class axis (default last), a tuple of axes, or None: as :func:`softmax`.
        out: optional result buffer, as :func:`softmax`.

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
    return _logits_kernel(_kernels().log_softmax, logits, axis, out)


def logsumexp(logits: Any, axis: Any = -1, b: Any = None, keepdims: bool = False,
              return_sign: bool = False):
    r"""Stable :math:`\log \sum_k b_k e^{z_k}` along ``axis`` (SciPy's ``logsumexp``).

    .. math::

        \mathrm{lse}(z) = m + \log \sum_k e^{z_k - m}, \qquad m = \max_k z_k

    With scale factors ``b`` the sum is :math:`S = \sum_k b_k e^{z_k}`, computed as
    :math:`e^{m} \sum_k b_k e^{z_k - m}` with ``m`` the maximum over the entries whose
    :math:`b_k \ne 0` (an entry with :math:`b_k = 0` contributes nothing, also where
    :math:`z_k = -\infty`); the result is :math:`\log |S|` and, with ``return_sign``,
    :math:`\mathrm{sign}(S) \in \{-1, 0, 1\}`. A slice with no term (every :math:`z_k` is
    ``-inf``, or every :math:`b_k = 0`) or with :math:`S = 0` gives ``-inf`` (sign 0).

    Without ``b`` the kernel of the active backend does the work (one pass, float64 sums);
    with ``b`` it is a float64 NumPy computation with temporaries of the input's size.

    Args:
        logits: array-like ``z``, float16/32/64; ``-inf`` allowed.
        axis: the axis reduced (default last), a tuple of axes, or None for all of them.
        b: optional real scale factors (negative allowed, integers too), broadcastable
            against ``logits``; the two are broadcast to one shape first.
        keepdims: keep the reduced axes with length 1.
        return_sign: also return the sign of ``S``.

    Returns:
        ``lse``, or ``(lse, sign)`` with ``return_sign``: arrays of the (broadcast) shape
        without the reduced axes (with them of length 1 when ``keepdims``), in the logits'
        dtype, or with ``b`` NumPy's promotion of the two dtypes (as SciPy: float32 logits
        with an int64 ``b`` give float64); a 0-d array when every axis is reduced.

    Raises:
        TypeError: non-floating ``logits``, non-real ``b``, a bad ``axis`` type.
        ValueError: NaN or ``+inf`` in ``logits``, non-finite ``b``, empty input, an
            ``axis`` out of range or repeated, ``b`` not broadcastable, or (without
            ``return_sign``) a negative ``S``, whose log is undefined.

    Examples:
        >>> round(float(logsumexp([1e4, 1e4])), 6)  # 1e4 + log 2, no overflow
        10000.693147
        >>> logsumexp(np.zeros((2, 3)), axis=0, keepdims=True).shape
        (1, 3)
        >>> lse, sign = logsumexp([1.0, 2.0], b=[1.0, -1.0], return_sign=True)
        >>> round(float(lse), 6), float(sign)  # log(e^2 - e^1), negative sum
        (1.541325, -1.0)
        >>> float(logsumexp([-np.inf, -np.inf]))
        -inf
    """
    if b is not None:
        lse, sign, layout = _weighted_logsumexp(logits, axis, b)
    else:
        rows, layout = _v.logits_rows(logits, axis, check_values=False, axes_ok=True)
        lse = np.empty(rows.shape[0], dtype=rows.dtype)
        n_bad = _kernels().logsumexp(rows, lse)
        if n_bad:
            # NaN and +inf raise; the remaining invalid rows are all -inf, whose lse is -inf
            bad = ~np.isfinite(rows.max(axis=1))
            _raise_nan_or_posinf(rows[bad])
            lse[bad] = -np.inf
        sign = np.where(lse == -np.inf, 0.0, 1.0)
    if not return_sign and (sign < 0).any():
        raise ValueError(f"the weighted sum sum(b * exp(logits)) is negative in {int((sign < 0).sum())} slice(s), "
                         f"so its log is undefined; pass return_sign=True for log|sum| and its sign")
    result = layout.from_batch(lse)
    sign = sign.reshape(layout.batch_shape).astype(result.dtype)
    if keepdims:
        result = np.expand_dims(result, layout.axes)
        sign = np.expand_dims(sign, layout.axes)
    return (result, sign) if return_sign else result


def _raise_nan_or_posinf(rows: np.ndarray) -> None:
    if np.isnan(rows).any():
        raise ValueError("logits contains NaN")
    if np.isposinf(rows).any():
        raise ValueError("logits contains +inf")


def _weighted_logsumexp(logits: Any, axis: Any, b: Any):
    """``(log|S|, sign S, layout)`` per slice for :func:`logsumexp` with scale factors ``b``."""
    a = _v.as_float_array(logits, "logits", check_values=False)
    try:
        w = np.asarray(b)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"b must be an array of real numbers, got {type(b).__name__}") from exc
    if w.dtype == np.bool_ or not (np.issubdtype(w.dtype, np.floating) or np.issubdtype(w.dtype, np.integer)):
        raise TypeError(f"b must have a real (integer or floating) dtype, got dtype {w.dtype}")
    if np.issubdtype(w.dtype, np.floating) and w.size and not np.isfinite(w).all():
        raise ValueError("b contains NaN or an infinity")
    try:
        a, w = np.broadcast_arrays(a, w)
    except ValueError as exc:
        raise ValueError(f"b of shape {w.shape} does not broadcast against logits of shape {a.shape}") from exc
    dtype = np.result_type(a.dtype, w.dtype)  # NumPy's promotion, as SciPy: float32 with int64 is float64
    layout = dataclasses.replace(_v.layout_for(a, axis), dtype=np.dtype(dtype))
    if a.size == 0:
        raise ValueError(f"logits is empty (shape {a.shape}); need at least one row and one class")
    z = layout.to_rows(a, np.float64)
    _raise_nan_or_posinf(z)
    scale = layout.to_rows(w, np.float64)
    z = np.where(scale == 0.0, -np.inf, z)  # a zero factor removes the term, whatever z is
    m = z.max(axis=1)
    empty = m == -np.inf
    m_safe = np.where(empty, 0.0, m)
    total = (scale * np.exp(z - m_safe[:, None])).sum(axis=1)
    sign = np.sign(total)
    with np.errstate(divide="ignore"):
        lse = np.where(empty | (total == 0.0), -np.inf, m_safe + np.log(np.abs(total)))
    sign = np.where(empty, 0.0, sign)
    return lse, sign, layout


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
        ValueError: the result (``N * C * C`` float64 entries while it is built) would
            exceed ``softgrad._validation.MAX_RESULT_BYTES`` (4 GiB); the message says how
            big it would be. Checked before anything is computed; use
            :func:`softmax_backward` for a Jacobian-vector product instead.

    Examples:
        >>> softmax_jacobian([0.0, 0.0])
        array([[ 0.25, -0.25],
               [-0.25,  0.25]])
    """
    arr = _v.as_float_array(logits, "logits", check_values=False)
    ax = _v.normalize_axis(axis, arr.ndim)
    C = arr.shape[ax]
    # checked before any work: the float64 intermediate has N * C * C entries
    _v.check_result_size((arr.size // C if C else 0) * C * C, 8,
                         f"softmax_jacobian of logits with shape {arr.shape} (C={C} along axis {axis})")
    rows, layout = _v.logits_rows(arr, ax, check_values=False)
    a = np.empty_like(rows)
    _v.check_invalid_rows(_kernels().softmax(rows, a), rows)
    a = a.astype(np.float64)
    jac = a[:, :, None] * (np.eye(C)[None] - a[:, None, :])
    return jac.reshape(layout.batch_shape + (C, C)).astype(layout.dtype)


def softmax_backward(grad_probs: Any, probs: Any, axis: int = -1, *, out: np.ndarray | None = None) -> np.ndarray:
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
        out: optional result buffer (see the module docstring) of the common shape and the
            result's dtype; it must share no memory with either input.

    Returns:
        Array of the common shape (``out`` when given); dtype is the wider of the two
        inputs' dtypes.

    Raises:
        TypeError: a non-floating input, ``axis`` not int, ``out`` not an ndarray of the
            result's dtype.
        ValueError: non-finite entries (found by the kernel: a row's ``<g, a>`` is finite
            exactly when its entries are, unless their products overflow), empty input, shape
            mismatch, ``axis`` out of range, a bad ``out`` (as :func:`softmax`).

    Examples:
        >>> softmax_backward([1.0, 0.0], [0.5, 0.5])
        array([ 0.25, -0.25])
    """
    a = _v.as_float_array(probs, "probs", check_values=False)
    g = _v.as_float_array(grad_probs, "grad_probs", check_values=False)
    if g.shape != a.shape:
        raise ValueError(f"grad_probs must have the shape of probs {a.shape}, got {g.shape}")
    ax = _v.normalize_axis(axis, a.ndim)
    if a.size == 0:
        raise ValueError(f"probs is empty (shape {a.shape})")
    layout = _v.RowLayout(a.shape, ax, np.result_type(a.dtype, g.dtype))
    if out is not None:
        _v.check_out(out, layout.shape, layout.dtype, "out", {"probs": probs, "grad_probs": grad_probs})
    a_rows = layout.to_rows(a)
    g_rows = layout.to_rows(g)
    view = None if out is None else layout.rows_view(out)
    result = np.empty_like(a_rows) if view is None else view
    if _kernels().softmax_backward(g_rows, a_rows, result):
        # a non-finite dot: name the bad entries (none if only finite products overflowed)
        _v.as_float_array(a, "probs")
        _v.as_float_array(g, "grad_probs")
    if view is not None:
        return out
    if out is None:
        return layout.from_rows(result)
    np.copyto(out, layout.from_rows(result))
    return out
