"""Cross-entropy row kernels in PyTorch ops: the CPU path and the readable twin of the Triton kernels.

Every function here has the same signature and the same results as its namesake in
:mod:`softgrad.torch._triton_cross_entropy`; the tests check one against the other. The
public function (:func:`softgrad.torch.cross_entropy`) has validated everything: ``logits``
is ``(N, C)`` with unit column stride, ``target`` is ``(N,)`` int64 class indices or
``(N, C)`` float class probabilities, ``weight`` is ``None`` or ``(C,)`` in the compute
dtype. The compute dtype is float64 for float64 logits and float32 otherwise.

Notation for one row (the "kernel contract" of this family)::

    z        the row of logits                     s_c = cap * tanh(z_c / cap)  with a softcap, else z_c
    m        max_c s_c                             d   = sum_c exp(s_c - m)
    lse      m + log d                             a_c = exp(s_c - lse) = softmax(s)_c
    u_c      class coefficient: w_c for index targets (1 without weights),
             w_c ((1 - eps) t_c + eps / C) for probability targets t
    mass     sum_c u_c                             dot = sum_c u_c (s_c - m)    (terms with u_c = 0 count 0)

and the loss of a row that is not ignored (``y`` its class, ``eps`` the smoothing)::

    index:       ce = (1 - eps) w_y (m - s_y + log d) + (eps / C) (mass log d - dot)
    probability: ce = mass log d - dot                   (= -sum_c u_c log a_c)

Both are ``sum_c (coefficient) * (lse - s_c)`` written relative to the row max, so a
common offset of the logits (all near 1e4, say) cancels exactly instead of costing
``|z| * eps`` of precision. A term whose coefficient is exactly 0 contributes 0 even where
``s_c = -inf`` (``0 log 0 = 0``).

Gradient: with ``kappa`` the cross-entropy's reduction factor (``1/sum of weights`` for a
mean, else 1) and ``zeta`` the z-loss's (``1/rows`` for a mean, else 1), the derivative of
``kappa * ce + zeta * zl * lse^2`` is, per class ``c``::

    g_c = (alpha a_c - beta [c = y] - gamma u_c) * (1 - tanh^2(z_c / cap))     (last factor only with a softcap)

    index:       alpha = kappa ((1 - eps) w_y + (eps / C) mass) + 2 zeta zl lse,  beta = kappa (1 - eps) w_y,
                 gamma = kappa eps / C
    probability: alpha = kappa mass + 2 zeta zl lse,  beta = 0,  gamma = kappa

because ``d(lse - s_k)/ds_c = a_c - [c = k]``, ``d lse^2/ds_c = 2 lse a_c`` and
``d s_c/d z_c = 1 - tanh^2(z_c / cap)``. Ignored rows have ``alpha = beta = gamma = 0``.
A row whose index target is neither in ``[0, C)`` nor ``ignore_index`` gets a NaN loss and a
NaN gradient (the public function raises ``ValueError`` for it before anyone sees it in
eager mode; inside a compiled graph the NaN is the signal).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["RowStats", "forward", "row_stats", "grad_pass", "scale_rows_"]

# Bytes of float temporaries per chunk of rows; an (N, C) problem is processed in chunks so
# that the extra memory of this path is bounded by about this much beyond the outputs.
_CHUNK_BYTES = 64 * 2**20


class RowStats(NamedTuple):
    """Per-row statistics of one pass over a block of columns, each ``(N,)`` in the compute dtype.

    For a shard of the classes (columns ``[class_offset, class_offset + C_local)`` of the full
    row), ``max``/``log_sum`` describe the shard alone; the full row's values follow from an
    all-reduce over shards: ``M = max_k max_k``, ``lse = M + log sum_k exp(max_k + log_sum_k - M)``,
    ``target_logit = sum_k target_logit_k`` (only the shard holding the target contributes),
    ``mass = sum_k mass_k`` and ``dot_M = sum_k (dot_k + mass_k (max_k - M))``.
    """

    max: Tensor  #: m, the row max of the (softcapped) logits in the shard
    log_sum: Tensor  #: log d = log sum_c exp(s_c - m)
    target_logit: Tensor  #: s_y if the row's target class lies in the shard, else 0
    dot: Tensor  #: sum_c u_c (s_c - m); 0 unless asked for (need_dot)
    mass: Tensor  #: sum_c u_c; 0 unless asked for (need_dot)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunks(n_rows: int, n_cols: int):
    step = max(1, _CHUNK_BYTES // (8 * 4 * max(n_cols, 1)))  # ~4 float64-sized temporaries per logit
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def _scores(z: Tensor, softcap: float | None) -> tuple[Tensor, Tensor | None]:
    """``s = cap * tanh(z / cap)`` and ``tanh(z / cap)`` (or ``z`` and None without a softcap)."""
    if softcap is None:
        return z, None
    th = torch.tanh(z / softcap)
    return th * softcap, th


def _class_coeff(target_rows: Tensor | None, weight: Tensor | None, n_cols: int, label_smoothing: float,
                 num_classes: int, dtype: torch.dtype, device) -> Tensor:
    """``u`` of the module docstring: ``(n, C)`` for probability targets, else ``(1, C)``."""
    if target_rows is not None:
        u = target_rows.to(dtype) * (1.0 - label_smoothing) + label_smoothing / num_classes
        return u * weight if weight is not None else u
    if weight is not None:
        return weight[None, :]
    return torch.ones(1, n_cols, dtype=dtype, device=device)


def _masked_dot(u: Tensor, shifted: Tensor) -> Tensor:
    """``sum_c u_c shifted_c`` per row, counting 0 where ``u_c == 0`` (even if ``shifted_c = -inf``)."""
    prod = u * shifted
    return torch.where(u == 0, torch.zeros((), dtype=prod.dtype, device=prod.device), prod).sum(dim=1)


def row_stats(logits: Tensor, target: Tensor, weight: Tensor | None, *, class_offset: int = 0,
              num_classes: int | None = None, label_smoothing: float = 0.0, softcap: float | None = None,
              prob_target: bool = False, need_dot: bool = False) -> RowStats:
    """One pass over ``logits (N, C_local)``: the per-row :class:`RowStats`.

    For vocabulary-parallel use the logits may be a shard of the classes: column ``j`` is
    class ``class_offset + j`` of ``num_classes`` (default ``C_local``, offset 0). ``target``
    holds global class indices ``(N,)`` (rows whose target is not a class of the shard get
    ``target_logit = 0``; leaving out ignored rows is the caller's business) or, for ``prob_target``, the shard's
    ``(N, C_local)`` probabilities. ``weight`` is the shard's ``(C_local,)`` slice or None.
    ``dot``/``mass`` are computed only with ``need_dot`` (label smoothing or probability
    targets); they are 0 otherwise.
    """
    n_rows, n_cols = logits.shape
    cdt = _compute_dtype(logits.dtype)
    num_classes = n_cols if num_classes is None else num_classes
    out = [torch.zeros(n_rows, dtype=cdt, device=logits.device) for _ in range(5)]
    for rows in _chunks(n_rows, n_cols):
        s, _ = _scores(logits[rows].to(cdt), softcap)
        m = s.amax(dim=1)
        m_safe = torch.where(torch.isneginf(m), torch.zeros_like(m), m)  # an all -inf shard: d = 0
        shifted = s - m_safe[:, None]
        out[0][rows] = m
        out[1][rows] = torch.log(torch.exp(shifted).sum(dim=1))
        if not prob_target:
            local = target[rows] - class_offset
            here = (local >= 0) & (local < n_cols)
            picked = s.gather(1, torch.where(here, local, torch.zeros_like(local))[:, None])[:, 0]
            out[2][rows] = torch.where(here, picked, torch.zeros_like(picked))
        if need_dot:
            u = _class_coeff(target[rows] if prob_target else None, weight, n_cols, label_smoothing,
                             num_classes, cdt, logits.device)
            out[3][rows] = _masked_dot(u, shifted)
            out[4][rows] = u.sum(dim=1).expand(m.shape[0])
    return RowStats(*out)


def grad_pass(logits: Tensor, target: Tensor, weight: Tensor | None, lse: Tensor, coeffs: Tensor, out: Tensor, *,
              class_offset: int = 0, num_classes: int | None = None, label_smoothing: float = 0.0,
              softcap: float | None = None, prob_target: bool = False) -> None:
    """Write ``g_c = (alpha a_c - beta [c = y] - gamma u_c) * softcap'(z_c)`` into ``out (N, C_local)``.

    ``lse (N,)`` is the log-sum-exp of the *full* row (all shards), ``coeffs (N, 3)`` holds
    ``alpha, beta, gamma`` per row (compute dtype), ``a_c = exp(s_c - lse)``. Sharding as in
    :func:`row_stats`: the one-hot term applies where ``target - class_offset`` is a column of
    the shard. ``out`` may be ``logits`` itself (each chunk is read before it is written).
    """
    n_rows, n_cols = logits.shape
    cdt = _compute_dtype(logits.dtype)
    num_classes = n_cols if num_classes is None else num_classes
    for rows in _chunks(n_rows, n_cols):
        s, th = _scores(logits[rows].to(cdt), softcap)
        alpha, beta, gamma = coeffs[rows].to(cdt).unbind(dim=1)
        g = torch.exp(s - lse[rows, None].to(cdt)).mul_(alpha[:, None])
        if not prob_target:
            local = target[rows] - class_offset
            here = (local >= 0) & (local < n_cols)
            idx = torch.where(here, local, torch.zeros_like(local))[:, None]
            g.scatter_add_(1, idx, torch.where(here, -beta, torch.zeros_like(beta))[:, None])
        if prob_target or label_smoothing > 0.0:
            u = _class_coeff(target[rows] if prob_target else None, weight, n_cols, label_smoothing,
                             num_classes, cdt, logits.device)
            g.sub_(gamma[:, None] * u)
        if th is not None:
            g.mul_(1.0 - th * th)
        out[rows] = g.to(out.dtype)


def forward(logits: Tensor, target: Tensor, weight: Tensor | None, scales: Tensor, *, ignore_index: int,
            label_smoothing: float, z_loss: float, softcap: float | None, prob_target: bool,
            grad_out: Tensor | None, row_scale: Tensor | None = None, config=None) -> tuple[Tensor, Tensor]:
    """Fused forward: per-row cross-entropy and lse, and (if ``grad_out``) the gradient.

    Args:
        logits: ``(N, C)`` float16/bfloat16/float32/float64, unit column stride.
        target: ``(N,)`` int64 class indices, or ``(N, C)`` float probabilities (``prob_target``).
        weight: ``(C,)`` compute dtype, or None.
        scales: ``(2,)`` compute dtype on the logits' device: ``kappa, zeta`` of the module
            docstring (the reduction factors of the cross-entropy and of the z-loss).
        ignore_index: index target value of rows that contribute nothing.
        label_smoothing: ``eps`` in ``[0, 1]``.
        z_loss: ``zl >= 0``; only the gradient uses it (the caller adds ``zl * lse^2``).
        softcap: ``cap > 0`` or None.
        prob_target: whether ``target`` holds probabilities.
        grad_out: None (no gradient), a fresh ``(N, C)`` buffer of the logits' dtype, or
            ``logits`` itself (the gradient overwrites the logits, chunk by chunk).
        row_scale: optional ``(N,)`` factor multiplying ``kappa`` and ``zeta`` row by row (the
            per-row upstream gradient when the caller knows it in the forward).
        config: ignored (the Triton path's kernel configuration).

    Returns:
        ``(ce (N,), lse (N,))`` in the compute dtype: the unreduced, unscaled cross-entropy of
        each row (0 for ignored rows, NaN for an out-of-range target) and the row's lse.
    """
    n_rows, n_cols = logits.shape
    cdt = _compute_dtype(logits.dtype)
    eps = float(label_smoothing)
    kappa, zeta = scales.to(cdt).unbind()
    w = weight
    need_dot = prob_target or eps > 0.0
    ce_out = torch.empty(n_rows, dtype=cdt, device=logits.device)
    lse_out = torch.empty(n_rows, dtype=cdt, device=logits.device)
    zero = torch.zeros((), dtype=cdt, device=logits.device)
    nan = torch.full((), float("nan"), dtype=cdt, device=logits.device)
    for rows in _chunks(n_rows, n_cols):
        if row_scale is not None:
            kappa, zeta = (x * row_scale[rows].to(cdt) for x in scales.to(cdt).unbind())
        s, th = _scores(logits[rows].to(cdt), softcap)
        m = s.amax(dim=1)
        # the shift keeps every exp argument <= 0; an all -inf row keeps m = -inf, d = 0 and lse = -inf
        shifted = s - torch.where(torch.isneginf(m), zero, m)[:, None]
        log_d = torch.log(torch.exp(shifted).sum(dim=1))
        lse = m + log_d
        if need_dot:
            u = _class_coeff(target[rows] if prob_target else None, w, n_cols, eps, n_cols, cdt, logits.device)
            dot = _masked_dot(u, shifted)
            mass = u.sum(dim=1).expand(m.shape[0])
        if prob_target:
            valid = torch.ones_like(m, dtype=torch.bool)
            bad = torch.zeros_like(valid)
            ce = mass * log_d - dot
            alpha, beta, gamma = kappa * mass, torch.zeros_like(m), kappa.expand(m.shape[0])
        else:
            y = target[rows]
            valid = y != ignore_index
            in_range = (y >= 0) & (y < n_cols)
            bad = valid & ~in_range
            y_safe = torch.where(valid & in_range, y, torch.zeros_like(y))
            s_y = s.gather(1, y_safe[:, None])[:, 0]
            c1 = (1.0 - eps) * (w[y_safe] if w is not None else torch.ones_like(m))
            # (m - s_y) + log d = lse - s_y without cancelling a large common offset
            ce = torch.where(c1 == 0, zero, c1 * ((m - s_y) + log_d))
            alpha, beta = kappa * c1, kappa * c1
            gamma = (kappa * (eps / n_cols)).expand(m.shape[0])
            if eps > 0.0:
                ce = ce + (eps / n_cols) * (mass * log_d - dot)
                alpha = alpha + kappa * (eps / n_cols) * mass
        ce = torch.where(bad, nan, torch.where(valid, ce, zero))
        ce_out[rows] = ce
        lse_out[rows] = lse
        if grad_out is None:
            continue
        if z_loss:
            alpha = alpha + 2.0 * z_loss * zeta * lse
        keep = valid.to(cdt)
        alpha = torch.where(bad, nan, alpha * keep)
        beta, gamma = beta * keep, gamma * keep
        # g_c = (alpha a_c - beta [c = y] - gamma u_c) * (1 - tanh^2): see the module docstring
        g = torch.exp(shifted - log_d[:, None]).mul_(alpha[:, None])
        if not prob_target:
            g.scatter_add_(1, y_safe[:, None], -beta[:, None])
        if need_dot:
            g.sub_(gamma[:, None] * u)
        if th is not None:
            g.mul_(1.0 - th * th)
        grad_out[rows] = g.to(grad_out.dtype)
    return ce_out, lse_out


def scale_rows_(grad: Tensor, scale: Tensor) -> None:
    """``grad *= scale`` in place: ``scale`` is a 0-d tensor or ``(N,)`` (one factor per row)."""
    if scale.dim() == 0:
        grad.mul_(scale.to(grad.dtype))
    else:
        grad.mul_(scale.to(grad.dtype)[:, None])
