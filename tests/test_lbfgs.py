"""softgrad's L-BFGS (``softgrad._lbfgs``): L-BFGS-B's schedule with a compact inverse product.

Checked against: SciPy's ``minimize(method="L-BFGS-B")`` (independent code: the same
iterates to rounding, the same iteration and evaluation counts, status and message on
logistic problems, Rosenbrock's evaluation points until rounding compounds, and every
stopping path: gradient, relative reduction, iteration limit, abnormal line search);
the textbook two-loop recursion for the direction (after the memory wraps); closed-form
minimisers; the strong Wolfe conditions at every step the line search accepts, on
More & Thuente's own test functions.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize

from softgrad._lbfgs import _MoreThuente, _PairMemory, minimize_lbfgs

FTOL_SKLEARN = 64 * np.finfo(np.float64).eps


def _scipy(fun, x0, maxiter=15000, gtol=1e-5, ftol=2.2e-9, maxls=50, callback=None):
    return scipy.optimize.minimize(fun, x0, jac=True, method="L-BFGS-B", callback=callback,
                                   options=dict(maxiter=maxiter, maxls=maxls, gtol=gtol, ftol=ftol))


def _logistic(rng, N=200, D=30, C=4, reg=1e-3, intercept=True):
    """Mean softmax cross-entropy of a linear model plus (reg / 2) |W|^2, and its gradient."""
    X = rng.standard_normal((N, D))
    y = rng.integers(0, C, N)
    cols = D + 1 if intercept else D
    Xb = np.hstack([X, np.ones((N, 1))]) if intercept else X

    def fun(theta):
        W = theta.reshape(C, cols)
        Z = Xb @ W.T
        Z -= Z.max(axis=1, keepdims=True)
        P = np.exp(Z)
        total = P.sum(axis=1, keepdims=True)
        P /= total
        J = -(Z[np.arange(N), y] - np.log(total[:, 0])).mean() + 0.5 * reg * (theta @ theta)
        P[np.arange(N), y] -= 1.0
        return J, (P.T @ Xb / N).ravel() + reg * theta

    return fun, np.zeros(C * cols)


def _rosenbrock(x):
    return scipy.optimize.rosen(x), scipy.optimize.rosen_der(x)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("reg", [1e-2, 1e-8])
@pytest.mark.parametrize("gtol,ftol", [(1e-5, 2.2e-9), (1e-8, FTOL_SKLEARN)])
def test_same_iterates_as_scipy_on_logistic_problems(seed, reg, gtol, ftol):
    fun, x0 = _logistic(np.random.default_rng(seed), reg=reg, intercept=seed != 1)
    ref_curve, our_curve = [], []

    def record(intermediate_result):  # SciPy passes an OptimizeResult to a parameter of this name
        ref_curve.append(intermediate_result.fun)

    ref = _scipy(fun, x0, gtol=gtol, ftol=ftol, callback=record)
    ours = minimize_lbfgs(fun, x0, maxiter=15000, gtol=gtol, ftol=ftol, callback=lambda r: our_curve.append(r.fun))
    assert (ours.nit, ours.nfev, ours.status, ours.message) == (ref.nit, ref.nfev, ref.status, ref.message)
    np.testing.assert_allclose(ours.x, ref.x, rtol=0, atol=1e-9 * max(1.0, np.max(np.abs(ref.x))))
    np.testing.assert_allclose(our_curve, ref_curve, rtol=1e-12)
    assert ours.fun == our_curve[-1] and ours.success
    np.testing.assert_allclose(ours.jac, fun(ours.x)[1], rtol=1e-12, atol=1e-15)


def test_rosenbrock_evaluation_points_follow_scipys():
    """Rosenbrock exercises the line search's interpolation; the points agree until rounding compounds."""
    points = {"ref": [], "ours": []}

    def recorded(tag):
        def fun(x):
            points[tag].append(x.copy())
            return _rosenbrock(x)
        return fun

    x0 = np.full(20, -1.2)
    ref = _scipy(recorded("ref"), x0)
    ours = minimize_lbfgs(recorded("ours"), x0, maxiter=15000, gtol=1e-5, ftol=2.2e-9)
    first = 40  # measured: agreement 1e-12 at 40 evaluations, 1e-8 at 60, then it drifts apart
    for k in range(first):
        np.testing.assert_allclose(points["ours"][k], points["ref"][k], rtol=1e-10, atol=1e-12, err_msg=f"point {k}")
    assert ours.status == ref.status == 0 and ours.message == ref.message
    assert abs(ours.nit - ref.nit) <= 0.1 * ref.nit
    np.testing.assert_allclose(ours.x, np.ones(20), atol=1e-3)


