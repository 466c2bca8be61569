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

On CUDA (when Triton imports) the chunk's loss and gradient come from the fused
cross-entropy kernel of :mod:`softgrad.torch._triton_cross_entropy` (through the custom
operator ``softgrad::cross_entropy_rows_``): one launch per chunk that reads the GEMM output
in its own dtype, computes in float32 (float64 for float64), and writes ``G`` over it, so no
float32 copy of the chunk is made. Elsewhere the same formulas run as PyTorch ops
(:func:`_chunk_loss_and_grad`).
"""

from __future__ import annotations

import torch
from torch import nn

from softgrad.torch import _cross_entropy

__all__ = ["linear_cross_entropy", "LinearCrossEntropyLoss", "choose_chunk_size"]

_REDUCTIONS = ("mean", "sum", "none")

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
# The chunk's cross-entropy: "auto" uses the fused row kernel (Triton) on CUDA when triton
# imports and PyTorch ops otherwise; "torch" always PyTorch ops; a softgrad.torch kernel spec
# such as "triton:two_pass:16" forces the fused kernel (tests run it in Triton's interpreter).
_CHUNK_KERNEL = "auto"


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


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_loss_and_grad(z, target, valid, scale, *, label_smoothing, z_loss, softcap, want_grad):
    """Per-row loss of one chunk and, if asked, ``scale_i * dloss_i/dz_i`` written into ``z``.

    ``z`` (n, V) is the chunk's logits in the compute dtype and is overwritten.
    ``target`` (n,) int64 with ignored rows already replaced by 0, ``valid`` (n,) bool,
    ``scale`` (n,) compute dtype. Returns ``(loss (n,), grad (n, V) or None)``.
    """
    vocab = z.shape[1]
    eps = float(label_smoothing)
    if softcap is not None:
        # s = c * tanh(z / c);  ds/dz = 1 - tanh(z / c)^2. Keep t = tanh(z / c) in z's buffer.
        t = z.div_(softcap).tanh_()
        s = t * softcap
    else:
        t = None
        s = z
    lse = torch.logsumexp(s, dim=1)  # (n,)
    s_target = s.gather(1, target[:, None]).squeeze(1)
    # loss_i = lse_i - (1 - eps) s_{i,t} - eps * mean_j s_ij + zl * lse_i^2:
    # label smoothing mixes the one-hot target with the uniform 1/V, whose
    # cross-entropy is lse - mean(s); z_loss is PaLM's auxiliary zl * lse^2.
    loss = lse - (1.0 - eps) * s_target
    if eps:
        loss = loss - eps * s.mean(dim=1)
    if z_loss:
        loss = loss + z_loss * lse * lse
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if not want_grad:
        return loss, None
    # d loss_i / d s_ij = p_ij (1 + 2 zl lse_i) - (1 - eps) [j = t_i] - eps / V,
    # with p = softmax(s) = exp(s - lse); this is the classic "softmax minus one-hot"
    # with the smoothing and z-loss terms folded in.
    g = s.sub_(lse[:, None]).exp_()  # p, in place (s is z's buffer, or a fresh one with softcap)
    row = scale * valid.to(scale.dtype)
    if z_loss:
        g.mul_((row * (1.0 + 2.0 * z_loss * lse))[:, None])
    else:
        g.mul_(row[:, None])
    if eps:
        g.sub_((row * (eps / vocab))[:, None])
    g.scatter_add_(1, target[:, None], (-(1.0 - eps) * row)[:, None])
    if t is not None:
        # chain rule through the softcap: dloss/dz = dloss/ds * (1 - t^2)
        g.mul_(t.mul_(t).neg_().add_(1.0))  # t's buffer is free now: reuse it for 1 - t^2
    return loss, g


def _fused_kernel_spec(device: torch.device) -> str | None:
    """The softgrad.torch kernel spec for the chunks' cross-entropy, or None for PyTorch ops."""
    if _CHUNK_KERNEL == "torch":
        return None
    if _CHUNK_KERNEL == "auto":
        return "auto" if device.type == "cuda" and _cross_entropy._triton_module() is not None else None
    return _CHUNK_KERNEL


def _fused_chunk_loss_and_grad(z, target, scale, *, ignore_index, label_smoothing, z_loss, softcap, want_grad,
                               kernel):
    """:func:`_chunk_loss_and_grad` in one fused kernel launch, on ``z`` in the GEMM's own dtype.

    ``target`` (n,) int64 with ``ignore_index`` rows as given. Returns ``(loss (n,) compute dtype,
    grad or None)``; the gradient (``scale_i * dloss_i/dz_i``) is written over ``z``.
    """
    ce, lse = torch.ops.softgrad.cross_entropy_rows_(z, target, scale if want_grad else None, ignore_index,
                                                     label_smoothing, z_loss, softcap, want_grad, kernel)
    if z_loss:
        ce = ce + torch.where(target != ignore_index, z_loss * lse * lse, torch.zeros_like(lse))
    return ce, (z if want_grad else None)


