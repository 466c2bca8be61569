"""``SoftmaxClassifier``: multinomial logistic regression with scikit-learn's estimator contract.

Layering: the loss kernel ``(logits, target) -> (loss, grad_logits)`` lives in
``softgrad._kernels``; :mod:`softgrad._linear_model` composes it with the linear map
(one reusable ``(N, C)`` work array per problem); this module validates input, picks a
solver, and keeps scikit-learn's fitted-attribute conventions. Saving uses ``.npz``
with a JSON header and never pickle. ``_LinearClassifier`` holds the fitting machinery
that :class:`softgrad.LogisticRegression` (``softgrad._logistic``) shares.

Conventions:
    ``coef_`` is ``(C, D)`` and ``intercept_`` is ``(C,)``, one row per class in the order
    of ``classes_`` (also for two classes: a softmax model keeps both rows, and
    ``coef_[1] - coef_[0]`` is the log-odds weight vector; a binary logistic model has one
    row, ``(1, D)``). The solvers work on ``W = coef_`` directly, as
    :mod:`softgrad._linear_model` takes it. ``X`` is dense or SciPy sparse (CSR/CSC),
    float32 or float64; the fitted weights take ``X``'s dtype.
"""

from __future__ import annotations

import collections
import json
import math
import numbers
import sys
import warnings
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, _fit_context
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, check_random_state, validate_data

from softgrad import _lbfgs, _linear_model
from softgrad._backend import kernels as _kernels
from softgrad._softmax import log_softmax as _log_softmax
from softgrad._softmax import softmax as _softmax

__all__ = ["SoftmaxClassifier"]

_FORMAT = "softgrad.SoftmaxClassifier"
_FORMAT_VERSION = 1
# Below this many multiply-adds per evaluation (N * D * C) the float32 phase of
# precision="auto" saves less than the float32 copy of X and the restart cost.
_MIXED_MIN_WORK = 1 << 23
# Below this many multiply-adds per objective evaluation (rows * D * C; for sgd a batch's
# rows) one evaluation takes well under a millisecond, and waking a second BLAS/Numba
# thread costs more than it saves -- on a busy machine ~5-10x more (measured: this test
# suite 78 s with two threads, 11 s with one, load average 5). Such fits run on one thread.
_SERIAL_MAX_WORK = 1 << 22
# relative objective decrease at which L-BFGS stops (as scikit-learn sets it for L-BFGS-B)
_FTOL = 64 * np.finfo(np.float64).eps
# options of the gd/sgd solvers and of precision, for estimators whose parameters lack them
_SOLVER_DEFAULTS = {"learning_rate": "auto", "schedule": "constant", "batch_size": 200, "shuffle": True,
                    "n_iter_no_change": 5, "precision": "auto", "callback": None}
# sgd with schedule="adaptive" stops after dividing the step by 5 five times (5**-5 = 3.2e-4)
_ADAPTIVE_FLOOR = 1.5 * 5.0 ** -5


