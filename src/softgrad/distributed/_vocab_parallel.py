r"""Vocabulary-parallel cross-entropy: each rank holds a block of columns of the logits.

Layout. The ``P`` ranks of a process group hold contiguous, possibly uneven, blocks of the
``V`` classes in rank order: rank ``k`` holds columns ``[o_k, o_k + V_k)`` with
``o_k = V_0 + ... + V_{k-1}`` and ``V = sum_k V_k`` (``V_k = 0`` is allowed). The layout
is not passed in: one max all-reduce of ``2 P + 16`` integers per call (:func:`_agree`) gives
every rank every width, and carries what the ranks must agree on (rows, dtype, options, a
checksum of the target, the local input checks), so a bad input on one rank raises the same
``ValueError`` on every rank instead of leaving the others blocked in the next collective.

Per row, shard ``k`` reduces its own columns with the fused row kernels
(``row_stats`` of :mod:`softgrad.torch._torch_cross_entropy` on CPU, of
:mod:`softgrad.torch._triton_cross_entropy` on CUDA) to ``RowStats``: ``m_k`` (max of the
softcapped logits ``s``), ``log d_k = log sum_c exp(s_c - m_k)``, ``s_y`` (if ``y`` is in the
shard, else 0), and with label smoothing or probability targets ``dot_k = sum_c u_c (s_c - m_k)``
and ``mass_k = sum_c u_c`` (``u`` as in the kernel module). Two all-reduces of ``O(N)``
numbers combine them::

    M       = max_k m_k                                             all_reduce(MAX): N numbers
    D       = sum_k exp(m_k - M + log d_k)                          \
    s_y     = sum_k s_y,k           (index targets)                  |
    w_y     = sum_k w_y,k           (index targets, sharded weight)  |  one all_reduce(SUM)
    dot_M   = sum_k dot_k + mass_k (m_k - M)                         |  of an (N, <=5) block
    mass    = sum_k mass_k                                           /
    lse     = M + log D

(``m_k = -inf``, a shard whose row is all ``-inf``, counts as 0 in the exponent and in the
``dot`` shift, as the kernels do.) Then every rank has the whole row's loss, written relative
to ``M`` as in the fused kernel::

    index:        ce = (1 - eps) w_y (M - s_y + log D) + (eps / V) (mass log D - dot_M)
    probability:  ce = mass log D - dot_M

and the per-row coefficients of the closed-form gradient
``g_c = (alpha a_c - beta [c = y] - gamma u_c) (1 - tanh^2(z_c / cap))`` with
``a_c = exp(s_c - lse)`` (the derivation is in the kernel module's docstring)::

    index:        alpha = kappa ((1 - eps) w_y + (eps / V) mass) + 2 zeta zl lse,
                  beta  = kappa (1 - eps) w_y,   gamma = kappa eps / V
    probability:  alpha = kappa mass + 2 zeta zl lse,   beta = 0,   gamma = kappa

(``kappa``, ``zeta``: the reduction factors of the cross-entropy and of the z-loss; 0 for
ignored rows). These formulas are :mod:`softgrad._cross_entropy_rule`'s, which
:func:`_combine` calls with the combined statistics; they are restated here only to show that
``O(N)`` numbers per rank suffice. The backward needs no communication: each rank writes the gradient of its own
columns with ``grad_pass`` from ``lse`` and the coefficients times ``grad_output``.
"""

from __future__ import annotations

import math
import zlib
from typing import NamedTuple

import torch
from torch import Tensor

from softgrad import _cross_entropy_rule as _rule
from softgrad.distributed import _comm
from softgrad.torch import _cross_entropy, _settings
from softgrad.torch._cross_entropy import CrossEntropyOutput
from softgrad.torch._torch_cross_entropy import compute_dtype
from softgrad.torch import _validation as _tv

__all__ = ["vocab_parallel_cross_entropy"]

_FLOAT_DTYPES = _tv.FLOAT_DTYPES  # _agree sends a dtype as its index in this tuple


