"""Linear classifiers on top of the losses: softmax (cross-entropy) and multiclass SVM.

CS231n conventions: weights ``W (D, C)``, data ``X (N, D)``, labels
``y (N,)`` in ``[0, C)``, scores ``X @ W (+ b)`` of shape ``(N, C)``, the data loss
averaged over the ``N`` rows and an L2 penalty ``reg * sum(W**2)`` (the bias is not
penalised). Both losses have the gradient form of CS231n's remark,

    dW = X.T @ margin / N + 2 * reg * W,      db = sum_i margin[i] / N,

where ``margin (N, C)`` is ``d loss_i / d scores_i``: ``softmax(scores) - onehot(y)`` for
the softmax loss, and for the hinge loss ``1`` where a wrong class violates the margin,
minus the number of violations at the true class.

The loss itself knows nothing of weights: ``method="vectorized"`` computes the scores,
hands them to :func:`softgrad.softmax_cross_entropy` (the active backend's fused
kernel), and maps ``d loss / d scores`` back through the matrix product.
``method="naive"`` is the explicit double loop over rows and classes, in float64,
kept as the readable reference the vectorised path is tested against.

The softmax *layer* functions follow Bendersky's article instead: one sample ``x (N,)``, weights
``W (T, N)`` (``T`` classes), logits ``W @ x``, and ``W`` flattened row-major into a
vector of length ``T * N``, so ``W[i, j]`` is entry ``i * N + j``.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from softgrad import _validation as _v
from softgrad._linear_model import is_sparse as _is_sparse
from softgrad._losses import softmax_cross_entropy
from softgrad._softmax import softmax, softmax_jacobian

_METHODS = ("vectorized", "naive")


# ---------------------------------------------------------------- validation


def _check_nonneg(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float >= 0, got {type(value).__name__}")
    value = float(value)
    if not (np.isfinite(value) and value >= 0.0):
        raise ValueError(f"{name} must be a finite float >= 0, got {value}")
    return value


def _sparse_X(X):
    """Validate a SciPy sparse ``X``: CSR/CSC kept (COO and the rest converted to CSR), float, finite."""
    if X.format not in ("csr", "csc"):
        X = X.tocsr()
    if not np.issubdtype(X.dtype, np.floating):
        raise TypeError(f"X must have a real floating dtype (float16/32/64), got sparse dtype {X.dtype}; "
                        "convert it explicitly, e.g. X.astype(np.float64)")
    if X.data.size and not np.isfinite(X.data).all():
        raise ValueError("X contains NaN or infinity")
    return X


def _linear_args(W, X, y, reg, b, method):
    """Validate the linear-classifier arguments.

    Returns ``(W, X, y, reg, b, method, dtypes)``: the arrays as given (validated, not
    converted; a sparse ``X`` other than CSR/CSC is converted to CSR), ``y`` as ``(N,)``
    int64 and the caller's dtypes for the results.
    """
    if not isinstance(method, str) or method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    reg = _check_nonneg(reg, "reg")
    W = _v.as_float_array(W, "W")
    X = _sparse_X(X) if _is_sparse(X) else _v.as_float_array(X, "X")
    if W.ndim != 2 or 0 in W.shape:
        raise ValueError(f"W must be a non-empty 2-D array (D, C), got shape {W.shape}")
    D, C = W.shape
    if X.ndim != 2:
        raise ValueError(f"X must be a 2-D array (N, D), got shape {X.shape}")
    if X.shape[0] == 0:
        raise ValueError(f"X is an empty batch (shape {X.shape}); need at least one row")
    if X.shape[1] != D:
        raise ValueError(f"X must have D={D} columns to match W of shape {W.shape}, got shape {X.shape}")
    N = X.shape[0]
    if b is not None:
        b = _v.as_float_array(b, "b")
        if b.shape != (C,):
            raise ValueError(f"b must have shape ({C},) (one entry per class of W), got {b.shape}")
    y_arr = np.asarray(y)
    if y_arr.dtype == np.bool_ or not np.issubdtype(y_arr.dtype, np.integer):
        raise TypeError(f"y must be an integer array of class indices, got dtype {y_arr.dtype}")
    if y_arr.shape != (N,):
        raise ValueError(f"y must have shape ({N},) (one label per row of X), got {y_arr.shape}")
    layout = _v.RowLayout((N, C), 1, np.dtype(np.float64))
    y_arr = _v.index_target(y_arr, layout, None, name="y")
    result_dtype = np.result_type(W.dtype, X.dtype, *(() if b is None else (b.dtype,)))
    return W, X, y_arr, reg, b, method, result_dtype


def _layer_args(W, x):
    """Validate the softmax-layer arguments ``W (T, N)`` and ``x (N,)``."""
    W = _v.as_float_array(W, "W")
    x = _v.as_float_array(x, "x")
    if W.ndim != 2 or 0 in W.shape:
        raise ValueError(f"W must be a non-empty 2-D array (T, N), got shape {W.shape}")
    if x.shape != (W.shape[1],):
        raise ValueError(f"x must have shape ({W.shape[1]},) to match W of shape {W.shape}, got {x.shape}")
    return W, x, np.result_type(W.dtype, x.dtype)


def _scores(X, W, b, dtype):
    """``X @ W (+ b)`` in ``dtype`` (a dense array also for sparse ``X``); a ValueError if it overflows."""
    with np.errstate(over="ignore", invalid="ignore"):  # reported below as a ValueError
        scores = np.asarray(X.astype(dtype, copy=False) @ W.astype(dtype, copy=False))
        if b is not None:
            scores += b.astype(dtype, copy=False)
    if not np.isfinite(scores).all():
        raise ValueError(f"the scores X @ W{' + b' if b is not None else ''} overflow {np.dtype(dtype)}; "
                         "scale X or W down")
    return scores


def _finish(loss, dW, db, reg, W, b, result_dtype):
    """Add the L2 penalty, cast to the callers' dtypes, pack ``(loss, dW[, db])``."""
    if reg == 0.0:
        # no penalty term at all: 0 * sum(W**2) would be 0 * inf = NaN once |W| >~ 1e154
        loss = result_dtype.type(float(loss))
        dW = dW.astype(W.dtype)
    else:
        W64 = W.astype(np.float64)
        with np.errstate(over="ignore"):
            penalty = reg * float(np.sum(W64 * W64))
            # d/dW reg * sum(W**2) = 2 * reg * W
            dW = dW + 2.0 * reg * W.astype(dW.dtype)
        if not (np.isfinite(penalty) and np.isfinite(dW).all()):
            raise ValueError(f"the L2 penalty reg * sum(W**2) with reg={reg} overflows float64 "
                             f"(max |W| = {float(np.max(np.abs(W64))):.3g}); scale W down")
        loss = result_dtype.type(float(loss) + penalty)
        dW = dW.astype(W.dtype)
    if b is None:
        return loss, dW
    return loss, dW, db.astype(b.dtype)


