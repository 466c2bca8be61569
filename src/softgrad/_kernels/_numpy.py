"""Reference kernels in NumPy: the readable specification of every row-wise kernel.

Contract (``docs/ARCHITECTURE.md``): arguments are validated, 2-D ``(N, C)``,
C-contiguous, float32 or float64, rows reduced along the last axis, targets in range.
The logits' values are not: every kernel returns the number of invalid rows (a NaN, a
``+inf``, or every entry ``-inf``), found from the row maximum it computes anyway, and
writes NaN to those rows' outputs; the public functions raise on a nonzero count.
Inputs are only read (they may be read-only or memory-mapped). Results go into the
``out`` arrays given. Work is done in blocks of rows, so no temporary of size
``(N, C)`` is allocated; per-row sums accumulate in float64.

Shared primitive: for a row ``z`` with ``m = max_k z_k``,

    lse(z) = m + log(sum_k exp(z_k - m))

is exact in real arithmetic and cannot overflow (every ``exp`` argument is <= 0, and the
term at the arg-max is exactly 1, so the sum ``s`` is in ``[1, C]``). Then
``softmax(z) = exp(z - m) / s`` and ``log_softmax(z) = (z - m) - log s``. Both are
written with the shifted logits ``z - m`` rather than ``z - lse``: for large ``|z|``
the subtraction ``z - lse`` would cancel ``|z| * eps`` of absolute precision.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from softgrad import _cross_entropy_rule as _rule

# Number of elements per block of rows; bounds the size of temporaries.
_BLOCK_ELEMENTS = 1 << 16


def _row_blocks(n_rows: int, n_cols: int) -> Iterator[slice]:
    step = max(1, _BLOCK_ELEMENTS // max(n_cols, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def _bad_rows(m: np.ndarray) -> np.ndarray:
    """Rows whose maximum ``m`` is not finite: NaN (``max`` propagates it), ``+inf``, or ``-inf`` (all ``-inf``)."""
    return ~np.isfinite(m)


def _shift(z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For a block ``z (n, C)``: the shifted logits ``z - m``, ``log s`` (float64) and the invalid rows."""
    z = z.astype(np.float64)
    m = z.max(axis=1, keepdims=True)
    bad = _bad_rows(m[:, 0])
    with np.errstate(invalid="ignore", divide="ignore"):
        shifted = z - m
        # exp(shifted) <= 1 everywhere; -inf entries contribute exp(-inf) = 0.
        log_s = np.log(np.exp(shifted).sum(axis=1))
    return shifted, log_s, bad


def logsumexp(logits: np.ndarray, out: np.ndarray) -> int:
    """``out[i] = log(sum_k exp(logits[i, k]))``; ``out (N,)`` of the logits' dtype. Returns the invalid rows' count."""
    N, C = logits.shape
    n_bad = 0
    for b in _row_blocks(N, C):
        z = logits[b]
        shifted, log_s, bad = _shift(z)
        out[b] = np.where(bad, np.nan, z.max(axis=1).astype(np.float64) + log_s)
        n_bad += int(bad.sum())
    return n_bad


def softmax(logits: np.ndarray, out: np.ndarray) -> int:
    """``out[i, k] = exp(logits[i, k] - lse_i)``. Returns the invalid rows' count."""
    N, C = logits.shape
    n_bad = 0
    for b in _row_blocks(N, C):
        shifted, log_s, bad = _shift(logits[b])
        with np.errstate(invalid="ignore", divide="ignore"):
            e = np.exp(shifted)
            out[b] = np.where(bad[:, None], np.nan, e / e.sum(axis=1, keepdims=True))
        n_bad += int(bad.sum())
    return n_bad


def log_softmax(logits: np.ndarray, out: np.ndarray) -> int:
    """``out[i, k] = logits[i, k] - lse_i``. Returns the invalid rows' count."""
    N, C = logits.shape
    n_bad = 0
    for b in _row_blocks(N, C):
        shifted, log_s, bad = _shift(logits[b])
        with np.errstate(invalid="ignore"):
            out[b] = np.where(bad[:, None], np.nan, shifted - log_s[:, None])
        n_bad += int(bad.sum())
    return n_bad