# ----------------------------------------------------------------------------- agreement between ranks
class Layout(NamedTuple):
    """Where this rank's columns sit in the full row, agreed by all ranks."""

    offset: int  #: o_k, the first global class of this rank's shard
    width: int  #: V_k, columns on this rank (may be 0)
    num_classes: int  #: V, the full number of classes
    widths: tuple  #: every rank's V_k, in group rank order
    all_full_weight: bool  #: every rank passed the full (V,) weight (w_y needs no communication)


# Fields every rank must agree on; each travels as +x and -x in one MAX all-reduce, so that
# max(x) == -max(-x) exactly when all ranks hold the same x.
_AGREED = ("rows", "dtype", "prob", "options", "extra", "target_sum")
_CHECKSUM_MOD = 1 << 61  # keeps the target checksum and its negation inside int64


def _target_checksum(target: Tensor) -> Tensor:
    """An int64 checksum of the row targets in ``[0, 2^61)``, position-weighted, so that differing ranks disagree."""
    n = target.shape[0]
    position = torch.arange(n, device=target.device, dtype=torch.int64) % 65521 + 1
    return torch.remainder((target.to(torch.int64) * position).sum(), _CHECKSUM_MOD)


def _agree(group, rank: int, world: int, *, rows: int, width: int, prob: bool, dtype: torch.dtype, options: tuple,
           target: Tensor, ignore_index: int, weight: Tensor | None, extra: int, device: torch.device,
           what: str) -> Layout:
    """One MAX all-reduce of ``2 P + 16`` int64, checked identically on every rank; returns the layout.

    The vector holds every rank's width and weight length at its own index (zeros elsewhere,
    so the maximum gathers them), each agreed field as ``+x`` and ``-x``, the target range, and
    the local input checks as ``rank + 1`` where they failed. Every rank then runs the same checks
    on the same reduced vector, so every rank raises the same exception (naming the argument and,
    where it is known, the rank) or none does. An all-reduce rather than an all-gather: its
    latency grows like ``log P`` with a tree algorithm instead of ``P``.
    """
    zero = torch.zeros((), dtype=torch.int64, device=device)
    if prob:
        target_sum, t_min, t_max = zero, zero, zero
        bad_target = ((target < 0) | ~torch.isfinite(target)).any().to(torch.int64)
    else:
        kept = torch.where(target != ignore_index, target, torch.zeros_like(target))
        target_sum = _target_checksum(target)
        t_min, t_max = (kept.min(), kept.max()) if rows else (zero, zero)
        bad_target = zero
    bad_weight = zero if weight is None else (~torch.isfinite(weight).all()).to(torch.int64)
    agreed = {"rows": rows, "dtype": _FLOAT_DTYPES.index(dtype), "prob": int(prob),
              "options": zlib.crc32(repr(options).encode()), "extra": int(extra), "target_sum": target_sum}
    vec = torch.zeros(2 * world + 2 * len(_AGREED) + 4, dtype=torch.int64, device=device)
    vec[rank] = width
    vec[world + rank] = 1 if weight is None else weight.shape[0] + 2  # 1: no weight; n + 2: n entries
    fields = torch.stack([torch.as_tensor(agreed[k], dtype=torch.int64, device=device) for k in _AGREED])
    base = 2 * world
    vec[base:base + len(_AGREED)] = fields
    vec[base + len(_AGREED):base + 2 * len(_AGREED)] = -fields
    tail = base + 2 * len(_AGREED)
    vec[tail] = t_max
    vec[tail + 1] = -t_min
    vec[tail + 2] = bad_target * (rank + 1)
    vec[tail + 3] = bad_weight * (rank + 1)
    out = _comm.all_reduce(vec, "max", group, f"{what} layout and checks").tolist()  # one host sync
    widths = tuple(out[:world])
    weight_lens = [n - 2 for n in out[world:2 * world]]  # -1: no weight
    high = dict(zip(_AGREED, out[base:base + len(_AGREED)]))
    low = {k: -v for k, v in zip(_AGREED, out[base + len(_AGREED):tail])}
    t_max, t_min = out[tail], -out[tail + 1]
    bad_target_rank, bad_weight_rank = out[tail + 2] - 1, out[tail + 3] - 1

    if high["rows"] != low["rows"]:
        raise ValueError(f"{what}: ranks disagree on the number of rows N (from {low['rows']} to {high['rows']}); "
                         "every rank must hold all N rows of its columns")
    if high["dtype"] != low["dtype"]:
        raise ValueError(f"{what}: ranks pass different dtypes ({_FLOAT_DTYPES[low['dtype']]} and "
                         f"{_FLOAT_DTYPES[high['dtype']]})")
    if high["prob"] != low["prob"]:
        raise ValueError("target: some ranks pass class indices and others class probabilities")
    if high["options"] != low["options"]:
        raise ValueError("ranks pass different options (ignore_index, reduction, label_smoothing, z_loss, softcap "
                         "or bias); every rank must call with the same ones")
    if high["extra"] != low["extra"]:
        raise ValueError(f"{what}: ranks disagree on the hidden size or bias")
    num_classes = sum(widths)
    if num_classes < 1:
        raise ValueError(f"{what}: the shards hold no classes at all (widths {list(widths)})")
    if prob:
        if bad_target_rank >= 0:
            raise ValueError(f"target (class probabilities) contains negative, NaN or infinite entries "
                             f"(on rank {bad_target_rank})")
    else:
        if high["target_sum"] != low["target_sum"]:
            raise ValueError("target differs between ranks; every rank must pass the same (N,) class indices")
        if t_min < 0 or t_max >= num_classes:
            value = t_min if t_min < 0 else t_max
            raise ValueError(f"target contains class index {value} outside [0, {num_classes}) or "
                             f"ignore_index={ignore_index}")
    all_full = False
    if any(n >= 0 for n in weight_lens):
        for r, (n, w) in enumerate(zip(weight_lens, widths)):
            if n < 0:
                raise ValueError(f"weight: rank {r} passes none while other ranks pass class weights")
            if n not in (num_classes, w):
                raise ValueError(f"weight on rank {r} has {n} entries; pass the full ({num_classes},) class weights "
                                 f"or that rank's shard of them ({w},)")
        if bad_weight_rank >= 0:
            raise ValueError(f"weight contains NaN or infinite entries (on rank {bad_weight_rank})")
        all_full = all(n == num_classes for n in weight_lens)
    return Layout(sum(widths[:rank]), widths[rank], num_classes, widths, all_full)