def _chunked_pass(hidden, weight, bias, target, scale, *, ignore_index, label_smoothing, z_loss, softcap,
                  chunk_size, need_grads):
    """Walk the rows of ``hidden (N, D)`` in chunks; see the module docstring.

    ``scale`` is an ``(N,)`` tensor of per-row gradient factors (compute dtype) or None
    when no gradient is needed. ``need_grads`` is a triple of bools for (hidden, weight, bias).
    Returns ``(loss_rows (N,) compute dtype, grad_hidden, grad_weight, grad_bias)`` with
    ``None`` for gradients not asked for.
    """
    n_rows, _dim = hidden.shape
    vocab = weight.shape[0]
    cdt = _compute_dtype(hidden.dtype)
    want_grad = scale is not None and any(need_grads)
    loss_rows = torch.empty(n_rows, dtype=cdt, device=hidden.device)
    grad_h = torch.empty_like(hidden) if want_grad and need_grads[0] else None
    # grad_W accumulates in the weight's dtype: exact for float32/float64; for bfloat16/float16
    # each chunk's GEMM accumulates in float32 and the running sum is rounded once per chunk
    # (a float32 buffer would cost 2x the weight, e.g. 2.1 GB more for a Llama-3 head).
    grad_w = torch.zeros_like(weight) if want_grad and need_grads[1] else None
    grad_b = torch.zeros(vocab, dtype=cdt, device=weight.device) if want_grad and need_grads[2] else None
    valid_all = target != ignore_index
    safe_target = torch.where(valid_all, target, torch.zeros_like(target))
    fused = _fused_kernel_spec(hidden.device)
    for start in range(0, n_rows, chunk_size):
        stop = min(start + chunk_size, n_rows)
        h_c = hidden[start:stop]
        z = torch.mm(h_c, weight.t())  # (n, V); low-precision inputs accumulate in fp32 inside the GEMM
        if bias is not None:
            z.add_(bias)
        if fused is not None:
            loss_c, g = _fused_chunk_loss_and_grad(
                z, target[start:stop], scale[start:stop] if want_grad else None, ignore_index=ignore_index,
                label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, want_grad=want_grad,
                kernel=fused,
            )
        else:
            z = z.to(cdt)
            loss_c, g = _chunk_loss_and_grad(
                z, safe_target[start:stop], valid_all[start:stop],
                scale[start:stop] if want_grad else None,
                label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, want_grad=want_grad,
            )
        loss_rows[start:stop] = loss_c
        if g is None:
            continue
        if grad_b is not None:
            grad_b.add_(g.sum(dim=0, dtype=grad_b.dtype))  # float32 sums also when g is bf16
        g_low = g.to(hidden.dtype)
        if grad_h is not None:
            grad_h[start:stop] = torch.mm(g_low, weight)  # (n, V) @ (V, D)
        if grad_w is not None:
            grad_w.addmm_(g_low.t(), h_c)  # (V, n) @ (n, D), accumulated in place
    if grad_b is not None:
        grad_b = grad_b.to(bias.dtype)
    return loss_rows, grad_h, grad_w, grad_b


