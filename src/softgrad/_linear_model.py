"""Objective and gradient of the L2-regularised linear softmax model (the estimator's hot path).

This module composes the loss kernel with a linear map; the loss kernel itself
(``cross_entropy_index`` of the active backend, see ``docs/ARCHITECTURE.md``) knows
nothing of weights.

Conventions:
    ``X`` is ``(N, D)``: a C-contiguous ndarray or a SciPy sparse CSR/CSC matrix (or
    array), float32 or float64, int32 or int64 indices. ``coef`` is ``(C, D)`` (one row
    of weights per class, scikit-learn's ``coef_`` layout; the logits are
    ``X @ coef.T + intercept``, ``(N, C)``), ``intercept`` is ``(C,)`` or ``None``,
    ``target`` is ``(N,)`` int64 in ``[0, C)``. ``row_scale`` is the per-row weight
    ``r_i = s_i / sum_j s_j`` as float64 ``(N,)``, so the data term is a weighted
    *mean*. ``coef``, ``intercept`` and the work array share one float dtype, the
    *compute dtype*; ``X`` has that dtype or is float32 under a float64 compute dtype,
    in which case it is cast to float64 one block of rows at a time (about ``2**20``
    entries; no float64 copy of ``X`` is made). Sums accumulate in float64.

The objective is::

    J(W, b) = sum_i r_i * loss_i  +  (alpha / 2) * ||W||_F^2
    loss_i  = logsumexp(z_i) - z_{i, y_i},      z_i = W x_i + b      (W = coef)

With ``binary=True`` the model has one logit per row (``coef`` ``(1, D)``, ``target``
in ``{0, 1}``) and the loss is the logistic one, scikit-learn's binary
``LogisticRegression``::

    loss_i = log(1 + exp(z_i)) - y_i z_i,      d loss_i / d z_i = sigmoid(z_i) - y_i

The intercept ``b`` is not penalised.
"""

from __future__ import annotations

import sys

import numpy as np

from softgrad._backend import kernels as _kernels

# entries of X per block when float32 X is cast to float64 (8 MiB of float64)
_BLOCK_ENTRIES = 1 << 20


def is_sparse(X) -> bool:
    """Whether ``X`` is a SciPy sparse matrix or array (without importing SciPy)."""
    sp = sys.modules.get("scipy.sparse")
    return sp is not None and sp.issparse(X)