# ---------------------------------------------------------------- softmax classifier


def _row_weights(sample_weight, N):
    """``r_i = s_i / sum_j s_j`` as float64 ``(N,)`` (``1 / N`` without weights)."""
    if sample_weight is None:
        return np.full(N, 1.0 / N)
    s = np.asarray(sample_weight)
    if s.dtype == object or s.dtype == np.bool_ or not np.issubdtype(s.dtype, np.number) \
            or np.iscomplexobj(s):
        raise TypeError(f"sample_weight must be an array of real numbers, got dtype {s.dtype}")
    if s.shape != (N,):
        raise ValueError(f"sample_weight must have shape ({N},) (one weight per row of X), got {s.shape}")
    s = s.astype(np.float64)
    if not np.isfinite(s).all():
        raise ValueError("sample_weight contains NaN or infinity")
    if (s < 0).any():
        raise ValueError("sample_weight contains negative values")
    total = s.sum()
    if not total > 0:
        raise ValueError("sample_weight sums to zero: the weighted mean is undefined")
    return s / total


def _softmax_loss_naive(W, X, y, b, r):
    """Seed 001's double loop, in float64: returns ``(data loss, dW, db)`` without ``reg``.

    ``r`` holds the row weights ``r_i`` (``1 / N`` each for the plain mean).
    """
    X = X.toarray() if _is_sparse(X) else X
    W, X = W.astype(np.float64), X.astype(np.float64)
    b = np.zeros(W.shape[1]) if b is None else b.astype(np.float64)
    N, C = X.shape[0], W.shape[1]
    loss = 0.0
    dW = np.zeros_like(W)
    db = np.zeros(C)
    for i in range(N):
        scores = X[i] @ W + b
        scores = scores - scores.max()  # exp(scores) <= 1: no overflow
        exp_scores = np.exp(scores)
        total = exp_scores.sum()
        # -log(exp_y / total), written without the division
        loss += r[i] * (np.log(total) - scores[y[i]])
        for j in range(C):
            p_j = exp_scores[j] / total
            # d loss_i / d score_j = p_j - 1[j == y_i]; d score_j / d W[:, j] = X[i]
            coeff = r[i] * (p_j - 1.0 if j == y[i] else p_j)
            dW[:, j] += coeff * X[i]
            db[j] += coeff
    return loss, dW, db


