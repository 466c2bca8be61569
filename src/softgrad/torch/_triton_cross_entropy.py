"""Cross-entropy row kernels in Triton: one launch computes the loss, the lse and the gradient.

Same functions, signatures and results as :mod:`softgrad.torch._torch_cross_entropy`: the
rule of :mod:`softgrad._cross_entropy_rule` (notation ``s``, ``m``, ``d``, ``lse``, ``u``,
``mass``, ``dot``, ``alpha``/``beta``/``gamma``, and the zero-coefficient convention),
re-expressed in Triton for speed; the conformance test holds it to the rule. Arithmetic is float32 for float16/bfloat16/float32 logits and
float64 for float64 logits; loads and stores are in the tensors' own dtypes.

Memory traffic is what decides the speed: the floor for a fused forward + backward is one
read of the logits plus one write of the gradient. One program handles one row, so nothing
is exchanged between programs and any ``C`` works. Variants (``KernelConfig.variant``):

* ``"one_pass"``: the whole row is one block held in registers between the reduction and
  the gradient, so the logits are read exactly once. Needs ``C <= ONE_PASS_MAX_COLS``
  (32768; the block is ``next_power_of_2(C)``, one compilation per power of two).
* ``"two_pass"``: the row is walked in blocks of ``block_size`` twice: a first pass with the
  online max/sum recurrence of Milakov & Gimelshein, "Online normalizer calculation for
  softmax" (arXiv:1805.02867) -- ``m' = max(m, max(block))``,
  ``d' = d exp(m - m') + sum exp(s - m')`` -- and a second pass that writes the gradient.
  The second pass walks the blocks in reverse, so it starts with the blocks the first pass
  read last, the ones most likely still in L2, and the loads carry L2 eviction hints (the
  first pass ``evict_last``, the second pass and the gradient stores ``evict_first``); the
  second read of a row then costs L2 bandwidth rather than HBM bandwidth whenever the rows
  in flight fit in L2. No
  recompilation per ``C``: ``C`` is a runtime argument, ``block_size`` a constant.

``"auto"`` picks ``one_pass`` up to ``ONE_PASS_MAX_COLS`` columns (half that with probability
targets, smoothing or a softcap, which need more registers) and ``two_pass`` above.
The block sizes and warp counts below are first choices, not tuned on a GPU yet;
``benchmarks/bench_gpu_cross_entropy.py`` times every variant side by side.

Row offsets are computed in int64 (``program_id * stride`` overflows int32 once
``N * C > 2**31``). Scalars that must be exact in float64 (``kappa``, ``zeta``, ``eps``,
``z_loss``, ``softcap``) travel in a small device tensor, not as kernel arguments (which
Triton passes as float32), and no host synchronisation is needed to build it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from softgrad.torch._torch_cross_entropy import RowStats

__all__ = ["KernelConfig", "INTERPRETED", "forward", "row_stats", "grad_pass", "scale_rows_"]

ONE_PASS_MAX_COLS = 32768
VARIANTS = ("auto", "one_pass", "two_pass")
_NEG_BIG = {torch.float32: -3.4028234663852886e38, torch.float64: -1.7976931348623157e308}


@dataclass(frozen=True)
class KernelConfig:
    """How the fused forward runs: ``variant`` (see the module docstring), the block size in
    elements (a power of two; ignored by ``one_pass``) and ``num_warps`` (None: a default)."""

    variant: str = "auto"
    block_size: int | None = None
    num_warps: int | None = None

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.block_size is not None and (self.block_size < 16 or self.block_size & (self.block_size - 1)):
            raise ValueError(f"block_size must be a power of two >= 16, got {self.block_size}")
        if self.num_warps is not None and self.num_warps not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"num_warps must be a power of two in [1, 32], got {self.num_warps}")


def _resolve(config: KernelConfig | None, n_cols: int, element_size: int, heavy: bool = False) -> tuple[str, int, int]:
    """``(variant, block, num_warps)`` for a row of ``n_cols`` elements of ``element_size`` bytes.

    ``heavy``: the row needs more live registers per element (probability targets, label
    smoothing or a softcap). ptxas reports no spills for the one-pass kernel up to 32768
    columns (32 warps) without those options and up to 16384 (32 warps) with them; ``auto``
    stays within these limits.
    """
    config = config or KernelConfig()
    variant = config.variant
    whole = triton.next_power_of_2(n_cols)
    if variant == "auto":
        variant = "one_pass" if whole <= (ONE_PASS_MAX_COLS // 2 if heavy else ONE_PASS_MAX_COLS) else "two_pass"
    if variant == "one_pass":
        if whole > ONE_PASS_MAX_COLS:
            raise ValueError(f"the one_pass variant holds a row in registers and needs C <= {ONE_PASS_MAX_COLS}, "
                             f"got C={n_cols}")
        block = max(whole, 16)
        warps = config.num_warps or min(32, max(4, block // (512 if heavy else 1024)))
        return variant, block, warps
    # 16 KiB of logits per block: 8192 bf16/fp16 or 4096 fp32 elements (2048 fp64).
    block = config.block_size or min(max(16384 // element_size, 16), max(whole, 16))
    warps = config.num_warps or min(16, max(4, block // 512))
    return variant, block, warps


# ----------------------------------------------------------------------------- device helpers
@triton.jit
def _tanh(x):
    # tanh(x) = sign(x) (1 - e) / (1 + e) with e = exp(-2|x|) in (0, 1]: no overflow, +-1 at +-inf.
    e = tl.exp(-2.0 * tl.abs(x))
    r = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -r, r)


@triton.jit
def _scores(x_row, cols, n_cols, cap, HAS_SOFTCAP: tl.constexpr, ACC: tl.constexpr, EVICT: tl.constexpr):
    """One block of a row: ``s`` (softcapped logits in ACC, -inf beyond the row), ``tanh(z / cap)``, mask.

    ``EVICT`` is the L2 eviction hint: ``"evict_last"`` where the block will be read again
    (the first of two passes), ``"evict_first"`` where this is its last read.
    """
    mask = cols < n_cols
    z = tl.load(x_row + cols, mask=mask, other=float("-inf"), eviction_policy=EVICT).to(ACC)
    if HAS_SOFTCAP:
        th = _tanh(z / cap)
        s = tl.where(mask, cap * th, float("-inf"))
    else:
        th = z
        s = z
    return s, th, mask


@triton.jit
def _class_coeff(t_row, W, cols, mask, eps, num_classes,
                 HAS_WEIGHT: tl.constexpr, PROB_TARGET: tl.constexpr, ACC: tl.constexpr):
    """``u_c`` for one block: ``w_c`` (1 without weights) or ``w_c ((1 - eps) t_c + eps / C)``; 0 beyond the row."""
    if PROB_TARGET:
        t = tl.load(t_row + cols, mask=mask, other=0.0).to(ACC)
        u = (1.0 - eps) * t + eps / num_classes
    else:
        u = tl.where(mask, 1.0, 0.0).to(ACC)
    if HAS_WEIGHT:
        u = u * tl.load(W + cols, mask=mask, other=0.0).to(ACC)
    return tl.where(mask, u, 0.0)


@triton.jit
def _stats_loop(x_row, t_row, W, n_cols, cap, eps, num_classes,
                NEED_DOT: tl.constexpr, HAS_WEIGHT: tl.constexpr, PROB_TARGET: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr, NEG_BIG: tl.constexpr,
                STATS: tl.constexpr):
    """First pass over a row: ``m``, ``d``, ``dot`` (relative to the final ``m``), ``mass`` and,
    with STATS, ``ent = sum_c e_c (s_c - m)`` (relative to the final ``m``) and the argmax.

    The online recurrence (arXiv:1805.02867) starts from the finite ``m = NEG_BIG`` rather than
    -inf, so blocks that are entirely -inf never form ``-inf - (-inf)``; ``dot`` is kept relative
    to the running max and re-based by ``mass * (m - m')`` whenever the max grows. ``ent``
    re-bases the same way: with ``m' >= m``, ``sum e'_c (s_c - m') = exp(m - m') (ent + (m - m') d)``.
    The argmax moves only to a block whose max is strictly larger (the first maximal column wins).
    """
    m = tl.full([], NEG_BIG, ACC)
    d = tl.zeros([], ACC)
    dot = tl.zeros([], ACC)
    mass = tl.zeros([], ACC)
    ent = tl.zeros([], ACC)
    arg = tl.zeros([], tl.int64)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        s, th, mask = _scores(x_row, cols, n_cols, cap, HAS_SOFTCAP, ACC, "evict_last")
        block_max = tl.max(s, axis=0)
        m_new = tl.maximum(m, block_max)
        e = tl.exp(s - m_new)
        if STATS:
            block_arg = (start + tl.argmax(s, axis=0)).to(tl.int64)
            arg = tl.where(block_max > m, block_arg, arg)
            ent = tl.exp(m - m_new) * (ent + (m - m_new) * d) + tl.sum(tl.where(e == 0.0, 0.0, e * (s - m_new)),
                                                                       axis=0)
        d = d * tl.exp(m - m_new) + tl.sum(e, axis=0)
        if NEED_DOT:
            u = _class_coeff(t_row, W, cols, mask, eps, num_classes, HAS_WEIGHT, PROB_TARGET, ACC)
            dot = dot + mass * (m - m_new) + tl.sum(tl.where(u == 0.0, 0.0, u * (s - m_new)), axis=0)
            mass = mass + tl.sum(u, axis=0)
        m = m_new
    return m, d, dot, mass, ent, arg


@triton.jit
def _grad_block(s, th, cols, y_local, a, alpha, beta, gamma, u,
                NEED_U: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """``g = (alpha a - beta [c = y] - gamma u) * (1 - tanh^2)`` for one block."""
    g = alpha * a
    g = tl.where(cols == y_local, g - beta, g)
    if NEED_U:
        g = g - gamma * u
    if HAS_SOFTCAP:
        g = g * (1.0 - th * th)
    return g


@triton.jit
def _grad_loop(x_row, g_row, t_row, W, n_cols, m, log_d, alpha, beta, gamma, y_local, cap, eps, num_classes,
               NEED_U: tl.constexpr, HAS_WEIGHT: tl.constexpr, PROB_TARGET: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, REVERSE: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Second pass over a row: write the gradient block by block (last block first if REVERSE)."""
    num_blocks = tl.cdiv(n_cols, BLOCK)
    for i in range(0, num_blocks):
        if REVERSE:
            start = (num_blocks - 1 - i) * BLOCK
        else:
            start = i * BLOCK
        cols = start + tl.arange(0, BLOCK)
        s, th, mask = _scores(x_row, cols, n_cols, cap, HAS_SOFTCAP, ACC, "evict_first")
        a = tl.exp((s - m) - log_d)  # softmax; (s - m) - log d avoids cancelling a large common offset
        if NEED_U:
            u = _class_coeff(t_row, W, cols, mask, eps, num_classes, HAS_WEIGHT, PROB_TARGET, ACC)
        else:
            u = a
        g = _grad_block(s, th, cols, y_local, a, alpha, beta, gamma, u, NEED_U, HAS_SOFTCAP)
        tl.store(g_row + cols, g.to(g_row.dtype.element_ty), mask=mask, eviction_policy="evict_first")


@triton.jit
def _row_loss_and_coeffs(m, log_d, dot, mass, s_y, w_y, valid, bad, kappa, zeta, eps, zl, num_classes,
                         SMOOTH: tl.constexpr, PROB_TARGET: tl.constexpr, HAS_ZLOSS: tl.constexpr):
    """Cross-entropy of a row and its gradient coefficients ``alpha, beta, gamma`` (module docstring)."""
    lse = m + log_d
    if PROB_TARGET:
        ce = mass * log_d - dot
        alpha = kappa * mass
        beta = kappa * 0.0
        gamma = kappa
    else:
        c1 = (1.0 - eps) * w_y
        ce = tl.where(c1 == 0.0, 0.0, c1 * ((m - s_y) + log_d))
        alpha = kappa * c1
        beta = kappa * c1
        gamma = kappa * eps / num_classes
        if SMOOTH:
            ce = ce + eps / num_classes * (mass * log_d - dot)
            alpha = alpha + kappa * eps / num_classes * mass
    if HAS_ZLOSS:
        alpha = alpha + 2.0 * zl * zeta * lse
    nan = float("nan")
    ce = tl.where(bad, nan, tl.where(valid, ce, 0.0))
    alpha = tl.where(bad, nan, tl.where(valid, alpha, 0.0))
    beta = tl.where(valid, beta, 0.0)
    gamma = tl.where(valid, gamma, 0.0)
    return ce, lse, alpha, beta, gamma


@triton.jit
def _row_target(T, row, x_row, W, n_cols, ignore_index, cap,
                HAS_WEIGHT: tl.constexpr, PROB_TARGET: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                ACC: tl.constexpr):
    """``(y, s_y, w_y, valid, bad)`` of a row, ``y`` clamped to a readable column (0 when ignored, out of
    range, or for probability targets, whose ``beta = 0`` makes the one-hot term vanish)."""
    if PROB_TARGET:
        y_safe = tl.full([], 0, tl.int64)
        valid = y_safe == 0
        bad = y_safe != 0
    else:
        y = tl.load(T + row).to(tl.int64)
        valid = y != ignore_index
        in_range = (y >= 0) & (y < n_cols)
        bad = valid & (~in_range)
        y_safe = tl.where(valid & in_range, y, 0)
    z_y = tl.load(x_row + y_safe).to(ACC)
    if HAS_SOFTCAP:
        s_y = cap * _tanh(z_y / cap)
    else:
        s_y = z_y
    if HAS_WEIGHT:
        w_y = tl.load(W + y_safe).to(ACC)
    else:
        w_y = tl.full([], 1.0, ACC)
    return y_safe, s_y, w_y, valid, bad


# ----------------------------------------------------------------------------- kernels
@triton.jit(do_not_specialize=["stride_x", "stride_g", "stride_t", "n_cols", "ignore_index"])
def _ce_two_pass_kernel(X, stride_x, G, stride_g, T, stride_t, W, P, RS, LOSS, LSE, STATS_OUT, n_rows, n_cols,
                        ignore_index,
                        HAS_ROW_SCALE: tl.constexpr, HAS_WEIGHT: tl.constexpr, PROB_TARGET: tl.constexpr,
                        SMOOTH: tl.constexpr,
                        HAS_SOFTCAP: tl.constexpr, HAS_ZLOSS: tl.constexpr, WITH_GRAD: tl.constexpr,
                        NEED_DOT: tl.constexpr, STATS: tl.constexpr, REVERSE: tl.constexpr, BLOCK: tl.constexpr,
                        ACC: tl.constexpr, NEG_BIG: tl.constexpr):
    """One row per program: pass 1 (online max/sum), loss, then pass 2 (gradient) if WITH_GRAD."""
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride overflows int32 when N * C > 2**31
    x_row = X + row * stride_x
    t_row = T + row * stride_t
    kappa = tl.load(P + 0)
    zeta = tl.load(P + 1)
    if HAS_ROW_SCALE:  # a per-row factor on the gradient (e.g. reduction="none"'s upstream gradient)
        r = tl.load(RS + row).to(ACC)
        kappa = kappa * r
        zeta = zeta * r
    eps = tl.load(P + 2)
    zl = tl.load(P + 3)
    cap = tl.load(P + 4)
    y, s_y, w_y, valid, bad = _row_target(T, row, x_row, W, n_cols, ignore_index, cap,
                                          HAS_WEIGHT, PROB_TARGET, HAS_SOFTCAP, ACC)
    m, d, dot, mass, ent, arg = _stats_loop(x_row, t_row, W, n_cols, cap, eps, n_cols, NEED_DOT,
                                            HAS_WEIGHT, PROB_TARGET, HAS_SOFTCAP, BLOCK, ACC, NEG_BIG, STATS)
    log_d = tl.log(d)
    ce, lse, alpha, beta, gamma = _row_loss_and_coeffs(m, log_d, dot, mass, s_y, w_y, valid, bad, kappa, zeta,
                                                       eps, zl, n_cols, SMOOTH, PROB_TARGET, HAS_ZLOSS)
    tl.store(LOSS + row, ce)
    tl.store(LSE + row, lse)
    if STATS:  # entropy = log d - sum_c e_c (s_c - m) / d; the argmax as a float of the compute dtype
        tl.store(STATS_OUT + row, log_d - ent / d)
        tl.store(STATS_OUT + n_rows + row, arg.to(ACC))
    if WITH_GRAD:
        _grad_loop(x_row, G + row * stride_g, t_row, W, n_cols, m, log_d, alpha, beta, gamma, y, cap, eps,
                   n_cols, NEED_DOT, HAS_WEIGHT, PROB_TARGET, HAS_SOFTCAP, REVERSE, BLOCK, ACC)


@triton.jit(do_not_specialize=["stride_x", "stride_g", "stride_t", "n_cols", "ignore_index"])
def _ce_one_pass_kernel(X, stride_x, G, stride_g, T, stride_t, W, P, RS, LOSS, LSE, STATS_OUT, n_rows, n_cols,
                        ignore_index,
                        HAS_ROW_SCALE: tl.constexpr, HAS_WEIGHT: tl.constexpr, PROB_TARGET: tl.constexpr,
                        SMOOTH: tl.constexpr,
                        HAS_SOFTCAP: tl.constexpr, HAS_ZLOSS: tl.constexpr, WITH_GRAD: tl.constexpr,
                        NEED_DOT: tl.constexpr, STATS: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """One row per program, the whole row in one block (BLOCK >= n_cols): the logits are read once."""
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    t_row = T + row * stride_t
    kappa = tl.load(P + 0)
    zeta = tl.load(P + 1)
    if HAS_ROW_SCALE:  # a per-row factor on the gradient (e.g. reduction="none"'s upstream gradient)
        r = tl.load(RS + row).to(ACC)
        kappa = kappa * r
        zeta = zeta * r
    eps = tl.load(P + 2)
    zl = tl.load(P + 3)
    cap = tl.load(P + 4)
    y, s_y, w_y, valid, bad = _row_target(T, row, x_row, W, n_cols, ignore_index, cap,
                                          HAS_WEIGHT, PROB_TARGET, HAS_SOFTCAP, ACC)
    cols = tl.arange(0, BLOCK)
    s, th, mask = _scores(x_row, cols, n_cols, cap, HAS_SOFTCAP, ACC, "evict_first")
    m = tl.max(s, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)  # an all -inf row: d = 0 and lse = -inf
    e = tl.exp(s - m)
    d = tl.sum(e, axis=0)
    log_d = tl.log(d)
    if NEED_DOT:
        u = _class_coeff(t_row, W, cols, mask, eps, n_cols, HAS_WEIGHT, PROB_TARGET, ACC)
        dot = tl.sum(tl.where(u == 0.0, 0.0, u * (s - m)), axis=0)
        mass = tl.sum(u, axis=0)
    else:
        u = e
        dot = tl.zeros([], ACC)
        mass = tl.zeros([], ACC)
    ce, lse, alpha, beta, gamma = _row_loss_and_coeffs(m, log_d, dot, mass, s_y, w_y, valid, bad, kappa, zeta,
                                                       eps, zl, n_cols, SMOOTH, PROB_TARGET, HAS_ZLOSS)
    tl.store(LOSS + row, ce)
    tl.store(LSE + row, lse)
    if STATS:  # entropy = log d - sum_c e_c (s_c - m) / d (0 for -inf columns); the first maximal column
        ent = tl.sum(tl.where(e == 0.0, 0.0, e * (s - m)), axis=0)
        tl.store(STATS_OUT + row, log_d - ent / d)
        tl.store(STATS_OUT + n_rows + row, tl.argmax(s, axis=0).to(ACC))
    if WITH_GRAD:
        a = e / d
        g = _grad_block(s, th, cols, y, a, alpha, beta, gamma, u, NEED_DOT, HAS_SOFTCAP)
        g_row = G + row * stride_g
        tl.store(g_row + cols, g.to(g_row.dtype.element_ty), mask=mask, eviction_policy="evict_first")


@triton.jit(do_not_specialize=["stride_x", "stride_t", "n_cols", "class_offset", "num_classes"])
def _ce_stats_kernel(X, stride_x, T, stride_t, W, P, OUT, n_rows, n_cols, class_offset, num_classes,
                     NEED_DOT: tl.constexpr, HAS_WEIGHT: tl.constexpr, PROB_TARGET: tl.constexpr,
                     HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr, NEG_BIG: tl.constexpr,
                     STATS: tl.constexpr):
    """:func:`row_stats`: OUT is ``(5, N)``: max, log_sum, target_logit, dot, mass (+ ent, argmax with STATS)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    t_row = T + row * stride_t
    eps = tl.load(P + 2)
    cap = tl.load(P + 4)
    m, d, dot, mass, ent, arg = _stats_loop(x_row, t_row, W, n_cols, cap, eps, num_classes, NEED_DOT,
                                            HAS_WEIGHT, PROB_TARGET, HAS_SOFTCAP, BLOCK, ACC, NEG_BIG, STATS)
    all_neg_inf = d == 0.0
    tl.store(OUT + row, tl.where(all_neg_inf, float("-inf"), m))
    tl.store(OUT + n_rows + row, tl.log(d))
    if PROB_TARGET:
        s_y = tl.zeros([], ACC)
    else:
        local = tl.load(T + row).to(tl.int64) - class_offset
        here = (local >= 0) & (local < n_cols)
        z_y = tl.load(x_row + tl.where(here, local, 0)).to(ACC)
        if HAS_SOFTCAP:
            z_y = cap * _tanh(z_y / cap)
        s_y = tl.where(here, z_y, 0.0)
    tl.store(OUT + 2 * n_rows + row, s_y)
    tl.store(OUT + 3 * n_rows + row, dot)
    tl.store(OUT + 4 * n_rows + row, mass)
    if STATS:
        tl.store(OUT + 5 * n_rows + row, ent)
        tl.store(OUT + 6 * n_rows + row, arg.to(ACC))


@triton.jit(do_not_specialize=["stride_x", "stride_g", "stride_t", "n_cols", "class_offset", "num_classes"])
def _ce_grad_kernel(X, stride_x, G, stride_g, T, stride_t, W, P, LSE, COEF, n_cols, class_offset, num_classes,
                    NEED_U: tl.constexpr, HAS_WEIGHT: tl.constexpr, PROB_TARGET: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """:func:`grad_pass`: the gradient of each row given the full row's lse and ``COEF (N, 3)``."""
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    t_row = T + row * stride_t
    eps = tl.load(P + 2)
    cap = tl.load(P + 4)
    lse = tl.load(LSE + row).to(ACC)
    alpha = tl.load(COEF + 3 * row).to(ACC)
    beta = tl.load(COEF + 3 * row + 1).to(ACC)
    gamma = tl.load(COEF + 3 * row + 2).to(ACC)
    if PROB_TARGET:
        y_local = tl.full([], -1, tl.int64)
    else:
        y_local = tl.load(T + row).to(tl.int64) - class_offset
    _grad_loop(x_row, G + row * stride_g, t_row, W, n_cols, lse, 0.0, alpha, beta, gamma, y_local, cap, eps,
               num_classes, NEED_U, HAS_WEIGHT, PROB_TARGET, HAS_SOFTCAP, False, BLOCK, ACC)


@triton.jit(do_not_specialize=["stride_g", "stride_s", "n_cols"])
def _scale_rows_kernel(G, stride_g, S, stride_s, n_cols, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """``G[row] *= S[row * stride_s]``, one program per row; a factor of exactly 1 skips the row's read and write."""
    row = tl.program_id(0).to(tl.int64)
    factor = tl.load(S + row * stride_s).to(ACC)
    if factor != 1.0:
        g_row = G + row * stride_g
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            g = tl.load(g_row + cols, mask=mask).to(ACC)
            tl.store(g_row + cols, (g * factor).to(G.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- host launchers
def _interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_ce_two_pass_kernel, InterpretedFunction)


INTERPRETED = _interpreted()


def _check_device(t: Tensor) -> None:
    if t.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError("the Triton cross-entropy kernels need CUDA tensors (or TRITON_INTERPRET=1 set "
                           f"before triton is imported, for CPU tensors); got a tensor on {t.device}")


def _two_pass(config: KernelConfig | None) -> KernelConfig:
    """The block size and warps of ``config`` for the row-walking stats and gradient kernels."""
    if config is None:
        return KernelConfig("two_pass")
    return KernelConfig("two_pass", config.block_size, config.num_warps)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _params(scales: Tensor | None, label_smoothing: float, z_loss: float, softcap: float | None,
            cdt: torch.dtype, device) -> Tensor:
    """``(5,)``: kappa, zeta, eps, z_loss, softcap (1 when off), filled on the device (no host sync)."""
    p = torch.empty(5, dtype=cdt, device=device)
    if scales is None:
        p[:2] = 1.0
    else:
        p[:2] = scales.to(cdt)
    p[2] = float(label_smoothing)
    p[3] = float(z_loss)
    p[4] = 1.0 if softcap is None else float(softcap)
    return p


def forward(logits: Tensor, target: Tensor, weight: Tensor | None, scales: Tensor, *, ignore_index: int,
            label_smoothing: float, z_loss: float, softcap: float | None, prob_target: bool,
            grad_out: Tensor | None, row_scale: Tensor | None = None, stats_out: Tensor | None = None,
            config: KernelConfig | None = None) -> tuple[Tensor, Tensor]:
    """Fused forward in one launch; arguments and results as ``_torch_cross_entropy.forward``.

    ``grad_out`` may be ``logits`` itself: every block is read before the same block is
    written, and nothing else reads it, so the gradient can overwrite the logits.
    """
    _check_device(logits)
    n_rows, n_cols = logits.shape
    cdt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    eps = float(label_smoothing)
    params = _params(scales, eps, z_loss, softcap, cdt, logits.device)
    ce = torch.empty(n_rows, dtype=cdt, device=logits.device)
    lse = torch.empty(n_rows, dtype=cdt, device=logits.device)
    heavy = prob_target or eps > 0.0 or softcap is not None
    variant, block, warps = _resolve(config, n_cols, logits.element_size(), heavy)
    g = grad_out if grad_out is not None else logits
    w = weight if weight is not None else params
    stride_t = target.stride(0) if prob_target else 0
    rs = row_scale.to(cdt).contiguous() if row_scale is not None else params
    common = dict(HAS_ROW_SCALE=row_scale is not None, HAS_WEIGHT=weight is not None, PROB_TARGET=prob_target,
                  SMOOTH=eps > 0.0, HAS_SOFTCAP=softcap is not None, HAS_ZLOSS=float(z_loss) != 0.0,
                  WITH_GRAD=grad_out is not None, NEED_DOT=prob_target or eps > 0.0, STATS=stats_out is not None,
                  BLOCK=block, ACC=_acc(cdt), num_warps=warps)
    st = stats_out if stats_out is not None else params
    args = (logits, logits.stride(0), g, g.stride(0), target, stride_t, w, params, rs, ce, lse, st, n_rows, n_cols,
            int(ignore_index))
    if variant == "one_pass":
        _ce_one_pass_kernel[(n_rows,)](*args, **common)
    else:
        _ce_two_pass_kernel[(n_rows,)](*args, REVERSE=True, NEG_BIG=_NEG_BIG[cdt], **common)
    return ce, lse


def row_stats(logits: Tensor, target: Tensor, weight: Tensor | None, *, class_offset: int = 0,
              num_classes: int | None = None, label_smoothing: float = 0.0, softcap: float | None = None,
              prob_target: bool = False, need_dot: bool = False, need_stats: bool = False,
              config: KernelConfig | None = None) -> RowStats:
    """One pass over the rows; arguments and results as ``_torch_cross_entropy.row_stats``."""
    _check_device(logits)
    n_rows, n_cols = logits.shape
    cdt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    params = _params(None, label_smoothing, 0.0, softcap, cdt, logits.device)
    out = torch.zeros(7 if need_stats else 5, n_rows, dtype=cdt, device=logits.device)
    _, block, warps = _resolve(_two_pass(config), n_cols, logits.element_size())
    _ce_stats_kernel[(n_rows,)](
        logits, logits.stride(0), target, target.stride(0) if prob_target else 0,
        weight if weight is not None else params, params, out, n_rows, n_cols, int(class_offset),
        int(n_cols if num_classes is None else num_classes),
        NEED_DOT=need_dot, HAS_WEIGHT=weight is not None, PROB_TARGET=prob_target, HAS_SOFTCAP=softcap is not None,
        BLOCK=block, ACC=_acc(cdt), NEG_BIG=_NEG_BIG[cdt], STATS=need_stats, num_warps=warps)
    return RowStats(*out.unbind(0))


def grad_pass(logits: Tensor, target: Tensor, weight: Tensor | None, lse: Tensor, coeffs: Tensor, out: Tensor, *,
              class_offset: int = 0, num_classes: int | None = None, label_smoothing: float = 0.0,
              softcap: float | None = None, prob_target: bool = False, config: KernelConfig | None = None) -> None:
    """Gradient pass given the full rows' lse; arguments as ``_torch_cross_entropy.grad_pass``."""
    _check_device(logits)
    n_rows, n_cols = logits.shape
    cdt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    params = _params(None, label_smoothing, 0.0, softcap, cdt, logits.device)
    _, block, warps = _resolve(_two_pass(config), n_cols, logits.element_size())
    coeffs = coeffs.to(cdt).contiguous()
    _ce_grad_kernel[(n_rows,)](
        logits, logits.stride(0), out, out.stride(0), target, target.stride(0) if prob_target else 0,
        weight if weight is not None else params, params, lse.to(cdt).contiguous(), coeffs, n_cols,
        int(class_offset), int(n_cols if num_classes is None else num_classes),
        NEED_U=prob_target or label_smoothing > 0.0, HAS_WEIGHT=weight is not None, PROB_TARGET=prob_target,
        HAS_SOFTCAP=softcap is not None, BLOCK=block, ACC=_acc(cdt), num_warps=warps)


def scale_rows_(grad: Tensor, scale: Tensor) -> None:
    """``grad *= scale`` in place (0-d or ``(N,)`` scale), skipping rows whose factor is exactly 1.

    The skip is decided on the device, per program, so a ``loss.backward()`` with the default
    ``grad_output = 1`` costs one launch and no pass over the gradient, without a host sync.
    """
    _check_device(grad)
    n_rows, n_cols = grad.shape
    cdt = torch.float64 if grad.dtype == torch.float64 else torch.float32
    s = scale.to(cdt).contiguous()
    block = max(16, min(8192, triton.next_power_of_2(n_cols)))
    _scale_rows_kernel[(n_rows,)](grad, grad.stride(0), s, 0 if s.dim() == 0 else 1, n_cols,
                                  BLOCK=block, ACC=_acc(cdt), num_warps=min(8, max(1, block // 1024)))
