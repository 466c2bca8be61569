"""``softgrad train``: train a softmax classifier end to end and report on it.

Steps: load and split the data (seeded, stratified; standardised with training
statistics), check the gradient of the training objective numerically on a small
batch, check that the initial loss is ``~ log C`` (CS231n's ``-log(0.1)`` for 10 classes), fit
:class:`softgrad.SoftmaxClassifier` with a progress bar, fit scikit-learn's
``LogisticRegression`` on the same split at the matching regularisation
(``C = 1 / (alpha * n_train)``), print both side by side, and write the run folder:
``metrics.json``, ``model.npz`` (folded back to raw features, so ``softgrad predict``
takes raw data) and PNG plots.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import time
import warnings
from pathlib import Path

import click
import numpy as np

import softgrad

_SOLVERS = ("lbfgs", "gd", "sgd")
_GRADCHECK_ROWS = 20
_GRADCHECK_FEATURES = 16


def _gradient_check(X, y, n_classes, alpha, fit_intercept, rng):
    """Gradient check of the estimator's objective on a small batch, against central differences."""
    from softgrad._linear_model import objective_and_gradient

    rows = rng.choice(X.shape[0], size=min(_GRADCHECK_ROWS, X.shape[0]), replace=False)
    cols = np.sort(rng.choice(X.shape[1], size=min(_GRADCHECK_FEATURES, X.shape[1]), replace=False))
    Xb = np.ascontiguousarray(X[np.ix_(rows, cols)], dtype=np.float64)
    yb = np.ascontiguousarray(y[rows], dtype=np.int64)
    scale = np.full(Xb.shape[0], 1.0 / Xb.shape[0])
    W = 0.1 * rng.standard_normal((n_classes, Xb.shape[1]))
    b = 0.1 * rng.standard_normal(n_classes)

    def objective(W, b):
        work = np.empty((Xb.shape[0], n_classes))
        J, gW, gb = objective_and_gradient(W, b if fit_intercept else None, Xb, yb, scale, alpha,
                                           work, np.empty(Xb.shape[0]))
        return J, gW, (gb if fit_intercept else np.zeros_like(b))

    report = softgrad.gradcheck(objective, W, b, names=["W", "b"])
    return report, Xb.shape


def _sanity_check(X, y, n_classes, rng):
    """CS231n's check: with tiny random weights every class gets ~1/C, so the loss is ~log C."""
    W = 1e-4 * rng.standard_normal((n_classes, X.shape[1]))
    loss = float(softgrad.cross_entropy(X @ W.T, y))
    return loss, math.log(n_classes)


def _sklearn_reference(X, y, alpha, tol, max_iter, n_classes):
    """LogisticRegression at the matching C; returns (model, seconds, C, its W (C, D), b (C,))."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    n = X.shape[0]
    # multinomial for 3+ classes: C = 1 / (alpha n). Binary: sklearn fits one log-odds
    # vector w = W_1 - W_0, whose penalty is twice the softmax optimum's, so C doubles.
    C = (2.0 if n_classes == 2 else 1.0) / (alpha * n) if alpha > 0 else np.inf
    lr = LogisticRegression(C=C, tol=tol, max_iter=max(max_iter, 1000))
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        lr.fit(X, y)
    seconds = time.perf_counter() - start
    if n_classes == 2:
        W = np.vstack([-lr.coef_[0] / 2, lr.coef_[0] / 2])
        b = np.array([-lr.intercept_[0] / 2, lr.intercept_[0] / 2])
    else:
        W, b = lr.coef_, lr.intercept_
    return lr, seconds, C, W, b


def _objective_text(objective: float) -> str:
    """The progress bar's label: nothing known before the first iteration has run."""
    return "objective -" if math.isnan(objective) else f"objective {objective:.6f}"


def _accuracy(model, X, y):
    return float(model.score(X, y)) if X.shape[0] else float("nan")


def _fmt(value, kind):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if kind == "pct":
        return f"{100 * value:.2f} %"
    if kind == "obj":
        return f"{value:.8f}"
    if kind == "s":
        return f"{value:.3f} s"
    return str(value)


@click.command()
@click.option("--data", "data_spec", default="digits", show_default=True, metavar="SPEC",
              help="digits | spiral[:K] | cifar10:PATH | mnist:PATH | fashion-mnist:PATH | csv:PATH | npz:PATH")
@click.option("--solver", type=click.Choice(_SOLVERS), default="lbfgs", show_default=True,
              help="lbfgs: L-BFGS (L-BFGS-B's iteration); gd: full-batch gradient descent; sgd: mini-batch SGD.")
