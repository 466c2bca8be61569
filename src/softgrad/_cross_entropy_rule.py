r"""The cross-entropy rule, stated once: options, per-row loss and gradient, reductions.

Every implementation of cross-entropy in softgrad -- the NumPy reference
(:mod:`softgrad._kernels._numpy`), the Numba kernels, the PyTorch-ops rows
(:mod:`softgrad.torch._torch_cross_entropy`), the Triton kernels, the vocabulary-parallel
combine and the chunks of ``linear_cross_entropy`` -- computes what this module states, and
``tests/test_cross_entropy_conformance.py`` holds each of them to it. The NumPy reference and
the PyTorch-ops rows *call* the functions below; Numba and Triton re-express them for speed.
The functions are written once for NumPy arrays and PyTorch tensors alike (out of place, so
autograd can differentiate them), and this module imports neither PyTorch nor SciPy.

Options (:class:`CrossEntropyOptions`): ``ignore_index``, ``reduction``, label smoothing
``eps``, z-loss ``zl`` and softcap ``cap``, validated once by
:meth:`CrossEntropyOptions.checked` with the same messages for every public function.

Notation for one row of ``C`` logits ``z`` (class weights ``w``, ones when absent)::

    s_c   = cap tanh(z_c / cap)  with a softcap, else z_c        (the scores)
    m     = max_c s_c                     d = sum_c exp(s_c - m)          lse = m + log d
    a_c   = exp(s_c - lse) = softmax(s)_c
    u_c   class coefficient: index targets: w_c;  probability targets t: w_c ((1 - eps) t_c + eps / C)
    mass  = sum_c u_c                     dot = sum_c u_c (s_c - m)

Loss of a row that is not ignored (``y`` its class)::

    index:        ce = (1 - eps) w_y (m - s_y + log d) + (eps / C) (mass log d - dot)
    probability:  ce = mass log d - dot                       (= -sum_c u_c log a_c)
    z-loss:       zl lse^2  (added per row, reduced with its own factor)

Both cross-entropies are ``sum_c coefficient_c (lse - s_c)`` written relative to the row max,
so a common offset of the logits (all near 1e4, say) cancels exactly instead of costing
``|z| * eps`` of precision.

**Zero coefficients.** A term whose coefficient is exactly 0 contributes exactly 0, also
where ``s_c = -inf`` (the convention ``0 log 0 = 0``): the target term when
``(1 - eps) w_y = 0``, a smoothing or probability term when ``u_c = 0``. PyTorch computes
``0 * inf = NaN`` there; every implementation of softgrad gives the limit instead. A term with
a non-zero coefficient on a ``-inf`` score gives an infinite loss (and a finite gradient), as
in PyTorch. This is the one place the rule is stated; docstrings elsewhere refer here.

Gradient, in closed form. ``d(lse - s_k)/ds_c = a_c - [c = k]``, ``d lse^2 / ds_c = 2 lse a_c``
and ``ds_c/dz_c = 1 - tanh^2(z_c / cap)``, so the derivative of
``kappa ce + zeta zl lse^2`` (``kappa``, ``zeta``: the reduction factors below) is::

    g_c = (alpha a_c - beta [c = y] - gamma u_c) (1 - tanh^2(z_c / cap))     (last factor only with a softcap)

    index:        alpha = kappa ((1 - eps) w_y + (eps / C) mass) + 2 zeta zl lse
                  beta  = kappa (1 - eps) w_y                    gamma = kappa eps / C
    probability:  alpha = kappa mass + 2 zeta zl lse,  beta = 0,  gamma = kappa

and ``alpha = beta = gamma = 0`` for ignored rows. The derivative with respect to a
probability target is ``d ce / d t_c = -(1 - eps) w_c (s_c - lse)`` (times ``kappa``).

Reductions (PyTorch's convention). With ``count`` the number of rows that are not ignored
(all rows for probability targets) and ``denom`` the summed weight ``sum w_y`` of those rows
for index targets (``count`` without weights; the number of rows for probability targets)::

    "mean":  loss = sum ce / denom + zl sum lse^2 / count      kappa = 1/denom, zeta = 1/count
    "sum":   loss = sum ce + zl sum lse^2                      kappa = zeta = 1
    "none":  loss_i = ce_i + zl lse_i^2                        kappa = zeta = 1 (gradient of the sum)

Token weights and normalisers (``softgrad.torch``). Per-row weights ``rho_i`` (loss masks,
DFT-style scaling) multiply row ``i``'s ``ce`` and z-loss and its factors: ``kappa_i = rho_i
kappa``, ``zeta_i = rho_i zeta``; the mean's denominators stay those above. A ``normalizer``
``n_i`` (a number, or one per row: per-sequence means of packed batches) replaces them: the
loss is ``sum_i rho_i (ce_i + zl lse_i^2) / n_i`` and ``kappa_i = zeta_i = rho_i / n_i`` --
Hugging Face's ``num_items_in_batch`` is ``n_i = num_items_in_batch``.

A mean over nothing (``denom = 0``: every row ignored, or all selected weights 0) is NaN, as in
PyTorch, and its factor -- hence the gradient -- is 0. A row whose index target is neither in
``[0, C)`` nor ``ignore_index`` is an error: the public functions raise ``ValueError`` (in
eager mode); the kernels give that row a NaN loss and a NaN gradient.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "REDUCTIONS",
    "CrossEntropyOptions",
    "denominators",
    "row_denominators",
    "reduction_factors",
    "row_loss",
    "grad_coefficients",
    "z_loss_rows",
    "reduce_rows",
    "gradient",
]

#: The reductions, in PyTorch's order.
REDUCTIONS = ("mean", "sum", "none")
_INT64 = np.iinfo(np.int64)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class CrossEntropyOptions:
    """The options of every cross-entropy in softgrad, validated once.

    Attributes:
        ignore_index: the index target of rows that contribute neither loss nor gradient
            (an int64; must stay -100 with probability targets, as in PyTorch).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        label_smoothing: ``eps`` in ``[0, 1]``, PyTorch's definition.
        z_loss: ``zl >= 0`` (finite), PaLM's auxiliary ``zl lse^2`` per row.
        softcap: ``cap > 0`` (finite) applies ``cap tanh(z / cap)`` first (Gemma 2), or None.

    Examples:
        >>> CrossEntropyOptions.checked(reduction="sum", label_smoothing=0.1)
        CrossEntropyOptions(ignore_index=-100, reduction='sum', label_smoothing=0.1, z_loss=0.0, softcap=None)
        >>> CrossEntropyOptions.checked(label_smoothing=1.5)
        Traceback (most recent call last):
        ...
        ValueError: label_smoothing must be in [0, 1], got 1.5
    """

    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None

    @classmethod
    def checked(cls, *, ignore_index: Any = -100, reduction: Any = "mean", label_smoothing: Any = 0.0,
                z_loss: Any = 0.0, softcap: Any = None) -> "CrossEntropyOptions":
        """Validate the options and return them as plain Python scalars.

        Raises:
            TypeError: a non-int ``ignore_index``; a non-real ``label_smoothing``, ``z_loss``
                or ``softcap``.
            ValueError: ``ignore_index`` outside int64; an unknown ``reduction``;
                ``label_smoothing`` outside ``[0, 1]``; a negative or non-finite ``z_loss``;
                a non-positive or non-finite ``softcap``.
        """
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        if not _INT64.min <= int(ignore_index) <= _INT64.max:
            raise ValueError(f"ignore_index must fit in int64 ([{_INT64.min}, {_INT64.max}]), got {ignore_index}")
        if not isinstance(reduction, str) or reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if not _is_real(label_smoothing):
            raise TypeError(f"label_smoothing must be a float in [0, 1], got {type(label_smoothing).__name__}")
        if not 0.0 <= float(label_smoothing) <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
        if not _is_real(z_loss):
            raise TypeError(f"z_loss must be a float >= 0, got {type(z_loss).__name__}")
        if not (float(z_loss) >= 0.0 and math.isfinite(float(z_loss))):
            raise ValueError(f"z_loss must be a finite float >= 0, got {z_loss}")
        if softcap is not None:
            if not _is_real(softcap):
                raise TypeError(f"softcap must be None or a float > 0, got {type(softcap).__name__}")
            if not (float(softcap) > 0.0 and math.isfinite(float(softcap))):
                raise ValueError(f"softcap must be None or a finite float > 0, got {softcap}")
        return cls(int(ignore_index), reduction, float(label_smoothing), float(z_loss),
                   None if softcap is None else float(softcap))


    def check_target_kind(self, prob_target: bool) -> None:
        """Raise ``ValueError`` for a non-default ``ignore_index`` with probability targets (as PyTorch)."""
        if prob_target and self.ignore_index != -100:
            raise ValueError("ignore_index is not supported with probability targets (as in PyTorch); "
                             f"leave it at -100, got {self.ignore_index}")

    @property
    def needs_dot(self) -> bool:
        """Whether index targets need ``dot``/``mass`` (label smoothing); probability targets always do."""
        return self.label_smoothing > 0.0


def _xp(x: Any):
    """The array module of ``x``: NumPy for arrays and scalars, else PyTorch (imported only then)."""
    if isinstance(x, (np.ndarray, np.generic, numbers.Number)):
        return np
    import torch

    return torch


def denominators(target: Any, weight: Any, *, ignore_index: int, prob_target: bool, num_classes: int,
                 dtype: Any = None) -> tuple[Any, Any]:
    """``(count, denom)`` of a batch: rows that count, and the mean's denominator (module docstring).

    ``target`` is ``(N,)`` class indices or ``(N, C)`` probabilities; ``weight`` ``(C,)`` or
    None. For tensors the results are 0-d tensors of ``dtype`` on the target's device (no host
    synchronisation); for arrays, floats. A target outside ``[0, C)`` adds nothing to ``denom``
    (it is an error reported elsewhere).
    """
    xp = _xp(target)
    n_rows = target.shape[0]
    if prob_target:
        if xp is np:
            return float(n_rows), float(n_rows)
        count = xp.full((), n_rows, dtype=dtype, device=target.device)
        return count, count
    valid = target != ignore_index
    if weight is None:
        return row_denominators(valid, None, dtype=dtype)
    hit = valid & (target >= 0) & (target < num_classes)
    if xp is np:
        weight = np.asarray(weight, dtype=np.float64)  # the weights' sum accumulates in float64
    count, _ = row_denominators(valid, None, dtype=dtype)
    _, denom = row_denominators(hit, weight[xp.where(hit, target, 0)], dtype=dtype)
    return count, denom


def row_denominators(valid: Any, w_y: Any, *, dtype: Any = None) -> tuple[Any, Any]:
    """``(count, denom)`` from the rows themselves: ``count = sum_i valid_i``, ``denom = sum_i valid_i w_{y_i}``.

    The form :func:`denominators` reduces to, for callers that hold ``w_y`` per row rather
    than the class weights (the vocabulary-parallel combine gathers it from the shards).
    ``valid`` is ``(N,)`` bool; ``w_y`` ``(N,)`` or None (unweighted: ``denom = count``).
    """
    xp = _xp(valid)
    count = valid.sum()
    count = float(count) if xp is np else count.to(dtype)
    if w_y is None:
        return count, count
    denom = xp.where(valid, w_y, 0.0).sum()
    return count, (float(denom) if xp is np else denom.to(dtype))


def reduction_factors(reduction: str, count: Any, denom: Any) -> tuple[Any, Any]:
    """``(kappa, zeta)``: the factors of the cross-entropy and of the z-loss in the reduced loss.

    ``count`` and ``denom`` are 0-d arrays or tensors (or floats). ``"mean"`` gives
    ``1/denom`` and ``1/count``, 0 where the denominator is 0 (so a mean over nothing has a
    zero gradient); ``"sum"`` and ``"none"`` give 1.

    >>> reduction_factors("mean", np.float64(4.0), np.float64(0.0))
    (0.0, 0.25)
    """
    if reduction != "mean":
        one = _xp(count).ones_like(count) if not isinstance(count, numbers.Number) else 1.0
        return one, one
    xp = _xp(count)
    safe_denom = xp.where(denom != 0, denom, 1.0)
    safe_count = xp.where(count != 0, count, 1.0)
    kappa = xp.where(denom != 0, 1.0 / safe_denom, 0.0)
    zeta = xp.where(count != 0, 1.0 / safe_count, 0.0)
    if xp is np:
        return float(kappa), float(zeta)
    return kappa, zeta


def row_loss(m: Any, log_d: Any, *, dot: Any = None, mass: Any = None, s_y: Any = None, w_y: Any = None,
             prob_target: bool, label_smoothing: float, num_classes: int) -> Any:
    """Per-row cross-entropy ``ce`` (without the z-loss) from the row statistics of the module docstring.

    Args:
        m, log_d: ``(n,)`` row max of the scores and ``log d``.
        dot, mass: ``(n,)`` ``sum_c u_c (s_c - m)`` and ``sum_c u_c`` (needed for probability
            targets and with label smoothing; else ignored).
        s_y, w_y: ``(n,)`` the target's score and class weight (index targets).
        prob_target, label_smoothing, num_classes: the row's kind, ``eps`` and ``C``.

    Returns:
        ``(n,)`` losses; ignored rows are the caller's business (``where(valid, ce, 0)``).
    """
    xp = _xp(m)
    eps = float(label_smoothing)
    # log d is finite (d is in [1, C] once the row max is subtracted), so mass log d needs no mask
    if prob_target:
        return mass * log_d - dot
    c1 = (1.0 - eps) * w_y
    # (m - s_y) + log d = lse - s_y without cancelling a large common offset; 0 * inf counts 0
    ce = xp.where(c1 == 0, 0.0, c1 * ((m - s_y) + log_d))
    if eps > 0.0:
        ce = ce + (eps / num_classes) * (mass * log_d - dot)
    return ce


def grad_coefficients(lse: Any, kappa: Any, zeta: Any, *, w_y: Any = None, mass: Any = None, valid: Any = None,
                      prob_target: bool, label_smoothing: float, z_loss: float,
                      num_classes: int) -> tuple[Any, Any, Any]:
    """``(alpha, beta, gamma)`` per row, each ``(n,)``: ``g_c = (alpha a_c - beta [c = y] - gamma u_c) softcap'``.

    ``kappa``/``zeta`` are the reduction factors (scalars or ``(n,)``, e.g. times a per-row
    upstream gradient); ``valid`` (``(n,)`` bool, None for all rows) zeroes ignored rows.
    """
    xp = _xp(lse)
    eps = float(label_smoothing)
    zeros = xp.zeros_like(lse)
    if prob_target:
        alpha = kappa * mass
        beta = zeros
        gamma = zeros + kappa
    else:
        c1 = (1.0 - eps) * w_y
        alpha = kappa * c1
        if eps > 0.0:
            alpha = alpha + kappa * (eps / num_classes) * mass
        beta = kappa * c1
        gamma = zeros + kappa * (eps / num_classes)
    if z_loss:
        alpha = alpha + 2.0 * z_loss * zeta * lse
    if valid is not None:
        alpha, beta, gamma = (xp.where(valid, x, 0.0) for x in (alpha, beta, gamma))
    return alpha, beta, gamma


def z_loss_rows(lse: Any, z_loss: float, valid: Any = None) -> Any:
    """``zl lse^2`` per row, 0 for ignored rows (``valid`` False) and everywhere when ``zl = 0``."""
    xp = _xp(lse)
    if not z_loss:
        return xp.zeros_like(lse)
    rows = z_loss * lse * lse
    return rows if valid is None else xp.where(valid, rows, 0.0)


def reduce_rows(ce: Any, z_rows: Any, reduction: str, count: Any, denom: Any, row_scale: Any = None) -> tuple[Any, Any]:
    """``(loss, z_part)``: the reduced loss (z-loss included) and its z-loss part.

    ``"none"`` returns the per-row ``ce + z_rows`` and ``z_rows``; ``"sum"`` their sums;
    ``"mean"`` ``sum ce / denom + sum z_rows / count`` (NaN when ``denom`` is 0, as PyTorch).

    ``row_scale`` (``(N,)`` or None) multiplies each row's ``ce`` and ``z_rows`` first: per-token
    weights ``rho_i``, and ``rho_i / normalizer_i`` with ``reduction="sum"`` for a caller's own
    normaliser (e.g. Hugging Face's ``num_items_in_batch``). The gradient factors are then
    ``kappa_i = rho_i kappa`` and ``zeta_i = rho_i zeta``: the mean's denominators do not change.
    """
    if row_scale is not None:
        ce, z_rows = ce * row_scale, z_rows * row_scale
    if reduction == "none":
        return ce + z_rows, z_rows
    z_part = z_rows.sum()
    if reduction == "sum":
        return ce.sum() + z_part, z_part
    xp = _xp(ce)
    # z_rows is 0 on ignored rows, so a mean over no rows has z_part = 0 / 1 = 0
    z_part = z_part / xp.where(count != 0, count, 1.0)
    mean_ce = xp.where(denom != 0, ce.sum() / xp.where(denom != 0, denom, 1.0), math.nan)
    return mean_ce + z_part, z_part


def gradient(a: Any, target: Any, u: Any, alpha: Any, beta: Any, gamma: Any, tanh: Any = None, *,
             prob_target: bool, need_u: bool) -> Any:
    """The closed-form gradient ``(alpha a - beta onehot(y) - gamma u) (1 - tanh^2)`` of ``(n, C)`` rows.

    The out-of-place form, for the NumPy reference and PyTorch autograd (double backward,
    forward-mode AD, ``torch.func``); the fast kernels assemble the same expression in place.
    ``target`` is ``(n,)`` class indices (any value for ignored rows, whose coefficients are
    0) or ignored for probability targets; ``u`` is ``(n, C)`` or ``(1, C)`` (used when
    ``need_u``); ``tanh`` is ``tanh(z / cap)`` with a softcap, else None.
    """
    xp = _xp(a)
    g = alpha[:, None] * a
    if not prob_target:
        cols = xp.arange(a.shape[1]) if xp is np else xp.arange(a.shape[1], device=a.device)
        onehot = cols[None, :] == target[:, None]
        g = g - xp.where(onehot, beta[:, None], 0.0)
    if need_u:
        g = g - gamma[:, None] * u
    if tanh is not None:
        g = g * (1.0 - tanh * tanh)
    return g
