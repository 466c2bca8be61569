"""SoftmaxClassifier on sparse X (CSR/CSC/COO, int32/int64 indices) and float32 X end to end.

Each sparse fit is compared with the dense fit of the same matrix: the same solver on the
same numbers, so the objective and the weights must agree to 1e-8.
"""

from __future__ import annotations

import tracemalloc
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.exceptions import ConvergenceWarning

from softgrad import SoftmaxClassifier
from softgrad._linear_model import objective_reference

FORMATS = ["csr_matrix", "csc_matrix", "coo_matrix", "csr_array", "csc_array"]


def _sparse_problem(rng, N=300, D=80, C=4, density=0.08):
    X = sp.random(N, D, density=density, format="csr", random_state=np.random.RandomState(rng.integers(1 << 31)),
                  data_rvs=lambda n: rng.normal(size=n))
    W = rng.normal(size=(C, D))
    y = np.argmax(X @ W.T + rng.gumbel(size=(N, C)), axis=1)
    return X, y


def _as(fmt, X, index_dtype=np.int32):
    X = getattr(sp, fmt)(X)
    if hasattr(X, "indices"):
        X.indices = X.indices.astype(index_dtype)
        X.indptr = X.indptr.astype(index_dtype)
    else:  # COO
        X.row = X.row.astype(index_dtype)
        X.col = X.col.astype(index_dtype)
    return X


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("solver", ["lbfgs", "gd", "sgd"])
def test_sparse_fit_equals_dense_fit(rng, fmt, index_dtype, solver):
    X, y = _sparse_problem(rng)
    sw = rng.uniform(0.2, 2.0, size=y.shape[0])
    params = dict(alpha=1e-2, solver=solver, tol=1e-8, max_iter=300, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # gd/sgd: same iterations either way
        dense = SoftmaxClassifier(**params).fit(X.toarray(), y, sample_weight=sw)
        sparse = SoftmaxClassifier(**params).fit(_as(fmt, X, index_dtype), y, sample_weight=sw)
    np.testing.assert_allclose(sparse.objective_, dense.objective_, rtol=1e-10)
    np.testing.assert_allclose(sparse.coef_, dense.coef_, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(sparse.intercept_, dense.intercept_, rtol=1e-8, atol=1e-8)
    assert sparse.n_iter_ == dense.n_iter_


@pytest.mark.parametrize("fmt", FORMATS)
def test_sparse_predictions_equal_dense(rng, fmt):
    X, y = _sparse_problem(rng)
    clf = SoftmaxClassifier(alpha=1e-2).fit(X, y)
    Xs, Xd = _as(fmt, X), X.toarray()
    np.testing.assert_allclose(clf.decision_function(Xs), clf.decision_function(Xd), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(clf.predict_proba(Xs), clf.predict_proba(Xd), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(clf.predict_log_proba(Xs), clf.predict_log_proba(Xd), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(clf.predict(Xs), clf.predict(Xd))
    assert clf.score(Xs, y) == clf.score(Xd, y)


def test_sparse_fit_meets_the_float64_gradient_tolerance(rng):
    X, y = _sparse_problem(rng, N=500, D=120, C=5)
    tol = 1e-7
    clf = SoftmaxClassifier(alpha=1e-3, tol=tol, max_iter=2000).fit(X, y)
    _, gW, gb = objective_reference(clf.coef_, clf.intercept_, X, y, None, 1e-3)
    assert max(np.abs(gW).max(), np.abs(gb).max()) <= tol


def test_sparse_warm_start_continues(rng):
    X, y = _sparse_problem(rng)
    clf = SoftmaxClassifier(alpha=1e-2, warm_start=True, tol=1e-6).fit(X, y)
    first = clf.n_iter_
    clf.fit(X.tocsc(), y)
    assert clf.n_iter_ <= 1 < first


def test_sparse_binary_softmax(rng):
    X, y = _sparse_problem(rng, C=2)
    dense = SoftmaxClassifier(alpha=1e-2, tol=1e-9).fit(X.toarray(), y)
    sparse = SoftmaxClassifier(alpha=1e-2, tol=1e-9).fit(X, y)
    np.testing.assert_allclose(sparse.coef_, dense.coef_, rtol=1e-8, atol=1e-10)
    assert sparse.decision_function(X).shape == (X.shape[0],)


def test_sparse_input_not_modified(rng):
    X, y = _sparse_problem(rng)
    X = X.astype(np.float32)
    copies = X.data.copy(), X.indices.copy(), X.indptr.copy()
    SoftmaxClassifier(precision="mixed").fit(X, y)
    for before, after in zip(copies, (X.data, X.indices, X.indptr)):
        np.testing.assert_array_equal(before, after)


# ------------------------------------------------------------------ float32 end to end


@pytest.mark.parametrize("precision", ["float64", "mixed"])
@pytest.mark.parametrize("sparse", [False, True])
def test_float32_fit_is_the_float64_optimum(rng, precision, sparse):
    """float32 X: the result is certified by the float64 gradient on the same values, float32 out."""
    X, y = _sparse_problem(rng, N=400, D=60, C=3, density=0.3)
    X32 = X.astype(np.float32)
    X32 = X32 if sparse else X32.toarray()
    tol = 1e-6
    clf = SoftmaxClassifier(alpha=1e-3, tol=tol, precision=precision, max_iter=2000).fit(X32, y)
    assert clf.coef_.dtype == clf.intercept_.dtype == np.float32
    assert clf.predict_proba(X32).dtype == np.float32
    # the float64 solve on the float32 values
    ref = SoftmaxClassifier(alpha=1e-3, tol=1e-10, precision="float64", max_iter=2000).fit(
        X32.astype(np.float64), y)
    np.testing.assert_allclose(clf.objective_, ref.objective_, rtol=1e-8)
    np.testing.assert_allclose(clf.coef_, ref.coef_, rtol=1e-3, atol=1e-4)


def test_float32_fit_makes_no_float64_copy_of_X(rng):
    """Peak memory of a float32 fit stays under half of what a float64 copy of X would take."""
    N, D, C = 8000, 500, 4  # X: 16 MB in float32; a float64 copy would be 32 MB
    X = rng.normal(size=(N, D)).astype(np.float32)
    y = rng.integers(0, C, size=N)
    # a first fit compiles and imports (allocations that are not the fit's own)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        SoftmaxClassifier(max_iter=2).fit(X[:50], y[:50])
    for precision in ("float64", "mixed"):
        clf = SoftmaxClassifier(alpha=1e-2, max_iter=5, precision=precision)
        tracemalloc.start()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf.fit(X, y)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 0.5 * N * D * 8, (precision, peak)
        assert clf.coef_.dtype == np.float32
