"""L-BFGS for smooth unconstrained problems: L-BFGS-B's iteration, two passes over the memory.

:func:`minimize_lbfgs` is the solver of ``solver="lbfgs"``. It runs the iteration of
L-BFGS-B (Byrd, Lu, Nocedal & Zhu 1995; Zhu, Byrd, Lu & Nocedal 1997) as SciPy's
``minimize(method="L-BFGS-B")`` runs it without bounds -- the same first step, the same
More-Thuente line search with the same constants, the same rule for skipping an update,
the same stopping tests and status codes -- so a fit takes the same iterations and stops
for the same reason. What differs is how the direction ``d = -H g`` is computed.

L-BFGS-B forms the *direct* compact representation of ``B = H^{-1}`` and solves with it:
for ``n`` variables and ``m`` pairs that is ``O(m n)`` work spread over several passes
over the ``2 m n`` stored numbers (measured: 27 ms per iteration at ``n = 400020``,
``m = 10``, as much as one evaluation of the TF-IDF objective it serves). Here the
*inverse* compact representation (Byrd, Nocedal & Schnabel 1994, eq. 3.1) is used::

    H = gamma I + [S  Y] [ R^-T (D + gamma Y'Y) R^-1   -R^-T ] [ S' ]
                         [ -R^-1                        0    ] [ Y' ]   (Y scaled by gamma)

    S, Y  : the last m pairs s_i = x_{i+1} - x_i, y_i = g_{i+1} - g_i, oldest first (n, m)
    R     : upper triangle of S'Y (R_ij = s_i'y_j for i <= j), D its diagonal
    gamma : s'y / y'y of the newest pair (L-BFGS-B's 1 / theta)

With ``a = S'g`` and ``b = Y'g`` (one matrix-vector product over the stored pairs) and
``u = R^-1 a``::

    H g = gamma g + S p - gamma Y u,      p = R^-T ((D + gamma Y'Y) u - gamma b)

(a second product), the small ``m x m`` algebra in between. The pairs are stored
interleaved, row ``2j`` is ``s`` and row ``2j + 1`` is ``y`` of slot ``j``, so that the
filled part is one contiguous ``(2 m, n)`` block for both products. Updating ``S'Y`` and
``Y'Y`` after a step takes the products of the block with the new ``y`` (one more pass).
Mathematically the direction equals L-BFGS-B's; the rounding differs, so iterates agree
to rounding, not bit for bit.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

__all__ = ["LbfgsResult", "minimize_lbfgs"]

_EPS = np.finfo(np.float64).eps
# L-BFGS-B's line-search constants: sufficient decrease (Armijo) 1e-3, curvature 0.9,
# relative interval width 0.1, and the largest step of an unconstrained problem
_LS_FTOL, _LS_GTOL, _LS_XTOL, _STPMAX = 1e-3, 0.9, 0.1, 1e10
# More-Thuente's bracket extrapolation factors before a minimiser is bracketed
_XTRAPL, _XTRAPU = 1.1, 4.0

MESSAGES = {
    "gradient": "CONVERGENCE: NORM OF PROJECTED GRADIENT <= PGTOL",
    "reduction": "CONVERGENCE: RELATIVE REDUCTION OF F <= FACTR*EPSMCH",
    "maxiter": "STOP: TOTAL NO. OF ITERATIONS REACHED LIMIT",
    "maxfun": "STOP: TOTAL NO. OF F,G EVALUATIONS EXCEEDS LIMIT",
    "abnormal": "ABNORMAL: ",
}


@dataclasses.dataclass
class LbfgsResult:
    """What :func:`minimize_lbfgs` returns; the fields of SciPy's ``OptimizeResult`` it fills.

    ``status`` is SciPy's: 0 converged, 1 iteration or evaluation limit, 2 abnormal stop
    (a line search that found no acceptable step from a steepest-descent direction).
    """

    x: np.ndarray
    fun: float
    jac: np.ndarray
    nit: int
    nfev: int
    status: int
    message: str

    @property
    def success(self) -> bool:
        return self.status == 0


@dataclasses.dataclass
class IterationResult:
    """The argument of ``callback``: the accepted point and its objective (SciPy's names)."""

    x: np.ndarray
    fun: float


def minimize_lbfgs(fun, x0, *, maxiter, gtol, ftol, maxcor=10, maxls=50, maxfun=15000, callback=None,
                   initial=None):
    """Minimise ``fun`` by L-BFGS, with L-BFGS-B's schedule and stopping rules (no bounds).

    Args:
        fun: ``x -> (f, g)``, the objective (a float) and its gradient (a float64 ``(n,)``
            array) at a float64 ``(n,)`` point. It must not keep a reference to ``x``: the
            solver reuses the array for the next trial point (the gradient it returns is
            the caller's to reuse).
        x0: the starting point, ``(n,)``; not modified.
        maxiter: the most iterations (accepted steps).
        gtol: stop when ``max_i |g_i| <= gtol``.
        ftol: stop when ``(f_old - f) <= ftol * max(|f_old|, |f|, 1)`` after a step.
        maxcor: the number ``m`` of stored pairs.
        maxls: the most evaluations in one line search.
        maxfun: stop after an iteration once more than this many evaluations were made.
        callback: called after every iteration with an object with ``x`` (the solver's
            own array: copy it to keep it) and ``fun``.
        initial: ``(f, g)`` at ``x0`` when the caller has them: the solver then starts
            without evaluating ``fun`` there (``nfev`` counts only its own evaluations).

    Returns:
        :class:`LbfgsResult`; ``jac`` is the gradient array ``fun`` returned at ``x``.
        After an abnormal stop ``x`` is the last accepted point.

    Differences from SciPy's L-BFGS-B beyond rounding: a NaN or infinite slope ``g'd`` at
    the start of a line search fails it at once (SciPy's search goes on with NaN); after
    an abnormal stop ``fun`` is the objective at ``x`` (SciPy's is the last trial's); the
    direction comes from the inverse representation, which needs no factorisation, so
    L-BFGS-B's restart after a failed Cholesky factorisation has no counterpart here.

    Raises:
        ValueError: ``x0`` is not a 1-D array, or ``maxcor`` / ``maxls`` is not positive.
    """
    if np.ndim(x0) != 1:
        raise ValueError(f"x0 must be a 1-D array, got shape {np.shape(x0)}")
    x = np.array(x0, dtype=np.float64)
    if maxcor < 1 or maxls < 1:
        raise ValueError(f"maxcor and maxls must be positive, got {maxcor} and {maxls}")
    n = x.shape[0]
    if initial is None:
        f, g = _evaluate(fun, x)
        nfev = 1
    else:
        f, g = _checked(x, *initial)
        g = g.copy()
        nfev = 0
    nit = 0
    if _max_abs(g) <= gtol:
        return LbfgsResult(x, f, g, 0, nfev, 0, MESSAGES["gradient"])

    memory = _PairMemory(n, maxcor)
    d = np.empty(n)
    x_old, g_old = np.empty(n), np.empty(n)
    while True:
        memory.direction(g, out=d)
        # ---- line search along d from (x, f, g), L-BFGS-B's lnsrlb
        np.copyto(x_old, x)
        np.copyto(g_old, g)
        f_old = f
        with np.errstate(over="ignore", invalid="ignore"):  # a non-finite slope is handled below
            gd_old = float(g @ d)
        accepted = False
        # a descent direction with a finite slope (a NaN or infinite one is not)
        if -math.inf < gd_old < 0.0:
            # the first step has length 1 (L-BFGS-B's rule without bounds), later ones stp = 1
            stp = min(1.0 / _norm(d), _STPMAX) if nit == 0 else 1.0
            search = _MoreThuente(f_old, gd_old, stp)
            evaluations, evaluated_stp = 0, None
            while True:
                if evaluations >= maxls:
                    break
                evaluations += 1  # a repeated trial counts against maxls, as in L-BFGS-B
                if search.stp != evaluated_stp:
                    # the search may retry its best step (rounding, or the interval below
                    # xtol): that point's f and g are at hand (SciPy's wrapper reuses them too)
                    np.multiply(d, search.stp, out=x)
                    x += x_old
                    f, g = _evaluate(fun, x)
                    nfev += 1
                    evaluated_stp = search.stp
                    gd = float(g @ d)
                if search.step(f, gd):
                    accepted = True
                    break
        if not accepted:
            # back to the last accepted point; from a steepest-descent start there is
            # nothing left to try, else the memory is dropped and the iteration restarts
            np.copyto(x, x_old)
            f, g = f_old, g_old.copy()
            if memory.size == 0:
                return LbfgsResult(x, f, g, nit, nfev, 1 if nfev > maxfun else 2, MESSAGES["abnormal"])
            memory.clear()
            continue
        stp = search.stp
        nit += 1
        if callback is not None:
            callback(IterationResult(x, f))
        if nit >= maxiter:
            return LbfgsResult(x, f, g, nit, nfev, 1, MESSAGES["maxiter"])
        if nfev > maxfun:
            return LbfgsResult(x, f, g, nit, nfev, 1, MESSAGES["maxfun"])
        if _max_abs(g) <= gtol:
            return LbfgsResult(x, f, g, nit, nfev, 0, MESSAGES["gradient"])
        if f_old - f <= ftol * max(abs(f_old), abs(f), 1.0):
            return LbfgsResult(x, f, g, nit, nfev, 0, MESSAGES["reduction"])
        # s = stp d, y = g - g_old; s'y from the directional derivatives as L-BFGS-B does.
        # The update is skipped unless s'y > eps * (-s'g_old): the curvature condition of
        # the line search makes s'y > 0, this guards its rounding.
        sy = (gd - gd_old) * stp
        if sy <= _EPS * (-gd_old * stp):
            continue
        memory.push(d, stp, g, g_old, sy)


def _evaluate(fun, x):
    return _checked(x, *fun(x))


def _checked(x, f, g):
    g = np.asarray(g, dtype=np.float64).reshape(-1)
    if g.shape != x.shape:
        raise ValueError(f"fun returned a gradient of shape {g.shape} for a point of shape {x.shape}")
    return float(f), g


def _norm(d):
    """``||d||_2`` without overflow or underflow of the squares (as BLAS's ``dnrm2``)."""
    with np.errstate(over="ignore", under="ignore"):  # both are handled below
        dd = float(d @ d)
    if 1e-280 < dd < math.inf:
        return math.sqrt(dd)
    scale = _max_abs(d)
    if not (0.0 < scale < math.inf):
        return scale
    scaled = d / scale
    return scale * math.sqrt(float(scaled @ scaled))


def _max_abs(g):
    """``max_i |g_i|`` (L-BFGS-B's projected-gradient norm without bounds), no temporary."""
    return max(float(g.max()), -float(g.min())) if g.shape[0] else 0.0


class _PairMemory:
    """The newest ``m`` pairs ``(s_i, y_i)`` and the product ``H g`` in compact form (module docstring)."""

    def __init__(self, n, m):
        self.n, self.m = n, m
        self.pairs = None  # (2m, n), allocated at the first push; row 2j = s, 2j + 1 = y of slot j
        self.sy = np.zeros((m, m))  # sy[i, j] = s_i'y_j by slot; valid where i is not newer than j
        self.yy = np.zeros((m, m))  # yy[i, j] = y_i'y_j by slot
        self.order = []  # slots, oldest pair first
        self.gamma = 1.0
        self._scaled = None  # (n,) scratch for gamma g

    @property
    def size(self):
        return len(self.order)

    def clear(self):
        self.order = []
        self.gamma = 1.0

    def push(self, d, stp, g, g_old, sy):
        """Store ``s = stp d`` and ``y = g - g_old`` (``s'y = sy > 0``) over the oldest pair."""
        if self.pairs is None:
            self.pairs = np.empty((2 * self.m, self.n))
        if len(self.order) == self.m:
            slot = self.order.pop(0)
        else:  # slots fill in order, so the filled rows stay one block
            slot = len(self.order)
        self.order.append(slot)
        s_row, y_row = self.pairs[2 * slot], self.pairs[2 * slot + 1]
        np.multiply(d, stp, out=s_row)
        np.subtract(g, g_old, out=y_row)
        k = len(self.order)
        products = self.pairs[:2 * k] @ y_row  # s_i'y and y_i'y for every stored slot i
        self.sy[:k, slot] = products[0::2]
        self.yy[:k, slot] = self.yy[slot, :k] = products[1::2]
        yy = float(products[2 * slot + 1])
        self.sy[slot, slot] = sy
        self.gamma = sy / yy

    def direction(self, g, out):
        """``out = -H g``; with no pairs stored ``H`` is the identity."""
        k = len(self.order)
        if k == 0:
            np.negative(g, out=out)
            return out
        block = self.pairs[:2 * k]
        ab = block @ g
        order = np.asarray(self.order)
        a, b = ab[0::2][order], ab[1::2][order]  # S'g, Y'g, oldest first
        gamma = self.gamma
        R = np.triu(self.sy[np.ix_(order, order)])
        YY = self.yy[np.ix_(order, order)]
        # R is upper triangular with a positive diagonal (the skip rule), so LU needs no
        # row exchange and the solves are back and forward substitution
        u = np.linalg.solve(R, a)
        p = np.linalg.solve(R.T, np.diag(R) * u + gamma * (YY @ u) - gamma * b)
        coefficients = np.empty(2 * k)
        coefficients[0::2][order] = -p  # out = -(gamma g + S p - gamma Y u)
        coefficients[1::2][order] = gamma * u
        np.matmul(coefficients, block, out=out)
        if self._scaled is None:
            self._scaled = np.empty(self.n)
        out -= np.multiply(g, gamma, out=self._scaled)
        return out


class _MoreThuente:
    """More & Thuente's line search (ACM TOMS 20, 1994), as MINPACK-2's ``dcsrch`` runs it.

    ``phi(stp) = f(x + stp d)``. Finds a step with the strong Wolfe conditions::

        phi(stp) <= phi(0) + ftol stp phi'(0)       |phi'(stp)| <= gtol |phi'(0)|

    by safeguarded cubic and quadratic interpolation on an interval ``[stx, sty]`` that
    is extrapolated until it brackets a minimiser, then shrunk. Call :meth:`step` with
    ``phi`` and ``phi'`` at ``self.stp``; it returns True when the step is accepted
    (converged, or one of ``dcsrch``'s warnings, which L-BFGS-B accepts too), else moves
    ``self.stp`` to the next trial.
    """

    def __init__(self, f0, g0, stp, ftol=_LS_FTOL, gtol=_LS_GTOL, xtol=_LS_XTOL, stpmin=0.0, stpmax=_STPMAX):
        if not (g0 < 0.0 and stpmin <= stp <= stpmax):
            raise ValueError(f"line search needs phi'(0) < 0 and stpmin <= stp <= stpmax, got {g0}, {stp}")
        self.stp, self.ftol, self.gtol, self.xtol = stp, ftol, gtol, xtol
        self.stpmin, self.stpmax = stpmin, stpmax
        self.brackt, self.stage = False, 1
        self.finit, self.ginit, self.gtest = f0, g0, ftol * g0
        self.width = stpmax - stpmin
        self.width1 = self.width / 0.5
        self.stx, self.fx, self.gx = 0.0, f0, g0
        self.sty, self.fy, self.gy = 0.0, f0, g0
        self.stmin, self.stmax = 0.0, stp + _XTRAPU * stp

    def step(self, f, g):
        stp = self.stp
        ftest = self.finit + stp * self.gtest
        if self.stage == 1 and f <= ftest and g >= 0.0:
            self.stage = 2
        # dcsrch's warnings (rounding limits progress, interval below xtol, a bound
        # reached) end the search with the current step, as does convergence
        if self.brackt and (stp <= self.stmin or stp >= self.stmax):
            return True
        if self.brackt and self.stmax - self.stmin <= self.xtol * self.stmax:
            return True
        if stp == self.stpmax and f <= ftest and g <= self.gtest:
            return True
        if stp == self.stpmin and (f > ftest or g >= self.gtest):
            return True
        if f <= ftest and abs(g) <= self.gtol * (-self.ginit):
            return True
        gtest = self.gtest
        if self.stage == 1 and f <= self.fx and f > ftest:
            # before the first step with sufficient decrease and phi' >= 0, interpolate the
            # modified function psi(stp) = phi(stp) - phi(0) - ftol stp phi'(0)
            state = _interpolation_step(self.stx, self.fx - self.stx * gtest, self.gx - gtest,
                                        self.sty, self.fy - self.sty * gtest, self.gy - gtest,
                                        stp, f - stp * gtest, g - gtest, self.brackt, self.stmin, self.stmax)
            self.stx, fxm, gxm, self.sty, fym, gym, stp, self.brackt = state
            self.fx, self.fy = fxm + self.stx * gtest, fym + self.sty * gtest
            self.gx, self.gy = gxm + gtest, gym + gtest
        else:
            state = _interpolation_step(self.stx, self.fx, self.gx, self.sty, self.fy, self.gy,
                                        stp, f, g, self.brackt, self.stmin, self.stmax)
            self.stx, self.fx, self.gx, self.sty, self.fy, self.gy, stp, self.brackt = state
        if self.brackt:
            # bisect when two trials did not shrink the interval by a third
            if abs(self.sty - self.stx) >= 0.66 * self.width1:
                stp = self.stx + 0.5 * (self.sty - self.stx)
            self.width1 = self.width
            self.width = abs(self.sty - self.stx)
            self.stmin, self.stmax = min(self.stx, self.sty), max(self.stx, self.sty)
        else:
            self.stmin = stp + _XTRAPL * (stp - self.stx)
            self.stmax = stp + _XTRAPU * (stp - self.stx)
        stp = float(np.fmin(np.fmax(stp, self.stpmin), self.stpmax))  # C's fmin/fmax: NaN-ignoring
        # no progress possible (rounding, or the interval is below xtol): retry the best step
        if self.brackt and (stp <= self.stmin or stp >= self.stmax
                            or self.stmax - self.stmin <= self.xtol * self.stmax):
            stp = self.stx
        self.stp = stp
        return False


def _interpolation_step(stx, fx, dx, sty, fy, dy, stp, fp, dp, brackt, stpmin, stpmax):
    """One safeguarded step of More-Thuente (MINPACK-2's ``dcstep``).

    ``(stx, fx, dx)``: the best step so far with its value and derivative; ``(sty, fy,
    dy)``: the other end of the interval; ``(stp, fp, dp)``: the trial just evaluated.
    Returns the updated interval ends, the next trial step and whether a minimiser is
    bracketed: ``(stx, fx, dx, sty, fy, dy, stp_next, brackt)``. The four cases are the
    paper's: a higher value (a minimiser lies between stx and stp), derivatives of
    opposite sign, a derivative of the same sign that decreased in magnitude, and one
    that did not.
    """
    with np.errstate(all="ignore"):  # IEEE arithmetic as the C code has it (0/0 -> NaN)
        stx, fx, dx, sty, fy, dy, stp, fp, dp = map(np.float64, (stx, fx, dx, sty, fy, dy, stp, fp, dp))
        sgnd = dp * (dx / abs(dx))
        if fp > fx:
            # cubic step, or halfway to the quadratic step if the cubic one is farther from stx
            theta = 3.0 * (fx - fp) / (stp - stx) + dx + dp
            s = np.fmax(abs(theta), np.fmax(abs(dx), abs(dp)))
            gamma = s * np.sqrt((theta / s) ** 2 - (dx / s) * (dp / s))
            if stp < stx:
                gamma = -gamma
            r = ((gamma - dx) + theta) / (((gamma - dx) + gamma) + dp)
            stpc = stx + r * (stp - stx)
            stpq = stx + ((dx / ((fx - fp) / (stp - stx) + dx)) / 2.0) * (stp - stx)
            stpf = stpc if abs(stpc - stx) < abs(stpq - stx) else stpc + (stpq - stpc) / 2.0
            brackt = True
        elif sgnd < 0.0:
            # the step farther from stp of the cubic and the secant steps
            theta = 3.0 * (fx - fp) / (stp - stx) + dx + dp
            s = np.fmax(abs(theta), np.fmax(abs(dx), abs(dp)))
            gamma = s * np.sqrt((theta / s) ** 2 - (dx / s) * (dp / s))
            if stp > stx:
                gamma = -gamma
            r = ((gamma - dp) + theta) / (((gamma - dp) + gamma) + dx)
            stpc = stp + r * (stx - stp)
            stpq = stp + (dp / (dp - dx)) * (stx - stp)
            stpf = stpc if abs(stpc - stp) > abs(stpq - stp) else stpq
            brackt = True
        elif abs(dp) < abs(dx):
            # the cubic may have no minimiser beyond stp: then step to the bound
            theta = 3.0 * (fx - fp) / (stp - stx) + dx + dp
            s = np.fmax(abs(theta), np.fmax(abs(dx), abs(dp)))
            gamma = s * np.sqrt(np.fmax(0.0, (theta / s) ** 2 - (dx / s) * (dp / s)))
            if stp > stx:
                gamma = -gamma
            r = ((gamma - dp) + theta) / ((gamma + (dx - dp)) + gamma)
            if r < 0.0 and gamma != 0.0:
                stpc = stp + r * (stx - stp)
            elif stp > stx:
                stpc = np.float64(stpmax)
            else:
                stpc = np.float64(stpmin)
            stpq = stp + (dp / (dp - dx)) * (stx - stp)
            if brackt:
                # the step nearer stp, kept within two thirds of the way to sty
                stpf = stpc if abs(stpc - stp) < abs(stpq - stp) else stpq
                if stp > stx:
                    stpf = np.fmin(stp + 0.66 * (sty - stp), stpf)
                else:
                    stpf = np.fmax(stp + 0.66 * (sty - stp), stpf)
            else:
                stpf = stpc if abs(stpc - stp) > abs(stpq - stp) else stpq
                stpf = np.fmax(stpmin, np.fmin(stpmax, stpf))
        elif brackt:
            # the derivative did not decrease: the cubic through stp and sty
            theta = 3.0 * (fp - fy) / (sty - stp) + dy + dp
            s = np.fmax(abs(theta), np.fmax(abs(dy), abs(dp)))
            gamma = s * np.sqrt((theta / s) ** 2 - (dy / s) * (dp / s))
            if stp > sty:
                gamma = -gamma
            r = ((gamma - dp) + theta) / (((gamma - dp) + gamma) + dy)
            stpf = stp + r * (sty - stp)
        else:
            stpf = np.float64(stpmax if stp > stx else stpmin)
        if fp > fx:
            sty, fy, dy = stp, fp, dp
        else:
            if sgnd < 0.0:
                sty, fy, dy = stx, fx, dx
            stx, fx, dx = stp, fp, dp
    return (float(stx), float(fx), float(dx), float(sty), float(fy), float(dy), float(stpf), brackt)
