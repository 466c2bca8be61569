"""Objective and gradient of the L2-regularised linear softmax model (the estimator's hot path).

This module composes the loss kernel with a linear map; the loss kernel itself
(``cross_entropy_index`` of the active backend, see ``docs/ARCHITECTURE.md``) knows
nothing of weights.

Conventions:
    ``X`` is ``(N, D)`` C-contiguous, ``coef`` is ``(C, D)`` (one row of weights per class,
    scikit-learn's ``coef_`` layout; the logits are ``X @ coef.T + intercept``, ``(N, C)``),
    ``intercept`` is ``(C,)`` or ``None``, ``target`` is ``(N,)`` int64 in ``[0, C)``. ``row_scale`` is the
    per-row weight ``r_i = s_i / sum_j s_j`` as float64 ``(N,)``, so the data term is a
    weighted *mean*. ``X``, ``coef``, ``intercept`` and the work array share one float
    dtype (float32 or float64); sums accumulate in float64.

The objective is::

    J(W, b) = sum_i r_i * loss_i  +  (alpha / 2) * ||W||_F^2
    loss_i  = logsumexp(z_i) - z_{i, y_i},      z_i = W x_i + b      (W = coef)

The intercept ``b`` is not penalised.
"""

from __future__ import annotations

import numpy as np

from softgrad._backend import kernels as _kernels


def objective_and_gradient(coef, intercept, X, target, row_scale, alpha, work, loss_rows,
                           grad_coef_out=None, grad_intercept_out=None):
    """Objective ``J`` and its gradient, using one reusable ``(N, C)`` work array.

    Steps, each writing into a buffer it was given::

        work  = X @ coef.T (+ intercept)                     logits, (N, C)
        work  = r_i * (softmax(work_i) - onehot(y_i))        in place, by the loss kernel
        gW    = work.T @ X + alpha * coef                    (C, D)
        gb    = sum_i work_i                                 (C,)

    Derivation: ``d loss_i / d z_i = softmax(z_i) - e_{y_i}`` (the fused cross-entropy
    gradient), so ``dJ/dz_i = r_i (softmax(z_i) - e_{y_i}) =: G_i`` (row ``i`` of ``G``,
    ``(N, C)``); by the chain rule through ``z = X W^T + 1 b^T``,
    ``dJ/dW = G^T X + alpha W`` and ``dJ/db = G^T 1``.

    ``G^T X`` is computed as written, ``work.T @ X`` into a C-contiguous ``(C, D)``
    result: with OpenBLAS this is up to twice as fast as ``(X.T @ work).T``.

    Args:
        coef: ``(C, D)`` weights.
        intercept: ``(C,)`` or ``None`` (no intercept).
        X: ``(N, D)`` C-contiguous data, ``coef``'s dtype.
        target: ``(N,)`` int64 class indices in ``[0, C)``.
        row_scale: ``(N,)`` float64 normalised sample weights ``r_i`` (summing to 1).
        alpha: L2 strength ``>= 0``.
        work: ``(N, C)`` C-contiguous buffer of ``coef``'s dtype; overwritten.
        loss_rows: ``(N,)`` float64 buffer; receives the unweighted per-row losses.
        grad_coef_out: optional C-contiguous ``(C, D)`` buffer for the weight gradient.
        grad_intercept_out: optional ``(C,)`` buffer for the intercept gradient.

    Returns:
        ``(objective, grad_coef, grad_intercept)``: a Python float, ``(C, D)`` and
        ``(C,)`` arrays (``grad_intercept`` is ``None`` without an intercept).

    Examples:
        >>> X = np.array([[1.0, 0.0], [0.0, 1.0]]); y = np.array([0, 1])
        >>> W = np.zeros((3, 2)); b = np.zeros(3)
        >>> J, gW, gb = objective_and_gradient(W, b, X, y, np.full(2, 0.5), 0.0,
        ...                                    np.empty((2, 3)), np.empty(2))
        >>> round(J, 6) == round(float(np.log(3)), 6)
        True
        >>> gb
        array([-0.16666667, -0.16666667,  0.33333333])
    """
    np.matmul(X, coef.T, out=work)
    if intercept is not None:
        np.add(work, intercept, out=work)
    _kernels().cross_entropy_index(work, target, None, -100, 0.0, row_scale, loss_rows, work)
    data_term = float(np.dot(loss_rows, row_scale))
    if grad_coef_out is None:
        grad_coef_out = np.empty_like(coef)
    np.matmul(work.T, X, out=grad_coef_out)
    penalty = 0.0
    if alpha:
        penalty = 0.5 * alpha * float(np.vdot(coef, coef))
        grad_coef_out += alpha * coef
    grad_intercept = None
    if intercept is not None:
        grad_intercept = np.sum(work, axis=0, out=grad_intercept_out, dtype=None)
    return data_term + penalty, grad_coef_out, grad_intercept