class _LinearClassifier(ClassifierMixin, BaseEstimator):
    """Fitting machinery shared by :class:`SoftmaxClassifier` and :class:`softgrad.LogisticRegression`.

    A subclass supplies its constructor and parameters, :meth:`_alpha` (the L2 strength of
    the mean objective, from the summed weights) and ``_binary_logit`` (whether two classes
    are fitted as one logistic logit, ``coef_`` ``(1, D)``, instead of two softmax rows).
    Solver options a subclass does not expose take ``_SOLVER_DEFAULTS``.
    """

    _binary_logit = False

    def _option(self, name):
        """A solver option: the parameter if the estimator has it, else SoftmaxClassifier's default."""
        return getattr(self, name) if name in self._get_param_names() else _SOLVER_DEFAULTS[name]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        return tags

    def _alpha(self, weight_sum):  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    # ------------------------------------------------------------------ fit
    def _fit(self, X, y, sample_weight):
        name = type(self).__name__
        X, y = validate_data(self, X, y, accept_sparse=("csr", "csc"), dtype=[np.float64, np.float32],
                             order="C")
        check_classification_targets(y)
        classes, target = np.unique(y, return_inverse=True)
        target = np.ascontiguousarray(target.reshape(-1), dtype=np.int64)
        if classes.shape[0] < 2:
            raise ValueError(
                f"{name} needs samples of at least 2 classes in y; the data contains "
                f"only one class: {classes[0]!r}")
        weights = self._row_weights(sample_weight, classes, target)
        present = np.bincount(target, weights=weights, minlength=classes.shape[0]) > 0
        if present.sum() < 2:
            raise ValueError(
                f"{name} needs at least 2 classes with positive sample_weight; the "
                f"weights leave only the class {classes[np.flatnonzero(present)[0]]!r}")
        weight_sum = float(weights.sum())
        row_scale = weights / weight_sum
        alpha = float(self._alpha(weight_sum))

        N, D = X.shape
        C = classes.shape[0]
        binary = self._binary_logit and C == 2
        rows = 1 if binary else C
        W, b = self._initial_weights(classes, D, rows)
        work = _work_per_row(X) * rows  # multiply-adds per evaluation, per row of the batch
        precision = self._option("precision")
        if precision == "auto":
            # float32 data is fitted in float32 first at no cost; float64 sparse data would
            # need a float32 copy of its values for little gain (its products are bound by
            # the index reads)
            cheap = X.dtype == np.float32 or not _linear_model.is_sparse(X)
            precision = ("mixed" if self.solver == "lbfgs" and cheap and N * work >= _MIXED_MIN_WORK
                         else "float64")

        self._curve: list[float] = []
        self._abnormal_stop = None  # the solver's message when it stops before max_iter unconverged
        batch = min(self._option("batch_size"), N) if self.solver == "sgd" else N
        problem = _Problem(X, target, row_scale, alpha, binary)
        with _thread_limit(batch * work, _linear_model.is_sparse(X)):
            if self.solver == "lbfgs":
                X32 = _as_float32(X) if precision == "mixed" else None
                W, b, objective, converged = self._fit_lbfgs(problem, X32, W, b)
            elif self.solver == "gd":
                W, b, objective, converged = self._fit_gd(problem, W, b)
            else:
                W, b, objective, converged = self._fit_sgd(problem, W, b)

        if not converged and self._abnormal_stop is not None:
            warnings.warn(
                _abnormal_stop_message(f"{name}(solver={self.solver!r})", len(self._curve), self.max_iter,
                                       self._abnormal_stop, f" (max |X| = {_max_abs_value(X):.3g})"),
                ConvergenceWarning, stacklevel=4)
        elif not converged:
            warnings.warn(
                f"{name}(solver={self.solver!r}) did not converge within "
                f"max_iter={self.max_iter} {'epochs' if self.solver == 'sgd' else 'iterations'} "
                f"(tol={self.tol}); increase max_iter or tol, or standardise X.",
                ConvergenceWarning, stacklevel=4)
        del self._abnormal_stop
        # scikit-learn's convention: the fitted weights have X's dtype (float32 in, float32 out)
        self.classes_ = classes
        self.coef_ = np.ascontiguousarray(W, dtype=X.dtype)
        self.intercept_ = (np.zeros(rows, dtype=X.dtype) if b is None
                           else np.array(b, dtype=X.dtype))
        self.loss_curve_ = np.asarray(self._curve, dtype=np.float64)
        self.objective_ = float(objective)
        del self._curve
        return self

    def _row_weights(self, sample_weight, classes, target):
        """``s_i``: validated ``sample_weight`` times ``class_weight[y_i]``, float64 ``(N,)``."""
        N = target.shape[0]
        if sample_weight is None:
            s = np.ones(N)
        else:
            s = np.asarray(sample_weight)
            if s.ndim == 0:
                s = np.full(N, s)
            if s.dtype == object or not np.issubdtype(s.dtype, np.number) or np.iscomplexobj(s):
                raise TypeError(f"sample_weight must be an array of real numbers, got dtype {s.dtype}")
            if s.shape != (N,):
                raise ValueError(f"sample_weight must have shape ({N},) (one per sample), got {s.shape}")
            s = s.astype(np.float64)
            if not np.isfinite(s).all():
                raise ValueError("sample_weight contains NaN or infinity")
            if (s < 0).any():
                raise ValueError("sample_weight contains negative values")
        if self.class_weight is not None:
            s = s * _class_weights(self.class_weight, classes, target, s)[target]
        if not s.sum() > 0:
            raise ValueError("sample_weight (times class_weight) sums to zero: all weights are zero, nothing to fit")
        return s

    def _initial_weights(self, classes, D, rows=None):
        """Zeros (the objective is convex), or the previous fit with ``warm_start``.

        ``rows`` is the number of weight rows (``C``, or 1 for a binary logistic fit).
        """
        rows = classes.shape[0] if rows is None else rows
        if (self.warm_start and hasattr(self, "coef_") and self.coef_.shape == (rows, D)
                and np.array_equal(self.classes_, classes)):
            W = np.array(self.coef_, dtype=np.float64, order="C")
            b = np.array(self.intercept_, dtype=np.float64) if self.fit_intercept else None
            return W, b
        return np.zeros((rows, D)), (np.zeros(rows) if self.fit_intercept else None)

    def _record(self, objective):
        self._curve.append(float(objective))
        n = len(self._curve)
        if self.verbose:
            print(f"{type(self).__name__}[{self.solver}] iteration {n}: objective {objective:.8f}",
                  file=sys.stdout)
        if self._option("callback") is not None:
            self._option("callback")(n, float(objective))

    # ---------------------------------------------------------------- lbfgs
    def _fit_lbfgs(self, problem, X32, W, b):
        rows, D = W.shape
        fit_intercept = b is not None

        def objective_in(dtype):
            # float32: on the float32 copy of X; float64: on X as given (float32 X is cast
            # block by block, never copied whole)
            data = problem if dtype == np.float64 else problem._replace(X=X32)
            return _Objective(data, rows, fit_intercept, dtype)

        theta, objective, converged, self._abnormal_stop = _lbfgs_in_phases(
            objective_in, _pack(W, b), float32=X32 is not None, max_iter=self.max_iter, tol=self.tol,
            record=self._record)
        W, b = _unpack(theta, rows, D, fit_intercept)
        return W, b, objective, converged

    # ------------------------------------------------------------------- gd
    def _step_size(self, X, row_scale, alpha, fit_intercept):
        if self._option("learning_rate") == "auto":
            try:
                with np.errstate(over="raise", invalid="raise"):
                    step = 1.0 / _linear_model.lipschitz_bound(X, row_scale, alpha, fit_intercept)
            except FloatingPointError:
                step = math.nan
            if not (math.isfinite(step) and step > 0.0):
                raise ValueError(
                    f"X is too large to fit with solver={self.solver!r}: the step-size bound "
                    f"overflows float64 (max |X| = {_max_abs_value(X):.3g}); standardise X, "
                    f"e.g. with sklearn.preprocessing.StandardScaler")
            return step
        return float(self._option("learning_rate"))

    def _check_finite(self, objective, gW, gb, t):
        """Stop with a ValueError when a gd/sgd step made the objective or gradient non-finite."""
        if math.isfinite(objective) and _finite_gradient(gW, gb):
            return
        unit = "epoch" if self.solver == "sgd" else "iteration"
        raise ValueError(
            f"{type(self).__name__}(solver={self.solver!r}) diverged: the objective became "
            f"{objective} at {unit} {t + 1} (the products X @ W overflow float64); standardise X "
            f"or lower learning_rate (now {self._option('learning_rate')!r})")

    def _scheduled(self, eta0, eta, t, objective, previous):
        """Step for iteration/epoch ``t + 1`` given the objective of ``t`` and ``t - 1``."""
        if self._option("schedule") == "invscaling":
            return eta0 / math.sqrt(t + 2)
        if self._option("schedule") == "adaptive" and objective >= previous:
            return 0.5 * eta
        return eta

    def _fit_gd(self, problem, W, b):
        X, target, row_scale, alpha, binary = problem
        N = X.shape[0]
        work = np.empty((N, W.shape[0]))
        loss_rows = np.empty(N)
        eta0 = eta = self._step_size(X, row_scale, alpha, b is not None)
        gW = np.empty_like(W)
        gb = None if b is None else np.empty_like(b)
        objective, gW, gb = _linear_model.objective_and_gradient(
            W, b, X, target, row_scale, alpha, work, loss_rows, gW, gb, binary=binary)
        previous = math.inf
        converged = False
        for t in range(self.max_iter):
            if _max_abs(gW, gb) <= self.tol:
                converged = True
                break
            # the seed's update: W += -step * dW ; b += -step * db
            W -= eta * gW
            if b is not None:
                b -= eta * gb
            with np.errstate(over="ignore", invalid="ignore"):  # reported by _check_finite
                new_objective, gW, gb = _linear_model.objective_and_gradient(
                    W, b, X, target, row_scale, alpha, work, loss_rows, gW, gb, binary=binary)
            self._check_finite(new_objective, gW, gb, t)
            self._record(new_objective)
            previous, objective = objective, new_objective
            eta = self._scheduled(eta0, eta, t, objective, previous)
        else:
            converged = _max_abs(gW, gb) <= self.tol
        return W, b, objective, converged

    # ------------------------------------------------------------------ sgd
    def _fit_sgd(self, problem, W, b):
        X, target, row_scale, alpha, binary = problem
        N, D = X.shape
        rows = W.shape[0]
        B = min(self._option("batch_size"), N)
        rng = check_random_state(self.random_state)
        eta0 = eta = self._step_size(X, row_scale, alpha, b is not None)
        sparse = _linear_model.is_sparse(X)
        Xr = X.tocsr() if sparse else X  # row gathers: CSR (a CSC matrix is converted once)
        # Buffers reused by every batch: rows of X (dense), targets, scales, logits/gradient.
        Xb = None if sparse else np.empty((B, D), dtype=X.dtype)
        tb = np.empty(B, dtype=np.int64)
        rb = np.empty(B)
        work = np.empty((B, rows))
        loss_rows = np.empty(B)
        gW = np.empty_like(W)
        gb = None if b is None else np.empty_like(b)
        order = np.arange(N)
        best = math.inf
        stall = 0
        previous = math.inf
        converged = False
        for epoch in range(self.max_iter):
            if self._option("shuffle"):
                rng.shuffle(order)
            epoch_objective = 0.0
            for start in range(0, N, B):
                idx = order[start:start + B]
                n = idx.shape[0]
                yb, sb = tb[:n], rb[:n]
                if sparse:
                    xb = Xr[idx]
                else:
                    xb = Xb[:n]
                    np.take(Xr, idx, axis=0, out=xb)
                np.take(target, idx, out=yb)
                # (N / n) r_i makes the batch objective an unbiased estimate of J.
                np.take(row_scale, idx, out=sb)
                sb *= N / n
                with np.errstate(over="ignore", invalid="ignore"):  # reported by _check_finite
                    objective, gW, gb = _linear_model.objective_and_gradient(
                        W, b, xb, yb, sb, alpha, work[:n], loss_rows[:n], gW, gb, binary=binary)
                self._check_finite(objective, gW, gb, epoch)
                epoch_objective += objective * (n / N)
                W -= eta * gW
                if b is not None:
                    b -= eta * gb
            self._record(epoch_objective)
            if epoch_objective > best - self.tol:
                stall += 1
            else:
                stall = 0
            best = min(best, epoch_objective)
            if self._option("schedule") == "invscaling":
                eta = self._scheduled(eta0, eta, epoch, epoch_objective, previous)
            previous = epoch_objective
            if stall >= self._option("n_iter_no_change"):
                if self._option("schedule") == "adaptive" and eta > eta0 * _ADAPTIVE_FLOOR:
                    eta /= 5.0
                    stall = 0
                    continue
                converged = True
                break
        objective = _linear_model.objective_value(W, b, X, target, row_scale, alpha, binary=binary)
        return W, b, objective, converged

    # ------------------------------------------------------------- predict
    def _logits(self, X):
        """``(N, C)`` class scores; a binary logistic model's one logit ``z`` as ``[0, z]``.

        The product runs in the common dtype of ``X`` and ``coef_`` (float32 data with a
        float32 model stays float32, as in scikit-learn).
        """
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, accept_sparse=("csr", "csc"),
                          dtype=[np.float64, np.float32])
        z = np.asarray(X @ self.coef_.T) + self.intercept_
        if z.shape[1] == 1:
            z = np.concatenate([np.zeros_like(z), z], axis=1)
        return np.ascontiguousarray(z)

    def decision_function(self, X):
        """Class scores ``z = X @ coef_.T + intercept_``.

        Args:
            X: array-like or sparse matrix ``(N, D)``.

        Returns:
            ``(N, C)`` logits in the common dtype of ``X`` and ``coef_``; for two classes
            the log-odds of ``classes_[1]`` (``z_1 - z_0``), of shape ``(N,)``
            (scikit-learn's binary convention).
        """
        z = self._logits(X)
        return z[:, 1] - z[:, 0] if z.shape[1] == 2 else z

    def predict_proba(self, X):
        """Class probabilities ``softmax(z)``, ``(N, C)`` in the order of ``classes_``."""
        return _softmax(self._logits(X), axis=-1)

    def predict_log_proba(self, X):
        """``log_softmax(z)`` (stable, no ``log(0)``), ``(N, C)``."""
        return _log_softmax(self._logits(X), axis=-1)

    def predict(self, X):
        """The most probable label per row, ``classes_[argmax z]``, shape ``(N,)``."""
        z = self._logits(X)
        return self.classes_[np.argmax(z, axis=1)]


