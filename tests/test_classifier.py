"""SoftmaxClassifier: parity with scikit-learn's LogisticRegression, solvers, labels, weights, save/load.

scikit-learn's own estimator checks are in ``test_classifier_estimator_checks.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.datasets import load_digits, load_iris, load_wine, make_classification
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import softgrad
from softgrad import SoftmaxClassifier
from softgrad._linear_model import objective_reference

# Several tests fit iris unscaled with few iterations on purpose (the behaviour under test is
# not convergence); tests about convergence use pytest.warns, which sees warnings regardless.
pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


def _standardised(X):
    return (X - X.mean(0)) / np.where(X.std(0) > 0, X.std(0), 1.0)


def _datasets():
    X_iris, y_iris = load_iris(return_X_y=True)
    X_wine, y_wine = load_wine(return_X_y=True)
    X_dig, y_dig = load_digits(return_X_y=True)
    X_syn, y_syn = make_classification(n_samples=400, n_features=12, n_informative=6, n_classes=5,
                                       n_clusters_per_class=1, random_state=3)
    return {
        "iris": (X_iris, y_iris),
        "wine_standardised": (_standardised(X_wine), y_wine),
        "digits_600": (_standardised(X_dig[:600]), y_dig[:600]),
        "synthetic_5class": (X_syn, y_syn),
    }


DATASETS = _datasets()
# standardised iris: converges in a few dozen iterations, for tests not about parity
IRIS = (_standardised(DATASETS["iris"][0]), DATASETS["iris"][1])


def _sk_objective(lr, X, y_index, s, alpha, binary=False):
    """Our J at scikit-learn's solution (binary: the symmetric softmax parametrisation)."""
    if binary:
        W = np.vstack([-lr.coef_[0] / 2, lr.coef_[0] / 2])
        b = np.array([-lr.intercept_[0] / 2, lr.intercept_[0] / 2])
    else:
        W, b = lr.coef_, lr.intercept_
    return objective_reference(W, b, X, y_index, s, alpha)[0]


@pytest.mark.parametrize("name", sorted(DATASETS))
@pytest.mark.parametrize("weighted", [False, True])
def test_objective_parity_with_logistic_regression(rng, name, weighted):
    """At alpha = 1 / (C * sum(s)) both reach the same minimum to 1e-6 relative."""
    X, y = DATASETS[name]
    s = rng.uniform(0.5, 2.0, size=y.shape[0]) if weighted else None
    alpha = 1e-2
    C = 1.0 / (alpha * (y.shape[0] if s is None else s.sum()))
    ours = SoftmaxClassifier(alpha=alpha, tol=1e-9, max_iter=5000).fit(X, y, sample_weight=s)
    lr = LogisticRegression(C=C, tol=1e-9, max_iter=5000).fit(X, y, sample_weight=s)
    J_sk = _sk_objective(lr, X, np.searchsorted(lr.classes_, y), s, alpha)
    np.testing.assert_allclose(ours.objective_, J_sk, rtol=1e-6)
    # the reported objective is J at the returned weights
    J_ours = objective_reference(ours.coef_, ours.intercept_, X, np.searchsorted(ours.classes_, y), s, alpha)[0]
    np.testing.assert_allclose(ours.objective_, J_ours, rtol=1e-12)
    np.testing.assert_allclose(ours.predict_proba(X), lr.predict_proba(X), atol=1e-3)


