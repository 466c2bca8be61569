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

import numbers

import torch
from torch import nn

from softgrad import _cross_entropy_rule as _rule
from softgrad.torch import _settings
from softgrad.torch import _torch_cross_entropy as _ops
from softgrad.torch import _validation as _tv
from softgrad.torch._cross_entropy import _check_targets
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


def _chunk_logits(hidden, weight, bias, rows: slice):
    """``z_c = h_c W^T + b`` for one chunk of rows: a fresh ``(n, V)`` tensor in the input dtype."""
    z = torch.mm(hidden[rows], weight.t())  # low-precision inputs accumulate in fp32 inside the GEMM
    if bias is not None:
        z = z.add_(bias) if not z.requires_grad else z + bias
    return z


def _chunked_pass(hidden, weight, bias, target, scale, opts, *, kernel, chunk_size, need_grads):
    """Walk the rows of ``hidden (N, D)`` in chunks; see the module docstring.

    ``scale`` is an ``(N,)`` tensor of per-row gradient factors (compute dtype; the rule's
    ``kappa = zeta`` per row) or None when no gradient is needed. ``need_grads`` is a triple of
    bools for (hidden, weight, bias). Returns ``(ce_rows (N,), lse (N,), grad_hidden,
    grad_weight, grad_bias)``: the per-row cross-entropy without the z-loss, in the compute
    dtype, and None for gradients not asked for.
    """
    n_rows, _dim = hidden.shape
    vocab = weight.shape[0]
    cdt = compute_dtype(hidden.dtype)
    want_grad = scale is not None and any(need_grads)
    ce_rows = torch.empty(n_rows, dtype=cdt, device=hidden.device)
    lse_rows = torch.empty(n_rows, dtype=cdt, device=hidden.device)
    grad_h = torch.empty_like(hidden) if want_grad and need_grads[0] else None
    # grad_W accumulates in the weight's dtype: exact for float32/float64; for bfloat16/float16
    # each chunk's GEMM accumulates in float32 and the running sum is rounded once per chunk
    # (a float32 buffer would cost 2x the weight, e.g. 2.1 GB more for a Llama-3 head).
    grad_w = torch.zeros_like(weight) if want_grad and need_grads[1] else None
    grad_b = torch.zeros(vocab, dtype=cdt, device=weight.device) if want_grad and need_grads[2] else None
    for start in range(0, n_rows, chunk_size):
        rows = slice(start, min(start + chunk_size, n_rows))
        z = _chunk_logits(hidden, weight, bias, rows)
        # the rule's per-row ce and lse; with a gradient, G = scale_i d(ce_i + zl lse_i^2)/dz_i over z's buffer
        ce, lse = torch.ops.softgrad.cross_entropy_rows_(
            z, target[rows], scale[rows] if want_grad else None, opts.ignore_index, opts.label_smoothing,
            opts.z_loss, opts.softcap, want_grad, kernel)
        ce_rows[rows] = ce
        lse_rows[rows] = lse
        if not want_grad:
            del z
            continue
        if grad_b is not None:
            grad_b.add_(z.sum(dim=0, dtype=grad_b.dtype))  # float32 sums also when G is bf16
        if grad_h is not None:
            grad_h[rows] = torch.mm(z, weight)  # (n, V) @ (V, D)
        if grad_w is not None:
            grad_w.addmm_(z.t(), hidden[rows])  # (V, n) @ (n, D), accumulated in place
        del z  # before the next chunk's GEMM allocates: one (n, V) buffer alive at a time
    if grad_b is not None:
        grad_b = grad_b.to(bias.dtype)
    return ce_rows, lse_rows, grad_h, grad_w, grad_b


def _row_scale(target, opts, cdt):
    """The rule's per-row ``kappa`` (= ``zeta``: no class weights here) and ``(count, denom)``."""
    count, denom = _rule.denominators(target, None, ignore_index=opts.ignore_index, prob_target=False,
                                      num_classes=0, dtype=cdt)
    kappa, _ = _rule.reduction_factors(opts.reduction, count, denom)
    return kappa.expand(target.shape[0]), count, denom