# ----------------------------------------------------------------------------- per-row combination
class Combined(NamedTuple):
    """The whole rows' quantities, identical on every rank, each ``(N,)`` in the compute dtype."""

    lse: Tensor  #: logsumexp of the full (softcapped) row
    ce: Tensor  #: per-row cross-entropy (0 for ignored rows), without the z-loss
    z_rows: Tensor  #: per-row z-loss zl * lse^2 (0 for ignored rows)
    coeffs: Tensor  #: (N, 3) alpha, beta, gamma with the reduction's factors (see the module docstring)
    loss: Tensor  #: the reduced loss ("none": per row), z-loss included
    z_part: Tensor  #: the z-loss part of ``loss``, reduced the same way
    kappa: Tensor  #: 0-d, the cross-entropy's reduction factor (the probability target's gradient needs it)
    stats: Tensor | None = None  #: (2, N) entropy and global argmax (as float) of the full rows, if asked for


def row_kernels(device: torch.device, kernel: str):
    """The row kernel module of ``softgrad.torch`` for ``device`` and the keyword arguments its calls take."""
    module, config = _settings.row_kernels(device, kernel)
    return module, ({} if config is None else {"config": config})


def _local_stats(logits: Tensor, target: Tensor, weight: Tensor | None, layout: Layout, *, label_smoothing: float,
                 softcap: float | None, prob: bool, need_dot: bool, kernel: str, need_stats: bool = False):
    """``RowStats`` of this rank's columns (a zero-width shard contributes nothing)."""
    n_rows = logits.shape[0]
    cdt = compute_dtype(logits.dtype)
    if layout.width == 0:
        neg = torch.full((n_rows,), -math.inf, dtype=cdt, device=logits.device)
        zeros = torch.zeros(n_rows, dtype=cdt, device=logits.device)
        extra = (zeros.clone(), zeros.clone()) if need_stats else ()
        return (neg, neg.clone(), zeros, zeros.clone(), zeros.clone()) + extra
    module, extra = row_kernels(logits.device, kernel)
    stats = module.row_stats(logits, target, weight, class_offset=layout.offset, num_classes=layout.num_classes,
                             label_smoothing=label_smoothing, softcap=softcap, prob_target=prob, need_dot=need_dot,
                             need_stats=need_stats, **extra)
    return tuple(x for x in stats if x is not None)


