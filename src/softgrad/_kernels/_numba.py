"""Fused parallel CPU kernels in Numba, with the signatures of :mod:`softgrad._kernels._numpy`.

Contract (``docs/ARCHITECTURE.md``): arguments are validated, 2-D ``(N, C)``,
C-contiguous, float32 or float64, targets in range. The logits' values are checked
here, in the passes that read them anyway: every kernel returns the number of invalid
rows (a NaN, a ``+inf``, or every entry ``-inf``) and writes NaN to their outputs.
Inputs are only read, never passed where a compiled branch could write them, so
read-only and memory-mapped arrays type-check. Results go into the ``out`` arrays
given; nothing of size ``(N, C)`` is allocated.

Layout of the work. Rows are spread over threads (``prange``); each row is handled by
one thread in at most three passes, all vectorised by LLVM:

1. ``m = max_k z_k``                          -- reads the row (the only read from memory)
2. ``e_k = exp(z_k - m)``, ``s = sum_k e_k``  -- reads the row again (now in L2), and for
   softmax / a gradient stores ``e`` in the output
3. ``out_k = e_k * c + d_k``                  -- rescales the output in place (in L2)

so a row costs one read of the logits and one write of the result from main memory,
the traffic of a copy, and one ``exp`` per element. (An online max-and-sum in one pass
needs a second ``exp`` per element to write the result; on this kind of machine the
``exp`` costs more than re-reading a row from L2.) For rows larger than L2 the later
passes come from L3 or memory.

``exp`` is our own: Cody-Waite range reduction ``x = n ln 2 + r``, ``|r| <= ln2 / 2``, a
polynomial for ``e^r`` (degree 6 in float32, 11 in float64: the Taylor series
economised with Chebyshev polynomials, approximation error below 0.05 ulp) and ``2^n``
built from its exponent bits. Tested error: within 1 ulp in both precisions. Unlike a call to libm's ``exp`` it vectorises without Intel SVML
(which the PyPI llvmlite cannot use), so it runs ~10-20x faster than the libm call.
Results below the smallest normal number (``x < -87.34`` in float32, ``x < -708.39`` in
float64) are flushed to 0; the reference would give a subnormal there (absolute
difference below ``1.2e-38`` / ``2.3e-308``).

Accumulation. Every per-row sum (``s``, the dot products, the smoothing and target
sums) accumulates in float64, in 8 or 16 interleaved partial sums (``fastmath``
re-association, which is what lets LLVM vectorise them), so a row of ``C = 10^6``
float32 logits keeps float32 accuracy. The one exception is the innermost sum of
float32 exps, taken in float32 over runs of ``_RUN = 512`` elements (at most 64 terms
in any partial sum) before it joins the float64 total: a float64 accumulator there
halves the loop's vector width and doubles the time of the exp pass. ``fastmath`` here
means re-association and FMA contraction only: no ``nnan``/``ninf`` assumptions (``-inf`` logits are legal), and the
``exp`` itself is compiled without re-association so its range reduction stays exact.

Threads: the number of threads of the calling thread is Numba's
(``NUMBA_NUM_THREADS``, :func:`numba.set_num_threads`); a threadpoolctl controller
(registered on import when threadpoolctl is installed) lets ``threadpool_limits`` set it.
A child process forked from a parent whose threading layer is GNU OpenMP (which cannot
run after ``fork()``) uses serial builds of the kernels, compiled in the child.
The kernels are compiled on first use and cached on disk (``cache=True``).
"""

from __future__ import annotations

import math
import os

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

# Re-association lets LLVM vectorise reductions; contraction allows FMA. Nothing that
# assumes away infinities or NaN. Only the small loop helpers get these flags: the
# kernels' own arithmetic (e.g. (z - m) - log s, which re-association would turn into
# the cancelling z - (m + log s)) is compiled strictly.
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
_JIT = {"parallel": True, "cache": True, "nogil": True}


# ----------------------------------------------------------------------------- primitives
@intrinsic
def _fmax(typingctx, a, b):
    """``llvm.maxnum(a, b)``: a max that LLVM vectorises as a reduction (no NaN reaches it)."""
    if not (isinstance(a, types.Float) and a == b):
        return None

    def codegen(context, builder, signature, args):
        ty = args[0].type
        name = "llvm.maxnum.f32" if ty == ir.FloatType() else "llvm.maxnum.f64"
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ty, [ty, ty]), name)
        return builder.call(fn, args)

    return a(a, b), codegen


@intrinsic
def _f32_from_bits(typingctx, bits):
    """Reinterpret an int32 as the float32 with the same bits."""
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def _f64_from_bits(typingctx, bits):
    """Reinterpret an int64 as the float64 with the same bits."""
    if bits != types.int64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.int64), codegen


def _exp(x):
    """``e**x`` for ``x <= 0`` (pure-Python stand-in; the compiled versions are below)."""
    return math.exp(x)


# ln 2 split so that n * _LN2_HI is exact for the n that occur (Cody & Waite).
_LOG2E = 1.4426950408889634
_LN2_HI_32, _LN2_LO_32 = 0.693359375, -2.12194440e-4
_LN2_HI_64, _LN2_LO_64 = 6.93147180369123816490e-01, 1.90821492927058770002e-10
# Smallest arguments whose exp is a normal number: ln(2**-126), ln(2**-1022).
_MIN_ARG_32, _MIN_ARG_64 = -87.33654, -708.39


