"""Every backend's kernels against naive per-row loops in float64.

These call the kernels directly, with inputs that satisfy the kernel contract; the
``K`` fixture runs each test once per backend that loads (``numpy``, ``numba``).
Comparisons of the fast backends against the NumPy reference on larger and extreme
inputs are in ``test_kernels_numba.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import softgrad
from softgrad._backend import _load
from conftest import tolerance

# shapes: single element, a few rows, and one spanning several row blocks
SHAPES = [(1, 1), (5, 7), (3, 40000)]
DTYPES = [np.float64, np.float32]


@pytest.fixture(params=softgrad.available_backends())
def K(request):
    """The kernel module of each backend that loads here."""
    return _load(request.param)


def _naive_lse(row):
    m = max(row)
    return m + math.log(sum(math.exp(x - m) for x in row))


def _naive_ce_index(z, y, w, ignore, eps):
    N, C = z.shape
    w = np.ones(C) if w is None else w
    loss = np.zeros(N)
    for i in range(N):
        if y[i] == ignore:
            continue
        lse = _naive_lse(z[i])
        p = [z[i, c] - lse for c in range(C)]
        loss[i] = -(1 - eps) * w[y[i]] * p[y[i]] - eps / C * sum(w[c] * p[c] for c in range(C))
    return loss


def _numerical_rowwise(f, z, h=1e-6):
    """Central differences of ``f(z) -> (N,)`` summed over rows, w.r.t. every z[i, k]."""
    g = np.zeros_like(z)
    for idx in np.ndindex(z.shape):
        zp, zm = z.copy(), z.copy()
        zp[idx] += h
        zm[idx] -= h
        g[idx] = (f(zp).sum() - f(zm).sum()) / (2 * h)
    return g


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_family(K, rng, shape, dtype):
    z = (rng.normal(size=shape) * 5).astype(dtype)
    if shape[1] > 1:
        z[0, 0] = -np.inf
    lse_ref = np.array([_naive_lse(r) for r in z.astype(np.float64)])
    out = np.empty(shape[0], dtype=dtype)
    K.logsumexp(z, out)
    np.testing.assert_allclose(out, lse_ref, **tolerance(dtype))
    out2 = np.empty_like(z)
    K.softmax(z, out2)
    np.testing.assert_allclose(out2, np.exp(z.astype(np.float64) - lse_ref[:, None]), **tolerance(dtype))
    K.log_softmax(z, out2)
    np.testing.assert_allclose(out2, z.astype(np.float64) - lse_ref[:, None], **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_backward_matches_jacobian(K, rng, dtype):
    z = rng.normal(size=(4, 6))
    a = np.exp(z - np.array([_naive_lse(r) for r in z])[:, None])
    g = rng.normal(size=(4, 6))
    ref = np.stack([(np.diag(a[i]) - np.outer(a[i], a[i])).T @ g[i] for i in range(4)])
    out = np.empty((4, 6), dtype=dtype)
    K.softmax_backward(g.astype(dtype), a.astype(dtype), out)
    np.testing.assert_allclose(out, ref, **tolerance(dtype))


@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_index_loss_and_gradient(K, rng, eps, weighted):
    N, C = 6, 5
    z = rng.normal(size=(N, C))
    y = rng.integers(0, C, size=N)
    y[2] = -100
    w = rng.uniform(0.2, 2.0, size=C) if weighted else None
    scale = rng.uniform(0.5, 2.0, size=N)
    loss, grad = np.empty(N), np.empty((N, C))
    K.cross_entropy_index(z, y, w, -100, eps, scale, loss, grad)
    np.testing.assert_allclose(loss, _naive_ce_index(z, y, w, -100, eps), rtol=1e-12, atol=1e-14)
    num = _numerical_rowwise(lambda zz: scale * _naive_ce_index(zz, y, w, -100, eps), z)
    np.testing.assert_allclose(grad, num, rtol=1e-6, atol=1e-8)
    assert np.all(grad[2] == 0.0)


@pytest.mark.parametrize("eps", [0.0, 0.3])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_probs_loss_and_gradient(K, rng, eps, weighted):
    N, C = 5, 4
    z = rng.normal(size=(N, C))
    t = rng.dirichlet(np.ones(C), size=N)
    w = rng.uniform(0.2, 2.0, size=C) if weighted else np.ones(C)

    def naive(zz):
        ts = (1 - eps) * t + eps / C
        lse = np.array([_naive_lse(r) for r in zz])
        return -np.array([sum(w[c] * ts[i, c] * (zz[i, c] - lse[i]) for c in range(C)) for i in range(N)])

    scale = rng.uniform(0.5, 2.0, size=N)
    loss, grad = np.empty(N), np.empty((N, C))
    K.cross_entropy_probs(z, t, w if weighted else None, eps, scale, loss, grad)
    np.testing.assert_allclose(loss, naive(z), rtol=1e-12)
    np.testing.assert_allclose(grad, _numerical_rowwise(lambda zz: scale * naive(zz), z), rtol=1e-6, atol=1e-8)


def test_gradient_in_place_and_loss_only(K, rng):
    N, C = 4, 3
    z = rng.normal(size=(N, C))
    y = np.array([0, 2, 1, 1])
    scale = np.ones(N)
    loss_ref, grad_ref = np.empty(N), np.empty((N, C))
    K.cross_entropy_index(z, y, None, -100, 0.1, scale, loss_ref, grad_ref)
    zz = z.copy()
    loss = np.empty(N)
    K.cross_entropy_index(zz, y, None, -100, 0.1, scale, loss, zz)  # grad_out aliases logits
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-15)
    np.testing.assert_allclose(zz, grad_ref, rtol=1e-15)
    loss2 = np.empty(N)
    K.cross_entropy_index(z, y, None, -100, 0.1, scale, loss2, None)
    np.testing.assert_array_equal(loss2, loss_ref)


def test_extreme_logits_stay_finite(K):
    z = np.array([[1e4, -1e4, -np.inf, 0.0], [-1e4, -1e4, -1e4, -np.inf]])
    out = np.empty_like(z)
    K.softmax(z, out)
    np.testing.assert_allclose(out, [[1, 0, 0, 0], [1 / 3, 1 / 3, 1 / 3, 0]], rtol=1e-15)
    K.log_softmax(z, out)
    np.testing.assert_allclose(out[0, :2], [0.0, -2e4])
    loss, grad = np.empty(2), np.empty_like(z)
    K.cross_entropy_index(z, np.array([1, 0]), None, -100, 0.0, np.ones(2), loss, grad)
    np.testing.assert_allclose(loss, [2e4, math.log(3)])
    assert np.isfinite(grad).all()


# ------------------------------------------------------------- sparse linear products
def _naive_csr_products(data, indices, indptr, B, G):
    """``X @ B`` and ``G.T @ X`` in float64 by loops over the stored entries (duplicates add)."""
    N, D = indptr.shape[0] - 1, B.shape[0]
    xb, gtx = np.zeros((N, B.shape[1])), np.zeros((G.shape[1], D))
    for i in range(N):
        for k in range(indptr[i], indptr[i + 1]):
            xb[i] += float(data[k]) * B[indices[k]].astype(np.float64)
            gtx[:, indices[k]] += float(data[k]) * G[i].astype(np.float64)
    return xb, gtx


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 5, 3), (300, 900, 20)])
def test_csr_products_match_loops(K, rng, dtype, index_dtype, shape):
    """Empty rows, unused columns, unsorted and duplicated column indices, C = 1."""
    N, D, C = shape
    counts = rng.integers(0, 6, size=N)
    counts[0] = 0 if N > 1 else 1  # an empty row (when there are others)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(index_dtype)
    indices = rng.integers(0, max(1, D // 2), size=int(indptr[-1])).astype(index_dtype)  # half the columns unused
    if indices.size > 1:
        indices[1] = indices[0]  # a duplicate
    data = rng.normal(size=indices.size).astype(dtype)
    B = rng.normal(size=(D, C)).astype(dtype)
    G = rng.normal(size=(N, C)).astype(dtype)
    xb_ref, gtx_ref = _naive_csr_products(data, indices, indptr, B, G)
    xb, gtx = np.full((N, C), np.nan, dtype=dtype), np.full((C, D), np.nan, dtype=dtype)
    copies = [a.copy() for a in (data, indices, indptr, B, G)]
    assert K.csr_dense_matmul(data, indices, indptr, B, xb) == 0
    assert K.csr_transpose_matmul(data, indices, indptr, G, gtx) == 0
    np.testing.assert_allclose(xb, xb_ref, **tolerance(dtype))
    np.testing.assert_allclose(gtx, gtx_ref, **tolerance(dtype))
    for before, after in zip(copies, (data, indices, indptr, B, G)):
        np.testing.assert_array_equal(before, after)  # inputs only read