def _reduce(ce_rows, lse_rows, target, opts, count, denom):
    z_rows = _rule.z_loss_rows(lse_rows, opts.z_loss, target != opts.ignore_index)
    loss, _ = _rule.reduce_rows(ce_rows, z_rows, opts.reduction, count, denom)
    return loss


def _differentiable_chunks(hidden, weight, bias, target, opts, chunk_size):
    """Per-row ``(ce, lse)`` from differentiable ops, chunk by chunk (forward-mode AD, ``torch.func``)."""
    parts = []
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, min(start + chunk_size, hidden.shape[0]))
        parts.append(_ops.differentiable_rows(_chunk_logits(hidden, weight, bias, rows), target[rows], None,
                                              ignore_index=opts.ignore_index, label_smoothing=opts.label_smoothing,
                                              softcap=opts.softcap, prob_target=False))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _differentiable_grads(hidden, weight, bias, target, scale, opts, chunk_size, need):
    """The gradients of ``sum_i scale_i (ce_i + zl lse_i^2)`` from differentiable ops, for ``create_graph=True``."""
    grad_h, grad_w, grad_b = [], 0, 0
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, min(start + chunk_size, hidden.shape[0]))
        g = _ops.differentiable_gradient(_chunk_logits(hidden, weight, bias, rows), target[rows], None,
                                         scale[rows], scale[rows], ignore_index=opts.ignore_index,
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
    def forward(ctx, hidden, weight, bias, target, ignore_index, reduction, label_smoothing, z_loss, softcap,
                chunk_size, kernel):
        cdt = compute_dtype(hidden.dtype)
        opts = _rule.CrossEntropyOptions(ignore_index, reduction, label_smoothing, z_loss, softcap)
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        ctx.opts, ctx.need, ctx.chunk_size, ctx.kernel = opts, need, chunk_size, kernel
        row_scale, count, denom = _row_scale(target, opts, cdt)
        # a reduction="none" gradient needs grad_output, known only in the backward
        in_forward = reduction != "none" and any(need)
        ce, lse, gh, gw, gb = _chunked_pass(hidden, weight, bias, target, row_scale if in_forward else None, opts,
                                            kernel=kernel, chunk_size=chunk_size, need_grads=need)
        out = _reduce(ce, lse, target, opts, count, denom)
        # hidden, weight and bias are kept (references) for recomputation and double backward
        if in_forward and torch.compiler.is_compiling():  # a traced graph saves the gradients as tensors
            ctx.save_for_backward(hidden, weight, bias, target, row_scale, gh, gw, gb)
            ctx.stored = "saved"
        else:
            # eager: the graph owns the gradients until the backward takes them, so the backward
            # can scale them in place and hand them on without a copy (saves a weight-sized tensor)
            ctx.save_for_backward(hidden, weight, bias, target, row_scale)
            ctx.stored = [gh, gw, gb] if in_forward else None
        ctx.mark_non_differentiable(lse)
        return out, lse  # compute dtype; the public function casts to the caller's dtype

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        hidden, weight, bias, target, row_scale, *saved_grads = ctx.saved_tensors
        nones = (None,) * 8
        if grad_out is None:
            return (None, None, None) + nones
        factor = grad_out.to(row_scale.dtype)
        scale = row_scale * (factor if factor.dim() == 0 else factor.reshape(-1))
        if torch.is_grad_enabled():  # create_graph=True: gradients that can be differentiated again
            return _differentiable_grads(hidden, weight, bias, target, scale, ctx.opts, ctx.chunk_size,
                                         ctx.need) + nones
        if ctx.stored == "saved":
            return tuple(None if g is None else g * grad_out for g in saved_grads) + nones
        if ctx.stored:
            # the loss is a scalar: the forward's gradients, scaled by grad_output in place and
            # handed on without a copy; a later backward through this call recomputes below
            gh, gw, gb = ctx.stored
            ctx.stored = None
            return tuple(None if g is None else g.mul_(grad_out) for g in (gh, gw, gb)) + nones
        _, _, gh, gw, gb = _chunked_pass(hidden, weight, bias, target, scale, ctx.opts, kernel=ctx.kernel,
                                         chunk_size=ctx.chunk_size, need_grads=ctx.need)
        return (gh, gw, gb) + nones


def _validate(hidden, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size):
    """Types, shapes, devices and options; returns the checked options."""
    _tv.check_tensor(hidden, "hidden")
    _tv.check_tensor(weight, "weight")
    _tv.check_tensor(target, "target")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    _tv.check_float(hidden, "hidden")
    if hidden.dim() < 2 or hidden.shape[-1] == 0:
        raise ValueError(f"hidden must have shape (N, D) or (B, T, D) with D >= 1, got {tuple(hidden.shape)}")
    if hidden.numel() == 0:
        raise ValueError(f"hidden has no rows (shape {tuple(hidden.shape)}); need at least one")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape (V, {hidden.shape[-1]}) with V >= 1, got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != hidden.dtype):
        raise ValueError(f"bias must have shape ({weight.shape[0]},) and dtype {hidden.dtype}, "
                         f"got {tuple(bias.shape)} {bias.dtype}")
    for name, value in (("weight", weight), ("target", target), ("bias", bias)):
        _tv.check_same_device(value, name, hidden, "hidden")
    _tv.check_index_dtype(target)
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"target shape {tuple(target.shape)} must equal hidden.shape[:-1] = "
                         f"{tuple(hidden.shape[:-1])}")
    opts = _rule.CrossEntropyOptions.checked(ignore_index=ignore_index, reduction=reduction,
                                             label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
    return opts


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
    chunk_size: int | None = None,
) -> torch.Tensor:
    r"""Cross-entropy of ``hidden @ weight.T + bias`` without materialising the logits.

    Equal to ``softgrad.torch.cross_entropy(F.linear(hidden, weight, bias), target, ...)`` (the
    rule of :mod:`softgrad._cross_entropy_rule`) but computed over chunks of rows, so peak
    extra memory is the weight gradient plus one ``(chunk_size, V)`` chunk, never ``(N, V)``:

    .. math::
        s = c 	anh(z / c),\quad z = h W^	op + b,\qquad
        \ell_i = (1-arepsilon)(\operatorname{lse}(s_i) - s_{i,t_i})
                 + 	frac{arepsilon}{V}	extstyle\sum_j (\operatorname{lse}(s_i) - s_{ij})
                 + \zeta \operatorname{lse}(s_i)^2

    Every autograd mode works (any number of backwards, double backward, forward-mode AD,
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
        reduction: ``"mean"`` (over non-ignored rows), ``"sum"`` or ``"none"`` (shape
            ``hidden.shape[:-1]``).
        label_smoothing: ``eps`` in ``[0, 1]``, PyTorch's definition.
        z_loss: ``zeta >= 0``, adds ``zeta * lse^2`` per row (PaLM).
        softcap: ``c > 0`` applies ``c * tanh(z / c)`` to the logits first (Gemma 2).
        chunk_size: rows per chunk; default from :func:`choose_chunk_size`.

    Returns:
        Tensor: scalar loss, or per-row losses for ``reduction="none"``, in ``hidden``'s
        dtype (under autocast: the dtype ``hidden`` had before the autocast cast). With
        ``reduction="mean"`` and every row ignored the loss is NaN (as in PyTorch) and the
        gradients are zero.

    Raises:
        TypeError: non-tensor arguments, non-floating ``hidden``, mismatched dtypes,
            a non-integer or uint64 ``target``, non-int ``ignore_index``, non-real options.
        ValueError: bad shapes or devices, ``reduction``, ``label_smoothing``, ``z_loss``,
            ``softcap``, ``ignore_index`` or ``chunk_size``; and in eager mode (one host
            synchronisation after the forward) ``target`` values outside ``[0, V)`` and not
            ``ignore_index``, or logits ``hidden @ weight.T + bias`` with NaN/``+inf`` (e.g. from
            NaN hidden states).

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
    """
    opts = _validate(hidden, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss, softcap,
                     chunk_size)
    device_type = hidden.device.type
    out_dtype = hidden.dtype  # the caller's dtype: float32 master weights under autocast give a float32 loss
    if _tv.autocast_enabled(hidden.device):
        # Under autocast the head's matmul runs in the autocast dtype, as nn.Linear's
        # would; the casts are ordinary autograd ops, so fp32 master weights get fp32 grads.
        low = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(low), weight.to(low)
        bias = bias.to(low) if bias is not None else None
    batch_shape = hidden.shape[:-1]
    h2 = hidden.reshape(-1, hidden.shape[-1])
    t1 = target.reshape(-1).to(torch.int64)
    if chunk_size is None:
        chunk_size = choose_chunk_size(h2.shape[0], weight.shape[0], h2.device, softcap=opts.softcap is not None)
    with _tv.autocast_off(hidden.device):
        if _tv.functorch_active() or _tv.has_tangent(h2, weight, bias):
            ce, lse = _differentiable_chunks(h2, weight, bias, t1, opts, int(chunk_size))
            _, count, denom = _row_scale(t1, opts, ce.dtype)
            out = _reduce(ce, lse, t1, opts, count, denom)
        else:
            out, lse = _LinearCrossEntropy.apply(h2, weight, bias, t1, opts.ignore_index, opts.reduction,
                                                 opts.label_smoothing, opts.z_loss, opts.softcap, int(chunk_size),
                                                 _settings.get_kernel())
    if _tv.values_checkable(h2):
        # one host synchronisation: targets in range, and every row's logits finite
        bad_rows = ~torch.isfinite(lse)
        if _check_targets(t1, None, weight.shape[0], opts.ignore_index, False, extra=bad_rows.any()):
            first = int(bad_rows.nonzero()[0, 0])
            raise ValueError(f"the logits hidden @ weight.T + bias contain NaN or +inf in {int(bad_rows.sum())} "
                             f"row(s) (first at flattened row {first}): check hidden, weight and bias for "
                             "NaN/inf values")
    if opts.reduction == "none":
        out = out.reshape(batch_shape)
    return out.to(out_dtype)