def _economised_exp_coefficients(degree: int, taylor_degree: int) -> tuple[float, ...]:
    """Coefficients ``c_0..c_degree`` of a polynomial for ``e^r`` on ``|r| <= 0.3467`` (> ln2/2).

    Chebyshev economisation, in exact rational arithmetic: the Taylor polynomial of
    ``taylor_degree`` (truncation error ``a^(t+1)/(t+1)!``), rescaled to ``u = r / a``,
    written in Chebyshev polynomials, and cut after ``T_degree``; each dropped term
    changes the result by at most its coefficient (``|T_k| <= 1``). Cheaper than the
    Taylor polynomial of the same accuracy by two degrees. The rounding of the
    coefficients to float is the only inexact step.
    """
    from fractions import Fraction

    from numpy.polynomial import chebyshev

    a = Fraction(3467, 10000)
    b = np.array([a**k / math.factorial(k) for k in range(taylor_degree + 1)], dtype=object)
    cheb = chebyshev.poly2cheb(b)
    poly = chebyshev.cheb2poly(cheb[: degree + 1])
    return tuple(float(poly[k] / a**k) for k in range(degree + 1))


# Dropped terms: below 2e-9 (float32, 3% of an ulp) and 4e-18 (float64, 4% of an ulp).
_EXP_C32 = _economised_exp_coefficients(6, 9)
_EXP_C64 = _economised_exp_coefficients(11, 15)


@overload(_exp, jit_options={"fastmath": {"contract"}})
def _exp_impl(x):
    # For x = n ln2 + r with n = round(x / ln2), |r| <= ln2/2: e^x = 2^n e^r. e^r is a
    # polynomial (Horner); 2^n is the float whose exponent field is n + bias.
    # Valid for x <= 0; x below the normal range (and -inf) gives 0.
    if x == types.float32:
        lo, log2e = np.float32(_MIN_ARG_32), np.float32(_LOG2E)
        hi_c, lo_c = np.float32(_LN2_HI_32), np.float32(_LN2_LO_32)
        c = tuple(np.float32(v) for v in _EXP_C32)

        def impl32(x):
            xc = _fmax(x, lo)
            n = np.floor(xc * log2e + np.float32(0.5))
            r = (xc - n * hi_c) - n * lo_c
            p = c[6]
            p = p * r + c[5]
            p = p * r + c[4]
            p = p * r + c[3]
            p = p * r + c[2]
            p = p * r + c[1]
            p = p * r + c[0]
            scale = _f32_from_bits(np.int32((np.int32(n) + np.int32(127)) << np.int32(23)))
            return p * scale if x >= lo else np.float32(0.0)

        return impl32
    if x == types.float64:
        c = _EXP_C64

        def impl64(x):
            xc = _fmax(x, _MIN_ARG_64)
            n = np.floor(xc * _LOG2E + 0.5)
            r = (xc - n * _LN2_HI_64) - n * _LN2_LO_64
            p = c[11]
            p = p * r + c[10]
            p = p * r + c[9]
            p = p * r + c[8]
            p = p * r + c[7]
            p = p * r + c[6]
            p = p * r + c[5]
            p = p * r + c[4]
            p = p * r + c[3]
            p = p * r + c[2]
            p = p * r + c[1]
            p = p * r + c[0]
            scale = _f64_from_bits((np.int64(n) + np.int64(1023)) << np.int64(52))
            return p * scale if x >= _MIN_ARG_64 else 0.0

        return impl64
    return None


# Modes of the exp pass over a block.
_SUM, _STORE, _IN_PLACE = 0, 1, 2


@njit(fastmath=_FASTMATH, cache=True)
def _row_max(row):
    """``max_k row_k``, or NaN when the row holds a NaN.

    ``llvm.maxnum`` skips NaN operands, so a second maxnum reduction records whether any
    entry is NaN; both reductions share one vectorised loop (measured +0.06 ns/element in
    float32 on an L1-resident block, against ~0.4 ns/element for the exp that follows).
    """
    one, zero = row.dtype.type(1.0), row.dtype.type(0.0)
    m, nan = row[0], zero
    for k in range(row.shape[0]):
        v = row[k]
        m = _fmax(m, v)
        nan = _fmax(nan, one if v != v else zero)
    return m if nan == zero else row.dtype.type(np.nan)


# Partial sums of exps: a run of _RUN elements is summed in the input's dtype (LLVM keeps
# that loop at the full vector width: 16 float32 lanes with AVX-512, where a float64
# accumulator would halve it and double the exp pass's time), and the runs' sums are added
# in float64. Each of the loop's partial sums (vector lanes x interleave, >= 8) then holds
# at most _RUN / 8 = 64 positive terms, so a float32 run sum is within ~64 u of exact
# (measured ~1e-9 relative on 10^6-element rows), and the row sum keeps float32 accuracy.
_RUN = 512


@njit(fastmath=_FASTMATH, cache=True)
def _run_exp_sum(x, bm):
    s = x.dtype.type(0.0)
    for k in range(x.shape[0]):
        s += _exp(x[k] - bm)
    return s


@njit(fastmath=_FASTMATH, cache=True)
def _run_exp_store(x, out, bm):
    s = x.dtype.type(0.0)
    for k in range(x.shape[0]):
        e = _exp(x[k] - bm)
        out[k] = e
        s += e
    return s


