"""Fused linear + cross-entropy that never materialises the ``(N, V)`` logits.

A language model's head computes ``logits = hidden @ weight.T (+ bias)`` and then the
softmax cross-entropy. For N tokens and a vocabulary of V the logits (and their
gradient) take ``N * V`` floats, which dominates memory (8192 x 128256 float32 is 4 GB).
This module walks over the tokens in chunks of ``n`` rows and, for each chunk, computes
the logits, the loss and the closed-form gradient, and immediately folds the gradient
into ``grad_hidden`` and ``grad_weight``; only one ``(n, V)`` chunk exists at a time.

Algorithm, per chunk ``c`` of rows (``h_c`` is ``(n, D)``)::

    z   = h_c @ W.T + b                      (n, V), float32 (float64 for float64 input)
    s   = cap * tanh(z / cap)                (only with softcap)
    lse = logsumexp(s, axis=1)               (n,)
    loss_i = lse_i - (1 - eps) s_{i,t_i} - eps * mean_j s_ij + zl * lse_i^2
    G   = dloss/dz * scale_i                 (n, V), written over the z buffer
    grad_h[c]   = G @ W                      (n, D)
    grad_W     += G.T @ h_c                  (V, D), accumulated in float32/float64
    grad_b     += G.sum(0)                   (V,)

For ``reduction="mean"``/``"sum"`` all of this happens in the forward (the gradient of a
scalar loss is known up to the scalar ``grad_output``), so the backward only multiplies
three stored tensors by ``grad_output``. For ``reduction="none"`` the per-row upstream
gradient is not known in the forward, so the forward computes only the per-row losses
and the backward walks the chunks again (recomputing the logits once) with
``scale_i = grad_output_i``. Either way, peak extra memory is
``grad_W (V*D) + grad_h (N*D) + O(n*V)`` and independent of ``N * V``.

Each chunk's loss and gradient are the rule of :mod:`softgrad._cross_entropy_rule`, computed
by the row kernels of ``softgrad.torch.cross_entropy`` through the custom operator
``softgrad::cross_entropy_rows_`` (:func:`softgrad.torch.use_kernel` chooses them): on CUDA one
Triton launch per chunk that reads the GEMM output in its own dtype, computes in float32
(float64 for float64) and writes ``G`` over it, so no float32 copy of the chunk is made; on CPU
the PyTorch-ops rows, relative to each row's max like the kernels.

Autograd, every mode: a plain backward scales the stored gradients (the first time; a later
backward through the same call walks the chunks again); ``create_graph=True`` rebuilds the
gradients chunk by chunk from differentiable ops of the rule (so double backward is
PyTorch's, at the price of holding each chunk's intermediates in the graph); under
forward-mode AD and ``torch.func`` transforms the loss is computed chunk by chunk from those
differentiable ops; meta and fake tensors give shapes and dtypes.
"""

from __future__ import annotations


import torch
from torch import nn

from softgrad import _cross_entropy_rule as _rule
from softgrad.torch import _settings
from softgrad.torch import _torch_cross_entropy as _ops
from softgrad.torch import _validation as _tv
from softgrad.torch import _cross_entropy as _cross_entropy_mod
from softgrad.torch._cross_entropy import CrossEntropyOutput, _check_targets, _statistics, row_factors
from softgrad.torch._torch_cross_entropy import compute_dtype

__all__ = ["linear_cross_entropy", "LinearCrossEntropyLoss", "choose_chunk_size"]

# Byte budget for one chunk of logits and its temporaries on CPU. 64 MiB still gives
# chunks of hundreds of rows for vocabularies of 32k (174 rows), so each chunk's three
# matrix products stay large, while the chunk is small next to an (N, V) buffer.
_CPU_CHUNK_BYTES = 64 * 2**20
# On CUDA a chunk may take 512 MiB (and never more than a quarter of the free memory):
# for a Llama-3 head (V=128256) that is 320 rows, a (320 x 4096) @ (4096 x 128256) GEMM of
# ~0.34 TFLOP, large enough to keep the tensor cores busy, while the chunk stays a
# fraction of the weight gradient (1 GB in bf16). Rows are rounded down to a multiple of 64.
_GPU_CHUNK_BYTES = 512 * 2**20
_GPU_FREE_FRACTION = 0.25