def softmax_backward(grad_probs: np.ndarray, probs: np.ndarray, out: np.ndarray) -> int:
    """Vector-Jacobian product of softmax: ``out = (g - <g, a>) * a`` per row.

    Derivation: with ``a = softmax(z)``, ``da_j/dz_k = a_j (delta_jk - a_k)``, so for an
    upstream gradient ``g = dL/da``

        dL/dz_k = sum_j g_j a_j (delta_jk - a_k) = a_k g_k - a_k sum_j g_j a_j
                = a_k (g_k - <g, a>),

    which never forms the ``C x C`` Jacobian. Returns the number of rows whose ``<g, a>``
    is not finite: every row with a NaN or an infinity in ``g`` or ``a`` (a non-finite term,
    ``0 * inf`` included, keeps the sum non-finite), and rows whose finite products overflow.
    """
    N, C = probs.shape
    n_bad = 0
    for b in _row_blocks(N, C):
        g = grad_probs[b].astype(np.float64)
        a = probs[b].astype(np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            dot = np.einsum("ij,ij->i", g, a)
            out[b] = (g - dot[:, None]) * a
        n_bad += int((~np.isfinite(dot)).sum())
    return n_bad


def _scores(z: np.ndarray, softcap: float | None) -> tuple[np.ndarray, np.ndarray | None]:
    """A block's scores in float64: ``s = cap tanh(z / cap)`` and ``tanh(z / cap)``, or ``z`` and None."""
    z = z.astype(np.float64)
    if softcap is None:
        return z, None
    th = np.tanh(z / softcap)
    return softcap * th, th


def _masked_dot(u: np.ndarray, shifted: np.ndarray) -> np.ndarray:
    """``sum_c u_c shifted_c`` per row; a term with ``u_c = 0`` is 0 even where ``shifted_c = -inf``."""
    with np.errstate(invalid="ignore"):
        return np.where(u == 0.0, 0.0, u * shifted).sum(axis=1)


def _z_scale(grad_scale: np.ndarray, z_scale: np.ndarray | None) -> np.ndarray:
    return grad_scale if z_scale is None else z_scale


def cross_entropy_index(logits, target, weight, ignore_index, label_smoothing, grad_scale, loss_out, grad_out,
                        *, z_loss=0.0, z_scale=None, softcap=None, lse_out=None) -> int:
    """Cross-entropy per row for integer targets: the rule of :mod:`softgrad._cross_entropy_rule`.

    With scores ``s`` (softcapped logits), ``p = log_softmax(s)``, smoothing ``eps``, weights
    ``w`` (ones when ``None``) and label ``y``::

        loss_out[i] = (1 - eps) w_y (-p_y) + (eps / C) sum_c w_c (-p_c)      (0 when y == ignore_index)

    without the z-loss (the caller adds ``z_loss * lse^2``; ``lse_out``, if given, receives
    ``lse``). ``grad_out`` (optional, may alias ``logits``) receives the gradient of
    ``grad_scale[i] * loss_out[i] + z_scale[i] * z_loss * lse_i^2`` (``z_scale`` defaults to
    ``grad_scale``); ignored rows get 0. Returns the number of invalid rows (judged on the
    raw logits, ignored rows included), whose loss, lse and gradient are NaN.
    """
    N, C = logits.shape
    eps = float(label_smoothing)
    w = None if weight is None else weight.astype(np.float64)
    u = np.ones((1, C)) if w is None else w[None, :]
    mass_value = float(u.sum())
    zeta_all = _z_scale(grad_scale, z_scale)
    n_bad = 0
    for b in _row_blocks(N, C):
        bad = _bad_rows(logits[b].max(axis=1))
        n_bad += int(bad.sum())
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            s, th = _scores(logits[b], softcap)
            n = s.shape[0]
            m = s.max(axis=1)
            shifted = s - m[:, None]
            log_d = np.log(np.exp(shifted).sum(axis=1))
            y = target[b]
            valid = y != ignore_index
            y_safe = np.where(valid, y, 0)
            w_y = np.ones(n) if w is None else w[y_safe]
            mass = np.full(n, mass_value)
            dot = _masked_dot(u, shifted) if eps > 0.0 else None
            ce = _rule.row_loss(m, log_d, dot=dot, mass=mass, s_y=s[np.arange(n), y_safe], w_y=w_y,
                                prob_target=False, label_smoothing=eps, num_classes=C)
            loss_out[b] = np.where(bad, np.nan, np.where(valid, ce, 0.0))
            lse = m + log_d
            if lse_out is not None:
                lse_out[b] = np.where(bad, np.nan, lse)
            if grad_out is None:
                continue
            alpha, beta, gamma = _rule.grad_coefficients(
                lse, grad_scale[b], zeta_all[b], w_y=w_y, mass=mass, valid=valid, prob_target=False,
                label_smoothing=eps, z_loss=float(z_loss), num_classes=C)
            a = np.exp(shifted - log_d[:, None])
            grad = _rule.gradient(a, y_safe, u, alpha, beta, gamma, th, prob_target=False, need_u=eps > 0.0)
            grad_out[b] = np.where(bad[:, None], np.nan, grad)
    return n_bad


def cross_entropy_probs(logits, target, weight, label_smoothing, grad_scale, loss_out, grad_out,
                        *, z_loss=0.0, z_scale=None, softcap=None, lse_out=None) -> int:
    """Cross-entropy per row for class-probability targets: the rule of :mod:`softgrad._cross_entropy_rule`.

    With scores ``s``, ``p = log_softmax(s)`` and ``u_c = w_c ((1 - eps) t_c + eps / C)``::

        loss_out[i] = -sum_c u_c p_c

    (a term with ``u_c = 0`` counts 0 even where ``p_c = -inf``). ``lse_out``, ``grad_out``,
    ``grad_scale``, ``z_loss`` and ``z_scale`` as :func:`cross_entropy_index`; so is the
    returned count of invalid rows.
    """
    N, C = logits.shape
    eps = float(label_smoothing)
    w = None if weight is None else weight.astype(np.float64)
    zeta_all = _z_scale(grad_scale, z_scale)
    n_bad = 0
    for b in _row_blocks(N, C):
        bad = _bad_rows(logits[b].max(axis=1))
        n_bad += int(bad.sum())
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            s, th = _scores(logits[b], softcap)
            m = s.max(axis=1)
            shifted = s - m[:, None]
            log_d = np.log(np.exp(shifted).sum(axis=1))
            u = (1.0 - eps) * target[b].astype(np.float64) + eps / C
            if w is not None:
                u = u * w[None, :]
            mass = u.sum(axis=1)
            ce = _rule.row_loss(m, log_d, dot=_masked_dot(u, shifted), mass=mass, prob_target=True,
                                label_smoothing=eps, num_classes=C)
            loss_out[b] = np.where(bad, np.nan, ce)
            lse = m + log_d
            if lse_out is not None:
                lse_out[b] = np.where(bad, np.nan, lse)
            if grad_out is None:
                continue
            alpha, beta, gamma = _rule.grad_coefficients(
                lse, grad_scale[b], zeta_all[b], mass=mass, prob_target=True, label_smoothing=eps,
                z_loss=float(z_loss), num_classes=C)
            a = np.exp(shifted - log_d[:, None])
            grad = _rule.gradient(a, None, u, alpha, beta, gamma, th, prob_target=True, need_u=True)
            grad_out[b] = np.where(bad[:, None], np.nan, grad)
    return n_bad


# ------------------------------------------------------------- sparse linear products
def _csr(data, indices, indptr, n_cols):
    import scipy.sparse

    return scipy.sparse.csr_matrix((data, indices, indptr), shape=(indptr.shape[0] - 1, n_cols), copy=False)


def csr_dense_matmul(data, indices, indptr, dense, out) -> int:
    """``out = X @ dense`` for CSR ``X (N, D)`` = ``(data, indices, indptr)``; ``dense (D, C)``, ``out (N, C)``."""
    out[...] = _csr(data, indices, indptr, dense.shape[0]) @ dense
    return 0


def csr_transpose_matmul(data, indices, indptr, dense, out) -> int:
    """``out = dense.T @ X`` ``(C, D)`` for CSR ``X (N, D)`` and ``dense (N, C)``."""
    out[...] = (_csr(data, indices, indptr, out.shape[1]).T @ dense).T
    return 0