# Not _run_exp_store(x, x, bm): with input and output the same array LLVM's runtime alias
# check fails and the scalar loop runs (measured 2.6x slower per element).
@njit(fastmath=_FASTMATH, cache=True)
def _run_exp_in_place(x, bm):
    s = x.dtype.type(0.0)
    for k in range(x.shape[0]):
        e = _exp(x[k] - bm)
        x[k] = e
        s += e
    return s


@njit(fastmath=_FASTMATH, cache=True)
def _block_exp(x, out, mode):
    """Pass 1 over one block: ``bm = max x``, ``bs = sum_k exp(x_k - bm)`` (float64).

    ``mode``: ``_SUM`` only sums (``out`` is not touched: any array of ``x``'s dtype);
    ``_STORE`` also writes ``out_k = exp(x_k - bm)``; ``_IN_PLACE`` is for ``out`` the same
    memory as ``x`` (a separate loop that reads and writes ``out``, because LLVM would not
    vectorise a loop whose input and output it cannot prove apart). ``x`` itself is only
    read, so it may be a read-only array. A block that is entirely ``-inf`` returns
    ``(-inf, 0)`` and stores zeros. Bad values end the pass early: a NaN returns
    ``(nan, nan)``, a ``+inf`` returns ``(+inf, 0)``, and ``out`` then holds garbage. The
    sum is taken in runs of ``_RUN`` elements (see above).
    """
    bm = _row_max(x)
    s = 0.0
    if bm != bm:
        return bm, np.nan
    if bm == np.inf:
        return bm, s
    if bm == -np.inf:
        if mode != _SUM:
            for k in range(out.shape[0]):
                out[k] = 0.0
        return bm, s
    for lo in range(0, x.shape[0], _RUN):
        if mode == _SUM:
            s += np.float64(_run_exp_sum(x[lo:lo + _RUN], bm))
        elif mode == _STORE:
            s += np.float64(_run_exp_store(x[lo:lo + _RUN], out[lo:lo + _RUN], bm))
        else:
            s += np.float64(_run_exp_in_place(out[lo:lo + _RUN], bm))
    return bm, s


@njit(cache=True)
def _combine(m, s, bm, bs):
    """Merge the running ``(max, sum exp(z - max))`` with a block's ``(bm, bs)``.

    A NaN block (``bm`` NaN) makes ``s`` NaN; a ``+inf`` block makes ``m`` ``+inf``.
    """
    if bm == -np.inf:
        return m, s
    if bm > m:  # also the first finite block: m = -inf, s = 0
        return bm, s * math.exp(np.float64(m) - np.float64(bm)) + bs
    return m, s + bs * math.exp(np.float64(bm) - np.float64(m))


@njit(fastmath=_FASTMATH, cache=True)
def _scale_block(out, factor):
    f = out.dtype.type(factor)
    for k in range(out.shape[0]):
        out[k] = out[k] * f


@njit(fastmath=_FASTMATH, cache=True)
def _scale_block_sub(out, factor, shift):
    f, d = out.dtype.type(factor), out.dtype.type(shift)
    for k in range(out.shape[0]):
        out[k] = out[k] * f - d


@njit(fastmath=_FASTMATH, cache=True)
def _scale_block_sub_weight(out, factor, shift, weight):
    f, d = out.dtype.type(factor), out.dtype.type(shift)
    for k in range(out.shape[0]):
        out[k] = out[k] * f - d * weight[k]


@njit(cache=True)
def _chunk(c, n_chunks, n_rows):
    return c * n_rows // n_chunks, (c + 1) * n_rows // n_chunks


@njit(cache=True)
def _bad_row(m, s):
    """Whether a row's combined ``(m, s)`` shows a NaN, a ``+inf`` or no finite entry (all ``-inf``)."""
    return s != s or m == np.inf or m == -np.inf


@njit(cache=True)
def _fill(o, value):
    for k in range(o.shape[0]):
        o[k] = value


# ----------------------------------------------------------------------------- kernels
# Each kernel walks a row in blocks of `block` elements: pass 1 does max, exp and sum on
# one block while it is in L1, remembering the block's max; pass 2 rescales each block
# by exp(block max - row max) / sum. A row is then read from memory once and written
# once whatever its length (a row of 10^6 classes does not fit in L2).


# Every logits kernel returns the number of invalid rows (a NaN, a +inf, or every entry
# -inf), counted per chunk of rows while the rows are read anyway; such a row's outputs
# are NaN. The public functions raise on a nonzero count, so no separate validation pass
# reads the logits.


@njit(**_JIT)
def _softmax(logits, out, block, n_chunks):
    N, C = logits.shape
    nb = (C + block - 1) // block
    n_bad = np.zeros(n_chunks, dtype=np.int64)
    for c in prange(n_chunks):
        bmax = np.empty(nb, dtype=logits.dtype)
        lo, hi = _chunk(c, n_chunks, N)
        for i in range(lo, hi):
            row, o = logits[i], out[i]
            m, s = row.dtype.type(-np.inf), 0.0
            for b in range(nb):
                bm, bs = _block_exp(row[b * block:(b + 1) * block], o[b * block:(b + 1) * block], _STORE)
                bmax[b] = bm
                m, s = _combine(m, s, bm, bs)
            if _bad_row(m, s):
                n_bad[c] += 1
                _fill(o, np.nan)
                continue
            for b in range(nb):
                _scale_block(o[b * block:(b + 1) * block],
                             math.exp(np.float64(bmax[b]) - np.float64(m)) / s)
    return n_bad.sum()