def choose_chunk_size(n_rows: int, vocab: int, device: torch.device, *, softcap: bool = False) -> int:
    """Rows per chunk so that one chunk of float32 logits fits the memory budget.

    On CUDA the budget is 512 MiB or a quarter of ``torch.cuda.mem_get_info()``'s free
    memory, whichever is smaller, rounded down to a multiple of 64 rows; on CPU, and while
    ``torch.compile`` traces, a fixed 64 MiB.

    Args:
        n_rows: N, the number of token rows (>= 1).
        vocab: V, the number of classes (>= 1).
        device: where the computation runs.
        softcap: whether a second ``(n, V)`` buffer is needed for the tanh values.

    Returns:
        int: chunk rows in ``[1, n_rows]``.

    Examples:
        >>> choose_chunk_size(100_000, 32_000, torch.device("cpu"))
        174
        >>> choose_chunk_size(10, 32_000, torch.device("cpu"))
        10
    """
    # bytes per logit of a chunk: the float32 logits/gradient buffer, logsumexp's
    # float32 temporary, the low-precision GEMM output and the copy fed to the gradient
    # GEMMs (counted at 2 bytes each), and the tanh buffer with softcap.
    per_row = vocab * (4 + 4 + 2 + 2 + (4 if softcap else 0))
    if device.type == "cuda" and not torch.compiler.is_compiling():
        free, _total = torch.cuda.mem_get_info(device)
        rows = min(int(free * _GPU_FREE_FRACTION), _GPU_CHUNK_BYTES) // per_row
        rows = rows // 64 * 64 if rows >= 64 else rows
    else:
        rows = _CPU_CHUNK_BYTES // per_row
    return int(max(1, min(n_rows, rows)))


def _row_chunks(n_rows: int, chunk_size: int):
    """The slices ``[start, min(start + chunk_size, n_rows))`` that cover the ``n_rows`` rows in order.

    Every chunked walk over rows (forward, backward, differentiable forms; the vocabulary-parallel
    heads of :mod:`softgrad.distributed`) takes its chunks from here.
    """
    return (slice(start, min(start + chunk_size, n_rows)) for start in range(0, n_rows, chunk_size))


def _chunk_logits(hidden, weight, bias, rows: slice):
    """``z_c = h_c W^T + b`` for one chunk of rows: a fresh ``(n, V)`` tensor in the input dtype.

    Also a vocabulary shard's ``(n, V_k)`` chunk in :mod:`softgrad.distributed._vocab_parallel_linear`.
    """
    z = torch.mm(hidden[rows], weight.t())  # low-precision inputs accumulate in fp32 inside the GEMM
    if bias is not None:
        z = z.add_(bias) if not z.requires_grad else z + bias
    return z