def _softmax_loss_vectorized(W, X, y, b, dtype, r):
    """Scores, then the fused loss kernel (per-row losses), then ``dW = X.T @ dscores``."""
    scores = _scores(X, W, b, dtype)
    # weighted mean: dscores_i = r_i (softmax(scores_i) - onehot(y_i))
    loss_rows, dscores = softmax_cross_entropy(scores, y, reduction="none")
    loss = float(np.dot(np.asarray(loss_rows, dtype=np.float64), r))
    dscores *= r.astype(dscores.dtype)[:, None]
    dW = np.asarray(X.astype(dtype, copy=False).T @ dscores)
    return loss, dW, dscores.sum(axis=0)


def linear_softmax_loss(W: Any, X: Any, y: Any, reg: float = 0.0, *, b: Any = None,
                        method: str = "vectorized", sample_weight: Any = None):
    r"""Softmax (cross-entropy) loss of a linear classifier and its gradient.

    With scores :math:`s = XW + b`, :math:`p_i = \mathrm{softmax}(s_i)` and row weights
    :math:`r_i = w_i / \sum_j w_j` (``sample_weight`` :math:`w`; :math:`r_i = 1/N`
    without it, the plain mean):

    .. math::

        L = \sum_i r_i \big(\mathrm{lse}(s_i) - s_{i, y_i}\big) + \mathrm{reg}\sum W^2,
        \qquad
        \frac{\partial L}{\partial W} = X^\top R (P - Y) + 2\,\mathrm{reg}\, W,
        \qquad
        \frac{\partial L}{\partial b} = \sum_i r_i (p_i - y_i)

    where :math:`Y` is the one-hot matrix of ``y`` and :math:`R = \mathrm{diag}(r)`.
    ``method="vectorized"`` runs in the compute dtype of the inputs (float16 in float32)
    through the active backend's cross-entropy kernel, with ``X @ W`` and ``X.T @ G`` as
    SciPy sparse products when ``X`` is sparse; ``method="naive"`` is CS231n's ``softmax_loss_naive`` loop
    over rows and classes, always in float64. The two agree to ~1e-12 in float64.

    Args:
        W: weights ``(D, C)``, float16/32/64, finite.
        X: data ``(N, D)``, float, finite, ``N >= 1``: an array, or a SciPy sparse
            matrix/array (CSR/CSC used as given, other formats converted to CSR).
        y: labels ``(N,)``, integers in ``[0, C)``.
        reg: L2 strength, a float >= 0 (``b`` is not penalised).
        b: optional bias ``(C,)``; when given, its gradient is returned too.
        method: ``"vectorized"`` (default) or ``"naive"``.
        sample_weight: optional ``(N,)`` finite non-negative row weights, not all zero;
            the loss is their weighted mean.

    Returns:
        ``(loss, dW)``, or ``(loss, dW, db)`` when ``b`` is given. ``loss`` is a NumPy
        scalar of the inputs' common dtype; ``dW`` has ``W``'s shape and dtype, ``db``
        ``b``'s.

    Raises:
        TypeError: non-floating ``W``/``X``/``b``, non-integer ``y``, non-real ``reg``.
        ValueError: NaN/inf entries; ``W`` not 2-D or empty; ``X`` not 2-D, empty, or with
            the wrong number of columns; ``y`` or ``b`` of the wrong shape; a label
            outside ``[0, C)``; ``reg`` negative or not finite; unknown ``method``;
            scores that overflow; ``sample_weight`` of the wrong shape, negative,
            non-finite or summing to zero.

    Examples:
        Zero weights give every class probability ``1/C``, so the loss is ``log C``:

        >>> X = np.eye(2)  # two samples, two features
        >>> loss, dW = linear_softmax_loss(np.zeros((2, 3)), X, [0, 2])
        >>> round(float(loss), 6), dW.round(4)
        (1.098612, array([[-0.3333,  0.1667,  0.1667],
                          [ 0.1667,  0.1667, -0.3333]]))
        >>> loss, dW, db = linear_softmax_loss(np.zeros((2, 3)), X, [0, 2], b=np.zeros(3))
        >>> db.round(4)
        array([-0.1667,  0.3333, -0.1667])
    """
    W, X, y, reg, b, method, result_dtype = _linear_args(W, X, y, reg, b, method)
    r = _row_weights(sample_weight, X.shape[0])
    if method == "naive":
        loss, dW, db = _softmax_loss_naive(W, X, y, b, r)
    else:
        loss, dW, db = _softmax_loss_vectorized(W, X, y, b, _v.compute_dtype(result_dtype), r)
    return _finish(loss, dW, db, reg, W, b, result_dtype)


