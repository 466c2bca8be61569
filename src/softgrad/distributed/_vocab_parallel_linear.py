r"""Vocabulary-parallel fused linear + cross-entropy: the output layer's rows are split across ranks.

Rank ``k`` holds rows ``[o_k, o_k + V_k)`` of the ``(V, D)`` output weight (and of the bias),
in rank order as in :mod:`softgrad.distributed._vocab_parallel`, and the same ``(N, D)``
hidden states as every other rank. The ``(N, V_k)`` logits of the shard are never held
whole: the rows are walked in chunks of ``n`` (the chunk size of
:func:`softgrad.torch.choose_chunk_size` for ``V_k`` columns), twice.

Forward, per chunk ``c``::

    z_c = h_c W_k^T + b_k                      (n, V_k), in the input dtype
    RowStats of z_c                            the fused row kernel (row_stats), (n,) each

then the two ``O(N)`` all-reduces of the vocabulary-parallel cross-entropy give every rank
the full rows' ``lse``, the loss and the gradient coefficients ``(alpha, beta, gamma)``.

Backward (``grad_output`` known), per chunk ``c``::

    z_c  = h_c W_k^T + b_k                     recomputed
    G_c  = dloss/dz_c                          grad_pass, written over z_c (closed form, see
                                               softgrad.torch._torch_cross_entropy)
    grad_h[c]  = G_c W_k                       (n, D): this shard's part of dloss/dh
    grad_W_k  += G_c^T h_c                     (V_k, D), local: no communication
    grad_b_k  += sum_i G_c[i]                  (V_k,)

and one sum all-reduce of ``grad_h`` (``N x D``) across the group, because
``dloss/dh = sum_k G_k W_k`` gathers every shard's part (the hidden states are replicated).
Each chunk costs one GEMM in the forward and three in the backward; the peak extra memory is
``grad_W_k + grad_h + O(n V_k)``.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import Tensor

from softgrad import _cross_entropy_rule as _rule
from softgrad.distributed import _comm
from softgrad.distributed._vocab_parallel import (
    Layout,
    _agree,
    _check_rows,
    _combine,
    _refuse_double_backward,
    _scaled_coeffs,
    row_kernels,
)
from softgrad.torch import _settings
from softgrad.torch._cross_entropy import CrossEntropyOutput, _statistics
from softgrad.torch._linear_cross_entropy import _chunk_logits, _row_chunks, choose_chunk_size
from softgrad.torch._torch_cross_entropy import compute_dtype
from softgrad.torch import _validation as _tv

__all__ = ["vocab_parallel_linear_cross_entropy"]


# ----------------------------------------------------------------------------- pieces of both heads
# (this module's cross-entropy and softgrad.distributed._vocab_parallel_logprobs)
def _agree_head(group, rank: int, world: int, hidden: Tensor, weight_shard: Tensor, bias_shard: Tensor | None,
                target: Tensor, options: tuple, ignore_index: int, *more) -> Layout:
    """The layout of a head's shards (:func:`_agree`: one max all-reduce of ``2 P + 16`` int64).

    ``hidden`` is the flattened ``(N, D)``, ``target`` the ``(N,)`` int64 indices. Besides the
    options every rank must agree on ``D``, a bias or not, a gradient for ``hidden`` or not (whether
    the backward's all-reduce of ``grad_h`` happens), and ``more``.
    """
    with_grad = torch.is_grad_enabled() and hidden.requires_grad
    extra = zlib.crc32(repr((hidden.shape[1], bias_shard is not None, with_grad, *more)).encode())
    return _agree(group, rank, world, rows=hidden.shape[0], width=weight_shard.shape[0], prob=False,
                  dtype=hidden.dtype, options=options, target=target, ignore_index=ignore_index, weight=None,
                  extra=extra, device=hidden.device, what="hidden")


def _sum_grad_hidden(grad_h: Tensor | None, hidden: Tensor, group, what: str) -> Tensor | None:
    """``dloss/dh = sum_k G_k W_k``: one sum all-reduce of this shard's ``(N, D)`` part (the hidden
    states are replicated), then cast to ``hidden``'s dtype; None (no gradient asked) stays None."""
    if grad_h is None:
        return None
    _comm.all_reduce(grad_h, "sum", group, f"{what} grad_hidden")
    return grad_h.to(hidden.dtype)


