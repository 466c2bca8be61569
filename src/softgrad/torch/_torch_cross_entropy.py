"""Cross-entropy row kernels in PyTorch ops: the CPU path, the readable twin of the Triton kernels,
and the differentiable form that autograd's higher-order modes run through.

Every function here has the same signature and the same results as its namesake in
:mod:`softgrad.torch._triton_cross_entropy`; the tests check one against the other. The
public function (:func:`softgrad.torch.cross_entropy`) has validated everything: ``logits``
is ``(N, C)`` with unit column stride, ``target`` is ``(N,)`` int64 class indices or
``(N, C)`` float class probabilities, ``weight`` is ``None`` or ``(C,)`` in the compute
dtype (:func:`compute_dtype`: float64 for float64 logits, float32 otherwise).

What is computed is the rule of :mod:`softgrad._cross_entropy_rule` (notation ``s``, ``m``,
``d``, ``lse``, ``a``, ``u``, ``mass``, ``dot``, ``alpha``/``beta``/``gamma``, ``kappa``/``zeta``
and the zero-coefficient convention are defined there): these kernels compute the row
statistics and call the rule's :func:`~softgrad._cross_entropy_rule.row_loss` and
:func:`~softgrad._cross_entropy_rule.grad_coefficients`, then assemble

    g_c = (alpha a_c - beta [c = y] - gamma u_c) (1 - tanh^2(z_c / cap))

in place, chunk by chunk. :func:`differentiable_rows` and :func:`differentiable_gradient` are
the same rule on whole tensors with out-of-place ops and the row max held constant, which
autograd can differentiate again (double backward), push tangents through (forward-mode AD)
and ``torch.func`` can transform.

A row whose index target is neither in ``[0, C)`` nor ``ignore_index`` gets a NaN loss and a
NaN gradient (the public function raises ``ValueError`` for it before anyone sees it in
eager mode; inside a compiled graph the NaN is the signal).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from softgrad import _cross_entropy_rule as _rule

__all__ = ["RowStats", "compute_dtype", "forward", "row_stats", "grad_pass", "scale_rows_", "differentiable_rows",
           "differentiable_gradient"]

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
    #: sum_c e_c (s_c - m) with e_c = exp(s_c - m), for the entropy (need_stats; None otherwise).
    #: Over shards: T_M = sum_k exp(m_k - M) (ent_k + (m_k - M) d_k), entropy = log D - T_M / D.
    ent: Tensor | None = None
    #: the shard's argmax as a local column index, float (need_stats; None otherwise)
    argmax: Tensor | None = None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The arithmetic dtype for logits of ``dtype``: float64 for float64, float32 for the rest."""
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
              prob_target: bool = False, need_dot: bool = False, need_stats: bool = False) -> RowStats:
    """One pass over ``logits (N, C_local)``: the per-row :class:`RowStats`.

    For vocabulary-parallel use the logits may be a shard of the classes: column ``j`` is
    class ``class_offset + j`` of ``num_classes`` (default ``C_local``, offset 0). ``target``
    holds global class indices ``(N,)`` (rows whose target is not a class of the shard get
    ``target_logit = 0``; leaving out ignored rows is the caller's business) or, for ``prob_target``, the shard's
    ``(N, C_local)`` probabilities. ``weight`` is the shard's ``(C_local,)`` slice or None.
    ``dot``/``mass`` are computed only with ``need_dot`` (label smoothing or probability
    targets); they are 0 otherwise. ``ent``/``argmax`` only with ``need_stats``.
    """
    n_rows, n_cols = logits.shape
    cdt = compute_dtype(logits.dtype)
    num_classes = n_cols if num_classes is None else num_classes
    out = [torch.zeros(n_rows, dtype=cdt, device=logits.device) for _ in range(7 if need_stats else 5)]
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
        if need_stats:
            e = torch.exp(shifted)
            out[5][rows] = torch.where(e == 0, torch.zeros((), dtype=cdt, device=e.device), e * shifted).sum(dim=1)
            out[6][rows] = s.argmax(dim=1).to(cdt)
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
    cdt = compute_dtype(logits.dtype)
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


def _index_target(target: Tensor, s: Tensor, weight: Tensor | None, ignore_index: int):
    """``(valid, bad, y_safe, s_y, w_y)`` of index-target rows: ``y_safe`` is a readable column."""
    n_cols = s.shape[1]
    valid = target != ignore_index
    bad = valid & ~((target >= 0) & (target < n_cols))
    y_safe = torch.where(valid & ~bad, target, torch.zeros_like(target))
    s_y = s.gather(1, y_safe[:, None])[:, 0]
    w_y = weight[y_safe] if weight is not None else torch.ones_like(s_y)
    return valid, bad, y_safe, s_y, w_y


