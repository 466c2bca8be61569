r"""Per-token log-probabilities and entropy of a linear head without materialising the logits (the RL head).

Policy-gradient losses (PPO, GRPO, ...) need, per generated token, ``log p(y)`` of the sampled
token under the policy, often its entropy, and gradients through both. With
``s = (h W^T + b) / tau`` (``tau`` the sampling temperature, a scalar or one per token)::

    lse   = logsumexp_c s_c
    logp  = s_y - lse                          log-probability of the target token
    H     = lse - sum_c p_c s_c                entropy of p = softmax(s)

Both are computed relative to the row max ``m`` so that nothing cancels: with
``e_c = exp(s_c - m)``, ``d = sum_c e_c = 1 + r`` (``r`` the sum without one maximal entry)
and ``q = sum_c e_c (s_c - m) <= 0``::

    logp  = (s_y - m) - log1p(r)               (a sum of two non-positive terms)
    H     = log1p(r) - q / (1 + r)             (a sum of two non-negative terms)

so both keep their relative accuracy even for a near-certain token (``logp ~ -1e-20``).

The rows are walked in chunks of ``n``: the forward computes one chunk's ``(n, V)`` logits,
reduces them to ``(m, d, s_y, q)`` and drops them; the backward recomputes them (one more
GEMM) and folds the chunk's gradient into ``grad_hidden``, ``grad_weight`` and ``grad_bias``
(the derivation is above :meth:`_LinearLogprobs.backward`). Peak extra memory is
``grad_W + grad_h + O(n V)``, never ``N V``. The pieces :func:`_scaled_logits`,
:func:`_row_stats` and :func:`_gradient_` are shared with
:mod:`softgrad.distributed._vocab_parallel_logprobs`.

Autograd modes: a plain backward (any number of times: each recomputes the chunks);
``create_graph=True`` rebuilds the gradient from differentiable ops (double backward);
forward-mode AD and ``torch.func`` transforms run the differentiable chunked form
(:func:`_differentiable_rows`); meta and fake tensors give shapes.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
from torch import Tensor

from softgrad import _cross_entropy_rule as _rule
from softgrad.torch import _validation as _tv
from softgrad.torch._cross_entropy import _check_targets
from softgrad.torch._linear_cross_entropy import _accumulate_mm_, _row_chunks, choose_chunk_size
from softgrad.torch._torch_cross_entropy import compute_dtype

__all__ = ["LogprobsOutput", "linear_logprobs"]


class LogprobsOutput(NamedTuple):
    """What :func:`linear_logprobs` returns with ``return_entropy=True``; both have ``target``'s shape."""

    logprobs: Tensor  #: log p(target) per token (0 for ignored tokens)
    entropy: Tensor  #: entropy of the token's softmax (0 for ignored tokens)


# ----------------------------------------------------------------------------- chunk pieces
def _scaled_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, rows: slice, temp, cdt) -> Tensor:
    """``s_c = (h_c W^T + b) / tau`` for one chunk: a fresh ``(n, V)`` tensor in the compute dtype.

    ``temp`` is a Python float or the ``(N,)`` per-row temperatures in ``cdt``. The GEMM runs in
    the input dtype (accumulating in float32 inside, as ``nn.Linear``); the bias is added after
    the cast, so a bfloat16 head's bias is not rounded into bfloat16 logits.
    """
    s = torch.mm(hidden[rows], weight.t()).to(cdt)  # .to is a no-op (same fresh buffer) for float32/float64
    if bias is not None:
        s.add_(bias)
    if isinstance(temp, Tensor):
        s.div_(temp[rows, None])
    elif temp != 1.0:
        s.div_(temp)
    return s


