r"""Vocabulary-parallel RL head: per-token ``log p(target)`` and entropy with the rows of ``W`` split across ranks.

Layout as in :mod:`softgrad.distributed._vocab_parallel`: rank ``k`` holds rows ``[o_k, o_k + V_k)``
of the ``(V, D)`` output weight (uneven, ``V_k = 0`` allowed), agreed by :func:`_agree`; every
rank holds the same ``hidden``, ``target`` and temperature. With ``s = (h W^T + b) / tau``
(the single-device definitions are in :mod:`softgrad.torch._linear_logprobs`), each rank walks
its ``(N, V_k)`` logits in row chunks and keeps per row, relative to its own max ``m_k``::

    r_k  = sum_c e_c - 1   (e_c = exp(s_c - m_k), the sum without one maximal entry)
    y_k  = s_y - m_k       (0 where y is not in the shard)
    q_k  = sum_c e_c (s_c - m_k)                 (only with return_entropy)

Two all-reduces of ``O(N)`` numbers then give every rank the whole row, relative to the global
max ``M`` (``f_k = exp(m_k - M)``, ``t_k = [m_k = M]``; a zero-width shard has ``f_k = 0``)::

    M    = max_k m_k                                                all_reduce(MAX): N numbers
    R    = sum_k (f_k r_k + (1 - t_k) f_k) + (sum_k t_k - 1)     \
    s_yM = sum_k [y in k] (y_k + m_k - M)                          |  one all_reduce(SUM)
    Q    = sum_k f_k (q_k + (1 + r_k) (m_k - M))                   /  of an (N, 3) or (N, 4) block
    T    = sum_k t_k

so that ``D = 1 + R`` (every term of ``R`` is >= 0: no cancellation, and ``log D = log1p(R)``
keeps its relative accuracy for near-certain tokens) and::

    lse  = M + log1p(R),   logp = s_yM - log1p(R),   H = log1p(R) - Q / (1 + R)

The backward needs no communication to form each rank's ``G = dL/dz`` on its own columns
(``lse`` and ``H`` are known on every rank; the formula is above
:func:`softgrad.torch._linear_logprobs._gradient_`); ``grad_W_k`` and ``grad_b_k`` stay local,
and one sum all-reduce of the ``(N, D)`` ``grad_h`` gathers ``sum_k G_k W_k``.

The row chunks (:func:`softgrad.torch._linear_cross_entropy._row_chunks`), the layout agreement
(:func:`_agree_head`) and that all-reduce (:func:`_sum_grad_hidden`) are those of
:mod:`softgrad.distributed._vocab_parallel_linear`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from softgrad import _cross_entropy_rule as _rule
from softgrad.distributed import _comm
from softgrad.distributed._vocab_parallel import (
    Layout,
    _check_rows,
    _refuse_double_backward,
    _target_checksum,
)
from softgrad.torch import _validation as _tv
from softgrad.distributed._vocab_parallel_linear import _agree_head, _sum_grad_hidden
from softgrad.torch._linear_cross_entropy import _row_chunks, choose_chunk_size
from softgrad.torch._linear_logprobs import (
    _TEMPERATURE_MESSAGE,
    LogprobsOutput,
    _accumulate,
    _bad_temperature,
    _check_temperature,
    _gradient_,
    _row_stats,
    _scaled_logits,
    _temperature_rows,
)
from softgrad.torch._torch_cross_entropy import compute_dtype

__all__ = ["vocab_parallel_linear_logprobs"]

_WHAT = "vocab_parallel_linear_logprobs"


def _local_targets(target: Tensor, valid: Tensor, layout: Layout):
    """This shard's column of each row's target (clamped into range) and whether it lies here."""
    local = target - layout.offset
    here = valid & (local >= 0) & (local < layout.width)
    return torch.where(here, local, 0).clamp_(0, max(layout.width - 1, 0)), here


class _VocabParallelLinearLogprobs(torch.autograd.Function):
    """Forward: chunked shard stats, two all-reduces. Backward: chunked ``G``, one all-reduce of ``grad_h``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, temp, layout: Layout, group, ignore_index, want_entropy,
                chunk_size):
        n_rows = hidden.shape[0]
        cdt = compute_dtype(hidden.dtype)
        valid = target != ignore_index
        y_local, here = _local_targets(target, valid, layout)
        m_k = torch.full((n_rows,), -math.inf, dtype=cdt, device=hidden.device)
        r_k, y_k = torch.zeros_like(m_k), torch.zeros_like(m_k)
        q_k = torch.zeros_like(m_k) if want_entropy else None
        if layout.width:
            for rows in _row_chunks(n_rows, chunk_size):
                s = _scaled_logits(hidden, weight, bias, rows, temp, cdt)
                m, rest, s_y, q = _row_stats(s, y_local[rows], here[rows], want_entropy)
                del s
                m_k[rows], r_k[rows], y_k[rows] = m, rest, s_y
                if want_entropy:
                    q_k[rows] = q
        big_m = _comm.all_reduce(m_k.clone(), "max", group, f"{_WHAT} row max")
        empty = torch.isneginf(m_k)  # a zero-width shard: contributes nothing
        zero = torch.zeros((), dtype=cdt, device=hidden.device)
        shift = torch.where(empty, zero, m_k - big_m)  # m_k - M <= 0
        f = torch.where(empty, zero, torch.exp(shift))
        top = (~empty & (m_k == big_m)).to(cdt)
        columns = [f * r_k + (1.0 - top) * f, top, torch.where(here, y_k + shift, zero)]
        if want_entropy:
            columns.append(f * (q_k + (1.0 + r_k) * shift))
        block = _comm.all_reduce(torch.stack(columns, dim=1).contiguous(), "sum", group, f"{_WHAT} row sums")
        sums = block.unbind(dim=1)
        rest = sums[0] + (sums[1] - 1.0)
        log_d = torch.log1p(rest)
        lse = big_m + log_d
        _check_rows(lse, "the logits (hidden @ weight_shard.T + bias_shard) / temperature")
        logp = torch.where(valid, sums[2] - log_d, zero)
        ent = torch.where(valid, log_d - sums[3] / (1.0 + rest), zero) if want_entropy else torch.zeros_like(logp)
        if not want_entropy:
            ctx.mark_non_differentiable(ent)
        ctx.set_materialize_grads(False)
        ctx.layout, ctx.group, ctx.chunk_size = layout, group, chunk_size
        ctx.temp_scalar = None if isinstance(temp, Tensor) else temp
        ctx.save_for_backward(hidden, weight, bias, y_local, here, valid, temp if isinstance(temp, Tensor) else None,
                              lse, ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        _refuse_double_backward(_WHAT)
        hidden, weight, bias, y_local, here, valid, temp_t, lse, ent = ctx.saved_tensors
        temp = temp_t if temp_t is not None else ctx.temp_scalar
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        cdt = lse.dtype
        zero = torch.zeros((), dtype=cdt, device=lse.device)
        g_lp = None if grad_logp is None else torch.where(valid, grad_logp.to(cdt), zero)
        g_h = None if grad_ent is None else torch.where(valid, grad_ent.to(cdt), zero)
        # every rank takes part in the all-reduce of grad_h (agreed in the forward), even with nothing to add
        grad_h = torch.zeros(hidden.shape, dtype=cdt, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=cdt, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=cdt, device=weight.device) if need_b else None
        if ctx.layout.width and (g_lp is not None or g_h is not None):
            for rows in _row_chunks(hidden.shape[0], ctx.chunk_size):
                s = _scaled_logits(hidden, weight, bias, rows, temp, cdt)
                grad = _gradient_(s, lse[rows], ent[rows] if g_h is not None else None,
                                  None if g_lp is None else g_lp[rows], None if g_h is None else g_h[rows],
                                  y_local[rows], here[rows], temp[rows] if temp_t is not None else temp)
                _accumulate(grad, hidden, weight, rows, grad_h, grad_w, grad_b)
                del s, grad
        grad_h = _sum_grad_hidden(grad_h, hidden, ctx.group, _WHAT)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return (grad_h, grad_w, grad_b) + (None,) * 7


def _validate(hidden, weight, target, bias, temperature, return_entropy, ignore_index, chunk_size):
    for name, value in (("hidden", hidden), ("weight_shard", weight), ("target", target)):
        _tv.check_tensor(value, name)
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"bias_shard must be a torch.Tensor or None, got {type(bias).__name__}")
    _tv.check_float(hidden, "hidden")
    if hidden.dim() < 2 or hidden.shape[-1] == 0:
        raise ValueError(f"hidden must have shape (N, D) or (B, T, D) with D >= 1, got {tuple(hidden.shape)}")
    if hidden.numel() == 0:
        raise ValueError(f"hidden has no rows (shape {tuple(hidden.shape)}); need at least one")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight_shard must have shape (V_shard, {hidden.shape[-1]}), got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight_shard dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if bias is not None and (tuple(bias.shape) != (weight.shape[0],) or bias.dtype != hidden.dtype):
        raise ValueError(f"bias_shard must have shape ({weight.shape[0]},) and dtype {hidden.dtype}, got "
                         f"{tuple(bias.shape)} {bias.dtype}")
    for name, value in (("weight_shard", weight), ("target", target), ("bias_shard", bias)):
        _tv.check_same_device(value, name, hidden, "hidden")
    _tv.check_index_dtype(target)
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"target shape {tuple(target.shape)} must equal hidden.shape[:-1] = "
                         f"{tuple(hidden.shape[:-1])}")
    temperature = _check_temperature(temperature, target, hidden, "hidden")
    _tv.check_flags(return_entropy=return_entropy)
    _rule.CrossEntropyOptions.checked(ignore_index=ignore_index)  # an int that fits int64
    _tv.check_chunk_size(chunk_size)
    return temperature


