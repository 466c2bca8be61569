r"""Data-parallel fitting of :class:`softgrad.SoftmaxClassifier`: rows split across ranks.

The classifier's objective is a weighted mean over rows plus a penalty,

.. math::

    J(W, b) = \sum_i r_i \ell_i(W, b) + \tfrac{\alpha}{2}\lVert W\rVert_F^2,
    \qquad r_i = s_i / \textstyle\sum_j s_j,

so over rows split into shards :math:`S_1, \ldots, S_P` it is a sum of per-shard terms:
:math:`J = \sum_k \sum_{i \in S_k} r_i \ell_i + \frac{\alpha}{2}\lVert W\rVert^2`, and the same
holds for its gradient (``X_k^T G_k`` per shard). Each rank evaluates its shard's data term
and gradient with :func:`softgrad._linear_model.objective_and_gradient` (one ``(N_k, C)`` work
array, the numba or NumPy kernels) with ``alpha = 0``, and one float64 sum all-reduce of
``1 + D C + C`` numbers per evaluation gives every rank the same objective and gradient, to
which it adds the penalty. The normaliser :math:`\sum_j s_j`, the classes (a rank may lack
some), ``class_weight="balanced"``'s counts, and -- for ``gd`` with ``learning_rate="auto"`` --
the power iteration that bounds the gradient's Lipschitz constant are agreed the same way.

Every rank then runs the same deterministic solver (softgrad's L-BFGS, or gradient descent)
on the same numbers, so every rank takes the same steps and ends with the same model, which
equals the single-process fit on the concatenated rows up to the rounding of the sums (the
solvers' decisions are identical as long as those roundings do not flip a line search; the
tests check 1e-8). A final broadcast verifies that all ranks hold the same weights.
"""

from __future__ import annotations

import math
import sys
import warnings
import zlib

import numpy as np
import torch

from softgrad import _linear_model
from softgrad.distributed import _comm

__all__ = ["fit_data_parallel"]


class _Reducer:
    """Float64 sum all-reduce of NumPy vectors over ``group`` (on the device its backend needs)."""

    def __init__(self, group, rank: int, world: int):
        self.group, self.rank, self.world = group, rank, world
        self.device = _comm.comm_device(group)

    def sum(self, values: np.ndarray, what: str) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64)).to(self.device)
        _comm.all_reduce(t, "sum", self.group, what)
        return t.cpu().numpy()


def _pack(W, b) -> np.ndarray:
    """``theta = [W.ravel(), b]`` in float64, the estimator's parameter vector (``W`` is ``coef_``, ``(C, D)``)."""
    return np.concatenate([W.reshape(-1), b]) if b is not None else W.reshape(-1).astype(np.float64)


def _unpack(theta, shape, fit_intercept):
    size = shape[0] * shape[1]
    return theta[:size].reshape(shape), (theta[size:] if fit_intercept else None)


class _ShardObjective:
    """``theta -> (J, grad)`` over all ranks' rows: local data term, all-reduce, then the penalty.

    ``theta = [W.ravel(), b]`` in float64 with ``W`` in ``coef_``'s ``(C, D)`` layout, as in the
    single-process estimator. The shard is held in one compute dtype (float32 for the first
    phase of ``precision="mixed"``). The latest evaluation is memoised (SciPy evaluates the
    starting point again); every rank sees the same ``theta``, so every rank skips the same
    all-reduce.
    """

    def __init__(self, X, target, row_scale, alpha, shape, fit_intercept, reducer: _Reducer, dtype=np.float64):
        self.X, self.target, self.row_scale, self.alpha = X, target, row_scale, float(alpha)
        self.shape, self.fit_intercept = tuple(shape), fit_intercept
        self.reducer = reducer
        self.dtype = np.dtype(dtype)  # compute dtype; float64 reads float32 X block by block
        self.work = np.empty((X.shape[0], shape[0]), dtype=self.dtype)  # (N_k, C)
        self.loss_rows = np.empty(X.shape[0])
        self._last = None

    def __call__(self, theta):
        if self._last is not None and np.array_equal(theta, self._last[0]):
            return self._last[1], self._last[2].copy()
        J, grad = self._evaluate(theta)
        self._last = (theta.copy(), J, grad.copy())
        return J, grad

    def _evaluate(self, theta):
        size = self.shape[0] * self.shape[1]
        W, b = _unpack(theta if self.dtype == np.float64 else theta.astype(self.dtype), self.shape,
                       self.fit_intercept)
        packed = np.zeros(1 + theta.shape[0])  # [data term, grad W, grad b] of this shard
        if self.X.shape[0]:
            J, gW, gb = _linear_model.objective_and_gradient(W, b, self.X, self.target, self.row_scale, 0.0,
                                                             self.work, self.loss_rows)
            packed[0] = J
            packed[1:1 + size] = gW.reshape(-1)
            if b is not None:
                packed[1 + size:] = gb
        total = self.reducer.sum(packed, "objective and gradient")
        grad = total[1:]
        penalty = 0.0
        if self.alpha:
            # the L2 term is added once, after the sum over shards: 0.5 alpha ||W||^2, gradient alpha W
            penalty = 0.5 * self.alpha * float(np.vdot(W, W))
            grad[:size] += (self.alpha * W).reshape(-1)
        return float(total[0]) + penalty, grad