def _row_stats(s: Tensor, y_local: Tensor, y_here: Tensor, want_q: bool):
    """Per row of ``s`` (overwritten by ``s - m``): ``m``, ``r = d - 1``, ``s_y - m`` (0 where ``y`` is not in
    these columns) and, with ``want_q``, ``q = sum_c e_c (s_c - m)`` (else None); ``e = exp(s - m)``.

    ``r`` is the sum of ``e`` without one maximal entry (whose ``e`` is exactly 1), so that
    ``log d = log1p(r)`` keeps its relative accuracy for a near-certain row: there ``logp`` is
    ``-1e-20``, not a rounded 0, and the entropy keeps all its digits too.
    """
    m, top = s.max(dim=1)
    s.sub_(m[:, None])
    s_y = torch.where(y_here, s.gather(1, y_local[:, None]).squeeze(1), torch.zeros_like(m))
    e = torch.exp(s)
    e.scatter_(1, top[:, None], 0.0)  # the max entry contributes 1 to d, and 0 to q either way
    rest = e.sum(dim=1)
    q = torch.linalg.vecdot(e, s, dim=1) if want_q else None
    return m, rest, s_y, q


# The backward's gradient, for one chunk. With L = sum_i (g_i logp_i + k_i H_i) (g, k the
# upstream gradients of the log-probabilities and the entropies) and p = softmax(s):
#
#   d logp_i / d s_ic = [c = y_i] - p_ic
#   H_i = -sum_c p_ic log p_ic,  d p_ic' / d s_ic = p_ic' ([c' = c] - p_ic), so
#   d H_i / d s_ic = -sum_c' (log p_ic' + 1) p_ic' ([c' = c] - p_ic)
#                  = -p_ic (log p_ic + 1) + p_ic (sum_c' p_ic' log p_ic' + 1)
#                  = -p_ic (log p_ic + H_i)
#
# hence G_ic = dL/dz_ic = (g_i ([c = y_i] - p_ic) - k_i p_ic (log p_ic + H_i)) / tau_i   (s = z / tau)
#            = (g_i [c = y_i] - p_ic (g_i + k_i (log p_ic + H_i))) / tau_i,
# with log p_ic = s_ic - lse_i from the forward's lse and H. Then z = h W^T + b gives
# grad_h = G W, grad_W = G^T h, grad_b = sum_i G_i. Ignored rows have g_i = k_i = 0, so G_i = 0.
def _gradient_(s: Tensor, lse: Tensor, entropy: Tensor | None, g_lp: Tensor | None, g_h: Tensor | None,
               y_local: Tensor, y_here: Tensor, temp) -> Tensor:
    """``G = dL/dz`` of one chunk (formula above), written over ``s`` where possible; returns it.

    ``lse``, ``entropy``, ``g_lp``, ``g_h`` are the chunk's ``(n,)`` rows (``g_*`` zero on ignored
    rows; None for an unused output); the one-hot term lands where ``y_here``.
    """
    s.sub_(lse[:, None])  # log p
    p = torch.exp(s)
    if g_h is not None:
        s.add_(entropy[:, None]).mul_(g_h[:, None])  # k (log p + H)
        if g_lp is not None:
            s.add_(g_lp[:, None])
        grad = s.mul_(p).neg_()
    else:
        grad = p.mul_(g_lp.neg()[:, None])
    if g_lp is not None:
        grad.scatter_add_(1, y_local[:, None], torch.where(y_here, g_lp, torch.zeros_like(g_lp))[:, None])
    if isinstance(temp, Tensor):
        grad.div_(temp[:, None])
    elif temp != 1.0:
        grad.div_(temp)
    return grad


def _accumulate(grad: Tensor, hidden: Tensor, weight: Tensor, rows: slice, grad_h, grad_w, grad_b) -> None:
    """``grad_h[rows] = G W``, ``grad_W += G^T h_c``, ``grad_b += sum G`` for one chunk's ``G`` (compute dtype)."""
    g = grad.to(hidden.dtype)  # the GEMMs run in the input dtype, as nn.Linear's backward
    if grad_b is not None:
        grad_b.add_(grad.sum(dim=0))
    if grad_h is not None:
        grad_h[rows] = torch.mm(g, weight)  # (n, V) @ (V, D)
    if grad_w is not None:
        # (V, n) @ (n, D) added in place; a bfloat16/float16 head's float32 sum takes each
        # chunk's product unrounded (as linear_cross_entropy's accumulation does)
        _accumulate_mm_(grad_w, g.t(), hidden[rows])