def _accumulate_mm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with ``acc`` in a wider dtype than ``a, b`` (float32 for bf16/fp16 inputs).

    On CUDA the GEMM writes float32 directly (``out_dtype``): each chunk's product is never
    rounded to bf16. Elsewhere the operands are widened for the product (a chunk-sized copy).
    """
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError, NotImplementedError):  # a build without addmm.dtype for these dtypes
            pass
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _chunked_pass(hidden, weight, bias, target, class_weight, scales, row_scale, opts, *, kernel, chunk_size,
                  need_grads, want_grad, with_stats, accum_dtype):
    """Walk the rows of ``hidden (N, D)`` in chunks; see the module docstring.

    ``scales`` is the rule's ``(kappa, zeta)`` ``(2,)`` and ``row_scale`` its per-row factors
    ``(N,)`` or None (token weights / normaliser; the upstream gradient for ``"none"``), both in
    the compute dtype. ``need_grads`` is a triple of bools for (hidden, weight, bias); nothing is
    differentiated unless ``want_grad``. Returns ``(ce_rows, lse_rows, stats or None, grad_hidden,
    grad_weight, grad_bias)``: the per-row cross-entropy without the z-loss and the lse in the
    compute dtype, the ``(2, N)`` entropy/argmax, and None for gradients not asked for.
    """
    n_rows, _dim = hidden.shape
    vocab = weight.shape[0]
    cdt = compute_dtype(hidden.dtype)
    want_grad = want_grad and any(need_grads)
    ce_rows = torch.empty(n_rows, dtype=cdt, device=hidden.device)
    lse_rows = torch.empty(n_rows, dtype=cdt, device=hidden.device)
    stats = torch.empty(2, n_rows, dtype=cdt, device=hidden.device) if with_stats else None
    grad_h = torch.empty_like(hidden) if want_grad and need_grads[0] else None
    # grad_W accumulates in accum_dtype (float32 for bf16/fp16 weights unless asked otherwise),
    # so the running sum is not rounded to the weight's dtype once per chunk
    grad_w = torch.zeros(weight.shape, dtype=accum_dtype, device=weight.device) \
        if want_grad and need_grads[1] else None
    grad_b = torch.zeros(vocab, dtype=cdt, device=weight.device) if want_grad and need_grads[2] else None
    for rows in _row_chunks(n_rows, chunk_size):
        z = _chunk_logits(hidden, weight, bias, rows)
        # the rule's per-row ce and lse; with a gradient, G = r_i d(kappa ce_i + zeta zl lse_i^2)/dz_i over z's buffer
        ce, lse, chunk_stats = torch.ops.softgrad.cross_entropy_rows_(
            z, target[rows], class_weight, scales, None if row_scale is None else row_scale[rows],
            opts.ignore_index, opts.label_smoothing, opts.z_loss, opts.softcap, want_grad, with_stats, kernel)
        ce_rows[rows] = ce
        lse_rows[rows] = lse
        if with_stats:
            stats[:, rows] = chunk_stats
        if want_grad:
            if grad_b is not None:
                grad_b.add_(z.sum(dim=0, dtype=grad_b.dtype))  # float32 sums also when G is bf16
            if grad_h is not None:
                grad_h[rows] = torch.mm(z, weight)  # (n, V) @ (V, D)
            if grad_w is not None:
                _accumulate_mm_(grad_w, z.t(), hidden[rows])  # (V, n) @ (n, D)
        del z  # before the next chunk's GEMM allocates: one (n, V) buffer alive at a time
    if grad_w is not None:
        grad_w = grad_w.to(weight.dtype)
    if grad_b is not None:
        grad_b = grad_b.to(bias.dtype)
    return ce_rows, lse_rows, stats, grad_h, grad_w, grad_b


def _factors(target, class_weight, opts, cdt, vocab):
    """The rule's ``(count, denom, scales)`` of the batch: ``scales = (kappa, zeta)`` as a ``(2,)`` tensor."""
    count, denom = _rule.denominators(target, class_weight, ignore_index=opts.ignore_index, prob_target=False,
                                      num_classes=vocab, dtype=cdt)
    kappa, zeta = _rule.reduction_factors(opts.reduction, count, denom)
    return count, denom, torch.stack([kappa, zeta]).to(cdt)


def _reduce(ce_rows, lse_rows, target, opts, count, denom, row_scale):
    z_rows = _rule.z_loss_rows(lse_rows, opts.z_loss, target != opts.ignore_index)
    loss, z_part = _rule.reduce_rows(ce_rows, z_rows, opts.reduction, count, denom, row_scale)
    return loss, z_part


