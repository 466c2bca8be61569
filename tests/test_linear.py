"""linear_softmax_loss, linear_svm_loss, softmax_layer_jacobian, softmax_layer_cross_entropy_grad.

References: the naive loops (float64), PyTorch autograd in float64 (cross_entropy and
multi_margin_loss), explicit margin matrices built here, and central differences.
"""

from __future__ import annotations

import numpy as np
import pytest

import softgrad
from conftest import tolerance

LOSSES = [softgrad.linear_softmax_loss, softgrad.linear_svm_loss]
LOSS_IDS = ["softmax", "svm"]
# (N, D, C): one row, one feature, two classes, a tall and a wide case
SHAPES = [(1, 3, 2), (7, 1, 3), (20, 6, 5), (4, 30, 11)]


def _data(rng, N, D, C, dtype=np.float64):
    W = (rng.normal(size=(D, C)) * 0.5).astype(dtype)
    X = rng.normal(size=(N, D)).astype(dtype)
    y = rng.integers(0, C, size=N)
    b = rng.normal(size=C).astype(dtype)
    return W, X, y, b


def _onehot(y, C):
    Y = np.zeros((y.size, C))
    Y[np.arange(y.size), y] = 1.0
    return Y


# ---------------------------------------------------------------- naive == vectorised