def test_quadratic_minimiser_and_memory_wrap():
    """An ill-conditioned quadratic needs many more iterations than the 10 stored pairs."""
    rng = np.random.default_rng(3)
    n = 60
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = (Q * np.logspace(0, 3, n)) @ Q.T
    b = rng.standard_normal(n)

    def fun(x):
        Ax = A @ x
        return 0.5 * x @ Ax - b @ x, Ax - b

    res = minimize_lbfgs(fun, np.zeros(n), maxiter=1000, gtol=1e-5, ftol=0.0)
    assert res.status == 0 and res.message.startswith("CONVERGENCE: NORM") and res.nit > 100
    # |x - x*| <= |g| / lambda_min, lambda_min = 1
    np.testing.assert_allclose(res.x, np.linalg.solve(A, b), rtol=0, atol=1e-5 * np.sqrt(n))
    ref = _scipy(fun, np.zeros(n), gtol=1e-5, ftol=0.0)  # measured: 205 iterations, ours 200
    assert ref.message == res.message and abs(res.nit - ref.nit) <= 0.1 * ref.nit


def test_direction_equals_two_loop_recursion():
    """The compact product -H g against the textbook two-loop recursion, before and after the ring wraps."""
    rng = np.random.default_rng(4)
    n, m = 50, 5
    memory = _PairMemory(n, m)
    pairs = []
    A = np.diag(rng.uniform(0.5, 5.0, n))  # y = A s keeps every s'y > 0
    for k in range(12):
        d = rng.standard_normal(n)
        stp = rng.uniform(0.1, 2.0)
        g_old = rng.standard_normal(n)
        g = g_old + A @ (stp * d)
        s, y = stp * d, g - g_old
        memory.push(d, stp, g, g_old, float(s @ y))
        pairs = (pairs + [(s, y)])[-m:]
        q = rng.standard_normal(n)
        expected = -_two_loop(q, pairs)
        np.testing.assert_allclose(memory.direction(q, out=np.empty(n)), expected, rtol=1e-11, atol=1e-12,
                                   err_msg=f"after {k + 1} pairs")
    memory.clear()
    q = rng.standard_normal(n)
    np.testing.assert_array_equal(memory.direction(q, out=np.empty(n)), -q)
    # refilled after clear(): slots are reused from the start, no stale entries
    pairs = []
    for k in range(3):
        d, stp, g_old = rng.standard_normal(n), 1.0, rng.standard_normal(n)
        g = g_old + A @ d
        memory.push(d, stp, g, g_old, float(d @ (g - g_old)))
        pairs.append((d, g - g_old))
        np.testing.assert_allclose(memory.direction(q, out=np.empty(n)), -_two_loop(q, pairs), rtol=1e-11,
                                   atol=1e-12, err_msg=f"{k + 1} pairs after clear()")


def _two_loop(q, pairs):
    """H q by Nocedal & Wright's Algorithm 7.4, H0 = (s'y / y'y) I of the newest pair."""
    q = q.copy()
    alphas = []
    for s, y in reversed(pairs):
        a = (s @ q) / (s @ y)
        alphas.append(a)
        q -= a * y
    s, y = pairs[-1]
    r = (s @ y) / (y @ y) * q
    for (s, y), a in zip(pairs, reversed(alphas)):
        r += s * (a - (y @ r) / (s @ y))
    return r