@click.option("--reg", "alpha", type=click.FloatRange(min=0.0), default=1e-3, show_default=True,
              help="L2 strength alpha of mean CE + alpha/2 ||W||^2 (sklearn C = 1/(alpha n_train)).")
@click.option("--max-iter", "--epochs", "max_iter", type=click.IntRange(min=1), default=None,
              help="Iterations (lbfgs, gd) or epochs (sgd). [default: 200 for lbfgs, 1000 for gd, 50 for sgd]")
@click.option("--tol", type=click.FloatRange(min=0.0), default=1e-4, show_default=True,
              help="Stop when max |gradient| <= tol (lbfgs, gd) / the epoch objective stalls (sgd).")
@click.option("--lr", "learning_rate", default="auto", show_default=True, metavar="FLOAT|auto",
              help="Step size of gd/sgd; auto = 1/L (L: a bound on the gradient's Lipschitz constant).")
@click.option("--schedule", type=click.Choice(["constant", "invscaling", "adaptive"]), default="constant",
              show_default=True, help="Step size schedule of gd/sgd.")
@click.option("--batch-size", type=click.IntRange(min=1), default=200, show_default=True,
              help="Rows per mini-batch (sgd).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the split, the checks, spiral and sgd's shuffling.")
@click.option("--val-fraction", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.15, show_default=True,
              help="Fraction of the rows held out for validation (of the non-test rows when the data has its own test part); 0 for none.")
@click.option("--test-fraction", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.15, show_default=True,
              help="Used when the data has no test part of its own.")
@click.option("--label-column", default=None, metavar="INDEX|NAME",
              help="CSV/NPZ label column: an index (0 = first, -1 = last) or a CSV header name. "
                   "[default: CSV: the column named label/target/class/y, else the last; NPZ: the last]")