def _local_target_weight(target: Tensor, weight: Tensor | None, layout: Layout, cdt: torch.dtype) -> Tensor:
    """``w_y`` of the rows whose target class lies in this shard (0 elsewhere); ``weight`` is the shard's slice."""
    local = target - layout.offset
    here = (local >= 0) & (local < layout.width)
    if layout.width == 0:
        return torch.zeros(target.shape[0], dtype=cdt, device=target.device)
    picked = weight.to(cdt)[torch.where(here, local, torch.zeros_like(local))]
    return torch.where(here, picked, torch.zeros_like(picked))


def _combine(stats, target: Tensor, weight_shard: Tensor | None, weight_full: Tensor | None, layout: Layout,
             group, *, prob: bool, ignore_index: int, reduction: str, label_smoothing: float, z_loss: float,
             need_dot: bool, what: str) -> Combined:
    """The two all-reduces of the module docstring, then loss, lse and gradient coefficients."""
    m_k, log_d_k, s_y_k, dot_k, mass_k = stats[:5]
    need_stats = len(stats) > 5
    n_rows = m_k.shape[0]
    cdt = m_k.dtype
    eps = float(label_smoothing)
    V = layout.num_classes
    zero = torch.zeros((), dtype=cdt, device=m_k.device)

    M = _comm.all_reduce(m_k.clone(), "max", group, f"{what} row max")
    M_safe = torch.where(torch.isneginf(M), zero, M)  # a row that is -inf everywhere keeps d = 0
    m_safe = torch.where(torch.isneginf(m_k), zero, m_k)  # the kernels' shift for an all -inf shard row
    columns = [torch.exp(m_safe - M_safe + log_d_k)]
    if not prob:
        columns.append(s_y_k)
    sharded_weight = not prob and weight_shard is not None and weight_full is None
    if sharded_weight:
        columns.append(_local_target_weight(target, weight_shard, layout, cdt))
    if need_dot:
        # dot relative to the global max: sum_c u_c (s_c - M) = dot_k + mass_k (m_k - M); 0 where mass_k = 0
        columns.append(torch.where(mass_k == 0, dot_k, dot_k + mass_k * (m_safe - M_safe)))
        columns.append(mass_k)
    if need_stats:
        # the entropy's numerator relative to the global max: exp(m_k - M) (ent_k + (m_k - M) d_k)
        ent_k = stats[5]
        columns.append(torch.exp(m_safe - M_safe) * (ent_k + (m_safe - M_safe) * torch.exp(log_d_k)))
    block = _comm.all_reduce(torch.stack(columns, dim=1).contiguous(), "sum", group, f"{what} row sums")
    sums = iter(block.unbind(dim=1))
    log_d = torch.log(next(sums))
    lse = M_safe + log_d

    # the rule of softgrad._cross_entropy_rule on the combined statistics, relative to M
    valid = s_y = w_y = dot_m = mass = None
    if prob:
        dot_m, mass = next(sums), next(sums)
        count, denom = _rule.denominators(target, None, ignore_index=ignore_index, prob_target=True, num_classes=V,
                                          dtype=cdt)
    else:
        s_y = next(sums)
        valid = target != ignore_index
        if weight_full is not None:
            w_y = weight_full.to(cdt)[torch.where(valid, target, torch.zeros_like(target))]
        elif sharded_weight:
            w_y = next(sums)
        else:
            w_y = torch.ones(n_rows, dtype=cdt, device=m_k.device)
        if need_dot:
            dot_m, mass = next(sums), next(sums)
        count, denom = _rule.row_denominators(valid, None if weight_shard is None else w_y, dtype=cdt)
    ce = _rule.row_loss(M_safe, log_d, dot=dot_m, mass=mass, s_y=s_y, w_y=w_y, prob_target=prob,
                        label_smoothing=eps, num_classes=V)
    if valid is not None:
        ce = torch.where(valid, ce, zero)
    kappa, zeta = _rule.reduction_factors(reduction, count, denom)
    coeffs = torch.stack(_rule.grad_coefficients(lse, kappa, zeta, w_y=w_y, mass=mass, valid=valid,
                                                 prob_target=prob, label_smoothing=eps, z_loss=z_loss,
                                                 num_classes=V), dim=1)
    z_rows = _rule.z_loss_rows(lse, z_loss, valid)
    loss, z_part = _rule.reduce_rows(ce, z_rows, reduction, count, denom)
    row_stats = None
    if need_stats:
        entropy = log_d - block[:, -1] / torch.exp(log_d)
        # the global argmax: the lowest global column among the shards that hold the row's max
        nowhere = torch.full((n_rows,), torch.iinfo(torch.int64).max, dtype=torch.int64, device=m_k.device)
        candidate = torch.where(m_k == M, stats[6].to(torch.int64) + layout.offset, nowhere)
        argmax = _comm.all_reduce(candidate, "min", group, f"{what} argmax")
        row_stats = torch.stack([entropy, argmax.to(cdt)])
    return Combined(lse, ce, z_rows, coeffs, loss, z_part, kappa, row_stats)