class SoftmaxClassifier(_LinearClassifier):
    r"""Linear softmax classifier (multinomial logistic regression) trained by our own gradient.

    Minimises, over weights :math:`W` (``C x D``, ``coef_``) and intercepts :math:`b` (``C``),

    .. math::

        J(W, b) = \sum_i r_i \Big(\log\sum_c e^{z_{ic}} - z_{i y_i}\Big)
                  + \frac{\alpha}{2}\,\lVert W \rVert_F^2, \qquad
        z_i = W x_i + b, \quad r_i = \frac{s_i}{\sum_j s_j},

    a weighted *mean* of the cross-entropy plus an L2 penalty (the intercept is not
    penalised). :math:`s_i` is ``sample_weight`` times the ``class_weight`` of
    :math:`y_i` (ones by default).

    Regularisation mapping (same minimiser):

    * scikit-learn's ``LogisticRegression(C=...)`` (1.9: multinomial for 3+ classes, L2
      ``l1_ratio=0``, unpenalised intercept) minimises :math:`C\sum_i s_i\ell_i +
      \frac12\lVert W\rVert^2`, i.e. :math:`C \sum_j s_j` times our :math:`J` with
      :math:`\alpha = 1 / (C \sum_j s_j)` (``sum_j s_j = n_samples`` without weights).
      scikit-learn reports the objective divided by :math:`\sum_j s_j`, which equals our
      ``objective_``. For **two** classes scikit-learn fits one log-odds vector
      :math:`w` (binomial); the softmax optimum has :math:`W = [-w/2, w/2]`, so
      ``LogisticRegression(C=2 / (alpha * sum_j s_j))`` gives the same predictions.
    * CS231n's ``reg``: the training loop of the step-by-step derivation (README [D])
      adds ``0.5 * reg * sum(W * W)``, so ``alpha = reg``; the assignment's
      ``softmax_loss_vectorized`` adds ``reg * sum(W * W)``, so ``alpha = 2 * reg``. Both
      average the loss over rows.
    * scikit-learn's ``SGDClassifier(loss="log_loss", alpha=...)`` uses the same
      ``alpha`` (binary/one-vs-rest there, though).

    Solvers:

    * ``"lbfgs"`` (default): L-BFGS on our analytic gradient -- L-BFGS-B's iteration
      (SciPy's ``minimize(method="L-BFGS-B")`` takes the same steps, to rounding) with a
      cheaper inverse-Hessian product (``softgrad._lbfgs``) -- stopping when
      the largest gradient entry is ``<= tol`` (scikit-learn's criterion). With
      ``precision="mixed"`` (chosen automatically for large problems) it first runs in
      float32 on a float32 copy of ``X`` (twice the matrix-product speed) and then
      continues in float64 from there until the float64 gradient meets ``tol``, so the
      result is certified in float64.
    * ``"gd"``: full-batch gradient descent, CS231n's training loop, with step
      ``learning_rate`` (``"auto"``: ``1 / L`` for an upper bound ``L`` of the
      gradient's Lipschitz constant, which guarantees descent); same stopping rule.
    * ``"sgd"``: mini-batch stochastic gradient descent over ``batch_size`` rows,
      ``shuffle``-d each epoch with ``random_state``; ``max_iter`` counts epochs; stops
      when the epoch objective has not improved on its best by more than ``tol`` for
      ``n_iter_no_change`` epochs in a row.

    Threads: a fit whose objective evaluation is small (``rows * D * C < 2**22``, rows
    being ``batch_size`` for ``sgd``) runs with one BLAS and one kernel thread
    (threadpoolctl): there, synchronising a second thread costs more than it saves.
    Larger fits give one of BLAS and the kernels one thread, so that idle workers of one
    do not spin on the cores the other needs: a dense fit runs the loss kernel on one
    thread between BLAS's products, a sparse fit runs BLAS (vector operations only) on
    one thread beside the kernels' sparse products. The L-BFGS solver's own products
    (two passes over its stored pairs per iteration) run on NumPy's BLAS under the same
    limits.

    ``schedule`` sets the step of ``gd``/``sgd`` at iteration/epoch ``t``:
    ``"constant"`` (:math:`\eta`), ``"invscaling"`` (:math:`\eta/\sqrt{t+1}`) or
    ``"adaptive"``: ``gd`` halves :math:`\eta` whenever the objective increases;
    ``sgd`` divides it by 5 where the stopping rule would stop, and stops once
    :math:`\eta` has been divided five times.

    Args:
        alpha: L2 strength :math:`\alpha \ge 0` (see the mapping above).
        fit_intercept: learn :math:`b` (otherwise :math:`b = 0`).
        solver: ``"lbfgs"``, ``"gd"`` or ``"sgd"``.
        max_iter: iterations (``lbfgs``, ``gd``) or epochs (``sgd``), ``>= 1``.
        tol: stopping tolerance ``>= 0`` (see the solvers).
        learning_rate: step size ``> 0`` of ``gd``/``sgd``, or ``"auto"`` (``1 / L``).
        schedule: ``"constant"``, ``"invscaling"`` or ``"adaptive"`` (``gd``/``sgd``).
        batch_size: rows per mini-batch of ``sgd`` (clipped to ``n_samples``).
        shuffle: reshuffle the rows every ``sgd`` epoch.
        n_iter_no_change: patience of ``sgd``'s stopping rule, in epochs.
        class_weight: ``None``, ``"balanced"`` or a dict ``{label: weight >= 0}``;
            multiplies ``sample_weight``. ``"balanced"`` is scikit-learn 1.9's
            ``sum_i s_i / (n_classes * sum_{i in class} s_i)``: classes counted by summed
            ``sample_weight`` (``n_samples / (n_classes * count)`` without weights).
        precision: ``"float64"``, ``"mixed"`` (``lbfgs`` only: a float32 phase, then
            float64; costs a float32 copy of float64 ``X``, none of float32 ``X``) or
            ``"auto"`` (``"mixed"`` when the solver is ``lbfgs``, an evaluation takes
            ``>= 2**23`` multiply-adds (``N * D * C``, sparse ``nnz * C``) and ``X`` is
            dense or float32; else ``"float64"``). The float64 phase reads float32 ``X``
            as it is, casting blocks of rows to float64, so float32 data is never copied
            to float64 whole.
        warm_start: start from the previous ``coef_``/``intercept_`` when the classes
            and features match.
        random_state: seed or ``numpy.random.RandomState``/``Generator`` for ``sgd``'s
            shuffling.
        verbose: ``> 0`` prints the objective every iteration/epoch.
        callback: ``None`` or ``callback(n_iter, objective)``, called after each
            iteration/epoch (e.g. to drive a progress bar); not saved by :meth:`save`.

    Attributes:
        classes_: ``(C,)`` the sorted labels (any type ``numpy.unique`` sorts).
        coef_: ``(C, D)`` weights, in ``X``'s dtype (float32 or float64) as in scikit-learn.
        intercept_: ``(C,)`` intercepts, same dtype (zeros without ``fit_intercept``).
        n_iter_: iterations (``lbfgs``, ``gd``) or epochs (``sgd``) run, an int.
        loss_curve_: ``(n_iter_,)`` float64 objective after each iteration (``sgd``: the
            mean of the mini-batch objectives over the epoch).
        objective_: float, :math:`J` at the returned weights, in float64.
        n_features_in_, feature_names_in_: as in scikit-learn.

    Examples:
        >>> from sklearn.datasets import load_iris
        >>> X, y = load_iris(return_X_y=True)
        >>> clf = SoftmaxClassifier(alpha=1e-2).fit(X, y)
        >>> clf.coef_.shape, clf.predict_proba(X[:2]).sum(axis=1).round(6)
        ((3, 4), array([1., 1.]))
        >>> bool(clf.score(X, y) > 0.95)
        True
    """

    _parameter_constraints: dict = {
        "alpha": [Interval(numbers.Real, 0, None, closed="left")],
        "fit_intercept": ["boolean"],
        "solver": [StrOptions({"lbfgs", "gd", "sgd"})],
        "max_iter": [Interval(numbers.Integral, 1, None, closed="left")],
        "tol": [Interval(numbers.Real, 0, None, closed="left")],
        "learning_rate": [Interval(numbers.Real, 0, None, closed="neither"), StrOptions({"auto"})],
        "schedule": [StrOptions({"constant", "invscaling", "adaptive"})],
        "batch_size": [Interval(numbers.Integral, 1, None, closed="left")],
        "shuffle": ["boolean"],
        "n_iter_no_change": [Interval(numbers.Integral, 1, None, closed="left")],
        "class_weight": [dict, StrOptions({"balanced"}), None],
        "precision": [StrOptions({"auto", "float64", "mixed"})],
        "warm_start": ["boolean"],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
        "callback": [callable, None],
    }

    def __init__(self, alpha=1e-3, *, fit_intercept=True, solver="lbfgs", max_iter=100, tol=1e-4,
                 learning_rate="auto", schedule="constant", batch_size=200, shuffle=True,
                 n_iter_no_change=5, class_weight=None, precision="auto", warm_start=False,
                 random_state=None, verbose=0, callback=None):
        self.alpha = alpha
        self.fit_intercept = fit_intercept
        self.solver = solver
        self.max_iter = max_iter
        self.tol = tol
        self.learning_rate = learning_rate
        self.schedule = schedule
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.n_iter_no_change = n_iter_no_change
        self.class_weight = class_weight
        self.precision = precision
        self.warm_start = warm_start
        self.random_state = random_state
        self.verbose = verbose
        self.callback = callback

    # ------------------------------------------------------------------ fit
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, sample_weight=None):
        """Fit the model to ``X`` ``(n_samples, n_features)`` and labels ``y`` ``(n_samples,)``.

        Args:
            X: array-like ``(N, D)`` of finite numbers, or a SciPy sparse matrix/array
                (CSR or CSC are used as they are, int32 or int64 indices; other formats
                are converted to CSR once). float32 data is fitted without a float64
                copy and gives float32 ``coef_``/``intercept_``.
            y: array-like ``(N,)`` class labels of any type ``numpy.unique`` can sort;
                at least two classes.
            sample_weight: ``None`` or array-like ``(N,)`` of finite non-negative weights.

        Returns:
            self

        Raises:
            ValueError: NaN/inf or empty ``X``, mismatched lengths, continuous ``y``,
                fewer than two classes (with positive weight), negative/non-finite
                ``sample_weight`` or ``class_weight`` or a zero total weight, invalid
                parameters.
            TypeError: non-numeric ``sample_weight``.
        """
        self._fit(X, y, sample_weight)
        self.n_iter_ = int(self.loss_curve_.shape[0])
        return self

    def _alpha(self, weight_sum):
        return self.alpha

    # ----------------------------------------------------------- save/load
    def save(self, path, *, preprocessing=None) -> Path:
        """Write the fitted model to ``path`` as ``.npz`` without pickle.

        The file holds a JSON header (format name and version, softgrad version,
        parameters, label type, the input it takes) and the arrays ``coef``,
        ``intercept``, ``classes``, ``loss_curve`` and, if present, ``feature_names_in``.
        Labels must be numbers, booleans or strings.

        Args:
            path: the file to write.
            preprocessing: how the features given to :meth:`fit` were prepared, so that
                the file (and ``softgrad predict``) takes raw features whichever way the
                model was made:

                - a fitted standardisation, ``x -> (x - mean) / scale``: a
                  :class:`softgrad.datasets.Standardizer` or a fitted
                  ``sklearn.preprocessing.StandardScaler`` (``with_mean=False`` /
                  ``with_std=False`` honoured). It is folded into the stored weights,
                  ``W_raw = W / scale`` and ``b_raw = b - W_raw @ mean`` (exact up to
                  rounding, since ``z = W (x - mean) / scale + b`` is linear in ``x``), so
                  the loaded model takes raw features; the header records
                  ``"preprocessing": "standardize (folded into coef/intercept)"``.
                - ``"none"``: the model was fitted on raw features; recorded as such.
                - ``None`` (default): nothing is recorded. ``softgrad predict`` then warns
                  when the data look unscaled, since it cannot tell a model fitted on
                  standardised features from one fitted on raw ones.

        Returns:
            The path written.

        Raises:
            sklearn.exceptions.NotFittedError: the model (or the ``StandardScaler``) is not fitted.
            TypeError: labels or feature names of a type that cannot be stored without
                pickle; ``preprocessing`` of an unsupported kind.
            ValueError: ``preprocessing`` statistics of the wrong length or not finite,
                or a zero/negative scale.
        """
        check_is_fitted(self)
        coef, intercept, recorded = self.coef_, self.intercept_, None
        if isinstance(preprocessing, str):
            if preprocessing != "none":
                raise TypeError(f"preprocessing must be None, 'none' or a fitted Standardizer/StandardScaler, "
                                f"got the string {preprocessing!r}")
            recorded = "none"
        elif preprocessing is not None:
            standardizer = _as_standardizer(preprocessing, int(self.n_features_in_))
            coef_raw, intercept_raw = standardizer.fold(coef.astype(np.float64), intercept.astype(np.float64))
            coef, intercept = coef_raw.astype(coef.dtype), intercept_raw.astype(intercept.dtype)
            if not (np.isfinite(coef).all() and np.isfinite(intercept).all()):
                raise ValueError("preprocessing: folding the standardisation into the weights overflows "
                                 f"{coef.dtype} (scale as small as {standardizer.scale_.min():.3g})")
            recorded = _FOLDED_STANDARDIZATION
        classes, label_kind = _encode_labels(self.classes_)
        params = {k: v for k, v in self.get_params().items() if k not in ("callback", "random_state")}
        if isinstance(params["class_weight"], dict):
            cw = params["class_weight"]
            keys, kind = _encode_labels(np.array(list(cw.keys())))
            params["class_weight"] = {"labels": keys.tolist(), "label_kind": kind,
                                      "weights": [float(v) for v in cw.values()]}
        header = {"format": _FORMAT, "version": _FORMAT_VERSION,
                  "softgrad": _softgrad_version(), "label_kind": label_kind,
                  "n_features_in": int(self.n_features_in_), "n_iter": int(self.n_iter_),
                  "objective": float(self.objective_), "params": params}
        if recorded is not None:
            header["preprocessing"] = recorded
        arrays = {"header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
                  "coef": coef, "intercept": intercept, "classes": classes,
                  "loss_curve": self.loss_curve_}
        if hasattr(self, "feature_names_in_"):
            names, _ = _encode_labels(np.asarray(self.feature_names_in_))
            arrays["feature_names_in"] = names.astype(str)
        path = Path(path)
        with open(path, "wb") as f:
            np.savez(f, **arrays)
        return path

    @classmethod
    def load(cls, path) -> "SoftmaxClassifier":
        """Read a model written by :meth:`save` (``allow_pickle=False``).

        The file is checked before it is trusted: its first bytes must be a zip
        signature (a multi-GB file of anything else is refused after reading 4 bytes);
        every member's declared size is bounded (``softgrad._safe_io``) before it is
        read; the JSON header must match :data:`_HEADER_SCHEMA` (unknown keys are
        ignored, so later versions may add optional ones) and agree with the arrays.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: the file is not a softgrad model (not an ``.npz``, empty or
                truncated, no or a foreign header, an unsupported version, a header of
                the wrong types or inconsistent with the arrays, duplicated classes,
                non-finite weights, members beyond the size bound). Every message
                starts with the file's path.
        """
        path = Path(path)
        name = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"model file {name!r} does not exist")
        with open(path, "rb") as f:
            magic = f.read(4)
        if not magic.startswith(b"PK"):
            raise ValueError(f"{name!r} is not a softgrad model file: not an .npz (zip) archive "
                             f"(it starts with {magic!r})")
        if path.stat().st_size < _ZIP_MIN_BYTES:
            raise ValueError(f"{name!r} is not a softgrad model file: {path.stat().st_size} bytes is "
                             f"too short for a zip archive (empty or truncated)")
        from softgrad import _safe_io

        try:
            data = _safe_io.read_npz(path, name)
        except ValueError as exc:
            why = str(exc).removeprefix(repr(name)).lstrip(": ")
            raise ValueError(f"{name!r} is not a softgrad model file (an .npz written by "
                             f"SoftmaxClassifier.save): {why}") from exc
        try:
            return cls._from_arrays(data, name)
        except ValueError as exc:
            if str(exc).startswith(repr(name)):
                raise
            raise ValueError(f"{name!r} is not a valid softgrad model file: {exc}") from exc
        except (KeyError, TypeError, OverflowError, AttributeError, IndexError, MemoryError) as exc:
            raise ValueError(f"{name!r} is not a valid softgrad model file: {type(exc).__name__}: {exc}") from exc

    @classmethod
    def _from_arrays(cls, data, name):
        def bad(why):
            return ValueError(f"{name!r} is not a valid softgrad model file: {why}")

        if "header" not in data:
            raise bad("no 'header' entry (not written by SoftmaxClassifier.save)")
        raw_header = data["header"]
        if raw_header.dtype != np.uint8 or raw_header.ndim != 1:
            raise bad(f"the header must be a 1-D uint8 array of JSON text, got {raw_header.dtype} {raw_header.shape}")
        try:
            header = json.loads(raw_header.tobytes().decode())
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise bad(f"the header is not valid JSON ({exc})") from exc
        if not isinstance(header, dict) or header.get("format") != _FORMAT:
            raise bad(f"header format is {header.get('format') if isinstance(header, dict) else header!r}, "
                      f"expected {_FORMAT!r}")
        if header.get("version") != _FORMAT_VERSION or isinstance(header.get("version"), bool):
            raise bad(f"format version {header.get('version')!r} is not supported "
                      f"(this softgrad reads version {_FORMAT_VERSION})")
        why = _check_header(header)
        if why:
            raise bad(why)
        for key in ("coef", "intercept", "classes", "loss_curve"):
            if key not in data:
                raise bad(f"missing array {key!r}")
        coef, intercept, classes = data["coef"], data["intercept"], data["classes"]
        D = header["n_features_in"]
        params = dict(header["params"])
        label_kind = header["label_kind"]
        if coef.ndim != 2 or not np.issubdtype(coef.dtype, np.floating) or coef.shape[1] != D:
            raise bad(f"coef must be a float (C, {D}) array, got {coef.dtype} {coef.shape}")
        C = coef.shape[0]
        if intercept.shape != (C,) or not np.issubdtype(intercept.dtype, np.floating):
            raise bad(f"intercept must be a float ({C},) array, got {intercept.dtype} {intercept.shape}")
        if classes.shape != (C,) or C < 2:
            raise bad(f"classes must have shape ({C},) with C >= 2, got {classes.shape}")
        if classes.dtype.kind not in _LABEL_DTYPE_KINDS[label_kind]:
            raise bad(f"the header's label_kind {label_kind!r} does not match the stored classes of dtype "
                      f"{classes.dtype}")
        if np.unique(classes).shape[0] != C:
            raise bad("classes contains duplicated labels")
        if not (np.isfinite(coef).all() and np.isfinite(intercept).all()):
            raise bad("coef/intercept contain NaN or infinity")
        curve = data["loss_curve"]
        if curve.ndim != 1 or curve.dtype.kind not in "fiu":
            raise bad(f"loss_curve must be a 1-D float array, got {curve.dtype} {curve.shape}")
        names_in = data.get("feature_names_in")
        if names_in is not None and (names_in.shape != (D,) or names_in.dtype.kind != "U"):
            raise bad(f"feature_names_in must be ({D},) strings (one per feature), got {names_in.dtype} "
                      f"{names_in.shape}")
        cw = params.get("class_weight")
        if isinstance(cw, dict):
            why = _check_class_weight_entry(cw)
            if why:
                raise bad(why)
            keys = _decode_labels(np.asarray(cw["labels"]), cw["label_kind"])
            params["class_weight"] = dict(zip(keys.tolist(), cw["weights"]))
        try:
            model = cls(**params)
        except TypeError as exc:
            raise bad(f"unknown parameters in header ({exc})") from exc
        try:
            model._validate_params()
        except (ValueError, TypeError) as exc:
            raise bad(f"invalid parameters in header: {exc}") from exc
        model.classes_ = _decode_labels(classes, label_kind)
        dtype = coef.dtype if coef.dtype in (np.float32, np.float64) else np.float64
        model.coef_ = np.ascontiguousarray(coef, dtype=dtype)
        model.intercept_ = intercept.astype(dtype)
        model.loss_curve_ = curve.astype(np.float64)
        model.n_iter_ = int(header.get("n_iter", model.loss_curve_.shape[0]))
        objective = header.get("objective")
        model.objective_ = float("nan") if objective is None else float(objective)
        model.n_features_in_ = D
        # what the file says of its input (None: not recorded); read by `softgrad predict`
        model._saved_preprocessing = header.get("preprocessing")
        if names_in is not None:
            model.feature_names_in_ = names_in.astype(object)
        return model