def forward(logits: Tensor, target: Tensor, weight: Tensor | None, scales: Tensor, *, ignore_index: int,
            label_smoothing: float, z_loss: float, softcap: float | None, prob_target: bool,
            grad_out: Tensor | None, row_scale: Tensor | None = None, stats_out: Tensor | None = None,
            config=None) -> tuple[Tensor, Tensor]:
    """Fused forward: per-row cross-entropy and lse, and (if ``grad_out``) the gradient.

    Args:
        logits: ``(N, C)`` float16/bfloat16/float32/float64, unit column stride.
        target: ``(N,)`` int64 class indices, or ``(N, C)`` float probabilities (``prob_target``).
        weight: ``(C,)`` compute dtype, or None.
        scales: ``(2,)`` compute dtype on the logits' device: ``kappa, zeta``, the reduction
            factors of the cross-entropy and of the z-loss (the rule's).
        ignore_index: index target value of rows that contribute nothing.
        label_smoothing: ``eps`` in ``[0, 1]``.
        z_loss: ``zl >= 0``; only the gradient uses it (the caller adds ``zl * lse^2``).
        softcap: ``cap > 0`` or None.
        prob_target: whether ``target`` holds probabilities.
        grad_out: None (no gradient), a fresh ``(N, C)`` buffer of the logits' dtype, or
            ``logits`` itself (the gradient overwrites the logits, chunk by chunk).
        row_scale: optional ``(N,)`` factor multiplying ``kappa`` and ``zeta`` row by row (the
            per-row upstream gradient when the caller knows it in the forward).
        stats_out: optional ``(2, N)`` compute-dtype buffer for the same-pass statistics:
            ``stats_out[0]`` the entropy of ``softmax(s)`` per row, ``lse - sum_c a_c s_c`` =
            ``log d - sum_c e_c (s_c - m) / d`` with ``e_c = exp(s_c - m)``, and ``stats_out[1]`` the
            row's argmax (the first maximal column), as a float (exact below 2^24 columns).
        config: ignored (the Triton path's kernel configuration).

    Returns:
        ``(ce (N,), lse (N,))`` in the compute dtype: the unreduced, unscaled cross-entropy of
        each row (0 for ignored rows, NaN for an out-of-range target) and the row's lse.
    """
    n_rows, n_cols = logits.shape
    cdt = compute_dtype(logits.dtype)
    eps = float(label_smoothing)
    need_dot = prob_target or eps > 0.0
    ce_out = torch.empty(n_rows, dtype=cdt, device=logits.device)
    lse_out = torch.empty(n_rows, dtype=cdt, device=logits.device)
    zero = torch.zeros((), dtype=cdt, device=logits.device)
    kappa, zeta = scales.to(cdt).unbind()
    for rows in _chunks(n_rows, n_cols):
        if row_scale is not None:
            kappa, zeta = (x * row_scale[rows].to(cdt) for x in scales.to(cdt).unbind())
        s, th = _scores(logits[rows].to(cdt), softcap)
        m = s.amax(dim=1)
        m_safe = torch.where(torch.isneginf(m), zero, m)[:, None]
        # the shift keeps every exp argument <= 0; an all -inf row keeps m = -inf, d = 0 and lse = -inf.
        # One (n, C) buffer serves as s - m, then exp(s - m), then the gradient: the only
        # temporary of this path besides the softcap's; when the gradient overwrites the
        # logits in their own dtype that buffer is the logits' chunk itself.
        in_place = grad_out is logits and th is None and s.dtype == logits.dtype
        s_y = None
        if not prob_target:
            valid, bad, y_safe, s_y, w_y = _index_target(target[rows], s, weight, ignore_index)
        work = s.sub_(m_safe) if in_place else s - m_safe
        u = dot = mass = None
        if need_dot:
            u = _class_coeff(target[rows] if prob_target else None, weight, n_cols, eps, n_cols, cdt, logits.device)
            dot = _masked_dot(u, work)
            mass = u.sum(dim=1).expand(m.shape[0])
        if prob_target:
            valid, bad, y_safe, w_y = None, None, None, None
        if stats_out is not None:
            stats_out[1, rows] = work.argmax(dim=1).to(cdt)  # the shift by m does not move the argmax
            # sum_c e_c (s_c - m), 0 for -inf columns (e_c = 0): the entropy's numerator, before work is exp'd
            e_shift = torch.exp(work) * work
            shifted_sum = torch.where(torch.isneginf(work), zero, e_shift).sum(dim=1)
            del e_shift
        exp_shifted = work.exp_()
        d = exp_shifted.sum(dim=1)
        log_d = torch.log(d)
        if stats_out is not None:
            stats_out[0, rows] = log_d - shifted_sum / d
        lse = m + log_d
        ce = _rule.row_loss(m, log_d, dot=dot, mass=mass, s_y=s_y, w_y=w_y, prob_target=prob_target,
                            label_smoothing=eps, num_classes=n_cols)
        if not prob_target:
            ce = torch.where(bad, torch.nan, torch.where(valid, ce, zero))
        ce_out[rows] = ce
        lse_out[rows] = lse
        if grad_out is None:
            continue
        alpha, beta, gamma = _rule.grad_coefficients(lse, kappa, zeta, w_y=w_y, mass=mass, valid=valid,
                                                     prob_target=prob_target, label_smoothing=eps, z_loss=z_loss,
                                                     num_classes=n_cols)
        if bad is not None:
            alpha = torch.where(bad, torch.nan, alpha)
        # g_c = (alpha a_c - beta [c = y] - gamma u_c) * (1 - tanh^2) with a_c = exp(s_c - m) / d,
        # assembled in place over exp(s - m)
        g = exp_shifted.mul_((alpha / d)[:, None])
        if not prob_target:
            g.scatter_add_(1, y_safe[:, None], -beta[:, None])
        if need_dot:
            g.sub_(gamma[:, None] * u)
        if th is not None:
            g.mul_(th.mul_(th).neg_().add_(1.0))  # th's buffer is free now: 1 - tanh^2 in place
        if not in_place:
            grad_out[rows] = g.to(grad_out.dtype)
    return ce_out, lse_out