def _differentiable_chunks(hidden, weight, bias, target, class_weight, opts, chunk_size):
    """Per-row ``(ce, lse)`` from differentiable ops, chunk by chunk (forward-mode AD, ``torch.func``)."""
    parts = []
    for rows in _row_chunks(hidden.shape[0], chunk_size):
        parts.append(_ops.differentiable_rows(_chunk_logits(hidden, weight, bias, rows), target[rows], class_weight,
                                              ignore_index=opts.ignore_index, label_smoothing=opts.label_smoothing,
                                              softcap=opts.softcap, prob_target=False))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _differentiable_grads(hidden, weight, bias, target, class_weight, kappa, zeta, opts, chunk_size, need):
    """The gradients of ``sum_i kappa_i ce_i + zeta_i zl lse_i^2`` from differentiable ops (``create_graph=True``)."""
    grad_h, grad_w, grad_b = [], 0, 0
    for rows in _row_chunks(hidden.shape[0], chunk_size):
        g = _ops.differentiable_gradient(_chunk_logits(hidden, weight, bias, rows), target[rows], class_weight,
                                         kappa[rows], zeta[rows], ignore_index=opts.ignore_index,
                                         label_smoothing=opts.label_smoothing, z_loss=opts.z_loss,
                                         softcap=opts.softcap, prob_target=False).to(hidden.dtype)
        if need[0]:
            grad_h.append(g @ weight)
        if need[1]:
            grad_w = grad_w + g.t() @ hidden[rows]
        if need[2]:
            grad_b = grad_b + g.sum(dim=0)
    return (torch.cat(grad_h) if need[0] else None, grad_w if need[1] else None,
            grad_b if need[2] and bias is not None else None)


class _LinearCrossEntropy(torch.autograd.Function):
    """Autograd Function; inputs already validated and flattened to ``hidden (N, D)``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, class_weight, row_scale, ignore_index, reduction,
                label_smoothing, z_loss, softcap, chunk_size, kernel, accum_dtype, with_stats):
        cdt = compute_dtype(hidden.dtype)
        opts = _rule.CrossEntropyOptions(ignore_index, reduction, label_smoothing, z_loss, softcap)
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        ctx.opts, ctx.need, ctx.chunk_size, ctx.kernel, ctx.accum_dtype = opts, need, chunk_size, kernel, accum_dtype
        count, denom, scales = _factors(target, class_weight, opts, cdt, weight.shape[0])
        # a reduction="none" gradient needs grad_output, known only in the backward
        in_forward = reduction != "none" and any(need)
        ce, lse, stats, gh, gw, gb = _chunked_pass(
            hidden, weight, bias, target, class_weight, scales, row_scale, opts, kernel=kernel,
            chunk_size=chunk_size, need_grads=need, want_grad=in_forward, with_stats=with_stats,
            accum_dtype=accum_dtype)
        out, z_part = _reduce(ce, lse, target, opts, count, denom, row_scale)
        # hidden, weight and bias are kept (references) for recomputation and double backward
        if in_forward and torch.compiler.is_compiling():  # a traced graph saves the gradients as tensors
            ctx.save_for_backward(hidden, weight, bias, target, class_weight, row_scale, scales, gh, gw, gb)
            ctx.stored = "saved"
        else:
            # eager: the graph owns the gradients until the backward takes them, so the backward
            # can scale them in place and hand them on without a copy (saves a weight-sized tensor)
            ctx.save_for_backward(hidden, weight, bias, target, class_weight, row_scale, scales)
            ctx.stored = [gh, gw, gb] if in_forward else None
        if stats is None:
            stats = lse.new_empty(0)
        ctx.mark_non_differentiable(z_part, lse, stats)
        return out, z_part, lse, stats  # compute dtype; the public function casts to the caller's dtype

    @staticmethod
    def backward(ctx, grad_out, _grad_z, _grad_lse, _grad_stats):
        hidden, weight, bias, target, class_weight, row_scale, scales, *saved_grads = ctx.saved_tensors
        nones = (None,) * 12
        if grad_out is None:
            return (None, None, None) + nones
        factor = grad_out.to(scales.dtype)
        factor = factor.expand(hidden.shape[0]) if factor.dim() == 0 else factor.reshape(-1)
        r = factor if row_scale is None else factor * row_scale  # this backward's per-row factors
        if torch.is_grad_enabled():  # create_graph=True: gradients that can be differentiated again
            return _differentiable_grads(hidden, weight, bias, target, class_weight, scales[0] * r, scales[1] * r,
                                         ctx.opts, ctx.chunk_size, ctx.need) + nones
        if ctx.stored == "saved":
            return tuple(None if g is None else g * grad_out for g in saved_grads) + nones
        if ctx.stored:
            # the loss is a scalar: the forward's gradients, scaled by grad_output in place and
            # handed on without a copy; a later backward through this call recomputes below
            gh, gw, gb = ctx.stored
            ctx.stored = None
            return tuple(None if g is None else g.mul_(grad_out) for g in (gh, gw, gb)) + nones
        *_, gh, gw, gb = _chunked_pass(hidden, weight, bias, target, class_weight, scales, r, ctx.opts,
                                       kernel=ctx.kernel, chunk_size=ctx.chunk_size, need_grads=ctx.need,
                                       want_grad=True, with_stats=False, accum_dtype=ctx.accum_dtype)
        return (gh, gw, gb) + nones


def _validate(hidden, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size):
    """Types, shapes, devices and options; returns the checked options."""
    _tv.check_linear_head(hidden, weight, target, bias)
    opts = _rule.CrossEntropyOptions.checked(ignore_index=ignore_index, reduction=reduction,
                                             label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    _tv.check_chunk_size(chunk_size)
    return opts


def _shifted_targets(target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Next-token targets: position ``t`` is scored against ``target[..., t + 1]``; the last position is ignored.

    Only the small integer target moves (one ``(B, T)`` copy); ``hidden`` is used as it is.
    """
    shifted = torch.full_like(target, ignore_index)
    shifted[..., :-1] = target[..., 1:]
    return shifted