@njit(**_JIT)
def _logsumexp(logits, out, block, n_chunks):
    N, C = logits.shape
    nb = (C + block - 1) // block
    n_bad = np.zeros(n_chunks, dtype=np.int64)
    for c in prange(n_chunks):
        unused = np.empty(0, dtype=logits.dtype)  # _SUM's `out`: the logits may be read-only
        lo, hi = _chunk(c, n_chunks, N)
        for i in range(lo, hi):
            row = logits[i]
            m, s = row.dtype.type(-np.inf), 0.0
            for b in range(nb):
                bm, bs = _block_exp(row[b * block:(b + 1) * block], unused, _SUM)
                m, s = _combine(m, s, bm, bs)
            if _bad_row(m, s):
                n_bad[c] += 1
                out[i] = np.nan
                continue
            out[i] = np.float64(m) + math.log(s)
    return n_bad.sum()


@njit(**_JIT)
def _log_softmax(logits, out, block, n_chunks):
    N, C = logits.shape
    nb = (C + block - 1) // block
    n_bad = np.zeros(n_chunks, dtype=np.int64)
    for c in prange(n_chunks):
        lo, hi = _chunk(c, n_chunks, N)
        for i in range(lo, hi):
            row, o = logits[i], out[i]
            m, s = row.dtype.type(-np.inf), 0.0
            for b in range(nb):
                bm, bs = _block_exp(row[b * block:(b + 1) * block], o, _SUM)
                m, s = _combine(m, s, bm, bs)
            if _bad_row(m, s):
                n_bad[c] += 1
                _fill(o, np.nan)
                continue
            # (z - m) - log s in float64, rounded once: z - lse would cancel |z| * eps
            m64, log_s = np.float64(m), math.log(s)
            for k in range(C):
                o[k] = (np.float64(row[k]) - m64) - log_s
    return n_bad.sum()


@njit(fastmath=_FASTMATH, cache=True)
def _dot(g, a):
    d = 0.0
    for k in range(a.shape[0]):
        d += np.float64(g[k]) * np.float64(a[k])
    return d


@njit(**_JIT)
def _softmax_backward(grad_probs, probs, out):
    # out = (g - <g, a>) * a per row: the vector-Jacobian product of softmax, derived in
    # softgrad._kernels._numpy.softmax_backward. Two passes: the dot, then the write.
    # Returns the number of rows whose dot is not finite: every row with a NaN or an
    # infinity in g or a (a non-finite term, 0 * inf included, keeps a sum non-finite),
    # and rows whose finite products overflow.
    N = probs.shape[0]
    bad = np.zeros(N, dtype=np.uint8)
    for i in prange(N):
        g, a, o = grad_probs[i], probs[i], out[i]
        dot = _dot(g, a)
        if not math.isfinite(dot):
            bad[i] = 1
        for k in range(a.shape[0]):
            o[k] = (np.float64(g[k]) - dot) * np.float64(a[k])
    return np.int64(bad.sum())


@njit(fastmath=_FASTMATH, cache=True)
def _weighted_sum(z, weight, has_weight):
    """``sum_k w_k z_k`` (``w = 1`` without weights) in float64; a term with ``w_k = 0`` is 0 even
    where ``z_k = -inf`` (the rule's zero coefficient), another ``-inf`` term makes the sum ``-inf``."""
    s = 0.0
    if has_weight:
        for k in range(z.shape[0]):
            w = np.float64(weight[k])
            s += w * np.float64(z[k]) if w != 0.0 else 0.0
    else:
        for k in range(z.shape[0]):
            s += np.float64(z[k])
    return s