def _check_rows(lse: Tensor, what: str) -> None:
    """Raise on rows whose full softmax is undefined; ``lse`` is identical on every rank, so all raise."""
    bad = ~torch.isfinite(lse)
    if bool(bad.any()):  # one host sync
        first = int(bad.nonzero()[0, 0])
        raise ValueError(f"{what} contain NaN or +inf, or a row that is -inf on every rank ({int(bad.sum())} "
                         f"row(s), first at row {first}); the softmax of such a row is undefined")


def _scaled_coeffs(coeffs: Tensor, grad_loss: Tensor) -> Tensor:
    """The coefficients of the gradient of ``grad_loss * loss`` (per row for ``reduction="none"``)."""
    factor = grad_loss.to(coeffs.dtype)
    return coeffs * (factor if factor.dim() == 0 else factor.reshape(-1, 1))


# ----------------------------------------------------------------------------- autograd
class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Forward: local stats, two all-reduces, loss. Backward: ``grad_pass`` on the local columns only."""

    @staticmethod
    def forward(ctx, logits, target, weight_shard, weight_full, layout, group, ignore_index, reduction,
                label_smoothing, z_loss, softcap, inplace_backward, kernel, with_stats):
        prob = target.is_floating_point()
        need_dot = prob or label_smoothing > 0.0
        with _tv.autocast_off(logits.device):
            stats = _local_stats(logits, target, weight_shard, layout, label_smoothing=label_smoothing,
                                 softcap=softcap, prob=prob, need_dot=need_dot, kernel=kernel, need_stats=with_stats)
            out = _combine(stats, target, weight_shard, weight_full, layout, group, prob=prob,
                           ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                           z_loss=z_loss, need_dot=need_dot, what="vocab_parallel_cross_entropy")
        _check_rows(out.lse, "logits")
        stats = out.stats if out.stats is not None else out.lse.new_empty(0)
        ctx.mark_non_differentiable(out.z_part, out.lse, stats)
        ctx.set_materialize_grads(False)
        ctx.layout, ctx.prob, ctx.reduction = layout, prob, reduction
        ctx.label_smoothing, ctx.softcap, ctx.inplace = label_smoothing, softcap, inplace_backward
        ctx.kernel, ctx.consumed = kernel, False
        ctx.save_for_backward(logits, target, weight_shard, out.lse, out.coeffs, out.kappa)
        return out.loss, out.z_part, out.lse, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_z, _grad_lse, _grad_stats):
        if grad_loss is None:
            return (None,) * 14
        _refuse_double_backward("vocab_parallel_cross_entropy")
        logits, target, weight_shard, lse, coeffs, kappa = ctx.saved_tensors
        layout = ctx.layout
        grad_logits = grad_target = None
        if ctx.prob and ctx.needs_input_grad[1]:
            # d loss / d t_c = -(1 - eps) w_c log softmax(s)_c: local given the global lse
            grad_target = _cross_entropy._target_grad(logits, target, weight_shard, lse, kappa, grad_loss,
                                                      ctx.label_smoothing, ctx.softcap)
        if ctx.needs_input_grad[0]:
            if ctx.inplace:
                if ctx.consumed:
                    raise RuntimeError("vocab_parallel_cross_entropy(inplace_backward=True) wrote the gradient over "
                                       "the logits in the first backward; a second backward (retain_graph=True) "
                                       "would read it as logits. Use inplace_backward=False.")
                ctx.consumed = True
                grad_logits = logits
            else:
                grad_logits = torch.empty_like(logits)
            if layout.width:
                module, extra = row_kernels(logits.device, ctx.kernel)
                # g_c = (alpha a_c - beta [c = y] - gamma u_c) (1 - tanh^2): the module docstring
                module.grad_pass(logits, target, weight_shard, lse, _scaled_coeffs(coeffs, grad_loss), grad_logits,
                                 class_offset=layout.offset, num_classes=layout.num_classes,
                                 label_smoothing=ctx.label_smoothing, softcap=ctx.softcap, prob_target=ctx.prob,
                                 **extra)
        return (grad_logits, grad_target) + (None,) * 12


def _refuse_double_backward(what: str) -> None:
    """Raise for ``create_graph=True``: the backward's closed-form gradient is not differentiable again here."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{what} does not support double backward (backward with create_graph=True, "
                           "gradient penalties, hessians): its closed-form gradient is computed shard by shard "
                           "without a graph. Use softgrad.torch.cross_entropy on gathered logits for that.")