class _VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """Forward: chunked stats, two all-reduces. Backward: chunked gradient, one all-reduce of ``grad_h``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, layout: Layout, group, ignore_index, reduction, label_smoothing,
                z_loss, softcap, chunk_size, kernel, with_stats):
        n_rows = hidden.shape[0]
        cdt = compute_dtype(hidden.dtype)
        need_dot = label_smoothing > 0.0
        stats = [torch.zeros(n_rows, dtype=cdt, device=hidden.device) for _ in range(7 if with_stats else 5)]
        if layout.width == 0:
            stats[0].fill_(-math.inf)
            stats[1].fill_(-math.inf)
        else:
            module, extra = row_kernels(hidden.device, kernel)
            for rows in _row_chunks(n_rows, chunk_size):
                z = _chunk_logits(hidden, weight, bias, rows)
                chunk = module.row_stats(z, target[rows], None, class_offset=layout.offset,
                                         num_classes=layout.num_classes, label_smoothing=label_smoothing,
                                         softcap=softcap, prob_target=False, need_dot=need_dot,
                                         need_stats=with_stats, **extra)
                for buf, part in zip(stats, chunk):
                    buf[rows] = part
        out = _combine(stats, target, None, None, layout, group, prob=False, ignore_index=ignore_index,
                       reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, need_dot=need_dot,
                       what="vocab_parallel_linear_cross_entropy")
        _check_rows(out.lse, "the logits hidden @ weight_shard.T + bias_shard")
        row_stats = out.stats if out.stats is not None else out.lse.new_empty(0)
        ctx.mark_non_differentiable(out.z_part, out.lse, row_stats)
        ctx.set_materialize_grads(False)
        ctx.layout, ctx.group, ctx.chunk_size, ctx.kernel = layout, group, chunk_size, kernel
        ctx.label_smoothing, ctx.softcap = label_smoothing, softcap
        ctx.save_for_backward(hidden, weight, bias, target, out.lse, out.coeffs)
        return out.loss, out.z_part, out.lse, row_stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_z, _grad_lse, _grad_stats):
        _refuse_double_backward("vocab_parallel_linear_cross_entropy")
        hidden, weight, bias, target, lse, coeffs = ctx.saved_tensors
        layout = ctx.layout
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        if grad_loss is None:
            # the loss is unused, but every rank must still take part in the all-reduce of grad_h
            grad_loss = torch.zeros((), dtype=lse.dtype, device=lse.device)
        n_rows = hidden.shape[0]
        cdt = lse.dtype
        coeffs = _scaled_coeffs(coeffs, grad_loss)
        grad_h = torch.zeros(hidden.shape, dtype=cdt, device=hidden.device) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=cdt, device=weight.device) if need_b and bias is not None else None
        if layout.width:
            module, extra = row_kernels(hidden.device, ctx.kernel)
            for rows in _row_chunks(n_rows, ctx.chunk_size):
                h_c = hidden[rows]
                z = _chunk_logits(hidden, weight, bias, rows)
                # G = (alpha a - beta onehot - gamma u) (1 - tanh^2), over z's own buffer
                module.grad_pass(z, target[rows], None, lse[rows], coeffs[rows], z, class_offset=layout.offset,
                                 num_classes=layout.num_classes, label_smoothing=ctx.label_smoothing,
                                 softcap=ctx.softcap, prob_target=False, **extra)
                if grad_b is not None:
                    grad_b.add_(z.sum(dim=0, dtype=cdt))
                if grad_h is not None:
                    grad_h[rows] = torch.mm(z, weight)  # (n, V_k) @ (V_k, D): this shard's part
                if grad_w is not None:
                    grad_w.addmm_(z.t(), h_c)  # (V_k, n) @ (n, D)
        grad_h = _sum_grad_hidden(grad_h, hidden, ctx.group, "vocab_parallel_linear_cross_entropy")
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return (grad_h, grad_w, grad_b) + (None,) * 11


def _validate(hidden, weight, target, bias, reduction, ignore_index, label_smoothing, z_loss, softcap,
              chunk_size) -> _rule.CrossEntropyOptions:
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
    _tv.check_index_dtype(target)  # also refuses uint64, as linear_cross_entropy does
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"target shape {tuple(target.shape)} must equal hidden.shape[:-1] = "
                         f"{tuple(hidden.shape[:-1])}")
    opts = _rule.CrossEntropyOptions.checked(ignore_index=ignore_index, reduction=reduction,
                                             label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    _tv.check_chunk_size(chunk_size)
    return opts


def vocab_parallel_linear_cross_entropy(
    hidden: Tensor,
    weight_shard: Tensor,
    target: Tensor,
    bias_shard: Tensor | None = None,
    *,
    group=None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    return_lse: bool = False,
    return_token_accuracy: bool = False,
    return_predicted_tokens: bool = False,
    return_entropy: bool = False,
) -> Tensor | CrossEntropyOutput:
    r"""Cross-entropy of ``hidden @ W.T + b`` with the rows of ``W`` (the classes) split across ranks.

    Rank ``k`` of ``group`` holds rows ``[o_k, o_k + V_k)`` of the ``(V, D)`` output weight
    (and the same rows of the bias), in rank order, uneven sizes allowed; every rank holds the
    same ``hidden`` and ``target``. The loss (equal on every rank) and the gradients -- of
    ``hidden`` (summed over the group), of this rank's ``weight_shard`` and ``bias_shard`` --
    equal those of :func:`softgrad.torch.linear_cross_entropy` on the full weight, to float
    rounding:

    .. math::
        s = c \tanh(z / c),\quad z = h W^\top + b,\qquad
        \ell_i = \operatorname{lse}(s_i) - (1-\varepsilon) s_{i,t_i}
                 - \tfrac{\varepsilon}{V}\textstyle\sum_j s_{ij} + \zeta \operatorname{lse}(s_i)^2

    No rank ever holds its ``(N, V_k)`` logits whole: the rows are processed in chunks, once
    in the forward (per-row statistics) and once in the backward (gradient). Communication
    per step: the forward's ``O(N + P)`` of :func:`vocab_parallel_cross_entropy` (max all-reduces
    of ``2 P + 16`` int64 and of ``N`` numbers, a sum all-reduce of ``2N``, ``4N`` with label
    smoothing), and in the backward one all-reduce of the ``(N, D)`` hidden gradient in float32
    (float64 for float64) -- the usual price of a replicated input in tensor parallelism.

    Args:
        hidden: ``(N, D)`` or ``(B, T, D)``, float16/bfloat16/float32/float64, identical on every
            rank (the softmax runs in float32, float64 for float64).
        weight_shard: ``(V_k, D)`` rows of the output weight (``V_k = 0`` allowed), ``hidden``'s dtype.
        target: integer class indices in ``[0, V)`` or ``ignore_index``, shape
            ``hidden.shape[:-1]``, identical on every rank.
        bias_shard: optional ``(V_k,)``, the same rows of the bias; all ranks or none.
        group: the process group (default: the world group).
        ignore_index: target value whose rows contribute neither loss nor gradient.
        reduction: ``"mean"`` (over non-ignored rows), ``"sum"`` or ``"none"`` (shape ``hidden.shape[:-1]``).
        label_smoothing: :math:`\varepsilon \in [0, 1]`, PyTorch's definition.
        z_loss: :math:`\zeta \ge 0`, adds :math:`\zeta \operatorname{lse}^2` per row (PaLM).
        softcap: ``c > 0`` applies :math:`c \tanh(z / c)` to the logits first (Gemma 2).
        chunk_size: rows per chunk; default :func:`softgrad.torch.choose_chunk_size` for ``V_k`` columns.
        return_lse, return_token_accuracy, return_predicted_tokens, return_entropy: also return the
            full rows' lse, z-loss part and same-pass statistics (detached, the same on every rank)
            as a :class:`softgrad.torch.CrossEntropyOutput`, as
            :func:`softgrad.distributed.vocab_parallel_cross_entropy` does.

    Returns:
        The loss in ``hidden``'s dtype (under autocast: the dtype ``hidden`` had before the
        cast), the same on every rank: a scalar, or ``hidden.shape[:-1]`` for ``"none"``.

    Raises:
        RuntimeError: ``torch.distributed`` is not initialised.
        TypeError: non-tensor arguments, mismatched or unsupported dtypes, non-integer ``target``.
        ValueError: shapes, options, ``chunk_size``; and, identically on every rank: ranks that
            disagree on ``N``, ``D``, dtype, options, bias or target; a target outside ``[0, V)``;
            non-finite logits.
        softgrad.distributed.CollectiveError: a peer exited, crashed or timed out.

    Examples:
        >>> import torch.distributed as dist
        >>> from softgrad.torch import linear_cross_entropy
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> g = torch.Generator().manual_seed(0)
        >>> h = torch.randn(6, 8, generator=g, dtype=torch.float64, requires_grad=True)
        >>> w = torch.randn(11, 8, generator=g, dtype=torch.float64, requires_grad=True)
        >>> t = torch.randint(0, 11, (6,), generator=g)
        >>> loss = vocab_parallel_linear_cross_entropy(h, w, t, chunk_size=4)  # one rank: all of W
        >>> bool(torch.allclose(loss, linear_cross_entropy(h, w, t)))
        True
        >>> dist.destroy_process_group()

        On ``P`` ranks, with the full ``W`` ``(V, D)``: ``w_k = W[start:start + width]`` for this
        rank's block, then ``vocab_parallel_linear_cross_entropy(h, w_k, t).backward()``.
    """
    opts = _validate(hidden, weight_shard, target, bias_shard, reduction, ignore_index, label_smoothing, z_loss,
                     softcap, chunk_size)
    _tv.check_flags(return_lse=return_lse, return_token_accuracy=return_token_accuracy,
                    return_predicted_tokens=return_predicted_tokens, return_entropy=return_entropy)
    with_stats = return_token_accuracy or return_predicted_tokens or return_entropy
    group, rank, world = _comm.resolve_group(group)
    out_dtype = hidden.dtype
    hidden, weight_shard, bias_shard = _tv.autocast_head(hidden, weight_shard, bias_shard)
    batch_shape = hidden.shape[:-1]
    h2 = hidden.reshape(-1, hidden.shape[-1])
    t1 = target.reshape(-1).to(torch.int64).contiguous()
    options = (opts.ignore_index, opts.reduction, opts.label_smoothing, opts.z_loss, opts.softcap)
    layout = _agree_head(group, rank, world, h2, weight_shard, bias_shard, t1, options, int(ignore_index),
                         with_stats)
    if chunk_size is None:
        chunk_size = choose_chunk_size(h2.shape[0], max(layout.width, 1), h2.device, softcap=softcap is not None)
    with _tv.autocast_off(hidden.device):
        loss, z_part, lse, stats = _VocabParallelLinearCrossEntropy.apply(
            h2, weight_shard, bias_shard, t1, layout, group, *options, int(chunk_size), _settings.get_kernel(),
            with_stats)
    if reduction == "none":
        loss, z_part = loss.reshape(batch_shape), z_part.reshape(batch_shape)
    loss = loss.to(out_dtype)
    if not (return_lse or with_stats):
        return loss
    extra = {} if not with_stats else _statistics(stats, t1, opts.ignore_index, tuple(batch_shape),
                                                  accuracy=return_token_accuracy,
                                                  predictions=return_predicted_tokens, entropy=return_entropy)
    return CrossEntropyOutput(loss, lse.reshape(batch_shape), z_part.to(out_dtype), **extra)