@njit(**_JIT)
def _cross_entropy_index(logits, target, weight, has_weight, weight_sum, ignore_index, eps, zl,
                         grad_scale, z_scale, loss_out, lse_out, has_lse, grad_out, mode, block, n_chunks):
    # The rule of softgrad._cross_entropy_rule for a row with label y, smoothing eps, weights
    # w (W = sum_c w_c), m = max z, s = sum_c exp(z_c - m), so -log p_c = log s - (z_c - m):
    #   loss = (1-eps) w_y (log s - (z_y - m)) + (eps/C) (W log s - sum_c w_c (z_c - m))
    # (a zero coefficient counts 0 also against z = -inf). Gradient of
    # kappa loss + zeta zl lse^2 (d(-log p_c)/dz = a - e_c with a_c = exp(z_c - m) / s):
    #   dloss/dz = alpha a - kappa (1-eps) w_y e_y - kappa (eps/C) w,
    #   alpha = kappa ((1-eps) w_y + eps W / C) + 2 zeta zl lse.
    # `mode` is _SUM (loss only), _STORE or _IN_PLACE (grad_out is logits: z_y and the
    # smoothing sum of a block are read before the block is overwritten).
    # Returns the number of invalid rows (see _softmax); an ignored row is read, and so
    # checked, only with lse_out.
    N, C = logits.shape
    nb = (C + block - 1) // block
    has_grad = mode != _SUM
    n_bad = np.zeros(n_chunks, dtype=np.int64)
    for c in prange(n_chunks):
        bmax = np.empty(nb, dtype=logits.dtype)
        unused = np.empty(0, dtype=logits.dtype)  # _SUM's `out`: the logits may be read-only
        lo, hi = _chunk(c, n_chunks, N)
        for i in range(lo, hi):
            y = target[i]
            row = logits[i]
            if y == ignore_index:
                loss_out[i] = 0.0
                if has_lse:  # the row's lse without touching the gradient buffer
                    m, s = row.dtype.type(-np.inf), 0.0
                    for b in range(nb):
                        bm, bs = _block_exp(row[b * block:(b + 1) * block], unused, _SUM)
                        m, s = _combine(m, s, bm, bs)
                    if _bad_row(m, s):
                        n_bad[c] += 1
                        lse_out[i] = np.nan
                    else:
                        lse_out[i] = np.float64(m) + math.log(s)
                if has_grad:
                    g = grad_out[i]
                    for k in range(C):
                        g[k] = 0.0
                continue
            g = grad_out[i] if has_grad else unused
            z_y = np.float64(row[y])
            w_y = np.float64(weight[y]) if has_weight else 1.0
            c1 = (1.0 - eps) * w_y
            m, s, side = row.dtype.type(-np.inf), 0.0, 0.0
            for b in range(nb):
                z = row[b * block:(b + 1) * block]
                if eps > 0.0:
                    side += _weighted_sum(z, weight[b * block:(b + 1) * block], has_weight)
                bm, bs = _block_exp(z, g[b * block:(b + 1) * block], mode)
                bmax[b] = bm
                m, s = _combine(m, s, bm, bs)
            if _bad_row(m, s):
                n_bad[c] += 1
                loss_out[i] = np.nan
                if has_lse:
                    lse_out[i] = np.nan
                if has_grad:
                    _fill(g, np.nan)
                continue
            m64, log_s = np.float64(m), math.log(s)
            lse = m64 + log_s
            loss = c1 * (log_s - (z_y - m64)) if c1 != 0.0 else 0.0
            if eps > 0.0:
                # sum_c w_c (z_c - m) = sum_c w_c z_c - W m
                loss += (eps / C) * (weight_sum * log_s - (side - weight_sum * m64))
            loss_out[i] = loss
            if has_lse:
                lse_out[i] = lse
            if not has_grad:
                continue
            kappa = grad_scale[i]
            coef = (kappa * (c1 + eps * weight_sum / C) + 2.0 * zl * z_scale[i] * lse) / s
            c_w = kappa * eps / C
            for b in range(nb):
                gb = g[b * block:(b + 1) * block]
                f = coef * math.exp(np.float64(bmax[b]) - m64)
                if eps == 0.0:
                    _scale_block(gb, f)
                elif has_weight:
                    _scale_block_sub_weight(gb, f, c_w, weight[b * block:(b + 1) * block])
                else:
                    _scale_block_sub(gb, f, c_w)
            # the label's entry, where a_y - 1 cancels, recomputed in float64
            g[y] = coef * math.exp(z_y - m64) - kappa * c1 - c_w * w_y
    return n_bad.sum()


@njit(cache=True)
def _smoothed_target(t, weight, has_weight, eps, C, k):
    u = (1.0 - eps) * np.float64(t[k]) + eps / C
    return u * np.float64(weight[k]) if has_weight else u


@njit(fastmath=_FASTMATH, cache=True)
def _target_sums(z, t, weight, has_weight, eps, k0, k1):
    """``(sum_k u_k, sum_k u_k z_k)`` over ``k0 <= k < k1``; a term with ``u_k = 0`` is 0."""
    C = z.shape[0]
    total, dot = 0.0, 0.0
    for k in range(k0, k1):
        u = _smoothed_target(t, weight, has_weight, eps, C, k)
        total += u
        dot += u * np.float64(z[k]) if u != 0.0 else 0.0
    return total, dot


@njit(**_JIT)
def _cross_entropy_probs(logits, target, weight, has_weight, eps, zl, grad_scale, z_scale, loss_out,
                         lse_out, has_lse, grad_out, mode, block, n_chunks):
    # With smoothed targets t'_c = (1-eps) t_c + eps/C and u_c = w_c t'_c:
    #   loss = -sum_c u_c (z_c - m - log s) = T log s - (sum_c u_c z_c - T m),  T = sum_c u_c
    # (terms with u_c = 0 count 0, also where z_c = -inf), and the gradient of
    # kappa loss + zeta zl lse^2 is (kappa T + 2 zeta zl lse) a - kappa u.
    # Returns the number of invalid rows (see _softmax).
    N, C = logits.shape
    nb = (C + block - 1) // block
    has_grad = mode != _SUM
    n_bad = np.zeros(n_chunks, dtype=np.int64)
    for c in prange(n_chunks):
        bmax = np.empty(nb, dtype=logits.dtype)
        unused = np.empty(0, dtype=logits.dtype)  # _SUM's `out`: the logits may be read-only
        lo, hi = _chunk(c, n_chunks, N)
        for i in range(lo, hi):
            row, t = logits[i], target[i]
            g = grad_out[i] if has_grad else unused
            m, s, total, dot = row.dtype.type(-np.inf), 0.0, 0.0, 0.0
            for b in range(nb):
                k0, k1 = b * block, min((b + 1) * block, C)
                bt, bd = _target_sums(row, t, weight, has_weight, eps, k0, k1)
                total += bt
                dot += bd
                bm, bs = _block_exp(row[k0:k1], g[k0:k1], mode)
                bmax[b] = bm
                m, s = _combine(m, s, bm, bs)
            if _bad_row(m, s):
                n_bad[c] += 1
                loss_out[i] = np.nan
                if has_lse:
                    lse_out[i] = np.nan
                if has_grad:
                    _fill(g, np.nan)
                continue
            m64, log_s = np.float64(m), math.log(s)
            loss_out[i] = total * log_s - (dot - total * m64)
            if has_lse:
                lse_out[i] = m64 + log_s
            if not has_grad:
                continue
            kappa = grad_scale[i]
            coef = (kappa * total + 2.0 * zl * z_scale[i] * (m64 + log_s)) / s
            for b in range(nb):
                k0, k1 = b * block, min((b + 1) * block, C)
                f = coef * math.exp(np.float64(bmax[b]) - m64)
                for k in range(k0, k1):
                    g[k] = np.float64(g[k]) * f - kappa * _smoothed_target(t, weight, has_weight, eps, C, k)
    return n_bad.sum()