def test_iteration_limit_and_callback():
    fun, x0 = _logistic(np.random.default_rng(5))
    seen = []
    ours = minimize_lbfgs(fun, x0, maxiter=3, gtol=1e-12, ftol=0.0, callback=lambda r: seen.append((r.x.copy(), r.fun)))
    ref = _scipy(fun, x0, maxiter=3, gtol=1e-12, ftol=0.0)
    assert (ours.nit, ours.nfev, ours.status, ours.message) == (ref.nit, ref.nfev, ref.status, ref.message)
    assert ours.status == 1 and ours.message == "STOP: TOTAL NO. OF ITERATIONS REACHED LIMIT"
    assert len(seen) == 3 and seen[-1][1] == ours.fun
    np.testing.assert_array_equal(seen[-1][0], ours.x)
    np.testing.assert_array_equal(x0, 0.0)  # the start is not modified


def test_converged_at_the_start():
    calls = []

    def fun(x):
        calls.append(1)
        return float(x @ x), 2 * x

    res = minimize_lbfgs(fun, np.zeros(4), maxiter=10, gtol=1e-5, ftol=1e-9)
    assert (res.nit, res.nfev, res.status, len(calls)) == (0, 1, 0, 1)
    assert res.message == _scipy(fun, np.zeros(4)).message


def test_relative_reduction_stop_matches_scipy():
    fun, x0 = _logistic(np.random.default_rng(6))
    ours = minimize_lbfgs(fun, x0, maxiter=15000, gtol=0.0, ftol=1e-6)
    ref = _scipy(fun, x0, gtol=0.0, ftol=1e-6)
    assert ours.message == ref.message == "CONVERGENCE: RELATIVE REDUCTION OF F <= FACTR*EPSMCH"
    assert (ours.nit, ours.nfev) == (ref.nit, ref.nfev)


@pytest.mark.parametrize("maxls", [1, 3, 10])
def test_abnormal_stop_on_a_wrong_gradient(maxls):
    """A gradient of the wrong sign: no step decreases f, both stop ABNORMAL after maxls evaluations.

    (With ~50 evaluations the steps reach the rounding floor of x, where summation order
    decides: not compared.)
    """
    def fun(x):
        return float(x @ x), -2 * x

    x0 = np.arange(1.0, 6.0)
    ours = minimize_lbfgs(fun, x0, maxiter=100, gtol=1e-8, ftol=1e-12, maxls=maxls)
    ref = _scipy(fun, x0, gtol=1e-8, ftol=1e-12, maxls=maxls)
    assert ours.status == ref.status == 2 and ours.message.startswith("ABNORMAL")
    assert (ours.nit, ours.nfev) == (ref.nit, ref.nfev)
    np.testing.assert_array_equal(ours.x, x0)  # the last accepted point


def _noisy(x):
    """An objective whose gradient is off by an oscillating term: line searches fail and restart."""
    return float(x @ x + np.sin(7 * x).sum()), 2 * x + 0.9 * 7 * np.cos(7 * x) * np.cos(3 * x.sum())


@pytest.mark.parametrize("maxls", [2, 3, 5])
def test_line_search_budget_and_restart_match_scipy(maxls):
    """Failed line searches (maxls evaluations) restart from steepest descent, then stop ABNORMAL."""
    x0 = np.linspace(-1.0, 1.0, 15)
    ours = minimize_lbfgs(_noisy, x0, maxiter=200, gtol=1e-8, ftol=1e-12, maxls=maxls)
    ref = _scipy(_noisy, x0, gtol=1e-8, ftol=1e-12, maxls=maxls)
    assert (ours.nit, ours.nfev, ours.status, ours.message) == (ref.nit, ref.nfev, ref.status, ref.message)
    assert ours.status == 2
    np.testing.assert_allclose(ours.x, ref.x, rtol=1e-10, atol=1e-12)
    # x is the last accepted point and fun its objective (SciPy's fun is the last trial's)
    assert ours.fun == _noisy(ours.x)[0]