@pytest.mark.parametrize("loss_fn", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("N, D, C", SHAPES)
@pytest.mark.parametrize("reg", [0.0, 0.3])
def test_naive_equals_vectorized(backend, rng, loss_fn, N, D, C, reg):
    W, X, y, b = _data(rng, N, D, C)
    for kwargs in ({}, {"b": b}):
        naive = loss_fn(W, X, y, reg, method="naive", **kwargs)
        vec = loss_fn(W, X, y, reg, method="vectorized", **kwargs)
        assert len(naive) == len(vec) == 2 + bool(kwargs)
        for a, v in zip(naive, vec):
            np.testing.assert_allclose(v, a, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- independent references


@pytest.mark.parametrize("N, D, C", SHAPES)
def test_softmax_loss_matches_torch(torch, backend, rng, N, D, C):
    W, X, y, b = _data(rng, N, D, C)
    reg = 0.1
    Wt = torch.tensor(W, requires_grad=True)
    bt = torch.tensor(b, requires_grad=True)
    lt = torch.nn.functional.cross_entropy(torch.tensor(X) @ Wt + bt, torch.tensor(y)) + reg * (Wt ** 2).sum()
    lt.backward()
    loss, dW, db = softgrad.linear_softmax_loss(W, X, y, reg, b=b)
    np.testing.assert_allclose(loss, lt.item(), rtol=1e-12)
    np.testing.assert_allclose(dW, Wt.grad.numpy(), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(db, bt.grad.numpy(), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("N, D, C", SHAPES)
@pytest.mark.parametrize("delta", [1.0, 0.25])
def test_svm_loss_matches_torch(torch, rng, N, D, C, delta):
    # torch's multi_margin_loss averages the hinge terms over the C classes too.
    W, X, y, b = _data(rng, N, D, C)
    reg = 0.1
    Wt = torch.tensor(W, requires_grad=True)
    bt = torch.tensor(b, requires_grad=True)
    scores = torch.tensor(X) @ Wt + bt
    lt = C * torch.nn.functional.multi_margin_loss(scores, torch.tensor(y), margin=delta) + reg * (Wt ** 2).sum()
    lt.backward()
    for method in ("naive", "vectorized"):
        loss, dW, db = softgrad.linear_svm_loss(W, X, y, reg, delta=delta, b=b, method=method)
        np.testing.assert_allclose(loss, lt.item(), rtol=1e-12)
        np.testing.assert_allclose(dW, Wt.grad.numpy(), rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(db, bt.grad.numpy(), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("method", ["naive", "vectorized"])
def test_dW_is_X_transpose_times_margin(backend, rng, method):
    """Seed 001's remark: for both losses dW = X.T @ margin / N + 2 reg W."""
    N, D, C = 12, 5, 4
    W, X, y, b = _data(rng, N, D, C)
    reg = 0.2
    Y = _onehot(y, C)
    scores = X @ W
    # softmax: margin = P - Y
    P = np.exp(scores - scores.max(axis=1, keepdims=True))
    P /= P.sum(axis=1, keepdims=True)
    _, dW = softgrad.linear_softmax_loss(W, X, y, reg, method=method)
    np.testing.assert_allclose(dW, X.T @ (P - Y) / N + 2 * reg * W, rtol=1e-12, atol=1e-14)
    # svm: margin = 1 at violating wrong classes, minus their count at the true class
    M = np.zeros((N, C))
    for i in range(N):
        for j in range(C):
            if j != y[i] and scores[i, j] - scores[i, y[i]] + 1.0 > 0:
                M[i, j] = 1.0
        M[i, y[i]] = -M[i].sum()
    _, dW = softgrad.linear_svm_loss(W, X, y, reg, method=method)
    np.testing.assert_allclose(dW, X.T @ M / N + 2 * reg * W, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- gradient checks


@pytest.mark.parametrize("loss_fn", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("method", ["naive", "vectorized"])
def test_gradcheck(backend, rng, loss_fn, method):
    W, X, y, b = _data(rng, 9, 4, 3)
    report = softgrad.gradcheck(lambda W, b: loss_fn(W, X, y, 0.05, b=b, method=method), W, b,
                                names=["W", "b"])
    assert report.passed, str(report)
    report = softgrad.gradcheck(lambda W: loss_fn(W, X, y, 0.0, method=method), W)
    assert report.passed, str(report)


@pytest.mark.parametrize("loss_fn", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_low_precision_against_float64(backend, rng, loss_fn, dtype):
    W, X, y, b = _data(rng, 16, 6, 5, dtype)
    loss, dW, db = loss_fn(W, X, y, 0.1, b=b)
    assert loss.dtype == dtype and dW.dtype == dtype and db.dtype == dtype
    ref = loss_fn(W.astype(np.float64), X.astype(np.float64), y, 0.1, b=b.astype(np.float64))
    # the result is rounded to ``dtype`` once; compare at the dtype's tolerance
    rtol, atol = {np.float32: (2e-5, 1e-6), np.float16: (5e-3, 2e-3)}[dtype]
    for got, want in zip((loss, dW, db), ref):
        np.testing.assert_allclose(np.asarray(got, dtype=np.float64), want, rtol=rtol, atol=atol)


def test_float32_stays_float32_inside(backend, rng):
    """The vectorised path computes in float32 for float32 input (it does not upcast)."""
    W, X, y, _ = _data(rng, 8, 3, 4, np.float32)
    loss, dW = softgrad.linear_softmax_loss(W, X, y, 0.0)
    naive_loss, naive_dW = softgrad.linear_softmax_loss(W, X, y, 0.0, method="naive")
    np.testing.assert_allclose(dW, naive_dW, **tolerance(np.float32))
    np.testing.assert_allclose(loss, naive_loss, **tolerance(np.float32))


# ---------------------------------------------------------------- seed 001 sanity check and edges


@pytest.mark.parametrize("method", ["naive", "vectorized"])
def test_small_weights_give_log_C(backend, rng, method):
    """Seed 001: W = 1e-4 * randn(3073, 10) makes every class ~equally likely, loss ~ -log(0.1)."""
    W = 1e-4 * rng.normal(size=(3073, 10))
    X = rng.normal(size=(40, 3073))
    y = rng.integers(0, 10, size=40)
    loss, _ = softgrad.linear_softmax_loss(W, X, y, 0.0, method=method)
    # scores are ~1e-4 * sqrt(3073) ~ 5.5e-3, so the mean loss is log 10 give or take
    # ~5.5e-3 / sqrt(40) ~ 9e-4; 5e-3 is over five standard deviations
    assert abs(float(loss) - (-np.log(0.1))) < 5e-3


def test_large_scores_are_stable(backend, rng):
    W = rng.normal(size=(4, 3)) * 1e3
    X = rng.normal(size=(5, 4)) * 10
    y = rng.integers(0, 3, size=5)
    naive = softgrad.linear_softmax_loss(W, X, y, method="naive")
    vec = softgrad.linear_softmax_loss(W, X, y)
    assert np.isfinite(naive[0]) and np.isfinite(naive[1]).all()
    np.testing.assert_allclose(vec[0], naive[0], rtol=1e-12)
    np.testing.assert_allclose(vec[1], naive[1], rtol=1e-10, atol=1e-10)


def test_svm_zero_when_margins_satisfied():
    # class 0 wins every row by more than delta: loss and gradient are 0 (plus reg)
    X = np.array([[1.0], [2.0]])
    W = np.array([[5.0, 0.0, -1.0]])
    for method in ("naive", "vectorized"):
        loss, dW = softgrad.linear_svm_loss(W, X, [0, 0], 0.0, method=method)
        assert float(loss) == 0.0
        np.testing.assert_array_equal(dW, np.zeros_like(W))


@pytest.mark.parametrize("loss_fn", LOSSES, ids=LOSS_IDS)
def test_inputs_not_modified(backend, rng, loss_fn):
    W, X, y, b = _data(rng, 6, 3, 4)
    copies = [a.copy() for a in (W, X, y, b)]
    for method in ("naive", "vectorized"):
        loss_fn(W, X, y, 0.5, b=b, method=method)
    for a, c in zip((W, X, y, b), copies):
        np.testing.assert_array_equal(a, c)


def test_accepts_lists():
    loss, dW = softgrad.linear_softmax_loss([[0.0, 0.0]], [[1.0], [2.0]], [0, 1])
    np.testing.assert_allclose(float(loss), np.log(2))
    assert dW.shape == (1, 2)


@pytest.mark.parametrize("loss_fn", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(W=np.zeros(3)), ValueError, r"^W must be a non-empty 2-D"),
    (dict(W=np.zeros((0, 3))), ValueError, r"^W must be a non-empty 2-D"),
    (dict(W=np.zeros((2, 3), dtype=int)), TypeError, r"^W must have a real floating dtype"),
    (dict(W=np.full((2, 3), np.nan)), ValueError, r"^W contains NaN"),
    (dict(X=np.zeros((4, 5))), ValueError, r"^X must have D=2 columns"),
    (dict(X=np.zeros((0, 2))), ValueError, r"^X is an empty batch"),
    (dict(X=np.zeros(2)), ValueError, r"^X must be a 2-D array"),
    (dict(X=np.array([[1.0, np.inf]] * 4)), ValueError, r"^X contains \+inf"),
    (dict(y=[0, 1, 2]), ValueError, r"^y must have shape \(4,\)"),
    (dict(y=[0, 1, 3, 0]), ValueError, r"^y contains class index 3 outside \[0, 3\)"),
    (dict(y=[0, -1, 2, 0]), ValueError, r"^y contains class index -1"),
    (dict(y=[0.0, 1.0, 2.0, 0.0]), TypeError, r"^y must be an integer array"),
    (dict(reg=-0.1), ValueError, r"^reg must be a finite float >= 0"),
    (dict(reg=np.nan), ValueError, r"^reg must be a finite float >= 0"),
    (dict(reg="0.1"), TypeError, r"^reg must be a float"),
    (dict(b=np.zeros(2)), ValueError, r"^b must have shape \(3,\)"),
    (dict(method="fast"), ValueError, r"^method must be one of"),
])
def test_bad_input_names_the_argument(loss_fn, kwargs, exc, match):
    args = dict(W=np.zeros((2, 3)), X=np.ones((4, 2)), y=[0, 1, 2, 0], reg=0.0)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        loss_fn(**args)


def test_svm_bad_delta():
    with pytest.raises(ValueError, match=r"^delta must be a finite float >= 0"):
        softgrad.linear_svm_loss(np.zeros((2, 3)), np.ones((4, 2)), [0, 1, 2, 0], delta=-1.0)


def test_overflowing_scores_raise():
    W = np.full((2, 2), 1e200)
    with pytest.raises(ValueError, match="scores X @ W overflow"):
        softgrad.linear_softmax_loss(W, np.full((1, 2), 1e200), [0])


# ---------------------------------------------------------------- the softmax layer (seed 002)


def _numerical_layer_jacobian(W, x, h=1e-6):
    """d softmax(W x) / d vec(W), one column per row-major entry of W."""
    T, N = W.shape
    cols = []
    for k in range(T * N):
        Wp, Wm = W.copy(), W.copy()
        Wp.flat[k] += h
        Wm.flat[k] -= h
        cols.append((softgrad.softmax(Wp @ x) - softgrad.softmax(Wm @ x)) / (2 * h))
    return np.stack(cols, axis=1)


@pytest.mark.parametrize("T, N", [(1, 1), (3, 4), (5, 2)])
def test_layer_jacobian_numerical(backend, rng, T, N):
    W, x = rng.normal(size=(T, N)), rng.normal(size=N)
    jac = softgrad.softmax_layer_jacobian(W, x)
    assert jac.shape == (T, T * N)
    np.testing.assert_allclose(jac, _numerical_layer_jacobian(W, x), rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(jac.sum(axis=0), 0.0, atol=1e-15)  # softmax sums to 1


def test_layer_jacobian_entries_and_chain_rule(rng):
    """Entry [t, i N + j] = S_t (delta_ti - S_i) x_j, and DP = DS @ Dg with seed 002's sparse Dg."""
    T, N = 3, 4
    W, x = rng.normal(size=(T, N)), rng.normal(size=N)
    S = np.exp(W @ x) / np.exp(W @ x).sum()
    jac = softgrad.softmax_layer_jacobian(W, x)
    for t in range(T):
        for i in range(T):
            for j in range(N):
                assert jac[t, i * N + j] == pytest.approx(S[t] * ((t == i) - S[i]) * x[j], rel=1e-12, abs=1e-15)
    DS = np.diag(S) - np.outer(S, S)
    Dg = np.zeros((T, T * N))  # row t: x in the columns of W's row t
    for t in range(T):
        Dg[t, t * N:(t + 1) * N] = x
    np.testing.assert_allclose(jac, DS @ Dg, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("T, N", [(2, 1), (4, 3), (6, 5)])
def test_layer_cross_entropy_grad(backend, rng, T, N):
    W, x = rng.normal(size=(T, N)), rng.normal(size=N)
    y = int(rng.integers(0, T))
    G = softgrad.softmax_layer_cross_entropy_grad(W, x, y)
    assert G.shape == (T, N)
    report = softgrad.gradcheck(lambda W: -softgrad.log_softmax(W @ x)[y], W,
                                grad=lambda W: softgrad.softmax_layer_cross_entropy_grad(W, x, y))
    assert report.passed, str(report)
    # seed 002: the gradient is row y of the layer Jacobian times -1/S_y
    S = softgrad.softmax(W @ x)
    np.testing.assert_allclose(G.ravel(), -softgrad.softmax_layer_jacobian(W, x)[y] / S[y],
                               rtol=1e-12, atol=1e-15)
    # ... and it is the linear softmax loss for one sample with W transposed (D = N, C = T)
    _, dW = softgrad.linear_softmax_loss(W.T, x[None, :], [y], 0.0)
    np.testing.assert_allclose(G, dW.T, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_layer_low_precision(rng, dtype):
    W, x = rng.normal(size=(4, 3)).astype(dtype), rng.normal(size=3).astype(dtype)
    W64, x64 = W.astype(np.float64), x.astype(np.float64)
    rtol, atol = {np.float32: (2e-5, 1e-6), np.float16: (5e-3, 1e-3)}[dtype]
    jac = softgrad.softmax_layer_jacobian(W, x)
    G = softgrad.softmax_layer_cross_entropy_grad(W, x, 2)
    assert jac.dtype == dtype and G.dtype == dtype
    np.testing.assert_allclose(jac.astype(np.float64), softgrad.softmax_layer_jacobian(W64, x64), rtol=rtol, atol=atol)
    np.testing.assert_allclose(G.astype(np.float64), softgrad.softmax_layer_cross_entropy_grad(W64, x64, 2),
                               rtol=rtol, atol=atol)


def test_layer_inputs_not_modified(rng):
    W, x = rng.normal(size=(3, 2)), rng.normal(size=2)
    W0, x0 = W.copy(), x.copy()
    softgrad.softmax_layer_jacobian(W, x)
    softgrad.softmax_layer_cross_entropy_grad(W, x, 1)
    np.testing.assert_array_equal(W, W0)
    np.testing.assert_array_equal(x, x0)


@pytest.mark.parametrize("args, exc, match", [
    ((np.zeros(3), np.zeros(3)), ValueError, r"^W must be a non-empty 2-D"),
    ((np.zeros((2, 3)), np.zeros(2)), ValueError, r"^x must have shape \(3,\)"),
    ((np.zeros((2, 3)), np.zeros(3, dtype=int)), TypeError, r"^x must have a real floating dtype"),
    ((np.zeros((2, 3)), np.array([0.0, np.nan, 0.0])), ValueError, r"^x contains NaN"),
])
def test_layer_bad_input(args, exc, match):
    with pytest.raises(exc, match=match):
        softgrad.softmax_layer_jacobian(*args)
    with pytest.raises(exc, match=match):
        softgrad.softmax_layer_cross_entropy_grad(*args, 0)


@pytest.mark.parametrize("y, exc, match", [
    (2, ValueError, r"^y=2 is outside \[0, 2\)"),
    (-1, ValueError, r"^y=-1 is outside"),
    (1.0, TypeError, r"^y must be an int"),
])
def test_layer_bad_label(y, exc, match):
    with pytest.raises(exc, match=match):
        softgrad.softmax_layer_cross_entropy_grad(np.zeros((2, 3)), np.zeros(3), y)


# ---------------------------------------------------------------- sparse X and sample_weight


@pytest.mark.parametrize("fmt", ["csr", "csc", "coo"])
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("loss_fn", LOSSES, ids=LOSS_IDS)
def test_sparse_X_equals_dense(backend, rng, fmt, index_dtype, loss_fn):
    import scipy.sparse as sp

    W, X, y, b = _data(rng, 40, 12, 5)
    X[rng.uniform(size=X.shape) < 0.7] = 0.0
    Xs = sp.csr_matrix(X).asformat(fmt)
    for name in ("indices", "indptr", "row", "col"):
        if hasattr(Xs, name):
            setattr(Xs, name, getattr(Xs, name).astype(index_dtype))
    for method in ("vectorized", "naive"):
        got = loss_fn(W, Xs, y, 0.1, b=b, method=method)
        want = loss_fn(W, X, y, 0.1, b=b, method=method)
        for g, w in zip(got, want):
            assert np.asarray(g).dtype == np.asarray(w).dtype
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("sparse", [False, True])
def test_sample_weight_is_a_weighted_mean(backend, rng, sparse):
    import scipy.sparse as sp

    W, X, y, b = _data(rng, 30, 6, 4)
    k = rng.integers(0, 4, size=30)
    k[0] = 3
    Xin = sp.csr_matrix(X) if sparse else X
    got = softgrad.linear_softmax_loss(W, Xin, y, 0.2, b=b, sample_weight=k)
    naive = softgrad.linear_softmax_loss(W, Xin, y, 0.2, b=b, sample_weight=k, method="naive")
    # integer weights are repeated rows
    repeated = softgrad.linear_softmax_loss(W, np.repeat(X, k, axis=0), np.repeat(y, k), 0.2, b=b)
    for g, n, r in zip(got, naive, repeated):
        np.testing.assert_allclose(g, n, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-12)
    # constant weights are the plain mean
    plain = softgrad.linear_softmax_loss(W, Xin, y, 0.2, b=b)
    for g, p in zip(softgrad.linear_softmax_loss(W, Xin, y, 0.2, b=b, sample_weight=np.full(30, 2.5)), plain):
        np.testing.assert_allclose(g, p, rtol=1e-12, atol=1e-14)


def test_sparse_float32_stays_float32(backend, rng):
    import scipy.sparse as sp

    W, X, y, b = _data(rng, 20, 5, 3, np.float32)
    loss, dW, db = softgrad.linear_softmax_loss(W, sp.csr_matrix(X), y, 0.1, b=b)
    assert loss.dtype == dW.dtype == db.dtype == np.float32
    ref = softgrad.linear_softmax_loss(W.astype(np.float64), X.astype(np.float64), y, 0.1, b=b.astype(np.float64))
    for g, r in zip((loss, dW, db), ref):
        np.testing.assert_allclose(g, r, **tolerance(np.float32))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(sample_weight=np.ones(3)), ValueError, r"^sample_weight must have shape \(8,\)"),
    (dict(sample_weight=-np.ones(8)), ValueError, "^sample_weight contains negative"),
    (dict(sample_weight=np.zeros(8)), ValueError, "^sample_weight sums to zero"),
    (dict(sample_weight=np.array([np.nan] * 8)), ValueError, "^sample_weight contains NaN"),
    (dict(sample_weight=np.array(["a"] * 8)), TypeError, "^sample_weight must be an array of real numbers"),
])
def test_bad_sample_weight_raises(rng, kwargs, error, match):
    W, X, y, _ = _data(rng, 8, 3, 2)
    with pytest.raises(error, match=match):
        softgrad.linear_softmax_loss(W, X, y, **kwargs)


def test_bad_sparse_X_raises(rng):
    import scipy.sparse as sp

    W, X, y, _ = _data(rng, 8, 3, 2)
    bad = sp.csr_matrix(X)
    bad.data[0] = np.inf
    with pytest.raises(ValueError, match="^X contains NaN or infinity"):
        softgrad.linear_softmax_loss(W, bad, y)
    with pytest.raises(TypeError, match="^X must have a real floating dtype"):
        softgrad.linear_softmax_loss(W, sp.csr_matrix(np.ones((8, 3), dtype=np.int64)), y)
    with pytest.raises(ValueError, match="^X must have D=3 columns"):
        softgrad.linear_softmax_loss(W, sp.csr_matrix(np.ones((8, 4))), y)