@njit(cache=True)
def _class_coefficient(is_prob, t_row, weight, has_weight, eps, C, k):
    """``u_k``: ``w_k`` (1 without weights) for index targets, ``w_k ((1-eps) t_k + eps/C)`` for probabilities."""
    if is_prob:
        return _smoothed_target(t_row, weight, has_weight, eps, C, k)
    return np.float64(weight[k]) if has_weight else 1.0


@njit(**_JIT)
def _cross_entropy_softcap(logits, index_target, prob_target, is_prob, weight, has_weight, ignore_index, eps, zl,
                           cap, grad_scale, z_scale, loss_out, lse_out, has_lse, grad_out, has_grad, n_chunks):
    # The rule on scores s_c = cap tanh(z_c / cap), with the chain-rule factor
    # ds_c/dz_c = 1 - tanh^2(z_c / cap) on the gradient:
    #   g_c = (alpha a_c - beta [c = y] - gamma u_c) (1 - (s_c / cap)^2)
    # (alpha, beta, gamma as in softgrad._cross_entropy_rule). Three plain float64 passes per
    # row (scores and max; sum, dot, mass; gradient); with a gradient buffer the scores are
    # kept in it between the passes (in place too: each entry is read before it is written).
    # Returns the number of invalid rows (see _softmax), judged on the raw logits: the
    # scores of +inf and -inf logits are the finite +-cap.
    N, C = logits.shape
    need_dot = is_prob or eps > 0.0
    n_bad = np.zeros(n_chunks, dtype=np.int64)
    for c in prange(n_chunks):
        unused = np.empty(0, dtype=logits.dtype)  # no gradient: the logits may be read-only
        lo, hi = _chunk(c, n_chunks, N)
        for i in range(lo, hi):
            row = logits[i]
            y = -1 if is_prob else index_target[i]
            ignored = (not is_prob) and y == ignore_index
            store = has_grad and not ignored
            g = grad_out[i] if has_grad else unused
            t_row = prob_target[i] if is_prob else prob_target[0:0].reshape(0)
            s_y = 0.0
            if not is_prob and not ignored:
                s_y = cap * math.tanh(np.float64(row[y]) / cap)
            m, raw_max, nan = -np.inf, -np.inf, False
            for k in range(C):
                zk = np.float64(row[k])
                nan = nan or zk != zk
                raw_max = max(raw_max, zk)
                sk = cap * math.tanh(zk / cap)
                if store:
                    g[k] = sk
                m = max(m, sk)
            if _bad_row(raw_max, np.nan if nan else 0.0):
                n_bad[c] += 1
                loss_out[i] = np.nan
                if has_lse:
                    lse_out[i] = np.nan
                if has_grad:
                    _fill(g, np.nan)
                continue
            d, dot, mass = 0.0, 0.0, 0.0
            for k in range(C):
                sk = np.float64(g[k]) if store else cap * math.tanh(np.float64(row[k]) / cap)
                d += math.exp(sk - m)
                if need_dot:
                    u = _class_coefficient(is_prob, t_row, weight, has_weight, eps, C, k)
                    mass += u
                    dot += u * (sk - m) if u != 0.0 else 0.0
            log_d = math.log(d)
            lse = m + log_d
            if has_lse:
                lse_out[i] = lse
            if ignored:
                loss_out[i] = 0.0
                if has_grad:
                    for k in range(C):
                        g[k] = 0.0
                continue
            kappa = grad_scale[i]
            if is_prob:
                loss_out[i] = mass * log_d - dot
                alpha, beta, gamma = kappa * mass, 0.0, kappa
            else:
                w_y = np.float64(weight[y]) if has_weight else 1.0
                c1 = (1.0 - eps) * w_y
                loss = c1 * ((m - s_y) + log_d) if c1 != 0.0 else 0.0
                if eps > 0.0:
                    loss += (eps / C) * (mass * log_d - dot)
                loss_out[i] = loss
                alpha = kappa * (c1 + (eps / C) * mass)
                beta, gamma = kappa * c1, kappa * eps / C
            if not has_grad:
                continue
            alpha += 2.0 * zl * z_scale[i] * lse
            for k in range(C):
                sk = np.float64(g[k])
                gk = alpha * math.exp((sk - m) - log_d)
                if need_dot:
                    gk -= gamma * _class_coefficient(is_prob, t_row, weight, has_weight, eps, C, k)
                if k == y:
                    gk -= beta
                th = sk / cap
                g[k] = gk * (1.0 - th * th)
    return n_bad.sum()


