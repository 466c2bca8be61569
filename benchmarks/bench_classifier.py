"""Classifier fit time and final objective: SoftmaxClassifier's solvers vs scikit-learn's LogisticRegression.

Problems (both at scikit-learn's default ``C = 1``, i.e. ``alpha = 1 / n_samples``):

* ``digits``: the 1797 8x8 digits that ship with scikit-learn, standardised (D=64, C=10);
* ``synthetic``: ``make_classification(n_samples=50_000, n_features=256, n_informative=64,
  n_classes=20, n_clusters_per_class=1, random_state=0)`` (float64);
* ``synthetic50_f32``: ``make_classification(n_samples=20_000, n_features=500, n_informative=100,
  n_classes=50, ...)`` in float32 (fitted without a float64 copy of X);
* ``tfidf_sparse``: a 20000 x 20000 CSR TF-IDF matrix of density 0.002 (40 words per row, each
  class drawing half of its words from its own Zipf-distributed topic, the rest from a shared
  background; log-scaled counts times idf, rows L2-normalised), 20 classes.

Implementations, each fitted once per problem in the same process, in turn, after an untimed
warm-up fit of 2 iterations on the same data (JIT kernels loaded, thread pools started):

* ``sklearn_lbfgs``   -- ``LogisticRegression(C=1, tol=1e-4)`` (scikit-learn's L-BFGS-B on its
  Cython multinomial loss), the reference;
* ``softgrad_lbfgs``  -- ``SoftmaxClassifier(alpha=1/n, tol=1e-4)`` as shipped (``precision="auto"``:
  mixed float32 -> float64 on the synthetic problem, float64 on digits);
* ``softgrad_lbfgs_f64`` -- the same with ``precision="float64"``;
* ``softgrad_logreg`` -- ``softgrad.LogisticRegression(C=1, tol=1e-4)``, the drop-in;
* ``sklearnex_lbfgs`` -- Intel's ``sklearnex.linear_model.LogisticRegression`` (scikit-learn-intelex,
  installed for the benchmark only: ``pip install scikit-learn-intelex``), skipped when absent;
* ``softgrad_gd`` / ``softgrad_sgd`` -- gradient descent (step 1/L) and mini-batch SGD with a
  fixed budget of iterations/epochs (dense problems); their objective gap is reported, not gated.

Peak memory of the sparse fit: tracemalloc's peak of NumPy/SciPy allocations during one extra
(untimed) ``softgrad_lbfgs`` fit and one ``sklearn_lbfgs`` fit, as a multiple of the CSR matrix's
bytes, beside two floors for ``n = C (D + 1)`` parameters and ``m = 10`` correction pairs: the
``2 m n`` float64 of the pairs, which any L-BFGS with 10 pairs stores (``lbfgs_pairs_over_csr``),
and SciPy's L-BFGS-B workspace, ``(2m + 5) n + 11 m^2 + 8 m`` float64 plus ``3 n`` int32
(``lbfgsb_workspace_over_csr``; scikit-learn's fit allocates it).

Solver time: ``solver_s`` is the time a fit spends in its quasi-Newton solver outside the
objective: for scikit-learn the time inside SciPy's L-BFGS-B routine (``setulb``: the
quasi-Newton update, Cauchy point and line search steps, ``O(m n)`` per iteration),
measured by wrapping it; for softgrad the time of its own L-BFGS (``softgrad._lbfgs``, the
same iteration with a cheaper direction) minus the time of the evaluations it makes.
``ratio_outside_solver`` is the ratio to scikit-learn's fit time with each fit's own
``solver_s`` subtracted: the evaluations and the code around them.

Correctness gate: every gated fit must reach scikit-learn's objective to ``1e-6`` relative (a lower one passes)
(both objectives are evaluated by the same float64 reference at the returned weights),
and the max |gradient| at our weights, recomputed in float64, must be <= tol.

Floor: one evaluation of the objective needs at least the two matrix products
``X @ W.T`` and ``G.T @ X`` (timed alone, float64 and float32); ``floor`` is that time
times the number of evaluations scikit-learn used.

Usage::

    python benchmarks/bench_classifier.py            # writes benchmarks/results/bench_classifier_<device>.{json,png}
    python benchmarks/bench_classifier.py --quick    # small problems, results to a temp dir (smoke test)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402

TOL = 1e-4
OBJECTIVE_RTOL = 1e-6


def _problems(quick: bool):
    from sklearn.datasets import load_digits, make_classification

    X, y = load_digits(return_X_y=True)
    if quick:
        X, y = X[:400], y[:400]
    std = X.std(axis=0)
    X = (X - X.mean(axis=0)) / np.where(std > 0, std, 1.0)
    shape = dict(n_samples=2000, n_features=32, n_informative=16, n_classes=5) if quick else \
        dict(n_samples=50_000, n_features=256, n_informative=64, n_classes=20)
    Xs, ys = make_classification(**shape, n_clusters_per_class=1, random_state=0)
    shape50 = dict(n_samples=1500, n_features=40, n_informative=20, n_classes=8) if quick else \
        dict(n_samples=20_000, n_features=500, n_informative=100, n_classes=50)
    X50, y50 = make_classification(**shape50, n_clusters_per_class=1, random_state=1)
    return {"digits": (np.ascontiguousarray(X), y), "synthetic": (Xs, ys),
            "synthetic50_f32": (X50.astype(np.float32), y50),
            "tfidf_sparse": _tfidf(*((2000, 2000, 10) if quick else (20_000, 20_000, 20)))}


def _tfidf(n_docs: int, vocab: int, n_classes: int, words_per_doc: int = 40, seed: int = 0):
    """A TF-IDF-like CSR problem: class topics over a Zipf vocabulary plus a shared background."""
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, size=n_docs)
    zipf = 1.0 / np.arange(1, vocab + 1) ** 1.1
    background = zipf / zipf.sum()
    topics = [rng.permutation(vocab) for _ in range(n_classes)]  # each class ranks the words its own way
    rows, cols = [], []
    for i in range(n_docs):
        own = topics[y[i]][np.minimum(rng.zipf(1.3, size=words_per_doc // 2) - 1, vocab - 1)]
        shared = rng.choice(vocab, size=words_per_doc - own.size, p=background)
        words = np.concatenate([own, shared])
        rows.append(np.full(words.size, i))
        cols.append(words)
    counts = sp.csr_matrix((np.ones(n_docs * words_per_doc), (np.concatenate(rows), np.concatenate(cols))),
                           shape=(n_docs, vocab))
    counts.sum_duplicates()
    df = np.bincount(counts.indices, minlength=vocab)
    idf = np.log((1 + n_docs) / (1 + df)) + 1.0
    X = counts.copy()
    X.data = np.log1p(X.data) * idf[X.indices]
    norms = np.sqrt(np.asarray(X.multiply(X).sum(axis=1)).ravel())
    X = sp.diags(1.0 / np.where(norms > 0, norms, 1.0)) @ X
    return sp.csr_matrix(X), y


def _count_evaluations():
    """Wrap scikit-learn's LinearModelLoss.loss_gradient to count objective evaluations."""
    from sklearn.linear_model import _linear_loss

    counter = {"n": 0}
    original = _linear_loss.LinearModelLoss.loss_gradient

    def counted(self, *args, **kwargs):
        counter["n"] += 1
        return original(self, *args, **kwargs)

    _linear_loss.LinearModelLoss.loss_gradient = counted
    return counter, lambda: setattr(_linear_loss.LinearModelLoss, "loss_gradient", original)