def _skippable(h2: torch.Tensor) -> bool:
    """Whether ignored rows may be dropped before the matmuls (needs a host read of how many rows count)."""
    if torch.compiler.is_compiling() or _tv.functorch_active() or _tv._is_fake(h2):
        return False
    return not (h2.is_cuda and torch.cuda.is_current_stream_capturing())


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    class_weight: torch.Tensor | None = None,
    token_weight: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    shift: bool = False,
    accum_dtype: torch.dtype | None = None,
    return_lse: bool = False,
    return_token_accuracy: bool = False,
    return_predicted_tokens: bool = False,
    return_entropy: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor | CrossEntropyOutput:
    r"""Cross-entropy of ``hidden @ weight.T + bias`` without materialising the logits.

    Equal to ``softgrad.torch.cross_entropy(F.linear(hidden, weight, bias), target, ...)`` (the
    rule of :mod:`softgrad._cross_entropy_rule`, every option included) but computed over chunks
    of rows, so peak extra memory is the weight gradient plus one ``(chunk_size, V)`` chunk,
    never ``(N, V)``. Per row, with :math:`z = h W^\top + b` and :math:`s = c \tanh(z / c)`
    under ``softcap=c``:

    .. math::
        \ell_i = (1-\varepsilon)\, w_{t_i} (\operatorname{lse}(s_i) - s_{i,t_i})
                 + \frac{\varepsilon}{V} \textstyle\sum_j w_j (\operatorname{lse}(s_i) - s_{ij})
                 + \zeta \operatorname{lse}(s_i)^2

    Rows whose target is ``ignore_index`` are dropped before the matmuls in eager mode (prompt
    tokens of supervised fine-tuning cost nothing; one host read of how many rows count). Every
    autograd mode works (any number of backwards, double backward, forward-mode AD,
    ``torch.func`` transforms, meta/fake tensors; see the module docstring).

    Args:
        hidden: ``(N, D)`` or ``(B, T, D)``, float64/float32/bfloat16/float16 (the
            softmax is computed in float32, or float64 for float64 input).
        weight: ``(V, D)`` as in ``nn.Linear`` (may be tied to an embedding; the
            gradients accumulate), same dtype and device as ``hidden``.
        target: class indices (an integer dtype but uint64), shape ``hidden.shape[:-1]``, values
            in ``[0, V)`` or ``ignore_index``.
        bias: optional ``(V,)``, same dtype.
        ignore_index: target value whose rows contribute neither loss nor gradient.
        reduction: ``"mean"`` (over non-ignored rows, weighted by ``class_weight``), ``"sum"``
            or ``"none"`` (shape ``hidden.shape[:-1]``).
        label_smoothing: ``eps`` in ``[0, 1]``, PyTorch's definition.
        z_loss: ``zeta >= 0``, adds ``zeta * lse^2`` per row (PaLM).
        softcap: ``c > 0`` applies ``c * tanh(z / c)`` to the logits first (Gemma 2).
        class_weight: optional ``(V,)`` per-class weights, as ``F.cross_entropy``'s ``weight``.
        token_weight, normalizer: per-row weights and the mean's replacement denominator, as in
            :func:`softgrad.torch.cross_entropy` (``normalizer=num_items_in_batch`` reproduces
            Hugging Face's gradient-accumulation loss).
        shift: next-token targets: row ``t`` of each sequence is scored against
            ``target[..., t + 1]`` and the last position is ignored (no copy of ``hidden``).
        accum_dtype: the dtype ``grad_weight`` accumulates in across chunks; default float32 for
            bfloat16/float16 weights (the gradient is rounded to the weight's dtype once, at the
            end; costs a float32 ``(V, D)`` buffer), the weight's dtype otherwise.
        return_lse, return_token_accuracy, return_predicted_tokens, return_entropy: also return
            the per-row ``lse``, the z-loss part and the asked-for same-pass statistics (detached)
            as a :class:`softgrad.torch.CrossEntropyOutput`; ignored rows' ``lse`` and entropy are
            NaN and their predicted token -1 (they are not computed).
        chunk_size: rows per chunk; default from :func:`choose_chunk_size`.

    Returns:
        Tensor: scalar loss, or per-row losses for ``reduction="none"``, in ``hidden``'s
        dtype (under autocast: the dtype ``hidden`` had before the autocast cast); with any
        ``return_*`` flag a :class:`~softgrad.torch.CrossEntropyOutput`. With
        ``reduction="mean"`` and every row ignored the loss is NaN (as in PyTorch) and the
        gradients are zero.

    Raises:
        TypeError: non-tensor arguments, non-floating ``hidden``, mismatched dtypes,
            a non-integer or uint64 ``target``, non-int ``ignore_index``, non-real options,
            non-bool flags, a non-floating ``accum_dtype``.
        ValueError: bad shapes or devices, ``reduction``, ``label_smoothing``, ``z_loss``,
            ``softcap``, ``ignore_index``, ``chunk_size``, ``class_weight``, ``token_weight`` or
            ``normalizer``; and in eager mode (one host synchronisation after the forward)
            ``target`` values outside ``[0, V)`` and not ``ignore_index``, non-finite class
            weights, or logits ``hidden @ weight.T + bias`` with NaN/``+inf`` (e.g. from
            NaN in ``hidden``).

    Examples:
        >>> import torch.nn.functional as F
        >>> g = torch.Generator().manual_seed(0)
        >>> h = torch.randn(2, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
        >>> w = torch.randn(11, 8, generator=g, dtype=torch.float64, requires_grad=True)
        >>> t = torch.randint(0, 11, (2, 5), generator=g)
        >>> loss = linear_cross_entropy(h, w, t, chunk_size=3)
        >>> ref = F.cross_entropy((h @ w.T).reshape(-1, 11), t.reshape(-1))
        >>> bool(torch.allclose(loss, ref))
        True
        >>> out = linear_cross_entropy(h, w, t, shift=True, return_token_accuracy=True)
        >>> ref = F.cross_entropy((h[:, :-1] @ w.T).reshape(-1, 11), t[:, 1:].reshape(-1))
        >>> bool(torch.allclose(out.loss, ref)), out.token_accuracy.shape
        (True, torch.Size([]))
    """
    opts = _validate(hidden, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss, softcap,
                     chunk_size)
    _tv.check_flags(shift=shift, return_lse=return_lse, return_token_accuracy=return_token_accuracy,
                    return_predicted_tokens=return_predicted_tokens, return_entropy=return_entropy)
    out_dtype = hidden.dtype  # the caller's dtype: float32 master weights under autocast give a float32 loss
    hidden, weight, bias = _tv.autocast_head(hidden, weight, bias)
    vocab = weight.shape[0]
    cdt = compute_dtype(hidden.dtype)
    accum = _accum_dtype(accum_dtype, weight.dtype)
    batch_shape = hidden.shape[:-1]
    t_full = _shifted_targets(target, opts.ignore_index) if shift else target
    h2 = hidden.reshape(-1, hidden.shape[-1])
    t1 = t_full.reshape(-1).to(torch.int64)
    cw = None
    if class_weight is not None:
        _tv.check_weight(class_weight, vocab, hidden, "hidden")
        cw = class_weight.detach().to(cdt).contiguous()
    row_scale, opts_k = row_factors(token_weight, normalizer, opts, tuple(batch_shape), hidden)
    with_stats = return_token_accuracy or return_predicted_tokens or return_entropy
    n_all = h2.shape[0]
    keep = None
    if _skippable(h2):
        valid = t1 != opts.ignore_index
        n_keep = int(valid.sum())  # one host read: the number of rows that count
        if n_keep < n_all:
            keep = valid.nonzero().squeeze(1)
    h_run, t_run, r_run = h2, t1, row_scale
    if keep is not None:
        h_run, t_run = h2.index_select(0, keep), t1.index_select(0, keep)  # autograd scatters grad_h back
        r_run = None if row_scale is None else row_scale.index_select(0, keep)
    if chunk_size is None:
        chunk_size = choose_chunk_size(max(h_run.shape[0], 1), vocab, h2.device, softcap=opts.softcap is not None)
    stats = None
    with _tv.autocast_off(hidden.device):
        if _tv.functorch_active() or _tv.has_tangent(h_run, weight, bias):
            ce, lse = _differentiable_chunks(h_run, weight, bias, t_run, cw, opts_k, int(chunk_size))
            count, denom, _ = _factors(t_run, cw, opts_k, ce.dtype, vocab)
            out, z_part = _reduce(ce, lse, t_run, opts_k, count, denom, r_run)
            z_part, lse = z_part.detach(), lse.detach()
            if with_stats:
                with torch.no_grad():
                    stats = torch.cat([_cross_entropy_mod._differentiable_stats(
                        _chunk_logits(h_run, weight, bias, rows), opts.softcap)
                        for rows in _row_chunks(h_run.shape[0], int(chunk_size))], dim=1)
        else:
            out, z_part, lse, stats = _LinearCrossEntropy.apply(
                h_run, weight, bias, t_run, cw, r_run, opts_k.ignore_index, opts_k.reduction,
                opts_k.label_smoothing, opts_k.z_loss, opts_k.softcap, int(chunk_size), _settings.get_kernel(),
                accum, with_stats)
            stats = stats if with_stats else None
    if _tv.values_checkable(h2):
        # one host synchronisation: targets in range, class weights finite, every row's logits finite
        bad_rows = ~torch.isfinite(lse)
        if _check_targets(t1, cw, vocab, opts.ignore_index, False, extra=bad_rows.any()):
            first = int(bad_rows.nonzero()[0, 0])
            raise ValueError(f"the logits hidden @ weight.T + bias contain NaN or +inf in {int(bad_rows.sum())} "
                             f"row(s) (first at row {first} of those that count): check hidden, weight and bias "
                             "for NaN/inf values")
    # back to every row: ignored rows have loss 0, and lse/entropy NaN, predicted token -1 (not computed)
    valid_all = t1 != opts.ignore_index
    if keep is not None:
        if opts.reduction == "none":
            out = out.new_zeros(n_all).index_copy(0, keep, out)
            z_part = z_part.new_zeros(n_all).index_copy(0, keep, z_part)
        lse = lse.new_full((n_all,), float("nan")).index_copy(0, keep, lse)
        if stats is not None:
            stats = stats.new_full((2, n_all), float("nan")).index_copy(1, keep, stats)
    elif lse.numel():
        lse = torch.where(valid_all, lse, float("nan"))
    if opts.reduction == "none":
        out, z_part = out.reshape(batch_shape), z_part.reshape(batch_shape)
    out = out.to(out_dtype)
    if not (return_lse or with_stats):
        return out
    extra = {}
    if with_stats:
        stats = torch.where(valid_all[None, :], stats, float("nan"))
        entropy, predicted = stats[0], torch.where(valid_all, stats[1], -1.0)
        extra = _statistics(torch.stack([entropy, predicted]), t1, opts.ignore_index, tuple(batch_shape),
                            accuracy=return_token_accuracy, predictions=return_predicted_tokens,
                            entropy=return_entropy)
    return CrossEntropyOutput(out, lse.reshape(batch_shape), z_part.to(out_dtype), **extra)