def _blocks(X, dtype):
    """``(rows, X_block)`` pairs covering ``X``, each block in ``dtype``.

    ``X`` already in ``dtype`` is one block, itself. float32 X under float64 is cast
    block by block: dense into one reused ``(rows, D)`` buffer, CSR by slicing rows.
    A CSC matrix (whose row slices cost a pass over all of it) is one block; SciPy's
    product then casts its data to float64 inside each product.
    """
    N, D = X.shape
    if X.dtype == dtype or N == 0:
        yield slice(0, N), X
        return
    if is_sparse(X):
        if X.format != "csr":
            yield slice(0, N), X
            return
        rows = max(1, int(_BLOCK_ENTRIES * N / max(X.nnz, 1)))
        for start in range(0, N, rows):
            sl = slice(start, min(start + rows, N))
            yield sl, X[sl].astype(dtype)
        return
    rows = max(1, _BLOCK_ENTRIES // max(D, 1))
    buf = np.empty((min(rows, N), D), dtype=dtype)
    for start in range(0, N, rows):
        sl = slice(start, min(start + rows, N))
        xb = buf[:sl.stop - sl.start]
        np.copyto(xb, X[sl])
        yield sl, xb


def _xwt_into(Xb, coef, out):
    """``out = Xb @ coef.T`` (``out`` is C-contiguous ``(n, C)``).

    CSR ``Xb`` goes to the backend's row-parallel kernel (with ``coef.T`` made
    contiguous, ``(D, C)``: each stored entry reads one contiguous row of it); CSC to SciPy.
    """
    if is_sparse(Xb):
        if Xb.format == "csr" and Xb.dtype == out.dtype:
            _kernels().csr_dense_matmul(Xb.data, Xb.indices, Xb.indptr, np.ascontiguousarray(coef.T), out)
        else:
            out[...] = Xb @ coef.T
    else:
        np.matmul(Xb, coef.T, out=out)


def _gtx_into(G, Xb, out):
    """``out = G.T @ Xb``, ``(C, D)``; CSR ``Xb`` by the backend's kernel, CSC as SciPy's ``(Xb.T @ G).T``."""
    if is_sparse(Xb):
        if Xb.format == "csr" and Xb.dtype == out.dtype:
            _kernels().csr_transpose_matmul(Xb.data, Xb.indices, Xb.indptr, G, out)
        else:
            out[...] = (Xb.T @ G).T
    else:
        np.matmul(G.T, Xb, out=out)


def _loss_and_dz(work, target, row_scale, loss_rows, binary, with_grad):
    """Per-row losses into ``loss_rows``; with ``with_grad``, ``work = r_i d loss_i / d z_i`` in place."""
    if not binary:
        _kernels().cross_entropy_index(work, target, None, -100, 0.0,
                                      row_scale if with_grad else np.zeros(target.shape[0]),
                                      loss_rows, work if with_grad else None)
        return
    z = work[:, 0].astype(np.float64)
    y = target.astype(np.float64)
    # log(1 + e^z) - y z, and sigmoid(z) = exp(-log(1 + e^-z)); both stable for any z
    np.subtract(np.logaddexp(0.0, z), y * z, out=loss_rows)
    if with_grad:
        p = np.exp(-np.logaddexp(0.0, -z))
        work[:, 0] = row_scale * (p - y)


def objective_and_gradient(coef, intercept, X, target, row_scale, alpha, work, loss_rows,
                           grad_coef_out=None, grad_intercept_out=None, *, binary=False):
    """Objective ``J`` and its gradient, using one reusable ``(N, C)`` work array.

    Steps, each writing into a buffer it was given::

        work  = X @ coef.T (+ intercept)                     logits, (N, C)
        work  = r_i * (softmax(work_i) - onehot(y_i))        in place, by the loss kernel
        gW    = work.T @ X + alpha * coef                    (C, D)
        gb    = sum_i work_i                                 (C,)

    Derivation: ``d loss_i / d z_i = softmax(z_i) - e_{y_i}`` (the fused cross-entropy
    gradient), so ``dJ/dz_i = r_i (softmax(z_i) - e_{y_i}) =: G_i`` (row ``i`` of ``G``,
    ``(N, C)``); by the chain rule through ``z = X W^T + 1 b^T``,
    ``dJ/dW = G^T X + alpha W`` and ``dJ/db = G^T 1``. With ``binary=True``,
    ``C = 1`` and ``G_i = r_i (sigmoid(z_i) - y_i)``.

    ``G^T X`` is computed as written, ``work.T @ X`` into a C-contiguous ``(C, D)``
    result: with OpenBLAS this is up to twice as fast as ``(X.T @ work).T``. For CSR
    ``X`` both products are the backend's ``csr_dense_matmul`` / ``csr_transpose_matmul``
    (Numba: parallel over rows; NumPy backend: SciPy's); for CSC ``X`` SciPy's.
    float32 ``X`` under float64 ``coef`` runs block by block (see the module
    docstring): logits, loss kernel and gradient for one block of rows, then the next.

    Args:
        coef: ``(C, D)`` weights (the compute dtype).
        intercept: ``(C,)`` or ``None`` (no intercept).
        X: ``(N, D)`` dense C-contiguous or sparse CSR/CSC data, ``coef``'s dtype or float32.
        target: ``(N,)`` int64 class indices in ``[0, C)`` (``{0, 1}`` if ``binary``).
        row_scale: ``(N,)`` float64 normalised sample weights ``r_i`` (summing to 1).
        alpha: L2 strength ``>= 0``.
        work: ``(N, C)`` C-contiguous buffer of ``coef``'s dtype; overwritten.
        loss_rows: ``(N,)`` float64 buffer; receives the unweighted per-row losses.
        grad_coef_out: optional C-contiguous ``(C, D)`` buffer for the weight gradient.
        grad_intercept_out: optional ``(C,)`` buffer for the intercept gradient.
        binary: one logistic logit per row instead of a softmax over ``C`` classes.

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
    if grad_coef_out is None:
        grad_coef_out = np.empty_like(coef)
    partial = None
    first = True
    for sl, Xb in _blocks(X, coef.dtype):
        w = work[sl]
        _xwt_into(Xb, coef, w)
        if intercept is not None:
            np.add(w, intercept, out=w)
        _loss_and_dz(w, target[sl], row_scale[sl], loss_rows[sl], binary, True)
        if first:
            _gtx_into(w, Xb, grad_coef_out)
            first = False
        else:
            if partial is None:
                partial = np.empty_like(grad_coef_out)
            _gtx_into(w, Xb, partial)
            grad_coef_out += partial
    data_term = float(np.dot(loss_rows, row_scale))
    penalty = 0.0
    if alpha:
        penalty = 0.5 * alpha * float(np.vdot(coef, coef))
        grad_coef_out += alpha * coef
    grad_intercept = None
    if intercept is not None:
        grad_intercept = np.sum(work, axis=0, out=grad_intercept_out, dtype=None)
    return data_term + penalty, grad_coef_out, grad_intercept


def objective_value(coef, intercept, X, target, row_scale, alpha, *, binary=False):
    """``J`` alone, in float64, over blocks of rows so that no ``(N, C)`` array is allocated.

    Dense ``X`` is read in blocks of about ``2**16 / C`` rows; sparse ``X`` in one block
    (CSR/CSC row slices would each copy). Arguments as :func:`objective_and_gradient`.

    Examples:
        >>> X = np.eye(2); y = np.array([0, 1])
        >>> round(objective_value(np.zeros((3, 2)), None, X, y, np.full(2, 0.5), 0.0), 6)
        1.098612
    """
    W = np.asarray(coef, dtype=np.float64)
    b = None if intercept is None else np.asarray(intercept, dtype=np.float64)
    N = X.shape[0]
    C = W.shape[0]
    step = N if is_sparse(X) else max(1, (1 << 16) // C)
    work = np.empty((min(step, N), C))
    loss_rows = np.empty(min(step, N))
    data = 0.0
    for start in range(0, N, step):
        sl = slice(start, min(start + step, N))
        n = sl.stop - sl.start
        Xs = X if (sl.start, sl.stop) == (0, N) else X[sl]
        for bl, Xb in _blocks(Xs, np.dtype(np.float64)):
            w = work[bl]
            _xwt_into(Xb, W, w)
            if b is not None:
                w += b
            _loss_and_dz(w, target[sl][bl], None, loss_rows[bl], binary, False)
        data += float(np.dot(loss_rows[:n], row_scale[sl]))
    return data + 0.5 * alpha * float(np.vdot(W, W))


def objective_reference(coef, intercept, X, target, sample_weight, alpha, *, binary=False):
    """Readable float64 reference of :func:`objective_and_gradient` (allocates freely).

    Args:
        coef: ``(C, D)``; intercept: ``(C,)`` or ``None``; X: ``(N, D)`` dense or sparse;
        target: ``(N,)`` ints; sample_weight: ``(N,)`` non-negative or ``None``; alpha: float;
        binary: the logistic loss of one logit (``C = 1``, targets in ``{0, 1}``).

    Returns:
        ``(objective, grad_coef (C, D), grad_intercept (C,) or None)`` in float64.

    Examples:
        >>> J, gW, gb = objective_reference(np.zeros((2, 1)), np.zeros(2), np.ones((4, 1)),
        ...                                 np.array([0, 1, 1, 1]), None, 0.0)
        >>> round(J, 6), gb
        (0.693147, array([ 0.25, -0.25]))
        >>> J, gW, gb = objective_reference(np.zeros((1, 1)), np.zeros(1), np.ones((4, 1)),
        ...                                 np.array([0, 1, 1, 1]), None, 0.0, binary=True)
        >>> round(J, 6), gb
        (0.693147, array([-0.25]))
    """
    W = np.asarray(coef, dtype=np.float64)
    X = X.toarray() if is_sparse(X) else X
    X = np.asarray(X, dtype=np.float64)
    N = X.shape[0]
    s = np.ones(N) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    r = s / s.sum()
    z = X @ W.T
    if intercept is not None:
        z = z + np.asarray(intercept, dtype=np.float64)
    rows = np.arange(N)
    if binary:
        y = np.asarray(target, dtype=np.float64)
        zi = z[:, 0]
        J = float((r * (np.logaddexp(0.0, zi) - y * zi)).sum() + 0.5 * alpha * (W * W).sum())
        G = (1.0 / (1.0 + np.exp(-zi)) - y)[:, None]
    else:
        m = z.max(axis=1, keepdims=True)
        log_p = (z - m) - np.log(np.exp(z - m).sum(axis=1, keepdims=True))
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
    is at most ``1/2`` (``1/4`` for the logistic loss, so the bound holds there too).
    Hence ``L <= lambda_max(X~^T R X~) / 2 + alpha``. ``lambda_max`` is
    estimated by power iteration (``iterations`` products with ``X`` and ``X^T``, no
    ``(D, D)`` matrix, in ``X``'s dtype) and inflated by 10% because power iteration
    approaches it from below.

    Returns:
        float ``L > 0``.

    Examples:
        >>> L = lipschitz_bound(np.eye(3), np.full(3, 1 / 3), 0.0, False)
        >>> 0.5 / 3 <= L <= 1.1 * 0.5 / 3 + 1e-12
        True
    """
    if not is_sparse(X):
        X = np.asarray(X)
    N, D = X.shape
    r = np.asarray(row_scale, dtype=np.float64)
    v = np.random.default_rng(seed).normal(size=D + int(fit_intercept))
    lam = 0.0
    for _ in range(iterations):
        v /= np.linalg.norm(v)
        u = np.asarray(X @ v[:D].astype(X.dtype), dtype=np.float64).reshape(-1)  # X~ v, (N,)
        if fit_intercept:
            u += v[D]
        u *= r
        w = np.asarray(X.T @ u.astype(X.dtype), dtype=np.float64).reshape(-1)
        if fit_intercept:
            w = np.append(w, u.sum())
        lam = float(np.linalg.norm(w))
        v = w
        if lam == 0.0:
            break
    return 1.1 * 0.5 * lam + float(alpha) + 1e-12