def _lipschitz_bound(X, row_scale, alpha, fit_intercept, reducer: _Reducer, *, iterations=30, seed=0) -> float:
    """:func:`softgrad._linear_model.lipschitz_bound` of the concatenated rows.

    The power iteration's product ``X~^T R X~ v`` is a sum over rows, so each rank forms its
    shard's part and one all-reduce of ``D (+1)`` numbers per iteration adds them; the
    starting vector comes from the same seed on every rank.
    """
    N, D = X.shape
    v = np.random.default_rng(seed).normal(size=D + int(fit_intercept))
    lam = 0.0
    for _ in range(iterations):
        v /= np.linalg.norm(v)
        u = np.asarray(X @ v[:D].astype(X.dtype), dtype=np.float64).reshape(-1)
        if fit_intercept:
            u += v[D]
        u *= row_scale
        w = np.asarray(X.T @ u.astype(X.dtype), dtype=np.float64).reshape(-1)
        if fit_intercept:
            w = np.append(w, u.sum())
        w = reducer.sum(w, "power iteration")
        lam = float(np.linalg.norm(w))
        v = w
        if lam == 0.0:
            break
    return 1.1 * 0.5 * lam + float(alpha) + 1e-12


class _Curve:
    """Objective per iteration on every rank; ``verbose`` prints on rank 0 only; the callback runs on every rank."""

    def __init__(self, estimator, rank: int):
        self.values: list[float] = []
        self.estimator, self.rank = estimator, rank
        self.abnormal_stop = None  # the solver's message when it stops before max_iter unconverged

    def __call__(self, objective: float) -> None:
        self.values.append(float(objective))
        n = len(self.values)
        if self.estimator.verbose and self.rank == 0:
            print(f"SoftmaxClassifier[{self.estimator.solver}, data parallel] iteration {n}: objective "
                  f"{objective:.8f}", file=sys.stdout)
        if self.estimator.callback is not None:
            self.estimator.callback(n, float(objective))


def _fit_lbfgs(est, X, X32, target, row_scale, W, b, reducer, curve):
    """The single-process estimator's L-BFGS schedule, on the all-reduced objective."""
    from softgrad import _classifier

    shape, fit_intercept = W.shape, b is not None

    def objective_in(dtype):
        data = X if dtype == np.float64 else X32
        return _ShardObjective(data, target, row_scale, est.alpha, shape, fit_intercept, reducer, dtype)

    theta, objective, converged, curve.abnormal_stop = _classifier._lbfgs_in_phases(
        objective_in, _pack(W, b), float32=X32 is not None, max_iter=est.max_iter, tol=est.tol, record=curve)
    W, b = _unpack(theta, shape, fit_intercept)
    return W, b, objective, converged


def _fit_gd(est, X, target, row_scale, W, b, reducer, curve):
    """The single-process estimator's gradient descent (same step rule and schedule) on the all-reduced objective."""
    from softgrad import _classifier

    shape, fit_intercept = W.shape, b is not None
    fun = _ShardObjective(X, target, row_scale, est.alpha, shape, fit_intercept, reducer)
    if est.learning_rate == "auto":
        eta0 = eta = 1.0 / _lipschitz_bound(X, row_scale, est.alpha, fit_intercept, reducer)
    else:
        eta0 = eta = float(est.learning_rate)

    def evaluate(W, b):
        J, grad = fun(_pack(W, b))
        gW, gb = _unpack(grad, shape, fit_intercept)
        return J, gW, gb

    objective, gW, gb = evaluate(W, b)
    previous = math.inf
    converged = False
    for t in range(est.max_iter):
        if _classifier._max_abs(gW, gb) <= est.tol:
            converged = True
            break
        W -= eta * gW
        if b is not None:
            b -= eta * gb
        new_objective, gW, gb = evaluate(W, b)
        curve(new_objective)
        previous, objective = objective, new_objective
        eta = est._scheduled(eta0, eta, t, objective, previous)
    else:
        converged = _classifier._max_abs(gW, gb) <= est.tol
    return W, b, objective, converged


