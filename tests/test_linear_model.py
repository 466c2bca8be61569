"""The linear model's objective and gradient (the estimator's hot path).

Checked against: its own float64 reference, central differences, scikit-learn's
``LinearModelLoss`` (independent code), and the CS231n teaching function
``linear_softmax_loss`` at the matching convention; plus the memory contract (one
``(N, C)`` work array, nothing else of that size), untouched inputs, extreme inputs,
and the Lipschitz bound behind the ``gd`` step size.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import softgrad
from conftest import tolerance
from softgrad._linear_model import lipschitz_bound, objective_and_gradient, objective_reference, objective_value


def _problem(rng, N=40, D=6, C=5, dtype=np.float64, weighted=True, scale=1.0):
    X = (scale * rng.normal(size=(N, D))).astype(dtype)
    y = rng.integers(0, C, size=N).astype(np.int64)
    W = (0.5 * rng.normal(size=(C, D))).astype(dtype)
    b = (0.5 * rng.normal(size=C)).astype(dtype)
    s = rng.uniform(0.0, 3.0, size=N) if weighted else None
    return X, y, W, b, s


def _fast(W, b, X, y, s, alpha):
    N, C = X.shape[0], W.shape[0]
    r = (np.ones(N) if s is None else s) / (N if s is None else s.sum())
    work = np.full((N, C), np.nan, dtype=X.dtype)  # contents must not matter
    return objective_and_gradient(W, b, X, y, r, alpha, work, np.empty(N))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("intercept", [True, False])
@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_matches_float64_reference(backend, rng, dtype, intercept, weighted, alpha):
    X, y, W, b, s = _problem(rng, dtype=dtype, weighted=weighted)
    b = b if intercept else None
    J, gW, gb = _fast(W, b, X, y, s, alpha)
    J_ref, gW_ref, gb_ref = objective_reference(W, b, X, y, s, alpha)
    tol = tolerance(dtype)
    np.testing.assert_allclose(J, J_ref, **tol)
    assert gW.dtype == dtype and gW.shape == W.shape
    np.testing.assert_allclose(gW, gW_ref, rtol=tol["rtol"], atol=10 * tol["atol"])
    if intercept:
        np.testing.assert_allclose(gb, gb_ref, rtol=tol["rtol"], atol=10 * tol["atol"])
    else:
        assert gb is None


def test_gradient_passes_gradcheck(backend, rng):
    X, y, W, b, s = _problem(rng, N=15, D=4, C=3)
    report = softgrad.gradcheck(lambda W, b: _fast(W, b, X, y, s, 0.2), W, b, names=["W", "b"])
    assert report.passed, str(report)


def test_reference_against_central_differences(rng):
    """The reference itself, independently of the kernels."""
    X, y, W, b, s = _problem(rng, N=12, D=3, C=4)
    J, gW, gb = objective_reference(W, b, X, y, s, 0.1)
    num_W = softgrad.numerical_gradient(lambda V: objective_reference(V, b, X, y, s, 0.1)[0], W)
    num_b = softgrad.numerical_gradient(lambda c: objective_reference(W, c, X, y, s, 0.1)[0], b)
    np.testing.assert_allclose(gW, num_W, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(gb, num_b, rtol=1e-6, atol=1e-9)


def test_matches_sklearn_linear_model_loss(backend, rng):
    from sklearn._loss.loss import HalfMultinomialLoss
    from sklearn.linear_model._linear_loss import LinearModelLoss

    X, y, W, b, s = _problem(rng, N=50, D=7, C=4)
    alpha = 0.05
    J, gW, gb = _fast(W, b, X, y, s, alpha)
    sk = LinearModelLoss(HalfMultinomialLoss(n_classes=4), fit_intercept=True)
    coef = np.column_stack([W, b])  # (C, D + 1)
    J_sk, g_sk = sk.loss_gradient(coef, X, y.astype(np.float64), sample_weight=s, l2_reg_strength=alpha)
    np.testing.assert_allclose(J, J_sk, rtol=1e-12)
    np.testing.assert_allclose(gW, g_sk[:, :-1], rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(gb, g_sk[:, -1], rtol=1e-10, atol=1e-13)


def test_matches_cs231n_teaching_function(backend, rng):
    """``linear_softmax_loss`` adds ``reg * sum(W**2)`` and takes W as (D, C): alpha = 2 * reg, W transposed."""
    X, y, W, b, _ = _problem(rng, N=30, D=5, C=6, weighted=False)
    reg = 0.07
    J, gW, gb = _fast(W, b, X, y, None, 2 * reg)
    for method in ("vectorized", "naive"):
        loss, dW, db = softgrad.linear_softmax_loss(W.T, X, y, reg, b=b, method=method)
        np.testing.assert_allclose(J, float(loss), rtol=1e-12)
        np.testing.assert_allclose(gW, dW.T, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(gb, db, rtol=1e-10, atol=1e-14)


def test_zero_weights_give_log_c(backend, rng):
    """Seed 001's sanity check, exactly: W = 0 makes every class 1/C."""
    X, y, _, _, s = _problem(rng, C=10)
    J, _, _ = _fast(np.zeros((10, 6)), np.zeros(10), X, y, s, 1.0)
    np.testing.assert_allclose(J, np.log(10), rtol=1e-14)