def test_binary_parity_uses_twice_c(rng):
    X, y = make_classification(n_samples=300, n_features=8, random_state=1)
    alpha = 1e-2
    ours = SoftmaxClassifier(alpha=alpha, tol=1e-9, max_iter=5000).fit(X, y)
    lr = LogisticRegression(C=2.0 / (alpha * y.shape[0]), tol=1e-9, max_iter=5000).fit(X, y)
    np.testing.assert_allclose(ours.objective_, _sk_objective(lr, X, y, None, alpha, binary=True), rtol=1e-6)
    np.testing.assert_allclose(ours.coef_[1] - ours.coef_[0], lr.coef_[0], rtol=1e-4, atol=1e-5)
    # binary decision_function is the log-odds of classes_[1], 1-D, as in scikit-learn
    d = ours.decision_function(X)
    assert d.shape == (300,)
    np.testing.assert_allclose(d, lr.decision_function(X), rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("solver, kwargs, rtol", [
    ("gd", {"max_iter": 800}, 1e-4),
    ("sgd", {"max_iter": 300, "batch_size": 32, "random_state": 0}, 5e-3),
    ("sgd", {"max_iter": 300, "schedule": "invscaling", "batch_size": 32, "random_state": 0}, 2e-2),
    ("sgd", {"max_iter": 300, "schedule": "adaptive", "batch_size": 32, "random_state": 0}, 5e-3),
])
def test_other_solvers_reach_the_lbfgs_minimum(solver, kwargs, rtol):
    X, y = DATASETS["iris"][0], DATASETS["iris"][1]
    X = _standardised(X)
    ref = SoftmaxClassifier(alpha=1e-2, tol=1e-10, max_iter=1000).fit(X, y)
    clf = SoftmaxClassifier(alpha=1e-2, solver=solver, tol=1e-6, **kwargs).fit(X, y)
    np.testing.assert_allclose(clf.objective_, ref.objective_, rtol=rtol)
    assert clf.loss_curve_.shape == (clf.n_iter_,)


def test_gd_is_the_seed_loop_with_fixed_step(rng):
    """Full-batch GD with step 1/L decreases the objective every iteration (a descent method)."""
    X, y = DATASETS["wine_standardised"]
    clf = SoftmaxClassifier(alpha=1e-3, solver="gd", max_iter=50, tol=0.0)
    with pytest.warns(ConvergenceWarning):
        clf.fit(X, y)
    assert clf.n_iter_ == 50
    assert np.all(np.diff(clf.loss_curve_) <= 1e-15)
    assert clf.loss_curve_[0] < np.log(3)  # started from W = 0, where J = log C


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_fixed_learning_rate_and_too_large_step(rng):
    X, y = DATASETS["iris"]
    X = _standardised(X)
    good = SoftmaxClassifier(solver="gd", learning_rate=0.5, max_iter=300, tol=1e-5).fit(X, y)
    assert good.score(X, y) > 0.95
    with pytest.warns(ConvergenceWarning):
        bad = SoftmaxClassifier(solver="gd", learning_rate=1e3, max_iter=30, tol=1e-5).fit(X, y)
    assert np.isfinite(bad.coef_).all()  # the stable kernels never produce NaN


def test_mixed_precision_certifies_in_float64(rng):
    X, y = make_classification(n_samples=600, n_features=10, n_informative=6, n_classes=4,
                               n_clusters_per_class=1, random_state=0)
    tol = 1e-6
    mixed = SoftmaxClassifier(alpha=1e-3, tol=tol, precision="mixed", max_iter=2000).fit(X, y)
    exact = SoftmaxClassifier(alpha=1e-3, tol=tol, precision="float64", max_iter=2000).fit(X, y)
    np.testing.assert_allclose(mixed.objective_, exact.objective_, rtol=1e-8)
    _, gW, gb = objective_reference(mixed.coef_, mixed.intercept_, X, y, None, 1e-3)
    assert max(np.abs(gW).max(), np.abs(gb).max()) <= tol


def test_float32_input_is_fitted_in_float64_and_returned_in_float32():
    """float32 X: the float64 solve on the same values (to float32 rounding), float32 out."""
    X, y = DATASETS["wine_standardised"]
    a = SoftmaxClassifier(tol=1e-7, max_iter=1000).fit(X.astype(np.float32), y)
    b = SoftmaxClassifier(tol=1e-7, max_iter=1000).fit(X.astype(np.float32).astype(np.float64), y)
    assert a.coef_.dtype == a.intercept_.dtype == np.float32
    np.testing.assert_allclose(a.objective_, b.objective_, rtol=1e-9)
    np.testing.assert_allclose(a.coef_, b.coef_, rtol=1e-5, atol=1e-6)
    assert a.predict_proba(X.astype(np.float32)).dtype == np.float32


def test_backends_agree(backend):
    X, y = DATASETS["wine_standardised"]
    clf = SoftmaxClassifier(tol=1e-8, max_iter=1000).fit(X, y)
    with softgrad.use_backend("numpy"):
        ref = SoftmaxClassifier(tol=1e-8, max_iter=1000).fit(X, y)
    np.testing.assert_allclose(clf.objective_, ref.objective_, rtol=1e-9)
    np.testing.assert_allclose(clf.coef_, ref.coef_, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("labels", [
    np.array(["setosa", "versicolor", "virginica"]),
    np.array([-7, 3, 100]),
    np.array(["b", "a", "c"], dtype=object),
    np.array([1.0, 2.0, 5.0]),
])
def test_any_label_type(labels):
    X, y = IRIS
    y_lab = labels[y]
    clf = SoftmaxClassifier(alpha=1e-2).fit(X, y_lab)
    np.testing.assert_array_equal(clf.classes_, np.unique(y_lab))
    pred = clf.predict(X)
    assert pred.dtype == clf.classes_.dtype
    assert np.mean(pred == y_lab) > 0.95
    # the same model as with labels 0..2, up to the order of the classes
    ref = SoftmaxClassifier(alpha=1e-2).fit(X, np.searchsorted(np.unique(y_lab), y_lab))
    np.testing.assert_allclose(clf.coef_, ref.coef_)


def test_class_weight_equals_sample_weight():
    X, y = DATASETS["wine_standardised"]
    cw = {0: 2.0, 1: 0.5, 2: 1.0}
    a = SoftmaxClassifier(class_weight=cw, tol=1e-8, max_iter=1000).fit(X, y)
    b = SoftmaxClassifier(tol=1e-8, max_iter=1000).fit(X, y, sample_weight=np.array([cw[k] for k in y]))
    np.testing.assert_allclose(a.coef_, b.coef_, rtol=1e-6, atol=1e-8)
    balanced = SoftmaxClassifier(class_weight="balanced").fit(X, y)
    assert balanced.score(X, y) > 0.95


def test_integer_sample_weight_equals_repeating_rows(rng):
    X, y = IRIS
    k = rng.integers(0, 3, size=y.shape[0])
    a = SoftmaxClassifier(alpha=1e-2, tol=1e-8, max_iter=1000).fit(X, y, sample_weight=k)
    b = SoftmaxClassifier(alpha=1e-2, tol=1e-8, max_iter=1000).fit(np.repeat(X, k, axis=0), np.repeat(y, k))
    np.testing.assert_allclose(a.coef_, b.coef_, rtol=1e-5, atol=1e-7)


def test_warm_start_continues(rng):
    X, y = DATASETS["wine_standardised"]
    clf = SoftmaxClassifier(warm_start=True, tol=1e-6, max_iter=1000).fit(X, y)
    first = clf.n_iter_
    clf.fit(X, y)
    assert clf.n_iter_ <= 1 < first
    cold = SoftmaxClassifier(tol=1e-6, max_iter=1000).fit(X, y)
    assert cold.n_iter_ == first


def test_callback_and_verbose(capsys):
    X, y = IRIS
    seen = []
    clf = SoftmaxClassifier(verbose=1, callback=lambda n, J: seen.append((n, J))).fit(X, y)
    assert [n for n, _ in seen] == list(range(1, clf.n_iter_ + 1))
    np.testing.assert_allclose([J for _, J in seen], clf.loss_curve_)
    assert "iteration 1: objective" in capsys.readouterr().out


@pytest.mark.parametrize("solver", ["gd", "lbfgs"])
def test_small_fits_run_on_one_thread(monkeypatch, solver):
    """Small evaluations run under threadpool_limits(1); large ones keep the caller's threads.

    The callback runs inside the solver, so with ``lbfgs`` this also covers the solver's
    own products (NumPy's BLAS, under the same limits).
    """
    from threadpoolctl import threadpool_info

    from softgrad import _classifier

    def blas_threads():
        return {p["internal_api"]: p["num_threads"] for p in threadpool_info()}

    outside = blas_threads()
    if max(outside.values(), default=1) < 2:
        pytest.skip("only one thread available: nothing to limit")
    seen = []
    X, y = IRIS
    SoftmaxClassifier(solver=solver, max_iter=2, callback=lambda n, J: seen.append(blas_threads())).fit(X, y)
    assert seen and all(set(t.values()) == {1} for t in seen)
    monkeypatch.setattr(_classifier, "_SERIAL_MAX_WORK", 1)  # now every fit counts as large
    # dense: BLAS keeps the caller's threads (it runs the products), the kernels get one
    seen.clear()
    SoftmaxClassifier(solver=solver, max_iter=2, callback=lambda n, J: seen.append(blas_threads())).fit(X, y)
    expected = {**outside, "numba": 1} if "numba" in outside else outside
    assert seen and all(t == expected for t in seen), (seen, expected)
    assert blas_threads() == outside
    # sparse: the products are the kernels', so BLAS gets one thread and the kernels keep theirs
    import scipy.sparse

    seen.clear()
    SoftmaxClassifier(solver=solver, max_iter=2, callback=lambda n, J: seen.append(threadpool_info())).fit(
        scipy.sparse.csr_matrix(X), y)
    assert seen
    for info in seen:
        for p in info:
            expected = 1 if p["user_api"] == "blas" else outside[p["internal_api"]]
            assert p["num_threads"] == expected, (p, outside)
    assert blas_threads() == outside


def test_probabilities_and_log_probabilities():
    X, y = IRIS
    clf = SoftmaxClassifier(alpha=1e-6, max_iter=30).fit(1e3 * X, y)  # huge logits
    p, logp = clf.predict_proba(1e3 * X), clf.predict_log_proba(1e3 * X)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-12)
    assert np.isfinite(logp).all()  # no log(0) even where p underflows to 0
    np.testing.assert_allclose(np.exp(logp), p, atol=1e-15)


def test_meta_estimators():
    X, y = DATASETS["iris"]
    pipe = make_pipeline(StandardScaler(), SoftmaxClassifier())
    scores = cross_val_score(pipe, X, y, cv=3)
    assert scores.mean() > 0.9
    grid = GridSearchCV(pipe, {"softmaxclassifier__alpha": [1e-2, 1.0]}, cv=3).fit(X, y)
    assert grid.best_params_["softmaxclassifier__alpha"] in (1e-2, 1.0)
    c = clone(SoftmaxClassifier(alpha=0.3, solver="sgd"))
    assert c.get_params()["alpha"] == 0.3 and not hasattr(c, "coef_")


@pytest.mark.parametrize("call, error, match", [
    (lambda X, y: SoftmaxClassifier().fit(X, np.zeros_like(y)), ValueError, "at least 2 classes"),
    (lambda X, y: SoftmaxClassifier().fit(np.where(X > 1, np.nan, X), y), ValueError, "NaN"),
    (lambda X, y: SoftmaxClassifier().fit(X, y + 0.5), ValueError, "Unknown label type"),
    (lambda X, y: SoftmaxClassifier().fit(X, y, sample_weight=-np.ones(len(y))), ValueError, "negative"),
    (lambda X, y: SoftmaxClassifier().fit(X, y, sample_weight=np.zeros(len(y))), ValueError, "sums to zero"),
    (lambda X, y: SoftmaxClassifier().fit(X, y, sample_weight=np.ones(3)), ValueError, "shape"),
    (lambda X, y: SoftmaxClassifier().fit(X, y, sample_weight=(y > 0) * (y < 2) * 1.0), ValueError,
     "at least 2 classes with positive"),
    (lambda X, y: SoftmaxClassifier(alpha=-1.0).fit(X, y), ValueError, "alpha"),
    (lambda X, y: SoftmaxClassifier(solver="newton").fit(X, y), ValueError, "solver"),
    (lambda X, y: SoftmaxClassifier(learning_rate=0.0).fit(X, y), ValueError, "learning_rate"),
    (lambda X, y: SoftmaxClassifier().fit(X[:0], y[:0]), ValueError, "0 sample"),
    (lambda X, y: SoftmaxClassifier().fit(X, y[:-1]), ValueError, "inconsistent numbers of samples"),
    (lambda X, y: SoftmaxClassifier().predict(X), NotFittedError, "not fitted"),
    (lambda X, y: SoftmaxClassifier().fit(X, y).predict(X[:, :2]), ValueError, "features"),
])
def test_bad_input_raises_clear_errors(call, error, match):
    X, y = IRIS
    with pytest.raises(error, match=match):
        call(X, y)


def test_caller_arrays_not_modified(rng):
    X, y = DATASETS["synthetic_5class"]
    s = rng.uniform(size=y.shape[0])
    copies = X.copy(), y.copy(), s.copy()
    for solver in ("lbfgs", "gd", "sgd"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            SoftmaxClassifier(solver=solver, max_iter=3).fit(X, y, sample_weight=s)
    for before, after in zip(copies, (X, y, s)):
        np.testing.assert_array_equal(before, after)


# ------------------------------------------------------------------ save / load
@pytest.mark.parametrize("labels", [np.array([10, 20, 30]), np.array(["x", "y", "z"]),
                                    np.array(["p", "q", "r"], dtype=object), np.array([True, False, True])[:2]])
def test_save_load_round_trip(tmp_path, labels):
    X, y = IRIS
    if labels.shape[0] == 2:
        y = (y > 0).astype(int)
    y_lab = labels[y]
    clf = SoftmaxClassifier(alpha=1e-2, class_weight={labels.tolist()[0]: 2.0, labels.tolist()[1]: 1.0}).fit(X, y_lab)
    path = clf.save(tmp_path / "model.npz")
    with np.load(path, allow_pickle=False) as npz:  # readable without pickle
        assert json.loads(npz["header"].tobytes())["format"] == "softgrad.SoftmaxClassifier"
    loaded = SoftmaxClassifier.load(path)
    np.testing.assert_array_equal(loaded.predict(X), clf.predict(X))
    assert loaded.classes_.dtype == clf.classes_.dtype
    np.testing.assert_array_equal(loaded.predict_proba(X), clf.predict_proba(X))
    assert loaded.get_params() == {**clf.get_params(), "random_state": None}
    assert loaded.n_iter_ == clf.n_iter_ and loaded.objective_ == clf.objective_


def test_save_keeps_feature_names(tmp_path):
    """feature_names_in_ (set by validate_data for DataFrames) survives as a string array."""
    X, y = IRIS
    clf = SoftmaxClassifier().fit(X, y)
    clf.feature_names_in_ = np.array(["sepal length", "sepal width", "petal length", "petal width"], dtype=object)
    loaded = SoftmaxClassifier.load(clf.save(tmp_path / "m.npz"))
    np.testing.assert_array_equal(loaded.feature_names_in_, clf.feature_names_in_)
    assert loaded.feature_names_in_.dtype == object


def test_dataframe_feature_names_round_trip(tmp_path):
    pd = pytest.importorskip("pandas")  # in the test extra
    X, y = load_iris(return_X_y=True, as_frame=True)
    assert isinstance(X, pd.DataFrame)
    clf = SoftmaxClassifier(max_iter=30).fit(X, y)
    loaded = SoftmaxClassifier.load(clf.save(tmp_path / "m.npz"))
    np.testing.assert_array_equal(loaded.feature_names_in_, X.columns)
    np.testing.assert_array_equal(loaded.predict(X), clf.predict(X))
    with pytest.raises(ValueError, match="feature names"):
        loaded.predict(X.rename(columns=lambda c: c.upper()))


def _write_npz(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def test_load_rejects_malformed_and_foreign_files(tmp_path):
    X, y = IRIS
    clf = SoftmaxClassifier().fit(X, y)
    good = clf.save(tmp_path / "good.npz")
    raw = good.read_bytes()
    with np.load(good, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    header = json.loads(arrays["header"].tobytes())

    def with_header(**changes):
        return {**arrays, "header": np.frombuffer(json.dumps({**header, **changes}).encode(), dtype=np.uint8)}

    cases = {
        "text.npz": (b"hello, not a model", "not an .npz"),
        "truncated.npz": (raw[: len(raw) // 2], "not a softgrad model file"),
        "empty.npz": (b"", "not an .npz"),
    }
    for name, (content, match) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=match):
            SoftmaxClassifier.load(tmp_path / name)
    npz_cases = {
        "foreign.npz": ({"weights": np.ones(3)}, "no 'header'"),
        "format.npz": (with_header(format="someone.else"), "expected 'softgrad.SoftmaxClassifier'"),
        "version.npz": (with_header(version=99), "version 99 is not supported"),
        "shape.npz": ({**arrays, "coef": arrays["coef"][:, :2]}, "coef must be"),
        "nan.npz": ({**arrays, "intercept": np.full(3, np.nan)}, "NaN"),
        "missing.npz": ({k: v for k, v in arrays.items() if k != "classes"}, "missing array 'classes'"),
        "params.npz": (with_header(params={"no_such_param": 1}), "unknown parameters"),
        "badjson.npz": ({**arrays, "header": np.frombuffer(b"{not json", dtype=np.uint8)}, "not valid JSON"),
        "object.npz": ({**arrays, "classes": np.array([1, "a", None], dtype=object)}, "pickle"),
    }
    for name, (content, match) in npz_cases.items():
        if name == "object.npz":
            with open(tmp_path / name, "wb") as f:
                np.savez(f, **content)  # an object array is stored pickled: refused on load
        else:
            _write_npz(tmp_path / name, **content)
        with pytest.raises(ValueError, match=match):
            SoftmaxClassifier.load(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        SoftmaxClassifier.load(tmp_path / "absent.npz")
    assert zipfile.is_zipfile(good)


@pytest.mark.parametrize("scaler_kind", ["standardizer", "sklearn", "sklearn-no-mean", "sklearn-no-std"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_save_with_preprocessing_takes_raw_features(tmp_path, rng, scaler_kind, dtype):
    """The folded model on raw X equals the fitted model on standardised X (logits to rounding)."""
    from sklearn.preprocessing import StandardScaler

    from softgrad.datasets import Standardizer

    X_raw = rng.normal(size=(300, 5)) * np.array([1.0, 10.0, 0.1, 100.0, 3.0]) + np.array([5.0, -20, 0.3, 1e3, 0])
    y = rng.integers(0, 3, size=300)
    scaler = {"standardizer": lambda: Standardizer().fit(X_raw),
              "sklearn": lambda: StandardScaler().fit(X_raw),
              "sklearn-no-mean": lambda: StandardScaler(with_mean=False).fit(X_raw),
              "sklearn-no-std": lambda: StandardScaler(with_std=False).fit(X_raw)}[scaler_kind]()
    X_std = scaler.transform(X_raw).astype(dtype)
    clf = SoftmaxClassifier(alpha=1e-2).fit(X_std, y)
    path = clf.save(tmp_path / "m.npz", preprocessing=scaler)
    with np.load(path, allow_pickle=False) as npz:
        assert json.loads(npz["header"].tobytes())["preprocessing"] == "standardize (folded into coef/intercept)"
        assert npz["coef"].dtype == dtype
    loaded = SoftmaxClassifier.load(path)
    assert loaded._saved_preprocessing.startswith("standardize")
    rtol = 1e-10 if dtype == np.float64 else 2e-4
    z_expected = clf.decision_function(X_std).astype(np.float64)
    np.testing.assert_allclose(loaded.decision_function(X_raw.astype(dtype)), z_expected,
                               rtol=rtol, atol=rtol * np.abs(z_expected).max())
    np.testing.assert_array_equal(loaded.predict(X_raw), clf.predict(scaler.transform(X_raw)))
    assert clf.coef_.dtype == dtype and not np.shares_memory(loaded.coef_, clf.coef_)  # clf untouched


def test_save_preprocessing_none_and_bad_scalers(tmp_path):
    from sklearn.exceptions import NotFittedError
    from sklearn.preprocessing import MinMaxScaler, StandardScaler

    from softgrad.datasets import Standardizer

    X, y = IRIS
    clf = SoftmaxClassifier().fit(X, y)
    assert SoftmaxClassifier.load(clf.save(tmp_path / "raw.npz", preprocessing="none"))._saved_preprocessing == "none"
    assert SoftmaxClassifier.load(clf.save(tmp_path / "plain.npz"))._saved_preprocessing is None
    np.testing.assert_array_equal(SoftmaxClassifier.load(tmp_path / "raw.npz").coef_, clf.coef_)
    with pytest.raises(TypeError, match="preprocessing must be None, 'none' or a fitted"):
        clf.save(tmp_path / "m.npz", preprocessing="standardize")
    with pytest.raises(TypeError, match="got MinMaxScaler"):
        clf.save(tmp_path / "m.npz", preprocessing=MinMaxScaler().fit(X))
    with pytest.raises(NotFittedError, match="StandardScaler is not fitted"):
        clf.save(tmp_path / "m.npz", preprocessing=StandardScaler())
    with pytest.raises(NotFittedError, match="Standardizer is not fitted"):
        clf.save(tmp_path / "m.npz", preprocessing=Standardizer())
    with pytest.raises(ValueError, match="has shape \\(3,\\), but the model has 4 features"):
        clf.save(tmp_path / "m.npz", preprocessing=StandardScaler().fit(X[:, :3]))
    bad = Standardizer().fit(X)
    bad.scale_ = bad.scale_ * np.array([1.0, 0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="scale must be > 0"):
        clf.save(tmp_path / "m.npz", preprocessing=bad)
    bad.scale_ = np.array([1.0, np.nan, 1.0, 1.0])
    with pytest.raises(ValueError, match="scale contains NaN"):
        clf.save(tmp_path / "m.npz", preprocessing=bad)
    assert not (tmp_path / "m.npz").exists()  # refused before anything is written
    with np.load(tmp_path / "plain.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    header = json.loads(arrays["header"].tobytes())
    arrays["header"] = np.frombuffer(json.dumps({**header, "preprocessing": "minmax"}).encode(), dtype=np.uint8)
    _write_npz(tmp_path / "foreign-pre.npz", **arrays)
    with pytest.raises(ValueError, match="header entry 'preprocessing' = 'minmax' must be 'none' or"):
        SoftmaxClassifier.load(tmp_path / "foreign-pre.npz")


def test_save_refuses_unsaveable_labels_and_unfitted(tmp_path):
    X, y = IRIS
    labels = np.empty(3, dtype=object)
    labels[:] = [(1, 2), (3, 4), (5, 6)]
    clf = SoftmaxClassifier().fit(X, np.arange(3)[y])
    clf.classes_ = labels
    with pytest.raises(TypeError, match="without pickle"):
        clf.save(tmp_path / "m.npz")
    with pytest.raises(NotFittedError):
        SoftmaxClassifier().save(tmp_path / "m.npz")


def test_import_softgrad_does_not_import_sklearn():
    code = ("import sys, softgrad; assert 'sklearn' not in sys.modules and 'scipy' not in sys.modules; "
            "softgrad.SoftmaxClassifier; assert 'sklearn' in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