class _SolverClock:
    """Time spent in the quasi-Newton solver itself, outside the objective, while active.

    SciPy's L-BFGS-B (scikit-learn's solver): the time inside its routine
    ``scipy.optimize._lbfgsb.setulb``. softgrad's L-BFGS (``softgrad._lbfgs.minimize_lbfgs``):
    the time of the call minus the time spent in the objective it evaluates.
    """

    def __init__(self):
        from scipy.optimize import _lbfgsb

        from softgrad import _lbfgs

        self._scipy, self._ours, self.seconds = _lbfgsb, _lbfgs, 0.0

    def __enter__(self):
        setulb = self._setulb = self._scipy.setulb
        minimize = self._minimize = self._ours.minimize_lbfgs

        def timed_setulb(*args, **kwargs):
            start = time.perf_counter()
            try:
                return setulb(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        def timed_minimize(fun, *args, **kwargs):
            inside = [0.0]

            def timed_fun(x):
                start = time.perf_counter()
                try:
                    return fun(x)
                finally:
                    inside[0] += time.perf_counter() - start

            start = time.perf_counter()
            try:
                return minimize(timed_fun, *args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start - inside[0]

        self._scipy.setulb, self._ours.minimize_lbfgs = timed_setulb, timed_minimize
        return self

    def __exit__(self, *exc):
        self._scipy.setulb, self._ours.minimize_lbfgs = self._setulb, self._minimize


def _fit(name, X, y, alpha, gd_iters, sgd_epochs):
    """Fit one implementation; return (seconds, W (C, D), b (C,), iterations, evaluations, solver seconds)."""
    from sklearn.base import clone
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    from softgrad import SoftmaxClassifier
    from softgrad import _classifier

    evals = {"n": 0}
    if name == "sklearn_lbfgs":
        model = LogisticRegression(C=1.0 / (alpha * y.shape[0]), tol=TOL, max_iter=10_000)
        counter, restore = _count_evaluations()
    elif name == "sklearnex_lbfgs":
        from sklearnex.linear_model import LogisticRegression as IntelLogisticRegression

        model = IntelLogisticRegression(C=1.0 / (alpha * y.shape[0]), tol=TOL, max_iter=10_000)
        counter, restore = {"n": 0}, lambda: None
    elif name == "softgrad_logreg":
        from softgrad import LogisticRegression as SoftgradLogisticRegression

        model = SoftgradLogisticRegression(C=1.0 / (alpha * y.shape[0]), tol=TOL, max_iter=10_000)
        counter, restore = {"n": 0}, lambda: None
    else:
        params = {"softgrad_lbfgs": dict(max_iter=10_000),
                  "softgrad_lbfgs_f64": dict(max_iter=10_000, precision="float64"),
                  "softgrad_gd": dict(solver="gd", max_iter=gd_iters),
                  "softgrad_sgd": dict(solver="sgd", max_iter=sgd_epochs, random_state=0)}[name]
        model = SoftmaxClassifier(alpha=alpha, tol=TOL, **params)
        original_call = _classifier._Objective.__call__

        def counted(self, theta):
            evals["n"] += 1
            return original_call(self, theta)

        _classifier._Objective.__call__ = counted
        counter = evals

        def restore():
            _classifier._Objective.__call__ = original_call
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            # untimed warm-up: 2 iterations on the same data (same dtype, format and thread
            # regime), so JIT kernels loaded from their cache, thread pools started and lazy
            # imports are not in the timing
            clone(model).set_params(max_iter=2).fit(X, y)
            counter["n"] = 0
            with _SolverClock() as solver:
                start = time.perf_counter()
                model.fit(X, y)
                seconds = time.perf_counter() - start
    finally:
        restore()
    n_iter = int(np.max(model.n_iter_))
    return seconds, model.coef_, model.intercept_, n_iter, counter["n"], solver.seconds


def _peak_fit_memory(X, y, alpha) -> dict:
    """tracemalloc's peak during one fit of sparse ``X`` (ours and scikit-learn's) and the L-BFGS-B
    workspace floor, each over the CSR matrix's bytes."""
    import tracemalloc

    from sklearn.linear_model import LogisticRegression

    from softgrad import SoftmaxClassifier

    csr_bytes = X.data.nbytes + X.indices.nbytes + X.indptr.nbytes
    peaks = {}
    for name, model in (("softgrad_lbfgs", SoftmaxClassifier(alpha=alpha, tol=TOL, max_iter=10_000)),
                        ("sklearn_lbfgs", LogisticRegression(C=1.0 / (alpha * y.shape[0]), tol=TOL,
                                                             max_iter=10_000))):
        tracemalloc.start()
        try:
            model.fit(X, y)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        peaks[name] = peak / csr_bytes
    n, m = int(np.unique(y).shape[0]) * (X.shape[1] + 1), 10
    peaks["lbfgsb_workspace"] = (8 * ((2 * m + 5) * n + 11 * m * m + 8 * m) + 4 * 3 * n) / csr_bytes
    peaks["lbfgs_pairs"] = 8 * 2 * m * n / csr_bytes
    return peaks


def _floor(X, C, repeats):
    """Median time of the two matrix products of one evaluation, float64 and float32 (ms)."""
    out = {}
    rng = np.random.default_rng(0)
    if hasattr(X, "tocsr"):  # sparse: SciPy's two products, in the matrix's dtype
        W = rng.normal(size=(C, X.shape[1]))
        t = _harness.time_cpu(lambda: (X @ W.T, (X.T @ (X @ W.T)).T), repeats=repeats, warmup=1)["median_ms"]
        return {"float64": t, "float32": t}
    for dtype in (np.float64, np.float32):
        Xd = np.ascontiguousarray(X, dtype=dtype)
        W = rng.normal(size=(C, X.shape[1])).astype(dtype)
        work = np.empty((X.shape[0], C), dtype=dtype)
        grad = np.empty_like(W)

        def products():
            np.matmul(Xd, W.T, out=work)
            np.matmul(work.T, Xd, out=grad)

        out[np.dtype(dtype).name] = _harness.time_cpu(products, repeats=repeats, warmup=1)["median_ms"]
    return out


def _chart(rows, path):
    import matplotlib.pyplot as plt

    problems = list(dict.fromkeys(r["problem"] for r in rows))
    fig, axes = plt.subplots(1, len(problems), figsize=(6 * len(problems), 4.8), squeeze=False)
    colours = {"sklearn_lbfgs": "#777777", "softgrad_lbfgs": "#1f77b4", "softgrad_lbfgs_f64": "#6baed6",
               "softgrad_gd": "#ff7f0e", "softgrad_sgd": "#2ca02c"}
    for ax, problem in zip(axes[0], problems):
        sub = [r for r in rows if r["problem"] == problem]
        names = [r["impl"] for r in sub]
        secs = [r["fit_s"] for r in sub]
        bars = ax.barh(names, secs, color=[colours.get(n, "#999999") for n in names])
        for bar, r in zip(bars, sub):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                    f"  {r['fit_s']:.2f} s, {r['ratio_vs_sklearn']:.2f}x, gap {r['objective_gap']:.1e}",
                    va="center", fontsize=8)
        evals = next((r["n_evals"] for r in sub if r["impl"] == "sklearn_lbfgs"), 0)
        for dtype, style in (("f64", ":"), ("f32", "--")):
            floor = sub[0][f"floor_ms_per_eval_{dtype}"] * evals / 1e3
            if floor:
                ax.axvline(floor, color="k", ls=style, lw=1,
                           label=f"floor: {dtype} products x sklearn's {evals} evaluations, {floor:.2f} s")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8, frameon=False)
        ax.invert_yaxis()
        ax.set_xlabel("fit time (s), one run")
        ax.set_title(f"{problem}: N={sub[0]['n']}, D={sub[0]['d']}, C={sub[0]['c']}")
        ax.set_xlim(0, max(secs) * 1.9)
    fig.suptitle("SoftmaxClassifier vs scikit-learn LogisticRegression (same objective, tol=1e-4)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small problems, results to a temporary directory")
    parser.add_argument("--floor-repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.quick:
        args.floor_repeats = 1
        _harness.RESULTS_DIR = Path(tempfile.mkdtemp(prefix="softgrad_bench_classifier_quick_"))

    import softgrad
    from softgrad._linear_model import objective_reference

    load_before = os.getloadavg()
    problems = _problems(args.quick)
    # warm-up: JIT-compiled kernels load, BLAS threads start (not timed)
    Xw, yw = problems["digits"]
    for name in ("sklearn_lbfgs", "softgrad_lbfgs"):
        _fit(name, Xw[:200], yw[:200], 1e-2, 2, 1)

    rows = []
    try:
        import sklearnex  # noqa: F401

        intel = ("sklearnex_lbfgs",)
    except ImportError:
        intel = ()
        print("scikit-learn-intelex is not installed: its rows are skipped (pip install scikit-learn-intelex)")
    # The L-BFGS fits that the target compares run first and back to back (the machine is
    # shared; the load average is recorded with every fit), the fixed-budget gd/sgd last.
    impls_of = {
        "synthetic": ("sklearn_lbfgs", "softgrad_lbfgs", "softgrad_logreg") + intel +
                     ("softgrad_lbfgs_f64", "softgrad_gd", "softgrad_sgd"),
        "digits": ("sklearn_lbfgs", "softgrad_lbfgs", "softgrad_logreg") + intel +
                  ("softgrad_lbfgs_f64", "softgrad_gd", "softgrad_sgd"),
        "synthetic50_f32": ("sklearn_lbfgs", "softgrad_lbfgs", "softgrad_logreg") + intel,
        "tfidf_sparse": ("sklearn_lbfgs", "softgrad_lbfgs", "softgrad_logreg") + intel,
    }
    gated = ("softgrad_lbfgs", "softgrad_lbfgs_f64", "softgrad_logreg")
    peak_memory = {}
    for problem in ("synthetic", "tfidf_sparse", "synthetic50_f32", "digits"):
        impls = impls_of[problem]
        X, y = problems[problem]
        N, D = X.shape
        C = int(np.unique(y).shape[0])
        alpha = 1.0 / N
        floor_ms = _floor(X, C, args.floor_repeats)
        budget = (20, 3) if args.quick else (200, 10) if problem == "synthetic" else (500, 50)
        results, loads = {}, {}
        for name in impls:
            loads[name] = os.getloadavg()[0]
            results[name] = _fit(name, X, y, alpha, *budget)
        J = {name: objective_reference(np.asarray(r[1], dtype=np.float64), np.asarray(r[2], dtype=np.float64), X, y,
                                       None, alpha)[0] for name, r in results.items()}
        J_ref = J["sklearn_lbfgs"]
        if problem == "tfidf_sparse":
            peak_memory[problem] = _peak_fit_memory(X, y, alpha)
        for name in (n for n in impls if n in gated):
            # reach scikit-learn's objective: no worse than it by more than OBJECTIVE_RTOL (lower is fine)
            if J[name] > J_ref * (1.0 + OBJECTIVE_RTOL):
                raise AssertionError(f"{problem}/{name}: objective {J[name]!r} is above scikit-learn's {J_ref!r} by "
                                     f"more than {OBJECTIVE_RTOL} relative; not benchmarking a worse answer")
            _, gW, gb = objective_reference(np.asarray(results[name][1], dtype=np.float64),
                                            np.asarray(results[name][2], dtype=np.float64), X, y, None, alpha)
            worst = max(np.abs(gW).max(), np.abs(gb).max())
            if worst > TOL:
                raise AssertionError(f"{problem}/{name}: max |gradient| {worst:.2e} > tol {TOL}")
        sk_seconds, sk_evals = results["sklearn_lbfgs"][0], results["sklearn_lbfgs"][4]
        sk_solver = results["sklearn_lbfgs"][5]
        memory = peak_memory.get(problem, {})
        for name, (seconds, _, _, n_iter, n_evals, solver_s) in results.items():
            rows.append({
                "problem": problem, "impl": name, "n": N, "d": D, "c": C, "alpha": alpha,
                "fit_s": seconds, "ratio_vs_sklearn": seconds / sk_seconds, "objective": J[name],
                "objective_gap": (J[name] - J_ref) / J_ref, "n_iter": n_iter, "n_evals": n_evals,
                "ms_per_eval": 1e3 * seconds / n_evals if n_evals else None,
                "floor_ms_per_eval_f64": floor_ms["float64"], "floor_ms_per_eval_f32": floor_ms["float32"],
                "floor_s": floor_ms["float64"] * sk_evals / 1e3,
                "gated": name in gated, "load_1min": loads[name], "dtype": str(X.dtype),
                "sparse": hasattr(X, "tocsr"),
                "solver_s": solver_s,
                "ratio_outside_solver": (seconds - solver_s) / (sk_seconds - sk_solver)
                                        if sk_seconds > sk_solver else None,
                "peak_over_csr": memory.get(name),
                "lbfgsb_workspace_over_csr": memory.get("lbfgsb_workspace"),
                "lbfgs_pairs_over_csr": memory.get("lbfgs_pairs"),
            })
    load_after = os.getloadavg()

    _harness.print_table(rows, ["problem", "impl", "fit_s", "ratio_vs_sklearn", "objective", "objective_gap",
                                "n_iter", "n_evals", "ms_per_eval", "solver_s", "ratio_outside_solver",
                                "floor_ms_per_eval_f64", "floor_ms_per_eval_f32", "load_1min"])
    for problem in problems:
        sub = {r["impl"]: r for r in rows if r["problem"] == problem}
        line = (f"{problem}: softgrad_lbfgs / sklearn_lbfgs fit time = {sub['softgrad_lbfgs']['ratio_vs_sklearn']:.2f}"
                f"; objectives agree to {abs(sub['softgrad_lbfgs']['objective_gap']):.1e} relative")
        if "sklearnex_lbfgs" in sub:
            line += (f"; vs scikit-learn-intelex {sub['softgrad_lbfgs']['fit_s'] / sub['sklearnex_lbfgs']['fit_s']:.2f}"
                     f" (its objective gap {sub['sklearnex_lbfgs']['objective_gap']:.1e})")
        line += (f"; outside the solvers {sub['softgrad_lbfgs']['ratio_outside_solver']:.2f}"
                 f" (ours took {sub['softgrad_lbfgs']['solver_s']:.2f} s, scikit-learn's L-BFGS-B"
                 f" {sub['sklearn_lbfgs']['solver_s']:.2f} s)")
        if problem in peak_memory:
            mem = peak_memory[problem]
            line += (f"; peak fit memory {mem['softgrad_lbfgs']:.2f} x the CSR matrix (scikit-learn"
                     f" {mem['sklearn_lbfgs']:.2f} x; the 10 L-BFGS pairs alone {mem['lbfgs_pairs']:.2f} x,"
                     f" L-BFGS-B's workspace {mem['lbfgsb_workspace']:.2f} x)")
        print(line)
    print(f"backend {softgrad.get_backend()}; load average before {load_before}, after {load_after}")
    extra = {"quick": args.quick, "tol": TOL, "objective_rtol": OBJECTIVE_RTOL, "backend": softgrad.get_backend(),
             "load_average_before": load_before, "load_average_after": load_after,
             "target": "sparse TF-IDF fit <= 0.5 x sklearn_lbfgs with memory <= 1.2 x the CSR matrix; dense "
                       "<= 0.3 x sklearn_lbfgs and <= 0.4 x sklearnex_lbfgs; same objective"}
    path = _harness.write_results("bench_classifier", rows, chart=_chart, extra=extra)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