def _grad_buffers(hidden: Tensor, weight: Tensor, bias: Tensor | None, need, cdt):
    grad_h = torch.empty_like(hidden) if need[0] else None
    grad_w = torch.zeros(weight.shape, dtype=cdt if weight.dtype != cdt else weight.dtype,
                         device=weight.device) if need[1] else None
    grad_b = torch.zeros(weight.shape[0], dtype=cdt, device=weight.device) if need[2] and bias is not None else None
    return grad_h, grad_w, grad_b


# ----------------------------------------------------------------------------- differentiable form
def _differentiable_chunk(hidden, weight, bias, rows, temp, target, valid, cdt):
    """One chunk's ``(log_softmax(s) (n, V), logp (n,), H (n,), lse (n,))`` from differentiable ops."""
    z = torch.mm(hidden[rows], weight.t()).to(cdt)
    if bias is not None:
        z = z + bias
    s = z / (temp[rows, None] if isinstance(temp, Tensor) else temp)
    lse = torch.logsumexp(s, dim=1)
    log_p = s - lse[:, None]
    zero = torch.zeros((), dtype=cdt, device=s.device)
    v = valid[rows]
    y = torch.where(v, target[rows], 0).clamp(0, weight.shape[0] - 1)  # the range is checked afterwards
    logp = torch.where(v, log_p.gather(1, y[:, None]).squeeze(1), zero)
    ent = torch.where(v, -(torch.exp(log_p) * log_p).sum(dim=1), zero)
    return log_p, logp, ent, lse


def _differentiable_rows(hidden, weight, bias, target, valid, temp, chunk_size):
    """Per-row ``(logp, H, lse)`` chunk by chunk from differentiable ops (forward-mode AD, ``torch.func``)."""
    cdt = compute_dtype(hidden.dtype)
    parts = [_differentiable_chunk(hidden, weight, bias, rows, temp, target, valid, cdt)[1:]
             for rows in _row_chunks(hidden.shape[0], chunk_size)]
    return tuple(torch.cat([p[i] for p in parts]) for i in range(3))


def _differentiable_grads(hidden, weight, bias, target, valid, temp, g_lp, g_h, chunk_size, need):
    """The backward's gradients from differentiable ops of the formula above (``create_graph=True``)."""
    cdt = compute_dtype(hidden.dtype)
    grad_h, grad_w, grad_b = [], 0, 0
    for rows in _row_chunks(hidden.shape[0], chunk_size):
        log_p, _, ent, _ = _differentiable_chunk(hidden, weight, bias, rows, temp, target, valid, cdt)
        p = torch.exp(log_p)
        grad = torch.zeros_like(p)
        if g_lp is not None:
            onehot = torch.nn.functional.one_hot(torch.where(valid[rows], target[rows], 0), p.shape[1]).to(cdt)
            grad = grad + g_lp[rows, None] * (onehot - p)
        if g_h is not None:
            grad = grad - g_h[rows, None] * p * (log_p + ent[:, None])
        grad = grad / (temp[rows, None] if isinstance(temp, Tensor) else temp)
        g = grad.to(hidden.dtype)
        if need[0]:
            grad_h.append(g @ weight)
        if need[1]:
            grad_w = grad_w + g.t() @ hidden[rows]
        if need[2]:
            grad_b = grad_b + grad.sum(dim=0)
    return (torch.cat(grad_h) if need[0] else None, grad_w if need[1] else None,
            grad_b.to(bias.dtype) if need[2] and bias is not None else None)