def test_repeated_trial_points_are_not_evaluated_again():
    """float32 rounding makes the line search retry its best step: that point is not evaluated twice."""
    for seed in range(4):
        fun, x0 = _logistic(np.random.default_rng(seed), reg=1e-4)

        def rounded(theta, fun=fun):
            J, g = fun(theta.astype(np.float32).astype(np.float64))
            return float(np.float32(J)), g.astype(np.float32)

        ours = minimize_lbfgs(rounded, x0, maxiter=15000, gtol=1e-7, ftol=FTOL_SKLEARN)
        ref = _scipy(rounded, x0, gtol=1e-7, ftol=FTOL_SKLEARN)
        # measured before the reuse: one to three more evaluations than SciPy in most seeds
        assert (ours.nit, ours.nfev, ours.message) == (ref.nit, ref.nfev, ref.message), seed
        assert ours.nfev > ours.nit + 5  # the line searches did interpolate


def test_update_skipped_when_the_gradient_does_not_change(monkeypatch):
    """On a linear stretch the accepted step (at stpmax) has y = 0: no pair is stored, as in L-BFGS-B."""
    from softgrad import _lbfgs

    pushes = []
    original = _lbfgs._PairMemory.push
    monkeypatch.setattr(_lbfgs._PairMemory, "push", lambda self, *a: pushes.append(1) or original(self, *a))

    def huber(x):
        a = np.abs(x)
        return float(np.where(a < 1, 0.5 * x * x, a - 0.5).sum()), np.clip(x, -1.0, 1.0)

    x0 = np.full(6, 1e15)
    ours = minimize_lbfgs(huber, x0, maxiter=3, gtol=1e-8, ftol=0.0)
    ref = _scipy(huber, x0, maxiter=3, gtol=1e-8, ftol=0.0)
    assert ours.nit == ref.nit == 3 and ours.nfev == ref.nfev and ours.status == ref.status == 1
    assert pushes == []
    np.testing.assert_allclose(ours.x, ref.x, rtol=1e-12)
    np.testing.assert_array_less(ours.x, x0)  # it moved, by stpmax steps


def test_evaluation_limit_matches_scipy():
    fun, x0 = _logistic(np.random.default_rng(1))
    ours = minimize_lbfgs(fun, x0, maxiter=100, gtol=1e-12, ftol=0.0, maxfun=5)
    ref = scipy.optimize.minimize(fun, x0, jac=True, method="L-BFGS-B",
                                  options=dict(maxiter=100, maxls=50, gtol=1e-12, ftol=0.0, maxfun=5))
    assert (ours.nit, ours.nfev, ours.status, ours.message) == (ref.nit, ref.nfev, ref.status, ref.message)
    assert ours.message == "STOP: TOTAL NO. OF F,G EVALUATIONS EXCEEDS LIMIT"


def test_non_finite_values_stop_abnormally_at_the_last_finite_point():
    def nan_far(x):  # NaN beyond radius 2, the minimiser (1.5, 1.5, 1.5) is beyond it too
        if x @ x > 4.0:
            return float("nan"), np.full_like(x, np.nan)
        return float(((x - 1.5) ** 2).sum()), 2 * (x - 1.5)

    ours = minimize_lbfgs(nan_far, np.zeros(3), maxiter=100, gtol=1e-8, ftol=1e-12)
    ref = _scipy(nan_far, np.zeros(3), gtol=1e-8, ftol=1e-12)
    assert (ours.nit, ours.nfev) == (ref.nit, ref.nfev) and ours.status == ref.status == 2
    assert np.isfinite(ours.fun) and ours.fun == nan_far(ours.x)[0]

    def huge(x):  # |g| ~ 1e160: g'd overflows; SciPy goes on with NaN for 50 evaluations
        return float(1e160 * (x @ x)), 2e160 * x

    res = minimize_lbfgs(huge, np.ones(4), maxiter=100, gtol=1e-8, ftol=1e-12)
    assert (res.status, res.nit, res.nfev) == (2, 0, 1) and res.message.startswith("ABNORMAL")
    np.testing.assert_array_equal(res.x, np.ones(4))