def test_inputs_unchanged_and_output_buffers_used(backend, rng):
    X, y, W, b, s = _problem(rng)
    copies = [a.copy() for a in (X, y, W, b, s)]
    N, C = X.shape[0], W.shape[0]
    gW_out, gb_out = np.empty_like(W), np.empty_like(b)
    _, gW, gb = objective_and_gradient(W, b, X, y, s / s.sum(), 0.1, np.empty((N, C)), np.empty(N),
                                       gW_out, gb_out)
    assert gW is gW_out and gb is gb_out
    for before, after in zip(copies, (X, y, W, b, s)):
        np.testing.assert_array_equal(before, after)


def test_extreme_inputs_stay_finite(backend, rng):
    """Logits of order 1e4: the kernel's max shift keeps loss and gradient finite and exact."""
    X, y, W, b, s = _problem(rng, scale=1e4)
    J, gW, gb = _fast(W, b, X, y, s, 0.0)
    J_ref, gW_ref, gb_ref = objective_reference(W, b, X, y, s, 0.0)
    assert np.isfinite(J) and np.isfinite(gW).all() and np.isfinite(gb).all()
    np.testing.assert_allclose(J, J_ref, rtol=1e-10)
    np.testing.assert_allclose(gW, gW_ref, rtol=1e-9, atol=1e-9 * np.abs(gW_ref).max())


def test_one_work_array_only(backend, rng):
    """Besides the caller's (N, C) work array, an evaluation allocates far less than (N, C)."""
    N, D, C = 100_000, 4, 16
    X = rng.normal(size=(N, D))
    y = rng.integers(0, C, size=N)
    W, b = 0.1 * rng.normal(size=(C, D)), np.zeros(C)
    r = np.full(N, 1.0 / N)
    work, loss_rows = np.empty((N, C)), np.empty(N)
    objective_and_gradient(W, b, X, y, r, 0.1, work, loss_rows)  # warm-up (JIT, caches)
    tracemalloc.start()
    try:
        objective_and_gradient(W, b, X, y, r, 0.1, work, loss_rows)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < work.nbytes / 2, f"peak {peak} bytes vs one (N, C) array of {work.nbytes} bytes"


def test_lipschitz_bound_covers_the_hessian(rng):
    """1 / L is a safe step: L is at least the Hessian's largest eigenvalue (by differences)."""
    X, y, W, b, s = _problem(rng, N=25, D=3, C=3)
    alpha = 0.1
    r = s / s.sum()
    theta = np.concatenate([W.ravel(), b])

    def grad(t):
        _, gW, gb = objective_reference(t[:9].reshape(3, 3), t[9:], X, y, s, alpha)
        return np.concatenate([gW.ravel(), gb])

    H = softgrad.numerical_gradient(grad, theta, eps=1e-5)
    lam = np.linalg.eigvalsh(0.5 * (H + H.T)).max()
    L = lipschitz_bound(X, r, alpha, True)
    assert lam <= L
    # and not uselessly loose: the bound of the 1/2-curvature of softmax is within ~10x here
    assert L <= 20 * lam