# ------------------------------------------------------------- sparse linear products
# The linear model's two products with a CSR matrix X (N, D) given by (data, indices,
# indptr): parallel over rows, no temporary the size of X or of the (N, C) result.
# Entries are accumulated in the output's dtype, as a BLAS product would; duplicated
# and unsorted column indices are summed, as SciPy's products do.


@njit(fastmath=_FASTMATH, cache=True)
def _axpy(y, a, x):
    """``y += a * x`` over one row of ``C`` entries."""
    for j in range(y.shape[0]):
        y[j] += a * x[j]


@njit(**_JIT)
def _csr_dense_matmul(data, indices, indptr, dense, out, n_chunks):
    N, C = out.shape
    for c in prange(n_chunks):
        acc = np.empty(C, dtype=out.dtype)
        lo, hi = _chunk(c, n_chunks, N)
        for i in range(lo, hi):
            acc[:] = 0.0
            for k in range(indptr[i], indptr[i + 1]):
                _axpy(acc, out.dtype.type(data[k]), dense[indices[k]])  # gather: acc += x_ik dense[k]
            for j in range(C):
                out[i, j] = acc[j]
    return 0


@njit(**_JIT)
def _csr_transpose_matmul(data, indices, indptr, dense, out, partial):
    # partial (P, D, C): chunk p of the rows scatters v * dense[i] into partial[p, column];
    # then the chunks' sums are added, in parallel over columns, into out (C, D).
    N, C = dense.shape
    P, D = partial.shape[0], partial.shape[1]
    for p in prange(P):
        acc = partial[p]
        acc[:] = 0.0
        lo, hi = _chunk(p, P, N)
        for i in range(lo, hi):
            g = dense[i]
            for k in range(indptr[i], indptr[i + 1]):
                _axpy(acc[indices[k]], out.dtype.type(data[k]), g)  # scatter: acc[k] += x_ik dense[i]
    for col in prange(D):
        for j in range(C):
            total = partial[0, col, j]
            for p in range(1, P):
                total += partial[p, col, j]
            out[j, col] = total
    return 0


# ----------------------------------------------------------------------------- contract
# Elements per block of a row: 16 KiB, so that a block stays in L1 between its passes.
_BLOCK_BYTES = 16384

# Stand-ins for an absent weight / gradient, so that one compiled version per dtype
# serves every option (has_weight and the mode select the branches at run time).
_NO_WEIGHT = {np.dtype(t): np.empty(0, dtype=t) for t in (np.float32, np.float64)}
_NO_GRAD = {np.dtype(t): np.empty((0, 0), dtype=t) for t in (np.float32, np.float64)}
_NO_LSE = np.empty(0, dtype=np.float64)
_NO_INDEX = np.empty(0, dtype=np.int64)


# Set in a child process forked from a parent whose Numba threading layer is OpenMP:
# GNU OpenMP cannot run a parallel region after fork() (Numba terminates the process),
# so such a child runs serial builds of the same kernels (compiled there, on first use).
_FORKED_FROM_OPENMP = False
_SERIAL: dict = {}


def _after_fork_in_child() -> None:
    global _FORKED_FROM_OPENMP
    try:
        _FORKED_FROM_OPENMP = numba.threading_layer() == "omp"
    except ValueError:  # no threading layer started in the parent
        _FORKED_FROM_OPENMP = False


os.register_at_fork(after_in_child=_after_fork_in_child)


def _k(kernel):
    """``kernel``, or its serial build in a child forked from an OpenMP-using parent."""
    if not _FORKED_FROM_OPENMP:
        return kernel
    serial = _SERIAL.get(kernel)
    if serial is None:  # prange runs as range without parallel=True
        serial = _SERIAL[kernel] = njit(nogil=True)(kernel.py_func)
    return serial


def _block(x: np.ndarray) -> int:
    return _BLOCK_BYTES // x.itemsize


def _n_chunks(n_rows: int) -> int:
    # a few chunks of rows per thread, so that uneven rows (ignored ones) balance out
    return min(n_rows, 4 * numba.get_num_threads())


def _grad_mode(logits: np.ndarray, grad_out) -> tuple[np.ndarray, int]:
    if grad_out is None:
        return _NO_GRAD[logits.dtype], _SUM
    if grad_out is logits or (grad_out.ctypes.data == logits.ctypes.data and grad_out.shape == logits.shape):
        return grad_out, _IN_PLACE
    return grad_out, _STORE


def logsumexp(logits: np.ndarray, out: np.ndarray) -> int:
    """``out[i] = log(sum_k exp(logits[i, k]))``; ``out (N,)`` of the logits' dtype. Returns the invalid rows' count."""
    return int(_k(_logsumexp)(logits, out, _block(logits), _n_chunks(logits.shape[0])))


def softmax(logits: np.ndarray, out: np.ndarray) -> int:
    """``out[i, k] = exp(logits[i, k] - lse_i)``. Returns the invalid rows' count."""
    return int(_k(_softmax)(logits, out, _block(logits), _n_chunks(logits.shape[0])))


def log_softmax(logits: np.ndarray, out: np.ndarray) -> int:
    """``out[i, k] = logits[i, k] - lse_i``. Returns the invalid rows' count."""
    return int(_k(_log_softmax)(logits, out, _block(logits), _n_chunks(logits.shape[0])))


def softmax_backward(grad_probs: np.ndarray, probs: np.ndarray, out: np.ndarray) -> int:
    """``out = (g - <g, a>) * a`` per row. Returns the count of rows whose ``<g, a>`` is not finite."""
    return int(_k(_softmax_backward)(grad_probs, probs, out))