def _agree_temperature(temp: Tensor, valid: Tensor, group, rank: int) -> None:
    """One max all-reduce of 3 int64: every rank holds the same per-row temperatures, all finite and > 0."""
    bits = temp.view(torch.int64 if temp.dtype == torch.float64 else torch.int32)
    checksum = _target_checksum(bits)
    bad = _bad_temperature(temp, valid).to(torch.int64)
    vec = torch.stack([checksum, -checksum, bad * (rank + 1)])
    high, neg_low, bad_rank = _comm.all_reduce(vec, "max", group, f"{_WHAT} temperature checks").tolist()
    if high != -neg_low:
        raise ValueError("temperature differs between ranks; every rank must pass the same per-token temperatures")
    if bad_rank > 0:
        raise ValueError(_TEMPERATURE_MESSAGE.format(int((valid & ~(torch.isfinite(temp) & (temp > 0))).sum())))


def vocab_parallel_linear_logprobs(
    hidden: Tensor,
    weight_shard: Tensor,
    target: Tensor,
    bias_shard: Tensor | None = None,
    *,
    group=None,
    temperature: float | Tensor = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> Tensor | LogprobsOutput:
    r""":func:`softgrad.torch.linear_logprobs` with the rows of ``W`` (the vocabulary) split across ranks.

    Rank ``k`` of ``group`` holds rows ``[o_k, o_k + V_k)`` of the ``(V, D)`` output weight (and
    the same rows of the bias), in rank order, uneven sizes and ``V_k = 0`` allowed; every rank
    passes the same ``hidden``, ``target`` and ``temperature``. The outputs (equal on every rank)
    and the gradients -- of ``hidden`` (summed over the group), of this rank's ``weight_shard``
    and ``bias_shard`` -- equal those of ``linear_logprobs`` on the full weight to float rounding:

    .. math::
        s = (h W^\top + b) / \tau,\qquad
        \log p_i(y_i) = s_{i,y_i} - \operatorname{lse}(s_i),\qquad
        H_i = \operatorname{lse}(s_i) - \textstyle\sum_c p_{ic} s_{ic}

    Both outputs are differentiable for any upstream gradient. No rank holds its ``(N, V_k)``
    logits whole. Communication per call: the layout agreement (a max all-reduce of
    ``2 P + 16`` int64; with a tensor temperature one more of 3 int64), a max all-reduce of
    ``N`` and a sum all-reduce of ``3N`` numbers (``4N`` with ``return_entropy``) in float32
    (float64 for float64), and in the backward one sum all-reduce of the ``(N, D)`` hidden
    gradient. Double backward, forward-mode AD and ``torch.func`` transforms are not supported
    (a clear error); use :func:`softgrad.torch.linear_logprobs` on the gathered weight for those.

    Args:
        hidden: ``(N, D)`` or ``(B, T, D)``, float16/bfloat16/float32/float64, identical on every rank.
        weight_shard: ``(V_k, D)`` rows of the output weight (``V_k = 0`` allowed), ``hidden``'s dtype.
        target: the tokens, integer class indices in ``[0, V)`` or ``ignore_index``, shape
            ``hidden.shape[:-1]``, identical on every rank.
        bias_shard: optional ``(V_k,)``, the same rows of the bias; all ranks or none.
        group: the process group (default: the world group).
        temperature: a float > 0, or a floating tensor broadcastable to ``target.shape``,
            finite and > 0 on non-ignored tokens, identical on every rank; no gradient.
        return_entropy: also return the entropy, as ``LogprobsOutput(logprobs, entropy)``.
        ignore_index: target value whose tokens give 0 and no gradient.
        chunk_size: rows per chunk; default :func:`softgrad.torch.choose_chunk_size` for ``V_k`` columns.

    Returns:
        ``logprobs`` of ``target``'s shape (or the named tuple), in float32 (float64 for
        float64 input), the same on every rank.

    Raises:
        RuntimeError: ``torch.distributed`` is not initialised; double backward.
        NotImplementedError: forward-mode AD or a ``torch.func`` transform.
        TypeError: as :func:`softgrad.torch.linear_logprobs` (naming ``weight_shard``/``bias_shard``).
        ValueError: shapes, options, ``chunk_size``; and, identically on every rank: ranks that
            disagree on ``N``, ``D``, dtype, options, bias, target or temperature; a target outside
            ``[0, V)``; temperatures not finite and > 0; non-finite logits.
        softgrad.distributed.CollectiveError: a peer exited, crashed or timed out.

    Examples:
        >>> import torch.distributed as dist
        >>> from softgrad.torch import linear_logprobs
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> g = torch.Generator().manual_seed(0)
        >>> h = torch.randn(6, 8, generator=g, dtype=torch.float64)
        >>> w = torch.randn(11, 8, generator=g, dtype=torch.float64)
        >>> t = torch.randint(0, 11, (6,), generator=g)
        >>> out = vocab_parallel_linear_logprobs(h, w, t, temperature=0.7, return_entropy=True)
        >>> ref = linear_logprobs(h, w, t, temperature=0.7, return_entropy=True)
        >>> bool(torch.allclose(out.logprobs, ref.logprobs) and torch.allclose(out.entropy, ref.entropy))
        True
        >>> dist.destroy_process_group()
    """
    temperature = _validate(hidden, weight_shard, target, bias_shard, temperature, return_entropy, ignore_index,
                            chunk_size)
    if _tv.functorch_active() or _tv.has_tangent(hidden, weight_shard, bias_shard):
        raise NotImplementedError(f"{_WHAT} does not support forward-mode AD or torch.func transforms; use "
                                  "softgrad.torch.linear_logprobs on the gathered weight for those")
    group, rank, world = _comm.resolve_group(group)
    hidden, weight_shard, bias_shard = _tv.autocast_head(hidden, weight_shard, bias_shard)
    batch_shape = target.shape
    h2 = hidden.reshape(-1, hidden.shape[-1])
    t1 = target.reshape(-1).to(torch.int64).contiguous()
    ignore_index = int(ignore_index)
    tensor_temperature = isinstance(temperature, Tensor)
    options = (ignore_index, "tensor" if tensor_temperature else temperature, return_entropy)
    layout = _agree_head(group, rank, world, h2, weight_shard, bias_shard, t1, options, ignore_index)
    cdt = compute_dtype(h2.dtype)
    valid = t1 != ignore_index
    temp = _temperature_rows(temperature, target, valid, cdt)
    if tensor_temperature:
        _agree_temperature(temp, valid, group, rank)
    if chunk_size is None:
        chunk_size = choose_chunk_size(h2.shape[0], max(layout.width, 1), h2.device)
    with _tv.autocast_off(hidden.device):
        logp, ent = _VocabParallelLinearLogprobs.apply(h2, weight_shard, bias_shard, t1, temp, layout, group,
                                                       ignore_index, return_entropy, int(chunk_size))
    logp = logp.reshape(batch_shape)
    if return_entropy:
        return LogprobsOutput(logp, ent.reshape(batch_shape))
    return logp