def objective_reference(coef, intercept, X, target, sample_weight, alpha):
    """Readable float64 reference of :func:`objective_and_gradient` (allocates freely).

    Args:
        coef: ``(C, D)``; intercept: ``(C,)`` or ``None``; X: ``(N, D)``;
        target: ``(N,)`` ints; sample_weight: ``(N,)`` non-negative or ``None``; alpha: float.

    Returns:
        ``(objective, grad_coef (C, D), grad_intercept (C,) or None)`` in float64.

    Examples:
        >>> J, gW, gb = objective_reference(np.zeros((2, 1)), np.zeros(2), np.ones((4, 1)),
        ...                                 np.array([0, 1, 1, 1]), None, 0.0)
        >>> round(J, 6), gb
        (0.693147, array([ 0.25, -0.25]))
    """
    W = np.asarray(coef, dtype=np.float64)
    X = np.asarray(X, dtype=np.float64)
    N = X.shape[0]
    s = np.ones(N) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    r = s / s.sum()
    z = X @ W.T
    if intercept is not None:
        z = z + np.asarray(intercept, dtype=np.float64)
    m = z.max(axis=1, keepdims=True)
    log_p = (z - m) - np.log(np.exp(z - m).sum(axis=1, keepdims=True))
    rows = np.arange(N)
    J = float(-(r * log_p[rows, target]).sum() + 0.5 * alpha * (W * W).sum())
    G = np.exp(log_p)
    G[rows, target] -= 1.0
    G *= r[:, None]
    gW = G.T @ X + alpha * W
    gb = None if intercept is None else G.sum(axis=0)
    return J, gW, gb


def lipschitz_bound(X, row_scale, alpha, fit_intercept, *, iterations=30, seed=0):
    """Upper estimate ``L`` of the gradient's Lipschitz constant, for the step ``1 / L``.

    The Hessian of ``sum_i r_i loss_i`` in ``(W, b)`` is ``sum_i r_i (x~_i x~_i^T) (x) H_i``
    with ``x~_i = [x_i, 1]`` and ``H_i = diag(p_i) - p_i p_i^T``, whose largest eigenvalue
    is at most ``1/2``. Hence ``L <= lambda_max(X~^T R X~) / 2 + alpha``. ``lambda_max`` is
    estimated by power iteration (``iterations`` products with ``X`` and ``X^T``, no
    ``(D, D)`` matrix) and inflated by 10% because power iteration approaches it from below.

    Returns:
        float ``L > 0``.

    Examples:
        >>> L = lipschitz_bound(np.eye(3), np.full(3, 1 / 3), 0.0, False)
        >>> 0.5 / 3 <= L <= 1.1 * 0.5 / 3 + 1e-12
        True
    """
    X = np.asarray(X)
    N, D = X.shape
    r = np.asarray(row_scale, dtype=np.float64)
    v = np.random.default_rng(seed).normal(size=D + int(fit_intercept))
    lam = 0.0
    for _ in range(iterations):
        v /= np.linalg.norm(v)
        u = X @ v[:D] + (v[D] if fit_intercept else 0.0)  # X~ v, (N,)
        u *= r
        w = X.T @ u
        if fit_intercept:
            w = np.append(w, u.sum())
        lam = float(np.linalg.norm(w))
        v = w
        if lam == 0.0:
            break
    return 1.1 * 0.5 * lam + float(alpha) + 1e-12