_Problem = collections.namedtuple("_Problem", "X target row_scale alpha binary")
_Problem.__doc__ = """One fit's data: ``X`` (dense or sparse), int64 ``target``, float64 ``row_scale``,
the L2 strength ``alpha`` and whether the model is one logistic logit (``binary``)."""


class _Objective:
    """``theta -> (J, grad)`` for the solver, ``theta = [W.ravel(), b]`` (``W`` is ``(C, D)``) in float64.

    Holds the problem, the compute ``dtype`` (float32 needs float32 ``X``; float64 takes
    float32 or float64 ``X``) and the reusable buffers: the ``(N, C)`` work array and the
    ``(N,)`` per-row losses.
    """

    def __init__(self, problem, rows, fit_intercept, dtype):
        N, D = problem.X.shape
        self.problem = problem
        self.D, self.C, self.fit_intercept = D, rows, fit_intercept
        self.dtype = np.dtype(dtype)
        self.work = np.empty((N, rows), dtype=self.dtype)
        self.loss_rows = np.empty(N)

    def __call__(self, theta):
        D, C = self.D, self.C
        p = self.problem
        grad = np.empty(theta.shape[0])
        if self.dtype == np.float64:
            W, b = _unpack(theta, C, D, self.fit_intercept)
            gW = grad[:D * C].reshape(C, D)
            gb = grad[D * C:] if self.fit_intercept else None
            J, _, _ = _linear_model.objective_and_gradient(
                W, b, p.X, p.target, p.row_scale, p.alpha, self.work, self.loss_rows, gW, gb,
                binary=p.binary)
        else:
            t = theta.astype(self.dtype)
            W, b = _unpack(t, C, D, self.fit_intercept)
            J, gW, gb = _linear_model.objective_and_gradient(
                W, b, p.X, p.target, p.row_scale, p.alpha, self.work, self.loss_rows,
                binary=p.binary)
            grad[:D * C] = gW.reshape(-1)
            if self.fit_intercept:
                grad[D * C:] = gb
        return J, grad

