"""The Numba kernels against the NumPy reference kernels, to float rounding.

Inputs satisfy the kernel contract (2-D, C-contiguous, float32/float64); the public
functions' handling of other layouts is checked at the end through the public API.
Shapes cover one element, a single row, rows spanning many blocks of the Numba
kernels (4096 float32 / 2048 float64 elements), and Triton's irregular 1823 x 781.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("numba")

import softgrad  # noqa: E402
from softgrad._kernels import _numba as NB  # noqa: E402
from softgrad._kernels import _numpy as REF  # noqa: E402
from conftest import tolerance  # noqa: E402

DTYPES = [np.float64, np.float32]
SHAPES = [(1, 1), (1, 7), (4, 9001), (1823, 781)]


def _logits(rng, shape, dtype, scale=5.0):
    return (rng.normal(size=shape) * scale).astype(dtype)


def _both(name, *arrays, out_shape=None, out_dtype=None):
    """Run kernel ``name`` of both backends on ``arrays``; return (numba out, reference out)."""
    x = arrays[-1]
    shape = x.shape if out_shape is None else out_shape
    dtype = x.dtype if out_dtype is None else out_dtype
    got, want = np.empty(shape, dtype), np.empty(shape, dtype)
    getattr(NB, name)(*arrays, got)
    getattr(REF, name)(*arrays, want)
    return got, want


def _extreme_rows(dtype, C=9001):
    """Rows of +-1e4, -inf mixtures, a single finite entry, and whole blocks of -inf."""
    z = np.zeros((6, C), dtype=dtype)
    z[0, ::2], z[0, 1::2] = 1e4, -1e4
    z[1, :] = -np.inf
    z[1, C // 2] = -1e4  # the only finite entry, far from zero
    z[2, :] = -np.inf
    z[2, [0, C - 1]] = [3.0, 1e4]  # finite entries in the first and last block only
    z[3, : C - 5] = -np.inf
    z[3, C - 5:] = np.arange(5)
    z[4] = np.linspace(-1e4, 1e4, C)
    z[5, ::3] = -np.inf
    return z


# ----------------------------------------------------------------------------- softmax family
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_family_matches_reference(rng, shape, dtype):
    z = _logits(rng, shape, dtype)
    for name in ("softmax", "log_softmax"):
        got, want = _both(name, z)
        np.testing.assert_allclose(got, want, **tolerance(dtype), err_msg=name)
    got, want = _both("logsumexp", z, out_shape=shape[:1])
    np.testing.assert_allclose(got, want, **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_family_extreme_rows(dtype):
    z = _extreme_rows(dtype)
    for name in ("softmax", "log_softmax"):
        got, want = _both(name, z)
        assert not np.isnan(got).any()
        np.testing.assert_allclose(got, want, **tolerance(dtype), err_msg=name)
    got, want = _both("softmax", z)
    assert got[1, 9001 // 2] == 1.0 and np.count_nonzero(got[1]) == 1  # single finite entry
    np.testing.assert_array_equal(got[z == -np.inf], 0.0)
    got, want = _both("logsumexp", z, out_shape=(6,))
    np.testing.assert_allclose(got, want, **tolerance(dtype))


@pytest.mark.parametrize("shape", [(1, 1), (3, 9001), (1823, 781)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_backward_matches_reference(rng, shape, dtype):
    a = np.empty(shape, dtype)
    REF.softmax(_logits(rng, shape, dtype), a)
    g = rng.normal(size=shape).astype(dtype)
    got, want = _both("softmax_backward", g, a)
    np.testing.assert_allclose(got, want, **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_exp_is_within_one_ulp(dtype):
    # _block_exp stores exp(x - max x); with max x = 0 that is exp(x) itself.
    x = np.concatenate([[0.0], -np.geomspace(1e-12, 700.0, 20000), [-1e4, -np.inf]]).astype(dtype)
    out = np.empty_like(x)
    bm, bs = NB._block_exp(x, out, NB._STORE)
    want = np.exp(x.astype(np.float64))
    tiny = np.finfo(dtype).tiny
    normal = want >= tiny
    ulp = np.spacing(want[normal].astype(dtype)).astype(np.float64)
    assert np.abs(out[normal] - want[normal]).max() / ulp.max() <= 1.0
    assert (np.abs(out[normal] - want[normal]) <= ulp).all()
    # below the normal range the result is flushed to 0 (the reference's subnormals are < tiny)
    np.testing.assert_array_equal(out[~normal], 0.0)
    assert bm == 0.0
    # the sum: float32 exps summed in float32 over runs of NB._RUN (at most _RUN / 8 terms in
    # any partial sum), the runs' sums in float64; float64 exps in float64 throughout
    rel_tol = (NB._RUN // 8) * np.finfo(np.float32).eps if dtype == np.float32 else 1e-14
    assert math.isclose(bs, math.fsum(out.astype(np.float64)), rel_tol=rel_tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_sums_accurate_at_a_million_classes(rng, dtype):
    # float64 accumulation: a float32 running sum over 10^6 terms would be off by
    # ~1e-4 relative; ours must match math.fsum to float32/float64 rounding of exp.
    C = 1_000_000
    z = rng.normal(size=(2, C)).astype(dtype) * 4
    z[1, :C // 2] = -np.inf
    z64 = z.astype(np.float64)
    lse_ref = np.array([m + math.log(math.fsum(np.exp(r - m))) for r, m in zip(z64, z64.max(axis=1))])
    lse = np.empty(2, dtype)
    NB.logsumexp(z, lse)
    np.testing.assert_allclose(lse, lse_ref, rtol=0, atol=4 * np.finfo(dtype).eps * abs(lse_ref).max())
    y = np.array([5, C - 1])
    loss = np.empty(2)
    NB.cross_entropy_index(z, y, None, -100, 0.0, np.ones(2), loss, None)  # float64 losses show s exactly
    atol = 5e-7 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(loss, lse_ref - z64[[0, 1], y], rtol=0, atol=atol)
    a = np.empty_like(z)
    NB.softmax(z, a)
    assert abs(math.fsum(a[0].astype(np.float64)) - 1.0) < (2e-6 if dtype == np.float32 else 1e-13)


# ----------------------------------------------------------------------------- cross-entropy
def _ce_both(kind, z, target, weight, eps, ignore_index, scale, grad):
    """Loss and gradient from both backends; ``grad`` is "separate", "in_place" or None."""
    out = []
    for K in (NB, REF):
        zz = z.copy()
        loss = np.empty(z.shape[0])
        g = {"separate": np.empty_like(zz), "in_place": zz, None: None}[grad]
        if kind == "index":
            K.cross_entropy_index(zz, target, weight, ignore_index, eps, scale, loss, g)
        else:
            K.cross_entropy_probs(zz, target, weight, eps, scale, loss, g)
        if grad != "in_place":
            np.testing.assert_array_equal(zz, z)  # the logits are left alone
        out.append((loss, g))
    return out


@pytest.mark.parametrize("grad", ["separate", "in_place", None])
@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("ignore_index", [-100, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_index_every_option(rng, dtype, ignore_index, weighted, eps, grad):
    N, C = 11, 5003  # several blocks per row
    z = _logits(rng, (N, C), dtype)
    z[0, 100:] = -np.inf
    y = rng.integers(0, C, size=N)
    y[0] = 7
    y[[2, 5]] = ignore_index
    w = rng.uniform(0.2, 2.0, size=C).astype(dtype) if weighted else None
    scale = rng.uniform(0.1, 2.0, size=N)
    (loss, g), (loss_ref, g_ref) = _ce_both("index", z, y, w, eps, ignore_index, scale, grad)
    tol = tolerance(dtype)
    np.testing.assert_array_equal(loss[[2, 5]], 0.0)  # ignored rows
    # smoothing puts weight on the -inf logits of row 0: an infinite loss, as in the reference
    assert (loss[0] == np.inf) == (eps > 0.0) and (loss_ref[0] == np.inf) == (eps > 0.0)
    np.testing.assert_allclose(loss, loss_ref, **tol)
    if grad is not None:
        np.testing.assert_allclose(g, g_ref, **tol)
        np.testing.assert_array_equal(g[[2, 5]], 0.0)


@pytest.mark.parametrize("grad", ["separate", "in_place", None])
@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_probs_every_option(rng, dtype, weighted, eps, grad):
    N, C = 7, 4100
    z = _logits(rng, (N, C), dtype)
    t = rng.dirichlet(np.ones(C), size=N).astype(dtype)
    z[0, :2000] = -np.inf
    t[0, :2000] = 0.0  # 0 * log 0 = 0 (no smoothing) -- or +inf with smoothing
    w = rng.uniform(0.2, 2.0, size=C).astype(dtype) if weighted else None
    scale = rng.uniform(0.1, 2.0, size=N)
    (loss, g), (loss_ref, g_ref) = _ce_both("probs", z, t, w, eps, -100, scale, grad)
    np.testing.assert_allclose(loss, loss_ref, **tolerance(dtype))
    assert np.isfinite(loss[0]) == (eps == 0.0)
    if grad is not None:
        np.testing.assert_allclose(g, g_ref, **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_extreme_logits(dtype):
    z = _extreme_rows(dtype, C=5001)
    y = np.array([1, 5001 // 2, 0, 5000, 2500, 3])  # z[5, 3] = -inf: infinite loss, finite gradient
    scale = np.full(6, 1 / 6)
    for grad in ("separate", "in_place"):
        (loss, g), (loss_ref, g_ref) = _ce_both("index", z, y, None, 0.0, -100, scale, grad)
        np.testing.assert_allclose(loss, loss_ref, **tolerance(dtype))
        assert loss[5] == np.inf and np.isfinite(loss[:5]).all()
        assert np.isfinite(g).all()
        np.testing.assert_allclose(g, g_ref, **tolerance(dtype))
    # row 0: label at -1e4 against 2501 logits at +1e4; row 2: label 3.0 against 1e4
    np.testing.assert_allclose(loss[[0, 2]], [2e4 + math.log(2501), 1e4 - 3.0], rtol=1e-7)


# ----------------------------------------------------------------------------- public API
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_public_api_same_under_both_backends(rng, dtype):
    z = (rng.normal(size=(6, 1823, 9)) * 4).astype(dtype)
    zt = z[::2, :, ::3]  # non-contiguous (3, 1823, 3), classes on axis 1 as in PyTorch
    y = rng.integers(0, 1823, size=(3, 3))
    results = {}
    for name in ("numpy", "numba"):
        with softgrad.use_backend(name):
            results[name] = (
                softgrad.softmax(zt, axis=1),
                softgrad.log_softmax(zt, axis=1),
                softgrad.logsumexp(zt, axis=1),
                *softgrad.softmax_cross_entropy(zt, y, axis=1, label_smoothing=0.1),
            )
    rtol, atol = tolerance(dtype)["rtol"], tolerance(dtype)["atol"]
    for got, want in zip(results["numba"], results["numpy"]):
        assert got.dtype == want.dtype == dtype
        np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64),
                                   rtol=max(rtol, 2 * np.finfo(dtype).eps), atol=atol)