def _local_checks(est, X_shard, y_shard, sample_weight):
    """Everything a rank can check alone; returns ``(X, y, s)`` (``s`` float64 ``(N_k,)`` or None)."""
    from sklearn.utils.multiclass import check_classification_targets
    from sklearn.utils.validation import validate_data

    est._validate_params()
    if est.solver == "sgd":
        raise ValueError("estimator.solver='sgd' is not supported by fit_data_parallel: its mini-batches would "
                         "depend on how the rows are split; use solver='lbfgs' or 'gd' (full-batch, deterministic)")
    X, y = validate_data(est, X_shard, y_shard, accept_sparse=("csr", "csc"), dtype=[np.float64, np.float32],
                         order="C", ensure_min_samples=0)
    check_classification_targets(y)
    s = None
    if sample_weight is not None:
        s = np.asarray(sample_weight)
        if s.ndim == 0:
            s = np.full(X.shape[0], s)
        if s.dtype == object or not np.issubdtype(s.dtype, np.number) or np.iscomplexobj(s):
            raise TypeError(f"sample_weight must be an array of real numbers, got dtype {s.dtype}")
        if s.shape != (X.shape[0],):
            raise ValueError(f"sample_weight must have shape ({X.shape[0]},) (one per row of X_shard), got {s.shape}")
        s = s.astype(np.float64)
        if not np.isfinite(s).all():
            raise ValueError("sample_weight contains NaN or infinity")
        if (s < 0).any():
            raise ValueError("sample_weight contains negative values")
    return X, y, s


def _params_key(est) -> int:
    params = {k: v for k, v in est.get_params().items() if k not in ("callback", "verbose")}
    return zlib.crc32(repr(sorted(params.items(), key=lambda kv: kv[0])).encode())


def _agree(est, X_shard, y_shard, sample_weight, group, world):
    """Local checks on every rank, then one all-gather: every rank raises the same error, or none does."""
    X = y = s = None
    failure = None
    try:
        X, y, s = _local_checks(est, X_shard, y_shard, sample_weight)
    except (TypeError, ValueError) as exc:
        failure = exc
    info = {"error": None if failure is None else (type(failure).__name__, str(failure)),
            "params": _params_key(est), "classes": None, "n_features": None, "feature_names": None}
    if failure is None:
        info["classes"] = np.unique(y) if y.shape[0] else y[:0]
        info["n_features"] = X.shape[1]
        names = getattr(est, "feature_names_in_", None)
        info["feature_names"] = None if names is None else [str(n) for n in names]
    infos = _comm.all_gather_object(info, group, world, "classes and input checks")
    if failure is not None:
        raise failure
    rejected = [(r, other["error"]) for r, other in enumerate(infos) if other["error"] is not None]
    if rejected:
        r, (kind, message) = rejected[0]
        raise (TypeError if kind == "TypeError" else ValueError)(
            f"fit_data_parallel: rank {r} rejected its input: {message}")
    if len({other["params"] for other in infos}) != 1:
        raise ValueError("estimator: the ranks' estimators have different parameters; every rank must fit the same "
                         "SoftmaxClassifier configuration")
    widths = [other["n_features"] for other in infos]
    if len(set(widths)) != 1:
        raise ValueError(f"X_shard: ranks hold different numbers of features {widths} (rank order)")
    if len({repr(other["feature_names"]) for other in infos}) != 1:
        raise ValueError("X_shard: ranks hold different feature names; pass the same columns on every rank")
    parts = [other["classes"] for other in infos if other["classes"].shape[0]]
    if not parts:
        raise ValueError("X_shard: every rank's shard is empty; there are no rows to fit")
    kinds = {"number" if p.dtype.kind in "biuf" else p.dtype.kind for p in parts}
    if len(kinds) > 1:
        raise ValueError(f"y_shard: the ranks hold labels of different types ({[str(p.dtype) for p in parts]}); "
                         "use one label type on every rank")
    try:
        classes = np.unique(np.concatenate(parts))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"y_shard: the ranks' labels cannot be sorted together ({exc}); use one label type on "
                         "every rank") from exc
    return X, y, s, classes