def _lbfgs_in_phases(objective_in, theta, *, float32, max_iter, tol, record):
    """The ``lbfgs`` schedule of ``SoftmaxClassifier.fit`` and ``fit_data_parallel``.

    ``objective_in(dtype)`` builds the objective ``theta -> (J, grad)`` computed in that
    dtype; ``record(objective)`` is called after every iteration. With ``float32`` a first
    phase runs on the float32 objective: its rounding makes it noisy at ~1e-8 relative, so
    the phase ends at the gradient tolerance or when a line search stops making progress.
    Either way the float64 phase checks the point and finishes, within ``max_iter``
    iterations in all. Returns ``(theta, objective, converged, abnormal)``; ``abnormal`` is
    the solver's reason when the float64 phase stopped abnormally (a line search found no
    decrease), else None.
    """
    def callback(intermediate_result):
        record(intermediate_result.fun)

    used = 0
    if float32 and max_iter > 0:
        f32 = objective_in(np.float32)
        res = _minimize_lbfgs(f32, theta, maxiter=max_iter, gtol=tol, ftol=_FTOL, callback=callback)
        theta, used = res.x, res.nit
        del f32, res  # the float32 (N, C) work array: only one work array lives at a time
    f64 = objective_in(np.float64)
    objective, grad = f64(theta)
    if np.max(np.abs(grad)) <= tol:
        return theta, objective, True, None
    if used >= max_iter:
        return theta, objective, False, None
    res = _minimize_lbfgs(f64, theta, maxiter=max_iter - used, gtol=tol, ftol=_FTOL, callback=callback,
                          initial=(objective, grad))
    abnormal = f"L-BFGS reported {res.message.strip().rstrip(':. ')}" if res.status == 2 else None
    return res.x, res.fun, res.status == 0, abnormal