@click.option("--no-standardize", is_flag=True, help="Train on raw features (default: standardise).")
@click.option("--no-sklearn", is_flag=True, help="Skip the scikit-learn LogisticRegression comparison.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output folder [default: runs/<timestamp>].")
@click.option("--no-plots", is_flag=True, help="Write metrics.json and the model only.")
@click.option("--quiet", "-q", is_flag=True, help="Print only the final summary line.")
def train(data_spec, solver, alpha, max_iter, tol, learning_rate, schedule, batch_size, seed,
          val_fraction, test_fraction, label_column, no_standardize, no_sklearn, out_dir, no_plots, quiet):
    """Train a linear softmax classifier and compare it with scikit-learn.

    With no options: the 8x8 digits that ship with scikit-learn, L-BFGS, alpha=1e-3.
    Prints the gradient check and the log C sanity check, a progress bar, and a table of
    train/validation/test accuracy, final objective and time next to scikit-learn's
    LogisticRegression; writes metrics.json, model.npz and PNG plots to --out.
    """
    from softgrad import datasets
    from softgrad._classifier import SoftmaxClassifier

    echo = (lambda *a, **k: None) if quiet else click.echo
    if learning_rate != "auto":
        try:
            learning_rate = float(learning_rate)
        except ValueError:
            raise click.BadParameter(f"must be a positive number or 'auto', got {learning_rate!r}",
                                     param_hint="--lr") from None
        if not learning_rate > 0:
            raise click.BadParameter(f"must be > 0, got {learning_rate}", param_hint="--lr")
    if max_iter is None:
        max_iter = {"lbfgs": 200, "gd": 1000, "sgd": 50}[solver]

    # a run folder that cannot be created fails before any work (it is made only after training)
    out = Path(out_dir) if out_dir else Path("runs") / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    why = _uncreatable(out)
    if why:
        raise click.ClickException(f"cannot create the output folder {str(out)!r}: {why}")
    try:
        data = datasets.load(data_spec, seed=seed, label_column=label_column)
        parts = datasets.prepare(data, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                                 standardize=not no_standardize)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        raise click.ClickException(str(exc)) from exc
    classes = np.unique(parts.y_train)
    C = classes.shape[0]
    if C < 2:
        raise click.ClickException(f"the training part of {data_spec!r} has only one class")
    D = parts.X_train.shape[1]
    shape = f"; images {'x'.join(map(str, data.image_shape))}" if data.image_shape else ""
    echo(f"data     {data.name}: {parts.X_train.shape[0] + parts.X_val.shape[0] + parts.X_test.shape[0]} "
         f"samples, {D} features, {C} classes{shape}")
    echo(f"split    seed {seed}: train {parts.X_train.shape[0]} / validation {parts.X_val.shape[0]} / "
         f"test {parts.X_test.shape[0]}" + ("" if no_standardize else ", standardised with training statistics"))
    echo(f"backend  {softgrad.get_backend()} kernels")

    rng = np.random.default_rng(seed)
    y_index = np.searchsorted(classes, parts.y_train)
    report, batch_shape = _gradient_check(parts.X_train, y_index, C, alpha, True, rng)
    echo(f"\nGradient check of the objective (mean CE + alpha/2 ||W||^2) on {batch_shape[0]} rows x "
         f"{batch_shape[1]} features, central differences in float64:")
    echo("  " + str(report).replace("\n", "\n  "))
    loss0, log_c = _sanity_check(parts.X_train, y_index, C, rng)
    ok = abs(loss0 - log_c) <= 0.02 * log_c
    echo(f"Sanity check: loss with W = 1e-4 * randn is {loss0:.4f}; log C = log {C} = {log_c:.4f} "
         f"({'ok' if ok else 'NOT close: check the data'})\n")
    if not report.passed:
        raise click.ClickException("the gradient check failed; not training on a wrong gradient")

    unit = "epochs" if solver == "sgd" else "iterations"
    state = {"objective": float("nan")}
    bar = None

    def on_iteration(n, objective):
        state["objective"] = objective
        if bar is not None:
            bar.update(1)

    clf = SoftmaxClassifier(alpha=alpha, solver=solver, max_iter=max_iter, tol=tol,
                            learning_rate=learning_rate, schedule=schedule, batch_size=batch_size,
                            random_state=seed, callback=on_iteration)
    start = time.perf_counter()
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if quiet:
                clf.fit(parts.X_train, parts.y_train)
            else:
                with click.progressbar(length=max_iter, label=f"Training ({solver})", width=30,
                                       item_show_func=lambda _: _objective_text(state["objective"]),
                                       show_eta=False, show_percent=False, show_pos=True) as bar:
                    clf.fit(parts.X_train, parts.y_train)
                    bar.update(max_iter - bar.pos)  # a converged run finishes the bar
        except ValueError as exc:  # e.g. a diverging gd/sgd run
            raise click.ClickException(str(exc)) from exc
    fit_seconds = time.perf_counter() - start
    not_converged = [w for w in caught if issubclass(w.category, ConvergenceWarning)]
    converged = not not_converged
    for w in not_converged:
        if "abnormally" in str(w.message):
            echo(f"warning: {w.message}")
    echo(f"{'converged' if converged else 'stopped (max_iter reached, not converged)'} after "
         f"{clf.n_iter_} {unit} in {fit_seconds:.3f} s; final objective {clf.objective_:.8f}")

    ours = {
        "train_accuracy": _accuracy(clf, parts.X_train, parts.y_train),
        "val_accuracy": _accuracy(clf, parts.X_val, parts.y_val),
        "test_accuracy": _accuracy(clf, parts.X_test, parts.y_test),
        "objective": clf.objective_, "fit_seconds": fit_seconds, "n_iter": clf.n_iter_,
        "converged": converged,
    }
    theirs = None
    if not no_sklearn:
        from softgrad._linear_model import objective_reference

        lr, lr_seconds, lr_C, W_sk, b_sk = _sklearn_reference(parts.X_train, parts.y_train, alpha, tol,
                                                              max_iter, C)
        lr_objective, _, _ = objective_reference(W_sk, b_sk, parts.X_train, y_index, None, alpha)
        theirs = {
            "train_accuracy": _accuracy(lr, parts.X_train, parts.y_train),
            "val_accuracy": _accuracy(lr, parts.X_val, parts.y_val),
            "test_accuracy": _accuracy(lr, parts.X_test, parts.y_test),
            "objective": lr_objective, "fit_seconds": lr_seconds, "n_iter": int(np.max(lr.n_iter_)),
            "C": lr_C,
        }

    rows = [("train accuracy", "train_accuracy", "pct"), ("validation accuracy", "val_accuracy", "pct"),
            ("test accuracy", "test_accuracy", "pct"), ("final objective", "objective", "obj"),
            ("fit time", "fit_seconds", "s"), ("epochs / iterations" if solver == "sgd" else "iterations",
                                               "n_iter", "int")]
    head = (f"softgrad SoftmaxClassifier({solver})",) + (("sklearn LogisticRegression(lbfgs)",) if theirs else ())
    width = max(len(h) for h in head) + 2
    lines = ["".ljust(22) + "".join(h.rjust(width) for h in head)]
    for label, key, kind in rows:
        cells = [_fmt(ours[key], kind)] + ([_fmt(theirs[key], kind)] if theirs else [])
        if key == "n_iter" and solver == "sgd":  # sgd counts epochs; scikit-learn's L-BFGS, iterations
            cells = [f"{cells[0]} epochs"] + [f"{c} iterations" for c in cells[1:]]
        lines.append(label.ljust(22) + "".join(c.rjust(width) for c in cells))
    echo("\n".join(lines))
    if theirs:
        rel = abs(ours["objective"] - theirs["objective"]) / abs(theirs["objective"])
        if solver == "lbfgs":
            timing = f"fit time ratio softgrad / sklearn = {fit_seconds / theirs['fit_seconds']:.2f}"
        else:  # a fixed budget of gd/sgd steps against a converged L-BFGS: the times are not comparable
            timing = f"fit times not comparable ({solver} with max_iter={max_iter} vs scikit-learn's L-BFGS)"
        echo(f"objective: relative difference {rel:.2e} (alpha = {alpha:g} <-> sklearn C = {theirs['C']:.6g}); "
             + timing)

    try:
        out.mkdir(parents=True, exist_ok=True)
        # the saved model takes raw features: the standardisation is folded into its weights
        clf.save(out / "model.npz", preprocessing=parts.scaler if parts.scaler is not None else "none")
    except OSError as exc:
        raise click.ClickException(f"cannot write {str(out / 'model.npz')!r}: {exc.strerror or exc}") from exc
    files = ["metrics.json", "model.npz"]
    if not no_plots:
        files += _write_plots(out, clf, parts, data, classes, solver, theirs, quiet)
    metrics = {
        "softgrad": softgrad.__version__, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "data": data.name, "n_features": D, "n_classes": C,
        "split": {"seed": seed, "train": int(parts.X_train.shape[0]), "val": int(parts.X_val.shape[0]),
                  "test": int(parts.X_test.shape[0]), "standardized": not no_standardize},
        "backend": softgrad.get_backend(),
        "params": {k: v for k, v in clf.get_params().items() if k != "callback"},
        "gradcheck": {"passed": report.passed, "max_abs_error": report.max_abs_error,
                      "max_rel_error": report.max_rel_error, "rows": batch_shape[0], "features": batch_shape[1]},
        "sanity_check": {"initial_loss": loss0, "log_C": log_c},
        "softgrad_classifier": ours, "sklearn_logistic_regression": theirs,
        "loss_curve": clf.loss_curve_.tolist(), "files": files,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json_default) + "\n")
    summary = (f"test accuracy {100 * ours['test_accuracy']:.2f} %, objective {ours['objective']:.6f}, "
               f"{fit_seconds:.2f} s; wrote {out}/: {', '.join(files)}")
    click.echo(summary if quiet else f"\nWrote {out}/: {', '.join(files)}")


