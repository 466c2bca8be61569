"""``LogisticRegression``: a drop-in for scikit-learn's, on softgrad's solvers and kernels.

The constructor, the objective and the fitted attributes are scikit-learn 1.9's
``LogisticRegression`` for L2 (or no) penalty; the fit is :class:`softgrad.SoftmaxClassifier`'s
machinery (``softgrad._classifier._LinearClassifier``): multinomial softmax for three or
more classes, one logistic logit for two.
"""

from __future__ import annotations

import math
import numbers
import warnings

import numpy as np
from sklearn.base import _fit_context
from sklearn.utils._param_validation import Interval, StrOptions

from softgrad._classifier import _LinearClassifier

__all__ = ["LogisticRegression"]

_OUR_SOLVERS = ("lbfgs", "gd", "sgd")
# scikit-learn's solvers for the L2 objective: the same minimiser as lbfgs
_SAME_OBJECTIVE = ("newton-cg", "newton-cholesky", "sag")


class LogisticRegression(_LinearClassifier):
    r"""L2-regularised logistic regression with scikit-learn's interface, fitted by softgrad.

    Switching from ``sklearn.linear_model.LogisticRegression`` is a change of import: the
    same parameters, the same objective and the same fitted attributes and shapes. It
    minimises scikit-learn 1.9's objective, reported (like scikit-learn's solvers see
    it) divided by the summed weights :math:`S = \sum_i s_i`:

    .. math::

        J(W, b) = \frac{1}{S}\sum_i s_i\,\ell_i(W, b) + \frac{1}{2 C S}\lVert W\rVert_F^2,

    with :math:`s_i` = ``sample_weight`` times ``class_weight`` of :math:`y_i`, the
    intercept unpenalised, and

    * three or more classes: :math:`\ell_i = \log\sum_c e^{z_{ic}} - z_{i y_i}`,
      :math:`z_i = W x_i + b` (multinomial; ``coef_`` ``(C, D)``, ``intercept_`` ``(C,)``);
    * two classes: :math:`\ell_i = \log(1 + e^{z_i}) - y_i z_i`, :math:`z_i = w^\top x_i + b`,
      :math:`y_i = 1` for ``classes_[1]`` (one logit; ``coef_`` ``(1, D)``, ``intercept_`` ``(1,)``).

    This is :class:`softgrad.SoftmaxClassifier`'s objective with
    :math:`\alpha = 1 / (C S)`. ``C=np.inf`` or ``penalty=None`` fit without penalty.

    Solvers: ``"lbfgs"`` (default; L-BFGS-B's iteration as ``SoftmaxClassifier`` runs it,
    with scikit-learn's settings -- ``gtol=tol`` on the largest gradient entry,
    ``ftol = 64 eps``, 50 line-search steps --
    on softgrad's fused gradient, with a float32 phase for large dense or float32 data,
    see ``SoftmaxClassifier``'s ``precision="auto"``), and softgrad's ``"gd"`` and
    ``"sgd"`` with ``SoftmaxClassifier``'s defaults (step ``1/L``, 200-row batches,
    patience 5). ``max_iter`` counts iterations (``sgd``: epochs).

    Input: ``X`` dense or SciPy sparse (CSR/CSC used as given, int32 or int64 indices;
    COO and others converted to CSR once), float32 or float64. float32 data is fitted
    without a float64 copy, and gives float32 ``coef_``/``intercept_``/``predict_proba``,
    as scikit-learn's does.

    Not implemented, each raising a ``ValueError`` that says what to use instead: L1 and
    elastic-net penalties (``penalty="l1"``/``"elasticnet"``, ``0 < l1_ratio``),
    liblinear's ``dual=True`` and ``intercept_scaling != 1``, and the solvers
    ``"liblinear"``, ``"saga"`` (use ``"lbfgs"`` for L2) and ``"newton-cg"``,
    ``"newton-cholesky"``, ``"sag"`` (same objective as ``"lbfgs"``; use it).

    Args:
        penalty: ``"l2"`` (default) or ``None`` (no penalty; ``C`` is ignored, with a
            warning if it was changed).
        C: inverse regularisation strength ``> 0``; ``np.inf`` means no penalty.
        l1_ratio: ``0.0`` or ``None`` (an L2 penalty); other values raise.
        dual: ``False``; ``True`` raises.
        tol: stopping tolerance ``>= 0`` on the largest gradient entry of ``J``.
        fit_intercept: learn the intercept (unpenalised).
        intercept_scaling: ``1``; other values raise.
        class_weight: ``None``, ``"balanced"`` (scikit-learn 1.9: classes counted by
            summed ``sample_weight``) or a dict ``{label: weight >= 0}``.
        random_state: seed for ``sgd``'s shuffling (accepted and unused by ``lbfgs``/``gd``).
        solver: ``"lbfgs"``, ``"gd"`` or ``"sgd"``.
        max_iter: iterations ``>= 0`` (``0`` returns the zero model with a ConvergenceWarning).
        verbose: ``> 0`` prints the objective every iteration.
        warm_start: start from the previous ``coef_``/``intercept_`` when the classes
            and features match.
        n_jobs: accepted for compatibility; no effect (as in scikit-learn >= 1.8).

    Attributes:
        classes_: ``(C,)`` sorted labels.
        coef_: ``(1, D)`` for two classes, else ``(C, D)``, in ``X``'s dtype.
        intercept_: ``(1,)`` or ``(C,)``, same dtype (zeros without ``fit_intercept``).
        n_iter_: int32 array ``(1,)``, iterations run.
        n_features_in_, feature_names_in_: as in scikit-learn.
        objective_: float, :math:`J` at the returned weights (float64), comparable with
            scikit-learn's ``loss`` at its solution.
        loss_curve_: ``(n_iter_[0],)`` float64 objective after each iteration.

    Raises:
        ValueError: (from :meth:`fit`) the unsupported options above, and the input
            errors of :meth:`softgrad.SoftmaxClassifier.fit`.

    Examples:
        >>> from sklearn.datasets import load_iris
        >>> X, y = load_iris(return_X_y=True)
        >>> clf = LogisticRegression(max_iter=1000).fit(X, y)
        >>> clf.coef_.shape, clf.n_iter_.shape
        ((3, 4), (1,))
        >>> bool(clf.score(X, y) > 0.95)
        True
        >>> LogisticRegression().fit(X[y < 2], y[y < 2]).coef_.shape
        (1, 4)
    """

    _binary_logit = True

    _parameter_constraints: dict = {
        "penalty": [StrOptions({"l1", "l2", "elasticnet"}), None],
        "C": [Interval(numbers.Real, 0, None, closed="right")],
        "l1_ratio": [Interval(numbers.Real, 0, 1, closed="both"), None],
        "dual": ["boolean"],
        "tol": [Interval(numbers.Real, 0, None, closed="left")],
        "fit_intercept": ["boolean"],
        "intercept_scaling": [Interval(numbers.Real, 0, None, closed="neither")],
        "class_weight": [dict, StrOptions({"balanced"}), None],
        "random_state": ["random_state"],
        "solver": [StrOptions({*_OUR_SOLVERS, *_SAME_OBJECTIVE, "liblinear", "saga"})],
        "max_iter": [Interval(numbers.Integral, 0, None, closed="left")],
        "verbose": ["verbose"],
        "warm_start": ["boolean"],
        "n_jobs": [None, numbers.Integral],
    }

    def __init__(self, penalty="l2", *, C=1.0, l1_ratio=0.0, dual=False, tol=1e-4, fit_intercept=True,
                 intercept_scaling=1, class_weight=None, random_state=None, solver="lbfgs", max_iter=100,
                 verbose=0, warm_start=False, n_jobs=None):
        self.penalty = penalty
        self.C = C
        self.l1_ratio = l1_ratio
        self.dual = dual
        self.tol = tol
        self.fit_intercept = fit_intercept
        self.intercept_scaling = intercept_scaling
        self.class_weight = class_weight
        self.random_state = random_state
        self.solver = solver
        self.max_iter = max_iter
        self.verbose = verbose
        self.warm_start = warm_start
        self.n_jobs = n_jobs

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, sample_weight=None):
        """Fit to ``X`` ``(n_samples, n_features)`` (dense or sparse) and labels ``y``.

        Args:
            X: array-like or SciPy sparse matrix/array ``(N, D)`` of finite numbers.
            y: array-like ``(N,)`` labels, at least two classes.
            sample_weight: ``None`` or array-like ``(N,)`` of finite non-negative weights.

        Returns:
            self

        Raises:
            ValueError: an option softgrad does not implement (the message names the
                alternative), or bad input as in :meth:`softgrad.SoftmaxClassifier.fit`.
            TypeError: non-numeric ``sample_weight``.
        """
        self._check_supported()
        if self.penalty is None and self.C != 1.0:
            warnings.warn("Setting penalty=None will ignore the C parameter (no penalty is fitted)",
                          UserWarning, stacklevel=3)
        self._fit(X, y, sample_weight)
        self.n_iter_ = np.array([self.loss_curve_.shape[0]], dtype=np.int32)
        return self

    def _check_supported(self):
        """Raise a ValueError for each option that softgrad does not implement, naming the alternative."""
        if self.penalty in ("l1", "elasticnet"):
            raise ValueError(
                f"penalty={self.penalty!r} is not implemented by softgrad.LogisticRegression (L2 or no penalty "
                "only); use penalty='l2' or None, or sklearn.linear_model.LogisticRegression(solver='saga', "
                "l1_ratio=...) for L1/elastic-net")
        if self.l1_ratio is not None and self.l1_ratio != 0:
            raise ValueError(
                f"l1_ratio={self.l1_ratio} asks for an L1/elastic-net penalty, which softgrad.LogisticRegression "
                "does not implement; use l1_ratio=0 (L2), or sklearn.linear_model.LogisticRegression("
                "solver='saga') for L1/elastic-net")
        if self.dual:
            raise ValueError(
                "dual=True (liblinear's dual formulation) is not implemented; softgrad.LogisticRegression solves "
                "the primal problem, which has the same L2 optimum: use dual=False")
        if self.intercept_scaling != 1:
            raise ValueError(
                f"intercept_scaling={self.intercept_scaling} is liblinear's scaling of a penalised synthetic "
                "feature; softgrad.LogisticRegression never penalises the intercept: leave intercept_scaling=1")
        if self.solver in _SAME_OBJECTIVE:
            raise ValueError(
                f"solver={self.solver!r} is not implemented by softgrad.LogisticRegression; it minimises the same "
                "objective as solver='lbfgs': use solver='lbfgs' (or softgrad's 'gd'/'sgd')")
        if self.solver in ("liblinear", "saga"):
            raise ValueError(
                f"solver={self.solver!r} is not implemented by softgrad.LogisticRegression; for the L2 objective "
                "use solver='lbfgs' (or 'gd'/'sgd'); for L1/elastic-net use sklearn.linear_model."
                "LogisticRegression(solver='saga')")

    def _alpha(self, weight_sum):
        if self.penalty is None or math.isinf(self.C):
            return 0.0
        return 1.0 / (self.C * weight_sum)
