"""softgrad.LogisticRegression as a drop-in for scikit-learn's: parity of objective and weights,
fitted shapes, options, and the applicable cases of scikit-learn's ``test_logistic.py``
(rewritten here; the glmnet values are the published reference numbers those tests use).

scikit-learn's estimator checks run on it in ``test_classifier_estimator_checks.py``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn import linear_model
from sklearn.base import clone
from sklearn.datasets import load_breast_cancer, load_iris, make_classification
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import log_loss
from sklearn.multiclass import OneVsRestClassifier
from sklearn.preprocessing import StandardScaler
from sklearn.utils.class_weight import compute_class_weight

from softgrad import LogisticRegression
from softgrad._linear_model import objective_reference

IRIS_X, IRIS_Y = load_iris(return_X_y=True)
IRIS_XS = StandardScaler().fit_transform(IRIS_X)
TINY_X = np.array([[-1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
TINY_Y2 = np.array([0, 1, 1])
TINY_Y3 = np.array([2, 1, 0])


def _sklearn_objective(coef, intercept, X, y, classes, C, sample_weight=None):
    """scikit-learn 1.9's lbfgs objective (mean loss + ||W||^2 / (2 C S)), at any weights, in float64."""
    target = np.searchsorted(classes, y)
    s = np.ones(X.shape[0]) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    alpha = 0.0 if np.isinf(C) else 1.0 / (C * s.sum())
    binary = classes.shape[0] == 2
    J, _, _ = objective_reference(np.asarray(coef, dtype=np.float64), np.asarray(intercept, dtype=np.float64),
                                  X, target, s, alpha, binary=binary)
    return J


def _problems():
    bc_X, bc_y = load_breast_cancer(return_X_y=True)
    syn_X, syn_y = make_classification(n_samples=300, n_features=15, n_informative=8, n_classes=4,
                                       n_clusters_per_class=1, random_state=7)
    return {
        "iris_multinomial": (IRIS_XS, IRIS_Y),
        "iris_binary": (IRIS_XS, (IRIS_Y == 1).astype(int)),
        "breast_cancer_binary": (StandardScaler().fit_transform(bc_X), bc_y),
        "synthetic_4class": (syn_X, syn_y),
    }


PROBLEMS = _problems()


# ------------------------------------------------------------------ parity with scikit-learn