# ---------------------------------------------------------------- multiclass SVM


def _svm_loss_naive(W, X, y, b, delta):
    """The hinge loss with explicit loops, in float64: ``(data loss, dW, db)`` without ``reg``."""
    X = X.toarray() if _is_sparse(X) else X
    W, X = W.astype(np.float64), X.astype(np.float64)
    b = np.zeros(W.shape[1]) if b is None else b.astype(np.float64)
    N, C = X.shape[0], W.shape[1]
    loss = 0.0
    dW = np.zeros_like(W)
    db = np.zeros(C)
    for i in range(N):
        scores = X[i] @ W + b
        correct = scores[y[i]]
        for j in range(C):
            if j == y[i]:
                continue
            margin = scores[j] - correct + delta
            if margin > 0:  # subgradient 0 at the kink margin == 0
                loss += margin
                # d margin / d score_j = 1, d margin / d score_y = -1
                dW[:, j] += X[i]
                dW[:, y[i]] -= X[i]
                db[j] += 1.0
                db[y[i]] -= 1.0
    return loss / N, dW / N, db / N


def _svm_loss_vectorized(W, X, y, b, delta, dtype):
    scores = _scores(X, W, b, dtype)
    N = scores.shape[0]
    rows = np.arange(N)
    margins = scores - scores[rows, y][:, None] + dtype.type(delta)
    margins[rows, y] = 0.0
    np.maximum(margins, 0.0, out=margins)
    loss = margins.sum(dtype=np.float64) / N
    # margin matrix M = d loss_i / d scores_i: 1 at each violating wrong class,
    # minus the number of violations at the true class.
    M = (margins > 0).astype(dtype)
    M[rows, y] = -M.sum(axis=1)
    M /= N
    dW = np.asarray(X.astype(dtype, copy=False).T @ M)
    return loss, dW, M.sum(axis=0)


def linear_svm_loss(W: Any, X: Any, y: Any, reg: float = 0.0, *, delta: float = 1.0, b: Any = None,
                    method: str = "vectorized"):
    r"""Multiclass SVM (hinge) loss of a linear classifier and its (sub)gradient.

    With scores :math:`s = XW + b`:

    .. math::

        L = \frac{1}{N}\sum_i \sum_{j \ne y_i} \max(0,\ s_{ij} - s_{i y_i} + \Delta)
            + \mathrm{reg}\sum W^2,
        \qquad
        \frac{\partial L}{\partial W} = \frac{1}{N} X^\top M + 2\,\mathrm{reg}\, W

    with :math:`M_{ij} = \mathbb{1}[s_{ij} - s_{iy_i} + \Delta > 0]` for :math:`j \ne y_i`
    and :math:`M_{iy_i} = -\sum_{j \ne y_i} M_{ij}` -- the same ``X.T @ margin`` form as
    :func:`linear_softmax_loss` (CS231n). At a kink (a margin exactly 0) the
    subgradient 0 is used. ``db = sum_i M_i / N``.

    Args:
        W, X, y, reg, b, method: as :func:`linear_softmax_loss` (``"naive"`` loops over
            rows and classes in float64).
        delta: the margin :math:`\Delta`, a float >= 0.

    Returns:
        ``(loss, dW)``, or ``(loss, dW, db)`` when ``b`` is given, typed as
        :func:`linear_softmax_loss`.

    Raises:
        TypeError, ValueError: as :func:`linear_softmax_loss`; also for a ``delta``
            that is not a finite float >= 0.

    Examples:
        With zero weights every wrong class violates the margin by exactly ``delta``:

        >>> loss, dW = linear_svm_loss(np.zeros((2, 3)), np.eye(2), [0, 2])
        >>> float(loss), dW
        (2.0, array([[-1. ,  0.5,  0.5],
                     [ 0.5,  0.5, -1. ]]))
    """
    W, X, y, reg, b, method, result_dtype = _linear_args(W, X, y, reg, b, method)
    delta = _check_nonneg(delta, "delta")
    if method == "naive":
        loss, dW, db = _svm_loss_naive(W, X, y, b, delta)
    else:
        loss, dW, db = _svm_loss_vectorized(W, X, y, b, delta, _v.compute_dtype(result_dtype))
    return _finish(loss, dW, db, reg, W, b, result_dtype)