def fit_data_parallel(estimator, X_shard, y_shard, *, group=None, sample_weight=None):
    r"""Fit ``estimator`` on the rows of all ranks, each rank holding a shard of them.

    Every rank of ``group`` calls this with the same :class:`~softgrad.SoftmaxClassifier`
    configuration and its own rows ``X_shard``, ``y_shard`` (uneven sizes, even empty, and
    shards that lack some classes are fine). Each rank evaluates the objective and gradient of
    its rows; one float64 all-reduce per evaluation sums them, so every rank runs the same
    solver on the objective of the concatenated rows,

    .. math::

        J(W, b) = \sum_k \sum_{i \in S_k} r_i \Big(\log\sum_c e^{z_{ic}} - z_{i y_i}\Big)
                  + \frac{\alpha}{2}\lVert W\rVert_F^2, \qquad r_i = s_i / \textstyle\sum_{\text{all } j} s_j,

    and returns a normal fitted estimator on every rank: ``classes_`` (the sorted union of
    all ranks' labels), ``coef_``, ``intercept_``, ``n_iter_``, ``loss_curve_``,
    ``objective_``, ``n_features_in_``; it predicts, scores, saves and pickles like one fitted
    by ``fit``. For ``solver="lbfgs"`` and ``"gd"`` (deterministic, full-batch) the model
    equals ``estimator.fit(X, y, sample_weight)`` on the concatenated rows up to the rounding
    of the sums (tested to 1e-8). ``class_weight`` (``"balanced"`` uses the summed sample weights per class
    over all ranks), ``warm_start``, ``precision``, ``tol``, ``max_iter`` and the ``gd`` step rules
    behave as in ``fit``. ``verbose`` prints on rank 0; ``callback`` runs on every rank.

    Communication: one all-gather of the ranks' label sets and input checks (pickled,
    small), up to three all-reduces of ``C + 2`` numbers (class weight totals, weight sums, work), ``30``
    all-reduces of ``D + 1`` for ``gd``'s automatic step, then one all-reduce of
    ``1 + D C + C`` float64 per objective evaluation, and a final broadcast of the weights.

    Args:
        estimator: a :class:`softgrad.SoftmaxClassifier` with ``solver`` ``"lbfgs"`` or ``"gd"``;
            fitted in place.
        X_shard: array-like ``(N_k, D)`` of finite numbers, or a SciPy sparse CSR/CSC matrix,
            this rank's rows (``N_k >= 0``); float32 is fitted without a float64 copy.
        y_shard: array-like ``(N_k,)`` labels of those rows.
        group: the process group (default: the world group of ``torch.distributed``).
        sample_weight: ``None`` or array-like ``(N_k,)`` non-negative weights of this rank's rows.

    Returns:
        ``estimator``, fitted (the same model on every rank).

    Raises:
        RuntimeError: ``torch.distributed`` is not initialised; the ranks ended with different
            weights (not expected: the solvers are deterministic).
        TypeError: ``estimator`` is not a ``SoftmaxClassifier``; and, on every rank, a rank's
            non-numeric ``sample_weight``.
        ValueError: on every rank, when any rank's input is invalid (the message names the
            rank): ``solver="sgd"``, invalid parameters, NaN/inf in ``X_shard``, mismatched
            lengths, continuous labels, different features or parameters on different ranks,
            labels that cannot be sorted together, fewer than two classes (with positive
            weight) over all ranks, weights summing to zero.
        softgrad.distributed.CollectiveError: a peer exited, crashed or timed out.

    Examples:
        >>> import torch.distributed as dist
        >>> from sklearn.datasets import load_iris
        >>> from softgrad import SoftmaxClassifier
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> X, y = load_iris(return_X_y=True)
        >>> clf = fit_data_parallel(SoftmaxClassifier(alpha=1e-2), X, y)  # one rank: all rows
        >>> ref = SoftmaxClassifier(alpha=1e-2).fit(X, y)
        >>> bool(abs(clf.coef_ - ref.coef_).max() < 1e-8)
        True
        >>> dist.destroy_process_group()

        Under ``torchrun --nproc_per_node=P``, rank ``r`` passes its rows, e.g.
        ``fit_data_parallel(clf, X[r::P], y[r::P])``; see ``examples/train_data_parallel.py``.
    """
    from sklearn.exceptions import ConvergenceWarning

    from softgrad import _classifier

    if not isinstance(estimator, _classifier.SoftmaxClassifier):
        raise TypeError(f"estimator must be a softgrad.SoftmaxClassifier, got {type(estimator).__name__}")
    group, rank, world = _comm.resolve_group(group)
    est = estimator
    X, y, s, classes = _agree(est, X_shard, y_shard, sample_weight, group, world)
    reducer = _Reducer(group, rank, world)
    C = classes.shape[0]
    if C < 2:
        raise ValueError("SoftmaxClassifier needs samples of at least 2 classes in y; the ranks' data together "
                         f"contain only one class: {classes[0]!r}")
    target = np.ascontiguousarray(np.searchsorted(classes, y), dtype=np.int64).reshape(-1)
    N, D = X.shape
    s = np.ones(N) if s is None else s
    counts = np.bincount(target, minlength=C).astype(np.float64)
    if est.class_weight is not None:
        if isinstance(est.class_weight, str) and est.class_weight == "balanced":
            # scikit-learn 1.9's rule with the summed sample weights of all ranks per class:
            # sum s / (n_classes * sum_{class} s), 0 for a class of zero total weight
            totals = reducer.sum(np.bincount(target, weights=s, minlength=C), "class weight totals")
            class_w = np.where(totals > 0, totals.sum() / (C * np.where(totals > 0, totals, 1.0)), 0.0)
        else:
            class_w = _classifier._class_weights(est.class_weight, classes, target, s)
        s = s * class_w[target]
    sparse = _linear_model.is_sparse(X)
    local_work = float(X.nnz if sparse else X.shape[0] * D)  # multiply-adds per class of X @ W.T
    stats = reducer.sum(np.append(np.bincount(target, weights=s, minlength=C), [counts.sum(), local_work]),
                        "class weights")
    per_class, total_work = stats[:C], stats[C + 1]
    if not per_class.sum() > 0:
        raise ValueError("sample_weight (times class_weight) sums to zero over all ranks: nothing to fit")
    present = per_class > 0
    if present.sum() < 2:
        raise ValueError("SoftmaxClassifier needs at least 2 classes with positive sample_weight; the weights of all "
                         f"ranks leave only the class {classes[np.flatnonzero(present)[0]]!r}")
    row_scale = s / per_class.sum()

    W, b = est._initial_weights(classes, D)
    precision = est.precision
    if precision == "auto":
        # as SoftmaxClassifier.fit: the work per evaluation over all ranks (N D C, sparse nnz C),
        # and no float32 phase for float64 sparse data
        work = total_work * C
        cheap = X.dtype == np.float32 or not sparse
        precision = ("mixed" if est.solver == "lbfgs" and cheap and work >= _classifier._MIXED_MIN_WORK
                     else "float64")
    curve = _Curve(est, rank)
    # float32 X is read as it is (no float64 copy; the float64 phase casts blocks of rows)
    # this rank's threads as in SoftmaxClassifier.fit, from its own work per evaluation
    with _classifier._thread_limit(local_work * C, sparse):
        if est.solver == "lbfgs":
            X32 = _classifier._as_float32(X) if precision == "mixed" else None
            W, b, objective, converged = _fit_lbfgs(est, X, X32, target, row_scale, W, b, reducer, curve)
        else:
            W, b, objective, converged = _fit_gd(est, X, target, row_scale, W, b, reducer, curve)

    # every rank ran the same solver on the same numbers; make sure they ended in the same place
    theta = _pack(W, b)
    mine = torch.from_numpy(np.append(theta, [objective, len(curve.values)])).to(reducer.device)
    first = _comm.broadcast(mine.clone(), 0, group, "fitted weights")
    if not torch.equal(first, mine):
        raise RuntimeError("fit_data_parallel: the ranks ended with different weights; the all-reduced objective "
                           "was not identical on every rank")
    if not converged and curve.abnormal_stop is not None:
        warnings.warn(
            _classifier._abnormal_stop_message(f"SoftmaxClassifier(solver={est.solver!r}) in fit_data_parallel",
                                               len(curve.values), est.max_iter, curve.abnormal_stop),
            ConvergenceWarning, stacklevel=2)
    elif not converged:
        warnings.warn(
            f"SoftmaxClassifier(solver={est.solver!r}) did not converge within max_iter={est.max_iter} iterations "
            f"(tol={est.tol}) in fit_data_parallel; increase max_iter or tol, or standardise X.",
            ConvergenceWarning, stacklevel=2)
    est.classes_ = classes
    est.coef_ = np.ascontiguousarray(W, dtype=X.dtype)  # W is in coef_'s (C, D) layout; X's dtype, as fit
    est.intercept_ = np.zeros(C, dtype=X.dtype) if b is None else np.array(b, dtype=X.dtype)
    est.loss_curve_ = np.asarray(curve.values, dtype=np.float64)
    est.n_iter_ = int(est.loss_curve_.shape[0])
    est.objective_ = float(objective)
    return est