def _accum_dtype(accum_dtype, weight_dtype: torch.dtype) -> torch.dtype:
    if accum_dtype is None:
        return torch.float32 if weight_dtype in (torch.bfloat16, torch.float16) else weight_dtype
    if not isinstance(accum_dtype, torch.dtype) or not accum_dtype.is_floating_point:
        raise TypeError(f"accum_dtype must be a floating torch.dtype or None, got {accum_dtype!r}")
    return accum_dtype


class LinearCrossEntropyLoss(nn.Module):
    """``nn.Module`` form of :func:`linear_cross_entropy`; ``forward(hidden, weight, target, bias=None)``.

    The weight is passed to ``forward`` (not owned), so the module works with a tied
    embedding or an ``nn.Linear`` head's ``weight`` alike. Every keyword of
    :func:`linear_cross_entropy` but the per-batch ``token_weight``/``normalizer`` is a
    constructor argument; ``class_weight`` is a buffer.

    Examples:
        >>> loss_fn = LinearCrossEntropyLoss(label_smoothing=0.1)
        >>> h, w = torch.randn(6, 4), torch.randn(9, 4)
        >>> loss_fn(h, w, torch.randint(0, 9, (6,))).shape
        torch.Size([])
    """

    def __init__(self, *, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 z_loss: float = 0.0, softcap: float | None = None, class_weight: torch.Tensor | None = None,
                 shift: bool = False, accum_dtype: torch.dtype | None = None, return_lse: bool = False,
                 return_token_accuracy: bool = False, return_predicted_tokens: bool = False,
                 return_entropy: bool = False, chunk_size: int | None = None) -> None:
        super().__init__()
        _rule.CrossEntropyOptions.checked(ignore_index=ignore_index, reduction=reduction,
                                          label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
        _tv.check_flags(shift=shift, return_lse=return_lse, return_token_accuracy=return_token_accuracy,
                        return_predicted_tokens=return_predicted_tokens, return_entropy=return_entropy)
        self.register_buffer("class_weight", class_weight)
        self.options = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                            z_loss=z_loss, softcap=softcap, shift=shift, accum_dtype=accum_dtype,
                            return_lse=return_lse, return_token_accuracy=return_token_accuracy,
                            return_predicted_tokens=return_predicted_tokens, return_entropy=return_entropy,
                            chunk_size=chunk_size)

    def forward(self, hidden, weight, target, bias=None):
        return linear_cross_entropy(hidden, weight, target, bias, class_weight=self.class_weight, **self.options)

    def extra_repr(self) -> str:
        shown = ("reduction", "ignore_index", "label_smoothing", "z_loss", "softcap", "shift")
        return ", ".join(f"{k}={self.options[k]!r}" for k in shown)