# ---------------------------------------------------------------- the softmax layer (Bendersky)


def softmax_layer_jacobian(W: Any, x: Any) -> np.ndarray:
    r"""Jacobian of :math:`P(W) = \mathrm{softmax}(W x)` with respect to the flattened ``W``.

    :math:`P = S \circ g` with :math:`g(W) = Wx`. The Jacobian of ``g`` with respect to
    ``W`` flattened row-major is :math:`D_{ij} g_t = \delta_{ti} x_j` (row ``t``, column
    ``i N + j``), so by the chain rule only the term ``k = i`` of
    :math:`\sum_k D_k S_t \, D_{ij} g_k` survives:

    .. math::

        D_{ij} P_t = S_t (\delta_{ti} - S_i)\, x_j

    i.e. the softmax Jacobian :func:`softgrad.softmax_jacobian` at :math:`Wx` (``T x T``)
    times ``x`` along a new last axis -- no ``T x NT`` matrix product is needed.

    Args:
        W: weights ``(T, N)``: ``T`` classes, ``N`` features; float16/32/64, finite.
        x: one sample ``(N,)``, float, finite.

    Returns:
        Array ``(T, T * N)`` in the inputs' common dtype; entry ``[t, i * N + j]`` is
        :math:`\partial P_t / \partial W_{ij}`. Each column sums to 0 over ``t``.

    Raises:
        TypeError: non-floating ``W`` or ``x``.
        ValueError: NaN/inf entries, ``W`` not 2-D or empty, ``x`` of the wrong shape.

    Examples:
        >>> softmax_layer_jacobian(np.zeros((2, 1)), np.array([2.0]))
        array([[ 0.5, -0.5],
               [-0.5,  0.5]])
    """
    W, x, dtype = _layer_args(W, x)
    cdtype = _v.compute_dtype(dtype)
    T, N = W.shape
    logits = W.astype(cdtype) @ x.astype(cdtype)
    DS = softmax_jacobian(logits).astype(np.float64)  # DS[t, i] = S_t (delta_ti - S_i)
    jac = DS[:, :, None] * x.astype(np.float64)[None, None, :]  # [t, i, j]
    return jac.reshape(T, T * N).astype(dtype)


def softmax_layer_cross_entropy_grad(W: Any, x: Any, y: Any) -> np.ndarray:
    r"""Gradient of :math:`-\log \mathrm{softmax}(Wx)_y` with respect to ``W``.

    By the chain rule through :func:`softmax_layer_jacobian`, only the row ``t = y`` of
    the layer Jacobian survives, scaled by :math:`\partial(-\log P_y)/\partial P_y = -1/S_y`:

    .. math::

        D_{ij}\,\mathrm{xent} = -\frac{1}{S_y}\, S_y(\delta_{yi} - S_i)\, x_j = (S_i - \delta_{yi})\, x_j

    So ``softmax_layer_cross_entropy_grad(W, x, y).ravel()`` equals
    ``-softmax_layer_jacobian(W, x)[y] / softmax(W @ x)[y]``, and it is the outer
    product ``(softmax(W x) - onehot(y)) x^T``.

    Args:
        W: weights ``(T, N)``, float16/32/64, finite.
        x: one sample ``(N,)``, float, finite.
        y: the label, an int in ``[0, T)``.

    Returns:
        Array ``(T, N)`` (the shape of ``W``) in the inputs' common dtype.

    Raises:
        TypeError: non-floating ``W``/``x``, non-integer ``y``.
        ValueError: NaN/inf entries, bad shapes, ``y`` outside ``[0, T)``.

    Examples:
        >>> softmax_layer_cross_entropy_grad(np.zeros((2, 3)), np.array([1.0, 2.0, 3.0]), 1)
        array([[ 0.5,  1. ,  1.5],
               [-0.5, -1. , -1.5]])
    """
    W, x, dtype = _layer_args(W, x)
    T = W.shape[0]
    y = _v.check_int(y, "y")
    if not 0 <= y < T:
        raise ValueError(f"y={y} is outside [0, {T}) (W has {T} rows, one per class)")
    cdtype = _v.compute_dtype(dtype)
    S = softmax(W.astype(cdtype) @ x.astype(cdtype)).astype(np.float64)
    S[y] -= 1.0  # S - onehot(y)
    return np.outer(S, x.astype(np.float64)).astype(dtype)