class _LinearCrossEntropy(torch.autograd.Function):
    """Autograd Function; inputs already validated and flattened to ``hidden (N, D)``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, ignore_index, reduction, label_smoothing, z_loss, softcap,
                chunk_size):
        cdt = _compute_dtype(hidden.dtype)
        valid = target != ignore_index
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        opts = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                    chunk_size=chunk_size)
        ctx.reduction = reduction
        ctx.opts = opts
        ctx.need = need
        count = valid.sum().to(cdt)
        if reduction == "none" or not any(need):
            loss_rows, _, _, _ = _chunked_pass(hidden, weight, bias, target, None, need_grads=need, **opts)
            ctx.save_for_backward(hidden, weight, bias, target)
            if reduction == "none":
                out = loss_rows
            else:
                out = loss_rows.sum() / count if reduction == "mean" else loss_rows.sum()
        else:
            if reduction == "mean":
                # PyTorch's convention: divide by the number of non-ignored rows
                # (NaN loss when every row is ignored; the gradient is then 0).
                row_scale = torch.ones(target.shape, dtype=cdt, device=hidden.device) / count.clamp(min=1)
            else:
                row_scale = torch.ones(target.shape, dtype=cdt, device=hidden.device)
            loss_rows, gh, gw, gb = _chunked_pass(hidden, weight, bias, target, row_scale, need_grads=need, **opts)
            out = loss_rows.sum() / count if reduction == "mean" else loss_rows.sum()
            if torch.compiler.is_compiling():
                ctx.owned = None
                ctx.save_for_backward(gh, gw, gb)
            else:
                # Eager: the graph owns the gradients until the backward takes them, so the
                # backward can scale them in place and hand them on without a copy (saves
                # one weight-sized tensor). The price: a second backward cannot reuse them.
                ctx.owned = [gh, gw, gb]
        return out  # compute dtype; the public function casts to the caller's dtype

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.reduction == "none" or not any(ctx.need):
            hidden, weight, bias, target = ctx.saved_tensors
            scale = grad_out.to(_compute_dtype(hidden.dtype)).reshape(-1)
            _, gh, gw, gb = _chunked_pass(hidden, weight, bias, target, scale, need_grads=ctx.need, **ctx.opts)
        else:
            # the loss is a scalar: every stored gradient scales by grad_output
            if ctx.owned is None:
                gh, gw, gb = (None if g is None else g * grad_out for g in ctx.saved_tensors)
            else:
                if not ctx.owned:
                    raise RuntimeError(
                        "linear_cross_entropy with reduction='mean' or 'sum' computes its gradients in the "
                        "forward and hands them to the first backward; retain_graph=True backwards are "
                        "not supported (use reduction='none' and reduce outside)")
                gh, gw, gb = ctx.owned
                ctx.owned = []
                gh, gw, gb = (None if g is None else g.mul_(grad_out) for g in (gh, gw, gb))
        return gh, gw, gb, None, None, None, None, None, None, None


def _validate(hidden, weight, target, bias, reduction, label_smoothing, z_loss, softcap, chunk_size):
    for name, value in (("hidden", hidden), ("weight", weight), ("target", target)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if not hidden.is_floating_point():
        raise TypeError(f"hidden must be a floating-point tensor, got {hidden.dtype}")
    if hidden.dim() < 2:
        raise ValueError(f"hidden must have shape (N, D) or (B, T, D), got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must have shape (V, {hidden.shape[-1]}), got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != hidden.dtype):
        raise ValueError(f"bias must have shape ({weight.shape[0]},) and dtype {hidden.dtype}, "
                         f"got {tuple(bias.shape)} {bias.dtype}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must hold class indices (int64), got {target.dtype}")
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"target shape {tuple(target.shape)} must equal hidden.shape[:-1] = "
                         f"{tuple(hidden.shape[:-1])}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if z_loss < 0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be None or > 0, got {softcap}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")


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

    Equal to ``cross_entropy(F.linear(hidden, weight, bias), target, ...)`` but computed
    over chunks of rows, so peak extra memory is the weight gradient plus one
    ``(chunk_size, V)`` chunk, never ``(N, V)``:

    .. math::
        s = c \tanh(z / c),\quad z = h W^\top + b,\qquad
        \ell_i = \operatorname{lse}(s_i) - (1-\varepsilon) s_{i,t_i}
                 - \tfrac{\varepsilon}{V}\textstyle\sum_j s_{ij} + \zeta \operatorname{lse}(s_i)^2

    Args:
        hidden: ``(N, D)`` or ``(B, T, D)``, float64/float32/bfloat16/float16 (the
            softmax is computed in float32, or float64 for float64 input).
        weight: ``(V, D)`` as in ``nn.Linear`` (may be tied to an embedding; the
            gradients accumulate), same dtype as ``hidden``.
        target: class indices, int64, shape ``hidden.shape[:-1]``, values in
            ``[0, V)`` or ``ignore_index``.
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
        dtype (under autocast: the dtype ``hidden`` had before the autocast cast). With ``reduction="mean"`` and every row ignored the loss is NaN (as in
        PyTorch) and the gradients are zero.

    Raises:
        TypeError: non-tensor arguments, non-floating ``hidden``, mismatched dtypes,
            non-integer ``target``.
        ValueError: bad shapes, ``target`` values out of range (checked in eager mode),
            ``reduction``, ``label_smoothing``, ``z_loss``, ``softcap`` or ``chunk_size``.

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
    _validate(hidden, weight, target, bias, reduction, label_smoothing, z_loss, softcap, chunk_size)
    device_type = hidden.device.type
    out_dtype = hidden.dtype  # the caller's dtype: float32 master weights under autocast give a float32 loss
    if torch.is_autocast_enabled(device_type):
        # Under autocast the head's matmul runs in the autocast dtype, as nn.Linear's
        # would; the casts are ordinary autograd ops, so fp32 master weights get fp32 grads.
        low = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(low), weight.to(low)
        bias = bias.to(low) if bias is not None else None
    batch_shape = hidden.shape[:-1]
    h2 = hidden.reshape(-1, hidden.shape[-1])
    t1 = target.reshape(-1).to(torch.int64)
    if not torch.compiler.is_compiling():
        # a data-dependent check (one host sync); skipped inside a compiled graph
        vocab = weight.shape[0]
        out_of_range = ((t1 < 0) | (t1 >= vocab)) & (t1 != ignore_index)
        if bool(out_of_range.any()):
            bad = t1[out_of_range][0].item()
            raise ValueError(f"target values must be in [0, {vocab}) or ignore_index={ignore_index}, got {bad}")
    if chunk_size is None:
        chunk_size = choose_chunk_size(h2.shape[0], weight.shape[0], h2.device, softcap=softcap is not None)
    with torch.autocast(device_type, enabled=False):
        out = _LinearCrossEntropy.apply(h2, weight, bias, t1, int(ignore_index), reduction,
                                        float(label_smoothing), float(z_loss),
                                        None if softcap is None else float(softcap), int(chunk_size))
    if reduction == "none":
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
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
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