def _whole_row_terms(logits: Tensor, target: Tensor, weight: Tensor | None, *, ignore_index: int,
                     label_smoothing: float, softcap: float | None, prob_target: bool):
    """Differentiable row statistics of whole ``(N, C)`` tensors, the row max held constant."""
    n_cols = logits.shape[1]
    cdt = compute_dtype(logits.dtype)
    eps = float(label_smoothing)
    s, th = _scores(logits.to(cdt), softcap)
    m = s.amax(dim=1).detach()
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    shifted = s - m[:, None]
    log_d = torch.log(torch.exp(shifted).sum(dim=1))
    terms = dict(s=s, th=th, m=m, shifted=shifted, log_d=log_d, lse=m + log_d, u=None, dot=None, mass=None,
                 valid=None, bad=None, y_safe=None, s_y=None, w_y=None)
    w = None if weight is None else weight.to(cdt)
    if prob_target or eps > 0.0:
        u = _class_coeff(target.to(cdt) if prob_target else None, w, n_cols, eps, n_cols, cdt, logits.device)
        prod = u * shifted
        terms.update(u=u, dot=torch.where(u == 0, torch.zeros_like(prod), prod).sum(dim=1),
                     mass=u.sum(dim=1).expand(m.shape[0]))
    if not prob_target:
        valid, bad, y_safe, s_y, w_y = _index_target(target, s, w, ignore_index)
        terms.update(valid=valid, bad=bad, y_safe=y_safe, s_y=s_y, w_y=w_y)
    return terms


def differentiable_rows(logits: Tensor, target: Tensor, weight: Tensor | None, *, ignore_index: int,
                        label_smoothing: float, softcap: float | None, prob_target: bool) -> tuple[Tensor, Tensor]:
    """``(ce (N,), lse (N,))`` as :func:`forward` returns them, from out-of-place ops autograd can differentiate.

    Holds ``O(N C)`` intermediates (no chunking): the path for double backward, forward-mode AD
    and ``torch.func`` transforms, not for speed.
    """
    t = _whole_row_terms(logits, target, weight, ignore_index=ignore_index, label_smoothing=label_smoothing,
                         softcap=softcap, prob_target=prob_target)
    ce = _rule.row_loss(t["m"], t["log_d"], dot=t["dot"], mass=t["mass"], s_y=t["s_y"], w_y=t["w_y"],
                        prob_target=prob_target, label_smoothing=label_smoothing, num_classes=logits.shape[1])
    if not prob_target:
        ce = torch.where(t["bad"], torch.nan, torch.where(t["valid"], ce, torch.zeros_like(ce)))
    return ce, t["lse"]


def differentiable_gradient(logits: Tensor, target: Tensor, weight: Tensor | None, kappa: Tensor, zeta: Tensor, *,
                            ignore_index: int, label_smoothing: float, z_loss: float, softcap: float | None,
                            prob_target: bool) -> Tensor:
    """The gradient :func:`forward` writes into ``grad_out``, in the compute dtype, as a differentiable function
    of ``logits`` (and of probability targets): what double backward differentiates.

    ``kappa``/``zeta`` are the reduction factors, 0-d or ``(N,)`` (per-row factors, e.g. times
    an upstream gradient).
    """
    t = _whole_row_terms(logits, target, weight, ignore_index=ignore_index, label_smoothing=label_smoothing,
                         softcap=softcap, prob_target=prob_target)
    alpha, beta, gamma = _rule.grad_coefficients(t["lse"], kappa, zeta, w_y=t["w_y"], mass=t["mass"],
                                                 valid=t["valid"], prob_target=prob_target,
                                                 label_smoothing=label_smoothing, z_loss=z_loss,
                                                 num_classes=logits.shape[1])
    a = torch.exp(t["shifted"] - t["log_d"][:, None])
    return _rule.gradient(a, t["y_safe"], t["u"], alpha, beta, gamma, t["th"], prob_target=prob_target,
                          need_u=t["u"] is not None)


def scale_rows_(grad: Tensor, scale: Tensor) -> None:
    """``grad *= scale`` in place: ``scale`` is a 0-d tensor or ``(N,)`` (one factor per row).

    A 0-d factor of exactly 1 on the CPU (read without a device synchronisation) skips the pass.
    """
    if scale.dim() == 0:
        if scale.device.type == "cpu" and float(scale) == 1.0:
            return
        grad.mul_(scale.to(grad.dtype))
    else:
        grad.mul_(scale.to(grad.dtype)[:, None])