def _uncreatable(folder: Path) -> str | None:
    """Why ``folder`` cannot be created (or used), or None: checked on its nearest existing ancestor."""
    path = folder.expanduser().absolute()
    if path.exists():
        if not path.is_dir():
            return "it exists and is not a folder"
        return None if os.access(path, os.W_OK | os.X_OK) else "it is not writable"
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{str(parent)!r} is not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{str(parent)!r} is not writable"
    return None


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _write_plots(out, clf, parts, data, classes, solver, theirs, quiet):
    from softgrad import _plots

    files = []
    curves = {f"softgrad ({solver})": clf.loss_curve_}
    _plots.loss_curve(curves, out / "loss_curve.png", reference=None if theirs is None else theirs["objective"],
                      reference_label="scikit-learn LogisticRegression", xlabel="epoch" if solver == "sgd" else "iteration")
    files.append("loss_curve.png")
    names = None
    if data.class_names is not None and np.issubdtype(classes.dtype, np.integer) and classes.max() < len(data.class_names):
        names = [data.class_names[int(c)] for c in classes]
    if data.image_shape is not None and int(np.prod(data.image_shape)) == clf.coef_.shape[1]:
        _plots.weight_images(clf.coef_, data.image_shape, out / "weights.png", class_names=names)
        files.append("weights.png")
    X_eval, y_eval, part = ((parts.X_test, parts.y_test, "test") if parts.X_test.shape[0]
                            else (parts.X_train, parts.y_train, "train"))
    _plots.confusion_matrix(y_eval, clf.predict(X_eval), classes, out / "confusion_matrix.png",
                            title=f"Confusion matrix ({part})", class_names=names)
    files.append("confusion_matrix.png")
    if clf.coef_.shape[1] == 2:
        # the points drawn are X_eval, so the accuracy in the title is the printed test (or train) accuracy
        scaled = " standardised" if parts.scaler is not None else ""
        _plots.decision_regions(clf.predict, X_eval, y_eval, classes, out / "decision_regions.png",
                                title=f"Decision regions,{scaled} {part} points")
        files.append("decision_regions.png")
    return files