# ----------------------------------------------------------------------------- autograd
class _LinearLogprobs(torch.autograd.Function):
    """Inputs validated and flattened: ``hidden (N, D)``, ``target (N,)`` int64, ``temp`` float or ``(N,)``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, temp, ignore_index, want_entropy, chunk_size):
        n_rows = hidden.shape[0]
        cdt = compute_dtype(hidden.dtype)
        valid = target != ignore_index
        y_safe = torch.where(valid, target, 0).clamp_(0, weight.shape[0] - 1)  # range checked after the forward
        logp = torch.empty(n_rows, dtype=cdt, device=hidden.device)
        lse = torch.empty_like(logp)
        ent = torch.empty_like(logp) if want_entropy else None
        for rows in _row_chunks(n_rows, chunk_size):
            s = _scaled_logits(hidden, weight, bias, rows, temp, cdt)
            m, rest, s_y, q = _row_stats(s, y_safe[rows], valid[rows], want_entropy)
            del s
            log_d = torch.log1p(rest)  # d = 1 + rest
            logp[rows] = s_y - log_d
            lse[rows] = m + log_d
            if want_entropy:
                ent[rows] = log_d - q / (1.0 + rest)
        zero = torch.zeros((), dtype=cdt, device=hidden.device)
        logp = torch.where(valid, logp, zero)
        ent = torch.where(valid, ent, zero) if want_entropy else torch.zeros_like(logp)
        if not want_entropy:
            ctx.mark_non_differentiable(ent)
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        ctx.chunk_size, ctx.temp_scalar = chunk_size, None if isinstance(temp, Tensor) else temp
        temp_t = temp if isinstance(temp, Tensor) else None
        ctx.save_for_backward(hidden, weight, bias, y_safe, valid, temp_t, lse, ent)
        return logp, ent, lse

    @staticmethod
    def backward(ctx, grad_logp, grad_ent, _grad_lse):
        hidden, weight, bias, y_safe, valid, temp_t, lse, ent = ctx.saved_tensors
        temp = temp_t if temp_t is not None else ctx.temp_scalar
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        nones = (None,) * 5
        if (grad_logp is None and grad_ent is None) or not any(need):
            return (None, None, None) + nones
        cdt = lse.dtype
        zero = torch.zeros((), dtype=cdt, device=lse.device)
        g_lp = None if grad_logp is None else torch.where(valid, grad_logp.to(cdt), zero)
        g_h = None if grad_ent is None else torch.where(valid, grad_ent.to(cdt), zero)
        if torch.is_grad_enabled():  # create_graph=True: a gradient that can be differentiated again
            return _differentiable_grads(hidden, weight, bias, y_safe, valid, temp, g_lp, g_h, ctx.chunk_size,
                                         need) + nones
        grad_h, grad_w, grad_b = _grad_buffers(hidden, weight, bias, need, cdt)
        for rows in _row_chunks(hidden.shape[0], ctx.chunk_size):
            s = _scaled_logits(hidden, weight, bias, rows, temp, cdt)
            grad = _gradient_(s, lse[rows], ent[rows] if g_h is not None else None,
                              None if g_lp is None else g_lp[rows], None if g_h is None else g_h[rows],
                              y_safe[rows], valid[rows], temp[rows] if temp_t is not None else temp)
            _accumulate(grad, hidden, weight, rows, grad_h, grad_w, grad_b)
            del s, grad
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return (grad_h, grad_w, grad_b) + nones


# ----------------------------------------------------------------------------- validation
def _check_temperature(temperature, target: Tensor, reference: Tensor, reference_name: str):
    """A Python real > 0, or a floating tensor broadcastable to ``target.shape`` without grad; returns it."""
    if isinstance(temperature, Tensor):
        if not temperature.is_floating_point():
            raise TypeError(f"temperature must be a float or a floating-point tensor, got a {temperature.dtype} "
                            "tensor")
        try:
            torch.broadcast_shapes(temperature.shape, target.shape)
        except RuntimeError:
            raise ValueError(f"temperature of shape {tuple(temperature.shape)} does not broadcast to the target's "
                             f"shape {tuple(target.shape)} (pass one per token, one per sequence, or a float)"
                             ) from None
        if torch.broadcast_shapes(temperature.shape, target.shape) != target.shape:
            raise ValueError(f"temperature of shape {tuple(temperature.shape)} must broadcast to the target's shape "
                             f"{tuple(target.shape)} without enlarging it")
        _tv.check_same_device(temperature, "temperature", reference, reference_name)
        if temperature.requires_grad and torch.is_grad_enabled():
            raise ValueError("temperature requires grad, but no gradient with respect to the temperature is "
                             "computed; pass temperature.detach()")
        return temperature
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a float > 0 or a tensor, got {type(temperature).__name__}")
    if not (math.isfinite(float(temperature)) and float(temperature) > 0.0):
        raise ValueError(f"temperature must be a finite float > 0, got {temperature}")
    return float(temperature)


def _validate(hidden, weight, target, bias, temperature, return_entropy, ignore_index, chunk_size):
    """Types, shapes, devices and options (no host synchronisation); returns ``(temperature, ignore_index)``."""
    _tv.check_linear_head(hidden, weight, target, bias)
    temperature = _check_temperature(temperature, target, hidden, "hidden")
    _tv.check_flags(return_entropy=return_entropy)
    ignore_index = _rule.CrossEntropyOptions.checked(ignore_index=ignore_index).ignore_index
    _tv.check_chunk_size(chunk_size)
    return temperature, ignore_index


def _temperature_rows(temperature, target: Tensor, valid: Tensor, cdt):
    """``(N,)`` per-row temperatures in the compute dtype (1 on ignored rows, which are never read), or the float."""
    if not isinstance(temperature, Tensor):
        return temperature
    rows = temperature.detach().to(cdt).expand(target.shape).reshape(-1)
    return torch.where(valid, rows, torch.ones((), dtype=cdt, device=rows.device))


def _bad_temperature(temp, valid: Tensor) -> Tensor | None:
    """0-d bool: some non-ignored row's temperature is not a finite number > 0 (None for a float temperature)."""
    if not isinstance(temp, Tensor):
        return None
    return (valid & ~(torch.isfinite(temp) & (temp > 0))).any()