def _abnormal_stop_message(label, n_iter, max_iter, reason, scale=""):
    """The ConvergenceWarning's text for an lbfgs fit that stopped before ``max_iter`` unconverged."""
    return (f"{label} stopped abnormally after {n_iter} iterations, not at max_iter={max_iter}: {reason}. "
            f"The line search found no decrease of the objective; this happens when X is badly scaled"
            f"{scale}: standardise X.")


def _minimize_lbfgs(fun, theta, *, maxiter, gtol, ftol, callback, initial=None):
    """L-BFGS with L-BFGS-B's schedule (:mod:`softgrad._lbfgs`) on ``fun(theta) -> (J, grad)``.

    scikit-learn's settings: ``m = 10`` pairs, at most 50 evaluations per line search,
    ``gtol`` on the largest gradient entry and ``ftol`` on the relative decrease. The
    iterates are SciPy's ``minimize(method="L-BFGS-B")``'s to rounding; each iteration
    reads the ``2 m n`` stored numbers twice (with NumPy's BLAS, under the fit's thread
    limits) where L-BFGS-B's own routine takes several passes (27 ms per iteration at
    ``n = 400020``, as long as one evaluation of that problem).
    """
    return _lbfgs.minimize_lbfgs(fun, theta, maxiter=int(maxiter), gtol=gtol, ftol=ftol, maxcor=10, maxls=50,
                                 callback=callback, initial=initial)