# ----------------------------------------------------------------------------- validation
def _validate(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, return_lse,
              inplace_backward) -> tuple[bool, _rule.CrossEntropyOptions]:
    """Local type/shape/option checks (no communication); returns whether targets are probabilities, and the options."""
    _tv.check_tensor(logits, "logits_shard")
    _tv.check_tensor(target, "target")
    _tv.check_float(logits, "logits_shard")
    if logits.dim() != 2:
        raise ValueError(f"logits_shard must have shape (N, V_shard) (flatten batch dimensions first), got "
                         f"{tuple(logits.shape)}")
    if logits.shape[0] == 0:
        raise ValueError("logits_shard has no rows (shape (0, V_shard)); need at least one row")
    _tv.check_same_device(target, "target", logits, "logits_shard")
    prob = target.is_floating_point()
    if prob:
        if target.shape != logits.shape:
            raise ValueError(f"target holds class probabilities (dtype {target.dtype}) and must be this rank's "
                             f"columns of them, shape {tuple(logits.shape)}, got {tuple(target.shape)}")
    else:
        if target.dtype == torch.bool or target.is_complex():
            raise TypeError(f"target must hold integer class indices or float probabilities, got {target.dtype}")
        _tv.check_index_dtype(target)  # uint64 would wrap, as in softgrad.torch.cross_entropy
        if tuple(target.shape) != (logits.shape[0],):
            raise ValueError(f"target must have shape ({logits.shape[0]},) (one global class index per row), got "
                             f"{tuple(target.shape)}")
    _tv.check_weight(weight, None, logits, "logits_shard")  # the full (V,) weights or this rank's slice
    opts = _rule.CrossEntropyOptions.checked(ignore_index=ignore_index, reduction=reduction,
                                             label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    opts.check_target_kind(prob)
    _tv.check_flags(return_lse=return_lse, inplace_backward=inplace_backward)
    return prob, opts


# ----------------------------------------------------------------------------- public API
def vocab_parallel_cross_entropy(
    logits_shard: Tensor,
    target: Tensor,
    *,
    group=None,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_lse: bool = False,
    return_token_accuracy: bool = False,
    return_predicted_tokens: bool = False,
    return_entropy: bool = False,
    inplace_backward: bool = False,
) -> Tensor | CrossEntropyOutput:
    r"""Cross-entropy of logits whose classes are split across the ranks of a process group.

    Rank ``k`` of ``group`` holds the columns ``[o_k, o_k + V_k)`` of the ``(N, V)`` logits,
    in rank order (``o_k = V_0 + ... + V_{k-1}``; widths may differ, ``V_k = 0`` included).
    Every rank gets the loss of the *full* rows -- the same value on every rank -- and, in the
    backward, the gradient of its own columns; both equal what
    :func:`softgrad.torch.cross_entropy` (and, with ``z_loss=0`` and ``softcap=None``,
    ``torch.nn.functional.cross_entropy``) gives on the unsharded logits, to float rounding.
    Per row, with :math:`s = c \tanh(z / c)` under ``softcap=c`` (else :math:`s = z`),
    :math:`\operatorname{lse} = \log \sum_{k < V} e^{s_k}`, :math:`p = s - \operatorname{lse}`:

    .. math::

        \ell = (1-\varepsilon)\, w_y (-p_y) + \frac{\varepsilon}{V} \sum_k w_k (-p_k)
               + \zeta \operatorname{lse}^2 \qquad\text{(class index } y\text{)}

    (probability targets :math:`t`: :math:`-\sum_k w_k((1-\varepsilon) t_k + \varepsilon/V) p_k
    + \zeta \operatorname{lse}^2`). Reductions, ignored rows and the NaN of a mean over nothing
    follow :func:`softgrad.torch.cross_entropy`.

    Communication per call, ``O(N + P)`` and independent of ``V``: one max all-reduce of
    ``2 P + 16`` int64 (layout and input checks), one max all-reduce of ``N`` numbers and one sum
    all-reduce of an ``(N, k)`` block, ``k`` = 2 (+1 with per-shard class weights, +2 with label
    smoothing; probability targets: 3), in float32 (float64 for float64 logits). The backward
    communicates nothing. The local work is the fused row kernels of
    :mod:`softgrad.torch` (Triton on CUDA, PyTorch ops on CPU): one read of the shard in the
    forward, one read and one write in the backward.

    Args:
        logits_shard: ``(N, V_k)`` float16/bfloat16/float32/float64, this rank's columns;
            ``-inf`` allowed. Same ``N`` and dtype on every rank.
        target: ``(N,)`` integer global class indices in ``[0, V)`` or ``ignore_index``,
            identical on every rank; or this rank's ``(N, V_k)`` columns of class probabilities
            (floating, non-negative), which receive a gradient if they require one.
        group: the process group (default: the world group of ``torch.distributed``).
        weight: optional class weights, no gradient: the full ``(V,)`` vector (the same on
            every rank; then ``w_y`` needs no communication) or this rank's ``(V_k,)`` slice.
        ignore_index: index target of rows that contribute nothing (only -100 with
            probability targets).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``(N,)`` per-row losses).
        label_smoothing: :math:`\varepsilon \in [0, 1]`, PyTorch's definition.
        z_loss: :math:`\zeta \ge 0`, PaLM's auxiliary loss.
        softcap: ``c > 0`` applies :math:`c \tanh(z / c)` to the logits first (Gemma 2).
        return_lse: also return the per-row ``lse`` (``(N,)``, float32, float64 for float64)
            and the z-loss part, as :class:`softgrad.torch.CrossEntropyOutput`.
        return_token_accuracy, return_predicted_tokens, return_entropy: also return the full
            rows' same-pass statistics of :func:`softgrad.torch.cross_entropy` (the same on every
            rank; the global argmax as a class index). Costs one more entry per row in the sum
            all-reduce and one min all-reduce of ``N`` int64; every rank must ask for the same.
        inplace_backward: the backward writes the gradient over ``logits_shard``'s memory and
            hands that buffer on (no ``(N, V_k)`` allocation); the logits must be C-contiguous
            and not a leaf, and the graph can be back-propagated once.

    Returns:
        The loss in the logits' dtype (float32 under autocast for float16/bfloat16), equal on
        every rank: a scalar, or ``(N,)`` for ``reduction="none"``; with ``return_lse=True`` a
        :class:`~softgrad.torch.CrossEntropyOutput` ``(loss, lse, z_loss)``.

    Raises:
        RuntimeError: ``torch.distributed`` is not initialised.
        TypeError: non-tensor arguments, unsupported dtypes, non-int ``ignore_index``,
            non-real options, non-bool flags.
        ValueError: shapes; options out of range; and, identically on every rank: ranks that
            disagree on ``N``, dtype, options or target; a target class outside ``[0, V)``;
            negative/non-finite probability targets or weights; a weight that is neither ``(V,)``
            nor ``(V_k,)``; rows with NaN/``+inf`` logits or ``-inf`` on every rank.
        softgrad.distributed.CollectiveError: a peer exited, crashed or timed out.

    Examples:
        >>> import torch.distributed as dist
        >>> import torch.nn.functional as F
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> g = torch.Generator().manual_seed(0)
        >>> z = torch.randn(4, 10, generator=g, dtype=torch.float64, requires_grad=True)
        >>> y = torch.tensor([1, 0, -100, 9])
        >>> loss = vocab_parallel_cross_entropy(z, y, label_smoothing=0.1)  # a world of one rank holds all columns
        >>> bool(torch.allclose(loss, F.cross_entropy(z, y, label_smoothing=0.1)))
        True
        >>> dist.destroy_process_group()

        On ``P`` ranks (``torchrun --nproc_per_node=P``), with ``full_logits`` ``(N, V)``::

            widths = [V // P + (r < V % P) for r in range(P)]          # any split works
            start = sum(widths[:rank])
            loss = vocab_parallel_cross_entropy(full_logits[:, start:start + widths[rank]], target)
    """
    prob, opts = _validate(logits_shard, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
                           return_lse, inplace_backward)
    _tv.check_flags(return_token_accuracy=return_token_accuracy, return_predicted_tokens=return_predicted_tokens,
                    return_entropy=return_entropy)
    if return_token_accuracy and prob:
        raise ValueError("return_token_accuracy needs class-index targets; with probability targets compare "
                         "predicted_tokens (return_predicted_tokens=True) with your own labels")
    with_stats = return_token_accuracy or return_predicted_tokens or return_entropy
    group, rank, world = _comm.resolve_group(group)
    logits = logits_shard if logits_shard.stride(-1) == 1 or logits_shard.shape[1] <= 1 else logits_shard.contiguous()
    target_rows = target.contiguous() if prob else target.to(torch.int64).contiguous()
    with_grad = torch.is_grad_enabled() and logits_shard.requires_grad
    if inplace_backward and with_grad:
        if not logits_shard.is_contiguous():
            raise ValueError("inplace_backward=True needs C-contiguous logits_shard to overwrite, got strides "
                             f"{logits_shard.stride()}")
        if logits_shard.is_leaf:
            raise ValueError("inplace_backward=True would overwrite a leaf tensor that requires grad; pass logits "
                             "computed from it (or inplace_backward=False)")
        if prob and target.requires_grad:
            raise ValueError("inplace_backward=True overwrites the logits that the probability target's gradient "
                             "needs; use inplace_backward=False")
    options = (opts.ignore_index, opts.reduction, opts.label_smoothing, opts.z_loss, opts.softcap)
    layout = _agree(group, rank, world, rows=logits.shape[0], width=logits.shape[1], prob=prob, dtype=logits.dtype,
                    options=options + (with_stats,), target=target_rows, ignore_index=int(ignore_index),
                    weight=weight, extra=0, device=logits.device, what="logits_shard")
    weight_shard = weight_full = None
    if weight is not None:
        cdt = compute_dtype(logits.dtype)
        if layout.all_full_weight:
            weight_full = weight.detach().to(cdt).contiguous()
            weight_shard = weight_full[layout.offset:layout.offset + layout.width].contiguous()
        elif weight.shape[0] == layout.num_classes and layout.width != layout.num_classes:
            weight_shard = weight.detach().to(cdt)[layout.offset:layout.offset + layout.width].contiguous()
        else:
            weight_shard = weight.detach().to(cdt).contiguous()
    loss, z_part, lse, stats = _VocabParallelCrossEntropy.apply(
        logits, target_rows, weight_shard, weight_full, layout, group, *options, bool(inplace_backward),
        _settings.get_kernel(), with_stats)
    out_dtype = logits_shard.dtype
    if out_dtype in (torch.float16, torch.bfloat16) and _tv.autocast_enabled(logits_shard.device):
        out_dtype = torch.float32  # autocast runs cross-entropy in float32
    loss = loss.to(out_dtype)
    if not (return_lse or with_stats):
        return loss
    extra = {} if not with_stats else _cross_entropy._statistics(
        stats, target_rows, opts.ignore_index, (logits.shape[0],), accuracy=return_token_accuracy,
        predictions=return_predicted_tokens, entropy=return_entropy)
    return CrossEntropyOutput(loss, lse, z_part.to(out_dtype), **extra)