def _lse_buffer(lse_out):
    return (_NO_LSE, False) if lse_out is None else (lse_out, True)


def cross_entropy_index(logits, target, weight, ignore_index, label_smoothing, grad_scale, loss_out, grad_out,
                        *, z_loss=0.0, z_scale=None, softcap=None, lse_out=None) -> int:
    """Cross-entropy per row for integer targets (:func:`softgrad._kernels._numpy.cross_entropy_index`).

    ``grad_out`` may be ``logits`` (the gradient overwrites the logits) or ``None``
    (loss only: one read of the logits, nothing written but ``loss_out``).
    """
    C = logits.shape[1]
    has_weight = weight is not None
    w = weight if has_weight else _NO_WEIGHT[logits.dtype]
    zeta = grad_scale if z_scale is None else z_scale
    lse, has_lse = _lse_buffer(lse_out)
    g, mode = _grad_mode(logits, grad_out)
    if softcap is not None:
        return int(_k(_cross_entropy_softcap)(
            logits, target, _NO_GRAD[logits.dtype], False, w, has_weight, np.int64(ignore_index),
            float(label_smoothing), float(z_loss), float(softcap), grad_scale, zeta, loss_out, lse, has_lse, g,
            mode != _SUM, _n_chunks(logits.shape[0])))
    weight_sum = float(weight.sum(dtype=np.float64)) if has_weight else float(C)
    return int(_k(_cross_entropy_index)(
        logits, target, w, has_weight, weight_sum, np.int64(ignore_index), float(label_smoothing), float(z_loss),
        grad_scale, zeta, loss_out, lse, has_lse, g, mode, _block(logits), _n_chunks(logits.shape[0])))


def cross_entropy_probs(logits, target, weight, label_smoothing, grad_scale, loss_out, grad_out,
                        *, z_loss=0.0, z_scale=None, softcap=None, lse_out=None) -> int:
    """Cross-entropy per row for probability targets (:func:`softgrad._kernels._numpy.cross_entropy_probs`)."""
    has_weight = weight is not None
    w = weight if has_weight else _NO_WEIGHT[logits.dtype]
    zeta = grad_scale if z_scale is None else z_scale
    lse, has_lse = _lse_buffer(lse_out)
    g, mode = _grad_mode(logits, grad_out)
    if softcap is not None:
        return int(_k(_cross_entropy_softcap)(
            logits, _NO_INDEX, target, True, w, has_weight, np.int64(-100), float(label_smoothing), float(z_loss),
            float(softcap), grad_scale, zeta, loss_out, lse, has_lse, g, mode != _SUM, _n_chunks(logits.shape[0])))
    return int(_k(_cross_entropy_probs)(
        logits, target, w, has_weight, float(label_smoothing), float(z_loss), grad_scale, zeta, loss_out, lse,
        has_lse, g, mode, _block(logits), _n_chunks(logits.shape[0])))


# ----------------------------------------------------------------------------- threads
def _register_threadpoolctl_controller() -> None:
    """Let ``threadpoolctl.threadpool_limits`` set Numba's thread count.

    threadpoolctl finds the libraries it controls among the loaded shared objects; the
    controller below matches Numba's threading-layer library (``omppool``, ``tbbpool``
    or ``workqueue``) and sets :func:`numba.set_num_threads`, which applies to the
    calling thread, the thread that enters ``threadpool_limits``. The threading layer
    is started here so that the library is loaded before any ``with`` block is entered.
    Without threadpoolctl this does nothing.
    """
    numba.get_num_threads()  # starts the threading layer (loads its library)
    try:
        import threadpoolctl
    except ImportError:
        return
    if any(getattr(c, "internal_api", None) == "numba" for c in threadpoolctl._ALL_CONTROLLERS):
        return

    class NumbaController(threadpoolctl.LibController):
        user_api = "numba"
        internal_api = "numba"
        filename_prefixes = ("omppool", "tbbpool", "workqueue")

        def get_num_threads(self):
            return numba.get_num_threads()

        def set_num_threads(self, num_threads):
            # numba refuses more threads than it launched (NUMBA_NUM_THREADS)
            numba.set_num_threads(max(1, min(int(num_threads), numba.config.NUMBA_NUM_THREADS)))

        def get_version(self):
            return numba.__version__

    threadpoolctl.register(NumbaController)


_register_threadpoolctl_controller()


def csr_dense_matmul(data, indices, indptr, dense, out) -> int:
    """``out = X @ dense`` for CSR ``X (N, D)`` = ``(data, indices, indptr)``; ``dense (D, C)``, ``out (N, C)``."""
    return int(_k(_csr_dense_matmul)(data, indices, indptr, dense, out, _n_chunks(out.shape[0])))


def csr_transpose_matmul(data, indices, indptr, dense, out) -> int:
    """``out = dense.T @ X`` ``(C, D)`` for CSR ``X (N, D)`` and ``dense (N, C)``.

    Each thread sums its rows' contributions into its own ``(D, C)`` buffer (allocated
    here: ``threads * D * C`` entries), then the buffers are added.
    """
    C, D = out.shape
    P = max(1, min(numba.get_num_threads(), dense.shape[0]))
    partial = np.empty((P, D, C), dtype=out.dtype)
    return int(_k(_csr_transpose_matmul)(data, indices, indptr, dense, out, partial))