class LinearCrossEntropyLoss(nn.Module):
    """``nn.Module`` form of :func:`linear_cross_entropy`; ``forward(hidden, weight, target, bias=None)``.

    The weight is passed to ``forward`` (not owned), so the module works with a tied
    embedding or an ``nn.Linear`` head's ``weight`` alike.

    Examples:
        >>> loss_fn = LinearCrossEntropyLoss(label_smoothing=0.1)
        >>> h, w = torch.randn(6, 4), torch.randn(9, 4)
        >>> loss_fn(h, w, torch.randint(0, 9, (6,))).shape
        torch.Size([])
    """

    def __init__(self, *, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 z_loss: float = 0.0, softcap: float | None = None, chunk_size: int | None = None) -> None:
        super().__init__()
        _rule.CrossEntropyOptions.checked(ignore_index=ignore_index, reduction=reduction,
                                          label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.chunk_size = chunk_size

    def forward(self, hidden, weight, target, bias=None):
        return linear_cross_entropy(hidden, weight, target, bias, ignore_index=self.ignore_index,
                                    reduction=self.reduction, label_smoothing=self.label_smoothing,
                                    z_loss=self.z_loss, softcap=self.softcap, chunk_size=self.chunk_size)

    def extra_repr(self) -> str:
        return (f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, softcap={self.softcap}")