def _thread_limit(work_per_evaluation, sparse=False):
    """Thread limits for one fit: see the class docstring's "Threads".

    Small evaluations (``_SERIAL_MAX_WORK``) get one BLAS and one kernel thread. Otherwise
    one of the two libraries gets one thread, so that idle workers of one do not spin on
    the cores the other's threads need: a sparse fit's products are the backend's own
    kernels and BLAS only runs vector operations (the penalty's dot product, the solver's
    updates), so BLAS gets one thread (TF-IDF benchmark, 2 cores: the loss kernel 14 -> 1
    ms per evaluation, the fit 1.26 -> 0.76 s); a dense fit's products are BLAS's, so the
    kernels get one. threadpoolctl (a scikit-learn dependency) limits OpenBLAS/MKL/OpenMP and,
    through the controller the Numba backend registers, Numba; the backend is loaded first
    so that its threading library is visible to threadpoolctl.
    """
    from threadpoolctl import threadpool_limits

    _kernels()
    if work_per_evaluation < _SERIAL_MAX_WORK:
        return threadpool_limits(limits=1)
    if sparse:
        return threadpool_limits(limits=1, user_api="blas")
    # dense: BLAS runs the products, and the loss kernel between them runs on the calling
    # thread; a parallel kernel's OpenMP workers would spin against BLAS's idle ones on
    # the same cores (50000 x 256 x 20, 2 cores: kernel 13 -> 5 ms, products 20 -> 15 ms
    # per evaluation)
    return threadpool_limits(limits=1, user_api="numba")


def _pack(W, b):
    return np.concatenate([W.reshape(-1), b]) if b is not None else W.reshape(-1).copy()


def _unpack(theta, C, D, fit_intercept):
    W = theta[:D * C].reshape(C, D)
    return W, (theta[D * C:] if fit_intercept else None)


def _finite_gradient(gW, gb):
    return bool(np.isfinite(gW).all() and (gb is None or np.isfinite(gb).all()))


def _max_abs_value(X):
    data = X.data if _linear_model.is_sparse(X) else X
    return float(np.max(np.abs(data))) if data.size else 0.0


def _max_abs(gW, gb):
    m = float(np.max(np.abs(gW)))
    return m if gb is None else max(m, float(np.max(np.abs(gb))))


def _work_per_row(X):
    """Multiply-adds per row and class of ``X @ W.T``: ``D`` dense, the mean row's non-zeros sparse."""
    if _linear_model.is_sparse(X):
        return X.nnz / max(X.shape[0], 1)
    return X.shape[1]


def _as_float32(X):
    """``X`` in float32: itself if it is float32; sparse copies only the values (indices shared)."""
    if X.dtype == np.float32:
        return X
    if _linear_model.is_sparse(X):
        return type(X)((X.data.astype(np.float32), X.indices, X.indptr), shape=X.shape)
    return X.astype(np.float32)