def test_a_gradient_returned_in_one_reused_buffer():
    fun, x0 = _logistic(np.random.default_rng(2))
    buffer = np.empty_like(x0)

    def reusing(x):
        J, g = fun(x)
        buffer[:] = g
        return J, buffer

    ours = minimize_lbfgs(reusing, x0, maxiter=100, gtol=1e-6, ftol=1e-12)
    ref = _scipy(fun, x0, gtol=1e-6, ftol=1e-12)
    assert (ours.nit, ours.nfev, ours.message) == (ref.nit, ref.nfev, ref.message)
    np.testing.assert_allclose(ours.x, ref.x, rtol=0, atol=1e-12)


# More & Thuente (1994), section 5: phi_1(a) = -a / (a^2 + beta), beta = 2 (a minimiser at sqrt 2);
# phi_2(a) = (a + beta)^5 - 2 (a + beta)^4, beta = 0.004 (a minimiser at 1.6 - beta)
def _phi1(a):
    return -a / (a * a + 2.0), (a * a - 2.0) / (a * a + 2.0) ** 2


def _phi2(a):
    t = a + 0.004
    return t ** 5 - 2 * t ** 4, 5 * t ** 4 - 8 * t ** 3


# The paper's Tables 1 and 2 (xtol = 1e-10): evaluations to convergence from each start.
@pytest.mark.parametrize("phi,ftol,gtol,counts", [(_phi1, 1e-3, 0.1, (6, 3, 1, 4)),
                                                  (_phi2, 0.1, 0.1, (12, 8, 8, 11))])
@pytest.mark.parametrize("start", range(4))
def test_line_search_accepts_strong_wolfe_steps(phi, ftol, gtol, counts, start):
    stp0 = (1e-3, 1e-1, 1e1, 1e3)[start]
    f0, g0 = phi(0.0)
    search = _MoreThuente(f0, g0, stp0, ftol=ftol, gtol=gtol, xtol=1e-10)
    for evaluations in range(1, 30):
        f, g = phi(search.stp)
        if search.step(f, g):
            break
    else:
        pytest.fail("no step accepted in 30 evaluations")
    assert evaluations == counts[start]
    assert f <= f0 + ftol * search.stp * g0  # sufficient decrease
    assert abs(g) <= gtol * abs(g0)  # curvature


def test_bad_arguments():
    fun, _ = _logistic(np.random.default_rng(7))
    with pytest.raises(ValueError, match="x0 must be a 1-D array"):
        minimize_lbfgs(fun, np.zeros((2, 3)), maxiter=5, gtol=1e-5, ftol=1e-9)
    with pytest.raises(ValueError, match="maxcor and maxls must be positive"):
        minimize_lbfgs(fun, np.zeros(4 * 31), maxiter=5, gtol=1e-5, ftol=1e-9, maxcor=0)
    with pytest.raises(ValueError, match="gradient of shape"):
        minimize_lbfgs(lambda x: (0.0, np.zeros(3)), np.zeros(4), maxiter=5, gtol=1e-5, ftol=1e-9)


def test_initial_point_values_save_the_first_evaluation():
    fun, x0 = _logistic(np.random.default_rng(8))
    plain = minimize_lbfgs(fun, x0, maxiter=100, gtol=1e-6, ftol=1e-12)
    f0, g0 = fun(x0)
    given = minimize_lbfgs(fun, x0, maxiter=100, gtol=1e-6, ftol=1e-12, initial=(f0, g0))
    assert given.nfev == plain.nfev - 1 and given.nit == plain.nit
    np.testing.assert_array_equal(given.x, plain.x)
    np.testing.assert_array_equal(g0, fun(x0)[1])  # the caller's gradient is not modified
    with pytest.raises(ValueError, match="gradient of shape"):
        minimize_lbfgs(fun, x0, maxiter=5, gtol=1e-5, ftol=1e-9, initial=(f0, g0[:-1]))


def test_norm_of_the_first_step_neither_overflows_nor_underflows():
    from softgrad._lbfgs import _norm

    for scale in (1e-200, 1.0, 1e200):
        d = scale * np.array([3.0, 4.0])
        assert _norm(d) == pytest.approx(5.0 * scale, rel=1e-15)
    assert _norm(np.zeros(3)) == 0.0
