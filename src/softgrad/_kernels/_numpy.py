"""Reference kernels in NumPy: the readable specification of every row-wise kernel.

Contract (``docs/ARCHITECTURE.md``): inputs are validated, 2-D ``(N, C)``,
C-contiguous, float32 or float64, rows reduced along the last axis, no row entirely
``-inf``, targets in range. Results go into the ``out`` arrays given. Work is done in
blocks of rows, so no temporary of size ``(N, C)`` is allocated; per-row sums
accumulate in float64.

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

# Number of elements per block of rows; bounds the size of temporaries.
_BLOCK_ELEMENTS = 1 << 16


def _row_blocks(n_rows: int, n_cols: int) -> Iterator[slice]:
    step = max(1, _BLOCK_ELEMENTS // max(n_cols, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def _shift(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For a block ``z (n, C)``: the shifted logits ``z - m`` and ``log s``, in float64."""
    z = z.astype(np.float64)
    shifted = z - z.max(axis=1, keepdims=True)
    # exp(shifted) <= 1 everywhere; -inf entries contribute exp(-inf) = 0.
    log_s = np.log(np.exp(shifted).sum(axis=1))
    return shifted, log_s


def _lse(z: np.ndarray) -> np.ndarray:
    """Row-wise log-sum-exp of a block ``z (n, C)`` as float64 ``(n,)``."""
    return z.max(axis=1).astype(np.float64) + _shift(z)[1]


def logsumexp(logits: np.ndarray, out: np.ndarray) -> None:
    """``out[i] = log(sum_k exp(logits[i, k]))``; ``out (N,)`` of the logits' dtype."""
    N, C = logits.shape
    for b in _row_blocks(N, C):
        out[b] = _lse(logits[b])


def softmax(logits: np.ndarray, out: np.ndarray) -> None:
    """``out[i, k] = exp(logits[i, k] - lse_i)``."""
    N, C = logits.shape
    for b in _row_blocks(N, C):
        shifted, log_s = _shift(logits[b])
        e = np.exp(shifted)
        out[b] = e / e.sum(axis=1, keepdims=True)


def log_softmax(logits: np.ndarray, out: np.ndarray) -> None:
    """``out[i, k] = logits[i, k] - lse_i``."""
    N, C = logits.shape
    for b in _row_blocks(N, C):
        shifted, log_s = _shift(logits[b])
        out[b] = shifted - log_s[:, None]


def softmax_backward(grad_probs: np.ndarray, probs: np.ndarray, out: np.ndarray) -> None:
    """Vector-Jacobian product of softmax: ``out = (g - <g, a>) * a`` per row.

    Derivation: with ``a = softmax(z)``, ``da_j/dz_k = a_j (delta_jk - a_k)``, so for an
    upstream gradient ``g = dL/da``

        dL/dz_k = sum_j g_j a_j (delta_jk - a_k) = a_k g_k - a_k sum_j g_j a_j
                = a_k (g_k - <g, a>),

    which never forms the ``C x C`` Jacobian.
    """
    N, C = probs.shape
    for b in _row_blocks(N, C):
        g = grad_probs[b].astype(np.float64)
        a = probs[b].astype(np.float64)
        dot = np.einsum("ij,ij->i", g, a)
        out[b] = (g - dot[:, None]) * a


def cross_entropy_index(logits, target, weight, ignore_index, label_smoothing, grad_scale,
                        loss_out, grad_out) -> None:
    """Cross-entropy per row for integer targets, with PyTorch's options.

    With ``p = log_softmax(z)``, smoothing ``eps``, weights ``w`` (all ones when ``None``),
    ``W = sum_c w_c`` and label ``y``::

        loss_i = (1 - eps) * w_y * (-p_y) + (eps / C) * sum_c w_c * (-p_c)

    and ``loss_i = 0`` when ``y == ignore_index`` (PyTorch's ``reduction="none"``).
    ``grad_out`` (optional, may alias ``logits``) receives ``grad_scale[i] * dloss_i/dz``.
    """
    N, C = logits.shape
    eps = float(label_smoothing)
    w = None if weight is None else weight.astype(np.float64)
    W = float(C) if w is None else float(w.sum())
    for b in _row_blocks(N, C):
        z = logits[b]
        n = z.shape[0]
        rows = np.arange(n)
        shifted, log_s = _shift(z)  # p = shifted - log_s
        y = target[b]
        valid = y != ignore_index
        y_safe = np.where(valid, y, 0)
        w_y = np.ones(n) if w is None else w[y_safe]
        loss = (1.0 - eps) * w_y * (log_s - shifted[rows, y_safe])
        if eps > 0.0:
            # sum_c w_c (-p_c) = W * log_s - sum_c w_c shifted_c
            ws = shifted.sum(axis=1) if w is None else shifted @ w
            loss = loss + (eps / C) * (W * log_s - ws)
        loss_out[b] = np.where(valid, loss, 0.0)
        if grad_out is None:
            continue
        # Gradient. d(-p_c)/dz = a - e_c with a = softmax(z), so
        #   dloss/dz = (1-eps) w_y (a - e_y) + (eps/C) sum_c w_c (a - e_c)
        #            = ((1-eps) w_y + eps W / C) * a - (1-eps) w_y e_y - (eps/C) w.
        # Without weights the coefficient of a is 1: a - ((1-eps) e_y + eps/C), the
        # fused "softmax minus smoothed one-hot" form.
        e = np.exp(shifted)
        a = e / e.sum(axis=1, keepdims=True)
        g = a * ((1.0 - eps) * w_y + eps * W / C)[:, None]
        g[rows, y_safe] -= (1.0 - eps) * w_y
        if eps > 0.0:
            g -= (eps / C) if w is None else (eps / C) * w[None]
        g *= (grad_scale[b] * valid)[:, None]
        grad_out[b] = g


def cross_entropy_probs(logits, target, weight, label_smoothing, grad_scale, loss_out,
                        grad_out) -> None:
    """Cross-entropy per row for class-probability targets, with PyTorch's options.

    With ``p = log_softmax(z)``, smoothed targets ``t = (1 - eps) * y + eps / C`` and
    weights ``w`` (ones when ``None``)::

        loss_i = -sum_c w_c t_c p_c

    Terms with ``w_c t_c == 0`` count as 0 even where ``p_c = -inf`` (the convention
    ``0 * log 0 = 0``; PyTorch would return NaN there).
    """
    N, C = logits.shape
    eps = float(label_smoothing)
    w = None if weight is None else weight.astype(np.float64)
    for b in _row_blocks(N, C):
        shifted, log_s = _shift(logits[b])
        t = target[b].astype(np.float64)
        if eps > 0.0:
            t = (1.0 - eps) * t + eps / C
        wt = t if w is None else t * w[None]
        logp = shifted - log_s[:, None]
        loss_out[b] = -(wt * np.where(wt == 0.0, 0.0, logp)).sum(axis=1)
        if grad_out is None:
            continue
        # Gradient. d(-p_c)/dz = a - e_c, so
        #   dloss/dz = sum_c w_c t_c (a - e_c) = (sum_c w_c t_c) * a - w * t.
        a = np.exp(logp)
        g = wt.sum(axis=1)[:, None] * a - wt
        g *= grad_scale[b][:, None]
        grad_out[b] = g