def _class_weights(class_weight, classes, target, sample_weight):
    """Per-class weights ``(C,)`` float64, by scikit-learn 1.9's rule.

    ``"balanced"``: ``w_c = sum_i s_i / (C * sum_{i: y_i = c} s_i)`` with ``s`` the
    ``sample_weight`` (ones without it: ``n_samples / (C * count_c)``), i.e. the classes
    are counted by summed sample weight; a class whose weights sum to 0 gets 0 (its rows
    weigh nothing anyway). A dict ``{label: weight}``: labels it omits weigh 1.

    Raises:
        ValueError: a dict with labels that are not classes, or a weight that is
            negative or not finite.
    """
    C = classes.shape[0]
    if isinstance(class_weight, str) and class_weight == "balanced":
        totals = np.bincount(target, weights=sample_weight, minlength=C)
        safe = np.where(totals > 0, totals, 1.0)
        return np.where(totals > 0, totals.sum() / (C * safe), 0.0)
    weights = np.asarray(compute_class_weight(class_weight, classes=classes, y=classes), dtype=np.float64)
    bad = ~np.isfinite(weights) | (weights < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        label = classes.tolist()[i]
        raise ValueError(f"class_weight of class {label!r} is {weights[i]}; class weights must be "
                         "finite and >= 0")
    return weights


# ---------------------------------------------------------------- model file schema
_ZIP_MIN_BYTES = 22  # an empty zip archive is its 22-byte end-of-directory record
# the header's "preprocessing" of a model saved with a standardisation folded into its weights
_FOLDED_STANDARDIZATION = "standardize (folded into coef/intercept)"

# The header keys the loader reads: name -> (required, accepted JSON types, extra check or None).
# Keys not listed are ignored, so a later writer may add optional keys (e.g. preprocessing).
_HEADER_SCHEMA = {
    "format": (True, (str,), None),
    "version": (True, (int,), None),
    "softgrad": (False, (str,), None),
    "label_kind": (True, (str,), lambda v: v in _LABEL_DTYPE_KINDS or f"must be one of {sorted(_LABEL_DTYPE_KINDS)}"),
    "n_features_in": (True, (int,), lambda v: v >= 1 or "must be >= 1"),
    "n_iter": (False, (int,), lambda v: v >= 0 or "must be >= 0"),
    "objective": (False, (int, float, type(None)), None),
    "params": (True, (dict,), None),
    "preprocessing": (False, (str,), lambda v: v in ("none", _FOLDED_STANDARDIZATION)
                      or f"must be 'none' or {_FOLDED_STANDARDIZATION!r}"),
}

# label_kind -> the stored classes' dtype kinds it accepts
_LABEL_DTYPE_KINDS = {"bool": "b", "int": "i", "uint": "u", "float": "f", "str": "U", "object-str": "U"}


def _check_header(header):
    """The first way ``header`` breaks :data:`_HEADER_SCHEMA`, or None."""
    for key, (required, types, check) in _HEADER_SCHEMA.items():
        if key not in header:
            if required:
                return f"the header has no {key!r} entry"
            continue
        value = header[key]
        if isinstance(value, bool) or not isinstance(value, types):
            return (f"header entry {key!r} must be of type {'/'.join(t.__name__ for t in types)}, "
                    f"got {type(value).__name__} {value!r:.80}")
        verdict = True if check is None else check(value)
        if verdict is not True:
            return f"header entry {key!r} = {value!r:.80} {verdict}"
    if not all(isinstance(k, str) for k in header["params"]):
        return "header entry 'params' must map parameter names to values"
    return None


def _check_class_weight_entry(cw):
    if set(cw) != {"labels", "label_kind", "weights"}:
        return f"params.class_weight must have the keys labels, label_kind, weights; got {sorted(cw)}"
    labels, kind, weights = cw["labels"], cw["label_kind"], cw["weights"]
    if not (isinstance(labels, list) and isinstance(weights, list) and len(labels) == len(weights)):
        return "params.class_weight: labels and weights must be lists of equal length"
    if kind not in _LABEL_DTYPE_KINDS:
        return f"params.class_weight: unknown label_kind {kind!r}"
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
        return "params.class_weight: weights must be numbers"
    if not all(isinstance(v, (int, float, str, bool)) for v in labels):
        return "params.class_weight: labels must be numbers, booleans or strings"
    if len(set(labels)) != len(labels):
        return "params.class_weight: duplicated labels"
    return None


def _as_standardizer(scaler, n_features):
    """A fitted Standardizer or StandardScaler as a :class:`softgrad.datasets.Standardizer` of
    float64 ``(D,)`` statistics (a StandardScaler's unused mean or scale as 0 or 1)."""
    from sklearn.exceptions import NotFittedError
    from sklearn.preprocessing import StandardScaler

    from softgrad.datasets import Standardizer

    if not isinstance(scaler, (Standardizer, StandardScaler)):
        raise TypeError("preprocessing must be None, 'none' or a fitted softgrad.datasets.Standardizer or "
                        f"sklearn.preprocessing.StandardScaler, got {type(scaler).__name__}")
    mean, scale = getattr(scaler, "mean_", None), getattr(scaler, "scale_", None)
    fitted = hasattr(scaler, "n_features_in_") if isinstance(scaler, StandardScaler) else mean is not None
    if not fitted:
        raise NotFittedError(f"preprocessing: this {type(scaler).__name__} is not fitted; fit it on the "
                             "training features first")
    stats = []
    for name, value, neutral in (("mean", mean, 0.0), ("scale", scale, 1.0)):
        # StandardScaler(with_mean=False) has mean_ None (or kept but unused), with_std=False scale_ None
        used = getattr(scaler, "with_mean" if name == "mean" else "with_std", True)
        arr = np.full(n_features, neutral) if value is None or not used else np.asarray(value, dtype=np.float64)
        if arr.shape != (n_features,):
            raise ValueError(f"preprocessing: the scaler's {name} has shape {arr.shape}, but the model has "
                             f"{n_features} features")
        if not np.isfinite(arr).all():
            raise ValueError(f"preprocessing: the scaler's {name} contains NaN or infinity")
        stats.append(arr)
    if (stats[1] <= 0).any():
        raise ValueError(f"preprocessing: the scaler's scale must be > 0, got min {stats[1].min():.3g}")
    return Standardizer(mean_=stats[0], scale_=stats[1])


def _encode_labels(labels):
    """Labels as a pickle-free array and a kind tag: ``"int"``, ``"float"``, ``"bool"``, ``"str"``."""
    labels = np.asarray(labels)
    kind = labels.dtype.kind
    if kind == "b":
        return labels, "bool"
    if kind == "u" and labels.size and int(labels.max()) > np.iinfo(np.int64).max:
        return labels.astype(np.uint64), "uint"  # int64 would wrap labels >= 2**63
    if kind in "iu":
        return labels.astype(np.int64), "int"
    if kind == "f":
        return labels.astype(np.float64), "float"
    if kind == "U":
        return labels, "str"
    if kind == "O" and all(isinstance(v, str) for v in labels.tolist()):
        return labels.astype(str), "object-str"
    raise TypeError(
        f"labels of dtype {labels.dtype} (values like {labels.tolist()[:3]!r}) cannot be saved "
        "without pickle; use numbers, booleans or strings")


def _decode_labels(arr, kind):
    if kind == "object-str":
        return arr.astype(str).astype(object)
    if kind == "str":
        return arr.astype(str)
    dtype = {"bool": np.bool_, "int": np.int64, "uint": np.uint64, "float": np.float64}.get(kind)
    if dtype is None or arr.dtype.kind not in _LABEL_DTYPE_KINDS.get(kind, ""):
        raise ValueError(f"label kind {kind!r} with stored dtype {arr.dtype} is not supported")
    return arr.astype(dtype)


def _softgrad_version():
    import softgrad

    return softgrad.__version__