# ------------------------------------------------------------------ sparse X, float32 X, binary


def _sparse_problem(rng, N=60, D=30, C=4, density=0.2):
    import scipy.sparse as sp

    X = sp.random(N, D, density=density, format="csr", random_state=np.random.RandomState(rng.integers(1 << 31)),
                  data_rvs=lambda n: rng.normal(size=n))
    y = rng.integers(0, C, size=N)
    W = 0.5 * rng.normal(size=(C, D))
    b = 0.5 * rng.normal(size=C)
    s = rng.uniform(0.1, 2.0, size=N)
    return X, y, W, b, s / s.sum()


@pytest.mark.parametrize("fmt", ["csr", "csc"])
@pytest.mark.parametrize("binary", [False, True])
def test_sparse_equals_dense_and_reference(backend, rng, fmt, binary):
    X, y, W, b, r = _sparse_problem(rng, C=1 if binary else 4)
    if binary:
        y = rng.integers(0, 2, size=y.shape[0])
    Xs = X.asformat(fmt)
    N, C = X.shape[0], W.shape[0]
    got = objective_and_gradient(W, b, Xs, y, r, 0.1, np.empty((N, C)), np.empty(N), binary=binary)
    dense = objective_and_gradient(W, b, X.toarray(), y, r, 0.1, np.empty((N, C)), np.empty(N), binary=binary)
    ref = objective_reference(W, b, X, y, r, 0.1, binary=binary)
    for g, d, f in zip(got, dense, ref):
        np.testing.assert_allclose(g, d, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(g, f, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("blocks", [1, 7])
def test_float32_X_under_float64_weights_is_exact_float64(backend, rng, monkeypatch, sparse, blocks):
    """float32 X with float64 coef: the float64 result on the float32 values (cast block by block)."""
    from softgrad import _linear_model

    X, y, W, b, r = _sparse_problem(rng, N=70, density=0.5)
    X32 = X.astype(np.float32)
    X32 = X32 if sparse else X32.toarray()
    # force several blocks (one when the whole X fits one)
    entries = X32.nnz if sparse else X32.size
    monkeypatch.setattr(_linear_model, "_BLOCK_ENTRIES", max(1, entries // blocks))
    N, C = X.shape[0], W.shape[0]
    got = objective_and_gradient(W, b, X32, y, r, 0.05, np.empty((N, C)), np.empty(N))
    want = objective_reference(W, b, X32.astype(np.float64), y, r, 0.05)
    assert got[1].dtype == np.float64
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-11, atol=1e-13)
    assert objective_value(W, b, X32, y, r, 0.05) == pytest.approx(want[0], rel=1e-12)


def test_binary_gradient_matches_central_differences(rng):
    X, y, W, b, r = _sparse_problem(rng, C=1)
    X = X.toarray()
    y = rng.integers(0, 2, size=X.shape[0])

    def J(theta):
        return objective_reference(theta[:-1].reshape(1, -1), theta[-1:], X, y, r, 0.3, binary=True)[0]

    theta = np.concatenate([W.ravel(), b])
    h = 1e-5
    num = np.array([(J(theta + h * e) - J(theta - h * e)) / (2 * h) for e in np.eye(theta.shape[0])])
    _, gW, gb = objective_and_gradient(W, b, X, y, r, 0.3, np.empty((X.shape[0], 1)), np.empty(X.shape[0]),
                                       binary=True)
    np.testing.assert_allclose(np.concatenate([gW.ravel(), gb]), num, rtol=1e-6, atol=1e-9)


def test_binary_loss_is_stable_for_huge_logits():
    X = np.array([[1.0], [1.0], [-1.0]])
    y = np.array([1, 0, 0])
    W = np.array([[800.0]])
    J, gW, _ = objective_and_gradient(W, None, X, y, np.full(3, 1 / 3), 0.0, np.empty((3, 1)), np.empty(3),
                                      binary=True)
    # rows: log(1 + e^-800) ~ 0, log(1 + e^800) = 800, log(1 + e^-800) ~ 0
    assert J == pytest.approx(800 / 3, rel=1e-12)
    np.testing.assert_allclose(gW, [[1 / 3]], rtol=1e-12)