@pytest.mark.parametrize("name", sorted(PROBLEMS))
@pytest.mark.parametrize("C", [0.05, 1.0, 30.0])
@pytest.mark.parametrize("fit_intercept", [True, False])
def test_same_objective_and_weights_as_sklearn(name, C, fit_intercept):
    X, y = PROBLEMS[name]
    params = dict(C=C, fit_intercept=fit_intercept, tol=1e-10, max_iter=5000)
    theirs = linear_model.LogisticRegression(**params).fit(X, y)
    ours = LogisticRegression(**params).fit(X, y)
    assert ours.coef_.shape == theirs.coef_.shape
    assert ours.intercept_.shape == theirs.intercept_.shape
    assert ours.n_iter_.shape == (1,) and ours.n_iter_.dtype == theirs.n_iter_.dtype
    J_theirs = _sklearn_objective(theirs.coef_, theirs.intercept_, X, y, theirs.classes_, C)
    J_ours = _sklearn_objective(ours.coef_, ours.intercept_, X, y, ours.classes_, C)
    np.testing.assert_allclose(ours.objective_, J_ours, rtol=1e-12)
    np.testing.assert_allclose(J_ours, J_theirs, rtol=1e-10)
    # weakly penalised correlated features (breast cancer at C=30) leave a flat valley: the
    # objectives agree to 1e-10 while the weights agree to ~1e-4 of their size
    scale = 1e-4 * max(1.0, float(np.abs(theirs.coef_).max()))
    np.testing.assert_allclose(ours.coef_, theirs.coef_, rtol=1e-4, atol=scale)
    np.testing.assert_allclose(ours.intercept_, theirs.intercept_, rtol=1e-4, atol=scale)
    np.testing.assert_allclose(ours.predict_proba(X), theirs.predict_proba(X), atol=1e-5)
    np.testing.assert_allclose(ours.decision_function(X), theirs.decision_function(X), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(ours.predict(X), theirs.predict(X))


@pytest.mark.parametrize("name", ["iris_multinomial", "breast_cancer_binary"])
@pytest.mark.parametrize("class_weight", [None, "balanced", "dict"])
def test_weighted_fits_match_sklearn(rng, name, class_weight):
    """sample_weight times class_weight (incl. 'balanced' counted by summed sample weight)."""
    X, y = PROBLEMS[name]
    sw = rng.uniform(0.1, 3.0, size=y.shape[0])
    if class_weight == "dict":
        class_weight = {c: float(w) for c, w in zip(np.unique(y), rng.uniform(0.5, 2.0, size=np.unique(y).shape[0]))}
    params = dict(C=0.7, tol=1e-10, max_iter=5000, class_weight=class_weight)
    theirs = linear_model.LogisticRegression(**params).fit(X, y, sample_weight=sw)
    ours = LogisticRegression(**params).fit(X, y, sample_weight=sw)
    np.testing.assert_allclose(ours.coef_, theirs.coef_, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.intercept_, theirs.intercept_, rtol=1e-5, atol=1e-6)


def test_balanced_weights_count_summed_sample_weight(rng):
    """Our 'balanced' rule equals scikit-learn 1.9's compute_class_weight with sample_weight."""
    from softgrad._classifier import _class_weights

    y = rng.integers(0, 4, size=200)
    sw = rng.uniform(0.0, 5.0, size=200)
    classes = np.unique(y)
    ours = _class_weights("balanced", classes, np.searchsorted(classes, y), sw)
    np.testing.assert_allclose(ours, compute_class_weight("balanced", classes=classes, y=y, sample_weight=sw),
                               rtol=1e-12)
    # unweighted counts would give a different answer on these weights
    assert not np.allclose(ours, compute_class_weight("balanced", classes=classes, y=y))


def test_sparse_tfidf_like_problem_matches_sklearn(rng):
    """A sparse non-negative, row-normalised (TF-IDF-like) matrix, 5 classes, CSR in both."""
    N, D, C = 600, 2000, 5
    X = sp.random(N, D, density=0.01, format="csr", random_state=np.random.RandomState(3),
                  data_rvs=lambda n: np.random.RandomState(4).exponential(size=n))
    y = rng.integers(0, C, size=N)
    # class-specific vocabulary so that the classes are learnable
    extra = sp.csr_matrix((np.full(N, 2.0), (np.arange(N), y * 7 + rng.integers(0, 7, size=N))), shape=(N, D))
    X = (X + extra).tocsr()
    norms = np.sqrt(np.asarray(X.multiply(X).sum(axis=1)).ravel())
    X = sp.diags(1.0 / norms) @ X
    X = X.tocsr()
    params = dict(C=10.0, tol=1e-10, max_iter=5000)
    theirs = linear_model.LogisticRegression(**params).fit(X, y)
    ours = LogisticRegression(**params).fit(X, y)
    J_theirs = _sklearn_objective(theirs.coef_, theirs.intercept_, X, y, theirs.classes_, 10.0)
    J_ours = _sklearn_objective(ours.coef_, ours.intercept_, X, y, ours.classes_, 10.0)
    np.testing.assert_allclose(J_ours, J_theirs, rtol=1e-10)
    np.testing.assert_allclose(ours.coef_, theirs.coef_, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ours.predict_proba(X), theirs.predict_proba(X), atol=1e-6)
    # and the dense fit of the same matrix is the same model
    dense = LogisticRegression(**params).fit(X.toarray(), y)
    np.testing.assert_allclose(dense.objective_, ours.objective_, rtol=1e-12)
    np.testing.assert_allclose(dense.coef_, ours.coef_, rtol=1e-7, atol=1e-9)


# ------------------------------------------------------------------ upstream cases, in our words


def _fits_exactly(clf, X, y):
    classes = np.unique(y)
    pred = clf.fit(X, y).predict(X)
    np.testing.assert_array_equal(clf.classes_, classes)
    np.testing.assert_array_equal(pred, y)
    proba = clf.predict_proba(X)
    assert proba.shape == (len(y), classes.shape[0])
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    np.testing.assert_array_equal(proba.argmax(axis=1), np.searchsorted(classes, y))


@pytest.mark.parametrize("to_sparse", [np.asarray, sp.csr_matrix, sp.csr_array])
def test_predicts_tiny_problems(to_sparse):
    for clf in (LogisticRegression(), LogisticRegression(C=100), LogisticRegression(fit_intercept=False)):
        _fits_exactly(clf, to_sparse(TINY_X), TINY_Y2)
    _fits_exactly(LogisticRegression(C=10), to_sparse(TINY_X), TINY_Y3)


def test_glmnet_reference_values():
    """glmnet (alpha=0, lambda=1, unstandardised) on a 9-row problem: lambda = 1 / (C n)."""
    X = np.array([[-4, -3, -2, -1, 0, 1, 2, 3, 4], [0, 0, 1, 0, 1, 1, 1, 0, 0]], dtype=float).T
    y = np.array([0, 0, 0, 1, 1, 1, 1, 1, 1])
    clf = LogisticRegression(C=1.0 / y.shape[0], tol=1e-8, max_iter=300).fit(X, y)
    np.testing.assert_allclose(clf.intercept_, [0.89230405539], rtol=1e-5)
    np.testing.assert_allclose(clf.coef_, [[0.44464569182, 0.01457563448]], rtol=1e-5)
    clf.fit(X, np.array([0, 0, 0, 1, 1, 1, 2, 2, 2]))
    np.testing.assert_allclose(clf.intercept_, [-0.12004759652, 0.2251747383, -0.1051271418], rtol=1e-5)
    np.testing.assert_allclose(clf.coef_, [[-0.38023389305, -0.01226499932], [-8.164030176e-05, 4.734548012e-02],
                                           [0.3803155334, -0.0350804808]], rtol=1e-5, atol=1e-8)


def test_inconsistent_input_and_nan():
    X = np.random.default_rng(0).random((5, 10))
    y = np.ones(5)
    y[0] = 0
    with pytest.raises(ValueError, match="inconsistent number"):
        LogisticRegression().fit(X, y[:-1])
    with pytest.raises(ValueError, match="X has 12 features"):
        LogisticRegression().fit(X, y).predict(np.zeros((3, 12)))
    X_nan = TINY_X.copy()
    X_nan[0, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        LogisticRegression().fit(X_nan, TINY_Y2)


def test_fitted_weights_are_writable():
    clf = LogisticRegression().fit(TINY_X, TINY_Y2)
    clf.coef_[:] = 0
    clf.intercept_[:] = 0
    np.testing.assert_allclose(clf.decision_function(TINY_X), 0.0)


def test_our_solvers_reach_the_lbfgs_solution():
    X, y = make_classification(n_samples=200, n_features=10, n_informative=5, random_state=0)
    params = dict(C=0.1, fit_intercept=False)
    ref = LogisticRegression(tol=1e-10, max_iter=1000, **params).fit(X, y)
    gd = LogisticRegression(solver="gd", tol=1e-6, max_iter=20000, **params).fit(X, y)
    np.testing.assert_allclose(gd.coef_, ref.coef_, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gd.objective_, ref.objective_, rtol=1e-8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        sgd = LogisticRegression(solver="sgd", random_state=0, max_iter=200, **params).fit(X, y)
    assert sgd.objective_ < ref.objective_ * 1.02


def test_unpenalised_multinomial_sums_to_zero_over_classes():
    """With C = inf the symmetric solution (sum over classes of coef_ = 0) is the one found from zeros."""
    X, y = PROBLEMS["synthetic_4class"]
    rng = np.random.default_rng(5)
    y = rng.permutation(y)  # not separable: the unpenalised optimum exists
    clf = LogisticRegression(C=np.inf, tol=1e-9, max_iter=2000).fit(X, y)
    np.testing.assert_allclose(clf.coef_.sum(axis=0), 0.0, atol=1e-10)
    theirs = linear_model.LogisticRegression(C=np.inf, tol=1e-9, max_iter=2000).fit(X, y)
    np.testing.assert_allclose(clf.coef_, theirs.coef_, rtol=2e-3, atol=1e-5)


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_penalised_multinomial_is_identifiable(fit_intercept):
    clf = LogisticRegression(C=len(IRIS_XS), fit_intercept=fit_intercept).fit(IRIS_XS, load_iris().target_names[IRIS_Y])
    np.testing.assert_allclose(clf.coef_.sum(axis=0), 0.0, atol=1e-10)
    if fit_intercept:
        assert abs(clf.intercept_.sum()) < 1e-11


def test_penalty_none_is_c_inf_and_warns_about_c():
    X, y = make_classification(n_samples=1000, n_redundant=0, random_state=0)
    with pytest.warns(UserWarning, match="penalty=None will ignore the C"):
        LogisticRegression(penalty=None, C=4).fit(X, y)
    a = LogisticRegression(penalty=None, max_iter=300).fit(X, y)
    b = LogisticRegression(C=np.inf, max_iter=300).fit(X, y)
    np.testing.assert_array_equal(a.predict(X), b.predict(X))
    np.testing.assert_allclose(a.coef_, b.coef_)


def test_c_inf_raises_no_other_warning():
    X, y = make_classification(n_samples=100, n_redundant=0, random_state=42)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=ConvergenceWarning)
        LogisticRegression(C=np.inf).fit(X, y)


def test_softmax_probabilities_beat_one_vs_rest():
    X, y = make_classification(n_samples=10, n_features=20, n_classes=3, n_informative=10, random_state=0)
    multi = LogisticRegression().fit(X, y)
    ovr = OneVsRestClassifier(LogisticRegression()).fit(X, y)
    assert log_loss(y, ovr.predict_proba(X)) > log_loss(y, multi.predict_proba(X))


@pytest.mark.parametrize("max_iter", [1, 2, 3, 4])
def test_max_iter_reached_warns_and_counts(max_iter):
    y = IRIS_Y.copy()
    y[y == 2] = 0
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        clf = LogisticRegression(max_iter=max_iter, tol=1e-15).fit(IRIS_X, y)
    assert clf.n_iter_[0] == max_iter


def test_n_iter_shape():
    y = IRIS_Y.copy()
    y[y == 2] = 0
    for target in (y, IRIS_Y):
        clf = LogisticRegression(tol=1e-2).fit(IRIS_XS, target)
        assert clf.n_iter_.shape == (1,) and clf.n_iter_.dtype == np.int32


def test_zero_max_iter_returns_the_starting_model():
    y = IRIS_Y == 2
    with pytest.warns(ConvergenceWarning):
        clf = LogisticRegression(max_iter=0).fit(IRIS_X, y)
    assert clf.n_iter_[0] == 0
    np.testing.assert_array_equal(clf.coef_, 0.0)
    np.testing.assert_allclose(clf.predict_proba(IRIS_X), 0.5)
    assert clf.score(IRIS_X, y) < 0.7


@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("warm_start", [True, False])
def test_warm_start(warm_start, fit_intercept):
    clf = LogisticRegression(tol=1e-4, warm_start=warm_start, fit_intercept=fit_intercept)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(IRIS_X, IRIS_Y)
        first = clf.coef_.copy()
        clf.max_iter = 1
        clf.fit(IRIS_X, IRIS_Y)
    moved = np.abs(first - clf.coef_).sum()
    assert (moved < 2.0) if warm_start else (moved > 2.0)


def test_warm_start_converged_fit_does_not_move():
    X = np.concatenate([np.random.default_rng(0).normal(size=(100, 2)) + 1, np.random.default_rng(1).normal(size=(100, 2))])
    y = np.array([1] * 100 + [-1] * 100)
    cold = LogisticRegression(tol=1e-8).fit(X, y)
    warm = LogisticRegression(tol=1e-8, warm_start=True)
    for _ in range(3):
        warm.fit(X, y)
    np.testing.assert_allclose(log_loss(y, warm.predict_proba(X)), log_loss(y, cold.predict_proba(X)), rtol=1e-7)


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_float32_in_float32_out(fit_intercept):
    y = TINY_Y2.astype(np.float32)
    template = LogisticRegression(tol=5e-4, fit_intercept=fit_intercept)
    fits = {}
    for name, X in {"dense32": TINY_X.astype(np.float32), "sparse32": sp.csr_matrix(TINY_X, dtype=np.float32),
                    "dense64": TINY_X, "sparse64": sp.csr_matrix(TINY_X)}.items():
        fits[name] = clone(template).fit(X, y)
        want = np.float32 if name.endswith("32") else np.float64
        assert fits[name].coef_.dtype == fits[name].intercept_.dtype == want
        assert fits[name].predict_proba(X).dtype == want
    atol = 2 * 1.72 * 5e-4  # |dw| <~ |H^-1| tol, as scikit-learn's bound for this problem
    np.testing.assert_allclose(fits["dense32"].coef_, fits["dense64"].coef_, atol=atol)
    np.testing.assert_allclose(fits["dense32"].coef_, fits["sparse32"].coef_, atol=atol)
    np.testing.assert_allclose(fits["dense64"].coef_, fits["sparse64"].coef_, atol=atol)


@pytest.mark.parametrize("to_sparse", [sp.csr_matrix, sp.csr_array, sp.csc_matrix])
def test_int64_sparse_indices(to_sparse):
    X = to_sparse(sp.random(20, 10, density=0.3, random_state=42))
    X.indices = X.indices.astype(np.int64)
    X.indptr = X.indptr.astype(np.int64)
    y = np.random.default_rng(42).integers(0, 2, size=20)
    ours = LogisticRegression(tol=1e-10).fit(X, y)
    dense = LogisticRegression(tol=1e-10).fit(X.toarray(), y)
    np.testing.assert_allclose(ours.coef_, dense.coef_, rtol=1e-8, atol=1e-10)


def test_weights_equal_repeated_rows_and_class_weights_equal_sample_weights():
    X, y = make_classification(n_samples=600, n_features=5, n_informative=3, n_redundant=0, random_state=0)
    sw = np.ones(600)
    sw[:200] = np.random.default_rng(0).integers(0, 5, size=200)
    kw = dict(fit_intercept=False, tol=1e-8, max_iter=1000)
    weighted = LogisticRegression(**kw).fit(X, y, sample_weight=sw)
    repeated = LogisticRegression(**kw).fit(np.repeat(X, sw.astype(int), axis=0), np.repeat(y, sw.astype(int)))
    np.testing.assert_allclose(weighted.coef_, repeated.coef_, atol=1e-5)
    by_class = LogisticRegression(class_weight={0: 1, 1: 2}, **kw).fit(X, y)
    by_sample = LogisticRegression(**kw).fit(X, y, sample_weight=y + 1)
    np.testing.assert_allclose(by_class.coef_, by_sample.coef_, atol=1e-6)


@pytest.mark.parametrize("to_sparse", [np.asarray, sp.csr_matrix])
def test_balanced_equals_its_dictionary(to_sparse):
    X, y = to_sparse(IRIS_XS[45:]), IRIS_Y[45:]
    classes = np.unique(y)
    cw = dict(zip(classes, compute_class_weight("balanced", classes=classes, y=y)))
    a = LogisticRegression(class_weight="balanced", max_iter=2000).fit(X, y)
    b = LogisticRegression(class_weight=cw, max_iter=2000).fit(X, y)
    np.testing.assert_allclose(a.coef_, b.coef_, rtol=1e-4)
    sw = np.array([cw[c] for c in y])
    c = LogisticRegression(max_iter=2000).fit(X, y, sample_weight=sw)
    np.testing.assert_allclose(c.coef_, b.coef_, rtol=1e-4)


@pytest.mark.parametrize("class_weight", [{0: 1.0, 1: 10.0, 2: 1.0}, "balanced"])
def test_caller_sample_weight_not_modified(class_weight):
    W = np.ones(len(IRIS_X))
    W[:75] = 2
    expected = W.copy()
    LogisticRegression(class_weight=class_weight, max_iter=200).fit(IRIS_XS, IRIS_Y, sample_weight=W)
    np.testing.assert_array_equal(W, expected)


# ------------------------------------------------------------------ unsupported options


@pytest.mark.parametrize("params, match", [
    (dict(penalty="l1"), "penalty='l1' is not implemented.*saga"),
    (dict(penalty="elasticnet", l1_ratio=0.5), "penalty='elasticnet' is not implemented"),
    (dict(l1_ratio=1.0), "l1_ratio=1.0 asks for an L1"),
    (dict(l1_ratio=0.3), "l1_ratio=0.3 asks for an L1"),
    (dict(dual=True), "dual=True.*use dual=False"),
    (dict(intercept_scaling=2.0), "intercept_scaling=2.0.*leave intercept_scaling=1"),
    (dict(solver="liblinear"), "solver='liblinear' is not implemented.*lbfgs"),
    (dict(solver="saga"), "solver='saga' is not implemented.*lbfgs"),
    (dict(solver="newton-cg"), "solver='newton-cg'.*same objective.*solver='lbfgs'"),
    (dict(solver="newton-cholesky"), "solver='newton-cholesky'.*same objective"),
    (dict(solver="sag"), "solver='sag'.*same objective"),
    (dict(class_weight={0: -1.0, 1: 1.0}), "class_weight of class 0 is -1.0"),
    (dict(C=0.0), "C"),
])
def test_unsupported_options_raise_and_say_what_to_use(params, match):
    with pytest.raises(ValueError, match=match):
        LogisticRegression(**params).fit(TINY_X, TINY_Y2)


def test_accepted_compatibility_options():
    """n_jobs and random_state are accepted (no effect on lbfgs); l1_ratio=None is L2."""
    base = LogisticRegression().fit(IRIS_XS, IRIS_Y)
    other = LogisticRegression(n_jobs=2, random_state=3, l1_ratio=None).fit(IRIS_XS, IRIS_Y)
    np.testing.assert_array_equal(base.coef_, other.coef_)