_TEMPERATURE_MESSAGE = "temperature must be finite and > 0 on every token that is not ignored; {} token(s) are not"


# ----------------------------------------------------------------------------- public API
def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    *,
    temperature: float | Tensor = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> Tensor | LogprobsOutput:
    r"""Per-token ``log p(target)`` (and entropy) of ``softmax((hidden @ weight.T + bias) / temperature)``.

    The RL head: what PPO/GRPO-style losses need of a language model's output layer, computed
    over chunks of tokens so that the ``(N, V)`` logits are never held:

    .. math::
        s = (h W^\top + b) / \tau,\qquad
        \log p_i(y_i) = s_{i,y_i} - \operatorname{lse}(s_i),\qquad
        H_i = \operatorname{lse}(s_i) - \textstyle\sum_c p_{ic} s_{ic}

    Both outputs are differentiable with respect to ``hidden``, ``weight`` and ``bias`` for any
    upstream gradient (an entropy bonus is trained through the entropy's own gradient
    :math:`-p (\log p + H) / \tau`). Every autograd mode works: repeated backward, double
    backward (``create_graph=True``), forward-mode AD, ``torch.func`` transforms,
    ``torch.compile``, meta/fake tensors.

    Args:
        hidden: ``(N, D)`` or ``(B, T, D)``, float64/float32/bfloat16/float16.
        weight: ``(V, D)`` as in ``nn.Linear`` (may be tied to an embedding), ``hidden``'s dtype
            and device.
        target: the sampled tokens, an integer dtype (not uint64) of shape ``hidden.shape[:-1]``,
            values in ``[0, V)`` or ``ignore_index``.
        bias: optional ``(V,)``, ``hidden``'s dtype.
        temperature: :math:`\tau`, a float > 0, or a floating tensor broadcastable to
            ``target.shape`` (per token ``(B, T)``, per sequence ``(B, 1)``, ...) whose entries
            on non-ignored tokens are finite and > 0; no gradient flows to it.
        return_entropy: also return the entropy, as :class:`LogprobsOutput`.
        ignore_index: target value of tokens (prompt, padding) whose log-probability and
            entropy are 0 and which contribute no gradient.
        chunk_size: rows per chunk; default :func:`softgrad.torch.choose_chunk_size`.

    Returns:
        ``logprobs`` of ``target``'s shape, or ``LogprobsOutput(logprobs, entropy)`` with
        ``return_entropy=True``. Computed in float32 -- float64 for float64 input -- and
        returned in that dtype, also for bfloat16/float16 heads: an importance ratio
        ``exp(logp - logp_old)`` from bfloat16 log-probabilities would be off by up to 1.6% near
        ``logp = -5`` (bfloat16's spacing there is 1/32). Under autocast the GEMMs run in the autocast dtype.

    Raises:
        TypeError: non-tensor arguments, a non-floating ``hidden``, mismatched dtypes, a
            non-integer or uint64 ``target``, a non-real or non-floating ``temperature``, a
            non-bool ``return_entropy``, a non-int ``ignore_index``.
        ValueError: bad shapes or devices, ``temperature <= 0`` (a float), a temperature tensor
            that requires grad or does not broadcast to ``target``, ``chunk_size``; and in eager
            mode (one host synchronisation after the forward) ``target`` values outside
            ``[0, V)`` and not ``ignore_index``, temperature entries that are not finite and
            > 0 on non-ignored tokens, and logits with NaN/``+inf``.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> h = torch.randn(2, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
        >>> w = torch.randn(11, 8, generator=g, dtype=torch.float64, requires_grad=True)
        >>> y = torch.randint(0, 11, (2, 5), generator=g)
        >>> out = linear_logprobs(h, w, y, temperature=0.7, return_entropy=True, chunk_size=3)
        >>> ref = torch.log_softmax(h @ w.T / 0.7, dim=-1)
        >>> bool(torch.allclose(out.logprobs, ref.gather(-1, y[..., None]).squeeze(-1)))
        True
        >>> bool(torch.allclose(out.entropy, -(ref.exp() * ref).sum(-1)))
        True
        >>> (out.logprobs.sum() + 0.01 * out.entropy.sum()).backward()  # gradient reaches h and w
    """
    temperature, ignore_index = _validate(hidden, weight, target, bias, temperature, return_entropy, ignore_index,
                                          chunk_size)
    hidden, weight, bias = _tv.autocast_head(hidden, weight, bias)
    batch_shape = target.shape
    h2 = hidden.reshape(-1, hidden.shape[-1])
    t1 = target.reshape(-1).to(torch.int64)
    cdt = compute_dtype(h2.dtype)
    valid = t1 != ignore_index
    temp = _temperature_rows(temperature, target, valid, cdt)
    if chunk_size is None:
        chunk_size = choose_chunk_size(h2.shape[0], weight.shape[0], h2.device)
    with _tv.autocast_off(hidden.device):
        if _tv.functorch_active() or _tv.has_tangent(h2, weight, bias):
            logp, ent, lse = _differentiable_rows(h2, weight, bias, t1, valid, temp, int(chunk_size))
            lse = lse.detach()
        else:
            logp, ent, lse = _LinearLogprobs.apply(h2, weight, bias, t1, temp, ignore_index, return_entropy,
                                                   int(chunk_size))
    if _tv.values_checkable(h2):
        # one host synchronisation: targets in range, temperatures valid, every row's logits finite
        bad_rows = ~torch.isfinite(lse)
        bad_temp = _bad_temperature(temp, valid)
        extra = bad_rows.any() if bad_temp is None else bad_rows.any() | bad_temp
        if _check_targets(t1, None, weight.shape[0], ignore_index, False, extra=extra):
            if bad_temp is not None and bool(bad_temp):
                raise ValueError(_TEMPERATURE_MESSAGE.format(int((valid & ~(torch.isfinite(temp) & (temp > 0)))
                                                                 .sum())))
            first = int(bad_rows.nonzero()[0, 0])
            raise ValueError(f"the logits (hidden @ weight.T + bias) / temperature contain NaN or +inf in "
                             f"{int(bad_rows.sum())} row(s) (first at flattened row {first}): check hidden, weight "
                             "and bias for NaN/inf values")
    logp = logp.reshape(batch_shape)
    if return_entropy:
        return LogprobsOutput(logp, ent.reshape(batch_shape))
    return logp
