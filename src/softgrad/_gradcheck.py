"""Numerical gradients by central differences, and checking analytic gradients against them.

``numerical_gradient(f, x)`` differentiates any function of one array in float64.
``gradcheck(f, *inputs)`` evaluates an analytic gradient at the inputs as given (so a
float32 code path is exercised in float32), differentiates the same function
numerically at float64 copies of the same values, and returns a
:class:`GradcheckReport` with one line per input.

Error measure (one number per input, scale-aware): with ``a`` the analytic and ``n``
the numerical gradient,

    max_abs_error = max_k |a_k - n_k|
    scale         = max_k |n_k|
    max_rel_error = max_abs_error / scale          (inf if scale is 0 and a != n)
    passed        = max_abs_error <= atol + rtol * scale

The relative error is measured against the largest entry rather than entry by entry:
the error of a central difference, ``|f| * eps_machine / h + h**2 * |f'''|``, does not
shrink with the entry it lands on, so an entry-wise ratio on entries near zero would
report noise, not a bug. ``atol`` only matters when the whole gradient is (nearly) zero.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from softgrad import _validation as _v

# Default (rtol, atol) by the least precise float dtype among the inputs and the analytic
# gradients. float64: the central difference itself is good to ~1e-9 relative for
# well-scaled functions at eps=1e-6; float32/float16: the analytic gradient's own rounding.
_DEFAULT_TOLERANCES = {
    np.dtype(np.float64): (1e-6, 1e-9),
    np.dtype(np.float32): (1e-4, 1e-6),
    np.dtype(np.float16): (1e-2, 1e-3),
}


def _check_eps(eps: Any) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a positive float, got {type(eps).__name__}")
    eps = float(eps)
    if not (np.isfinite(eps) and eps > 0.0):
        raise ValueError(f"eps must be a finite float > 0, got {eps}")
    return eps


def _value_array(value: Any, what: str) -> np.ndarray:
    """``f``'s value as a float64 array; a tuple is a usage error, non-finite a value error."""
    if isinstance(value, (tuple, list)):
        raise TypeError(
            f"{what} returned a {type(value).__name__}; numerical_gradient needs the value only "
            f"(for f returning (value, grad) pass lambda x: f(x)[0])"
        )
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} must return a real number or array, got {type(value).__name__}") from exc
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} returned a non-finite value; no finite difference exists there")
    return arr


#: The most entries of ``x`` :func:`numerical_gradient` differentiates (``2 * x.size`` calls of ``f``).
MAX_NUMERICAL_SIZE = 10 ** 6


def _check_evaluations(size: int, name: str = "x") -> None:
    if size > MAX_NUMERICAL_SIZE:
        raise ValueError(f"{name} has {size} entries; numerical_gradient would call f {2 * size} times "
                         f"(the limit is x.size <= {MAX_NUMERICAL_SIZE}); differentiate a smaller "
                         f"slice of x or check the gradient at a few sampled entries")


def numerical_gradient(f: Callable[[np.ndarray], Any], x: Any, *, eps: float = 1e-6) -> np.ndarray:
    r"""Gradient (or Jacobian) of ``f`` at ``x`` by central differences in float64.

    .. math::

        \frac{\partial f}{\partial x_k} \approx \frac{f(x + h e_k) - f(x - h e_k)}{(x_k + h) - (x_k - h)}

    The denominator is the step actually taken in floating point (it differs from
    ``2h`` when ``|x_k|`` is large), which removes the representation error of the step.
    The truncation error is :math:`O(h^2 f''')`, the rounding error about
    :math:`\epsilon_{64} |f| / h`; ``eps=1e-6`` balances the two for well-scaled ``f``.

    ``f`` is called ``2 * x.size`` times, each time with a fresh float64 array of
    ``x``'s shape; the caller's ``x`` is never modified.

    Args:
        f: function of one array. It may return a scalar (the result is the gradient,
            shape ``x.shape``) or an array of any shape ``S`` (the result is the
            Jacobian, shape ``S + x.shape``). It must not return a tuple.
        x: array-like of real numbers (integers are converted to float64), finite.
        eps: the step ``h``, a finite float > 0.

    Returns:
        float64 array of shape ``f(x).shape + x.shape``.

    Raises:
        TypeError: ``x`` is not real numeric; ``f`` returns a tuple or non-numeric value;
            ``eps`` is not a real number.
        ValueError: ``x`` has NaN/inf entries; ``f`` returns a non-finite value or
            values of changing shape; ``eps`` is not finite and positive; ``x`` has more
            than ``MAX_NUMERICAL_SIZE`` (10**6) entries (checked before ``f`` is called);
            the Jacobian would exceed ``softgrad._validation.MAX_RESULT_BYTES`` (4 GiB,
            checked after the first call of ``f``).

    Examples:
        >>> numerical_gradient(lambda v: (v ** 2).sum(), np.array([1.0, -2.0])).round(6)
        array([ 2., -4.])
        >>> numerical_gradient(lambda v: 3.0 * v, np.zeros(2)).round(6)  # a Jacobian
        array([[3., 0.],
               [0., 3.]])
    """
    eps = _check_eps(eps)
    arr = np.asarray(x)
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.floating)
                                     or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"x must be an array of real numbers, got dtype {arr.dtype}")
    point = np.array(arr, dtype=np.float64)  # always a copy
    if not np.isfinite(point).all():
        raise ValueError("x contains NaN or inf")
    # checked before f is called: the 2 * x.size columns kept are f(x).size * x.size float64s
    _check_evaluations(point.size)
    work = point.copy()
    flat = work.reshape(-1)  # a view: writing flat[k] perturbs work
    out_shape = None
    columns = []
    for k in range(flat.size):
        x_k = point.flat[k]
        hi, lo = x_k + eps, x_k - eps
        flat[k] = hi
        f_hi = _value_array(f(work.copy()), "f")
        flat[k] = lo
        f_lo = _value_array(f(work.copy()), "f")
        flat[k] = x_k
        if out_shape is None:
            out_shape = f_hi.shape
            _v.check_result_size(f_hi.size * point.size, 8,
                                 f"numerical_gradient's Jacobian (f(x) shape {out_shape}, x shape {point.shape})")
        if f_hi.shape != out_shape or f_lo.shape != out_shape:
            raise ValueError(f"f returned values of changing shape ({out_shape} and {f_hi.shape})")
        columns.append((f_hi - f_lo) / (hi - lo))
    if out_shape is None:  # x is empty: the derivative is empty too
        out_shape = _value_array(f(point.copy()), "f").shape
        return np.zeros(out_shape + point.shape)
    jac = np.stack(columns, axis=-1)  # S + (x.size,)
    return jac.reshape(out_shape + point.shape)


@dataclass(frozen=True)
class InputCheck:
    """The comparison for one input of :func:`gradcheck` (see the module docstring).

    Attributes:
        name: the input's name in the report.
        shape: the input's shape.
        dtype: the dtype of the analytic gradient.
        max_abs_error: ``max |analytic - numerical|``.
        max_rel_error: ``max_abs_error / max |numerical|``.
        scale: ``max |numerical|``.
        rtol, atol: the tolerances applied.
        passed: ``max_abs_error <= atol + rtol * scale`` and ``f`` left the input unchanged.
        note: why it failed beyond the numbers (e.g. the input was modified), else ``""``.
    """

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    max_abs_error: float
    max_rel_error: float
    scale: float
    rtol: float
    atol: float
    passed: bool
    note: str = ""


@dataclass(frozen=True)
class GradcheckReport:
    """Result of :func:`gradcheck`: one :class:`InputCheck` per input.

    ``bool(report)`` and ``report.passed`` are true when every input passed;
    ``str(report)`` is an aligned table, one row per input.

    Attributes:
        inputs: the per-input checks, in the order of the inputs.
        eps: the finite-difference step used.
    """

    inputs: tuple[InputCheck, ...]
    eps: float

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.inputs)

    @property
    def max_abs_error(self) -> float:
        """Largest absolute error over all inputs."""
        return max((c.max_abs_error for c in self.inputs), default=0.0)

    @property
    def max_rel_error(self) -> float:
        """Largest relative error over all inputs."""
        return max((c.max_rel_error for c in self.inputs), default=0.0)

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        n_failed = sum(not c.passed for c in self.inputs)
        head = (f"gradcheck passed ({len(self.inputs)} input(s), eps={self.eps:g})" if not n_failed
                else f"gradcheck FAILED ({n_failed} of {len(self.inputs)} input(s), eps={self.eps:g})")
        rows = [("input", "shape", "dtype", "max abs err", "max rel err", "rtol", "atol", "result")]
        for c in self.inputs:
            rows.append((c.name, str(c.shape), str(c.dtype), f"{c.max_abs_error:.3e}",
                         f"{c.max_rel_error:.3e}", f"{c.rtol:g}", f"{c.atol:g}",
                         ("pass" if c.passed else "FAIL") + (f" ({c.note})" if c.note else "")))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        lines = [head]
        for r in rows:
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths)) + "  " + r[-1])
        return "\n".join(line.rstrip() for line in lines)


def _split_result(result: Any, n_inputs: int) -> tuple[Any, tuple]:
    """Split ``f``'s return into ``(value, grads)`` for the ``(value, grad...)`` protocol."""
    if not isinstance(result, tuple) or len(result) < 2:
        raise TypeError(
            "f must return (value, grad) when grad= is not given; it returned "
            f"{type(result).__name__}" + (f" of length {len(result)}" if isinstance(result, tuple) else "")
            + ". For a value-only f pass grad=<callable returning the gradient(s)>"
        )
    value, rest = result[0], result[1:]
    if len(rest) == 1:
        return value, _as_grads(rest[0], n_inputs, "f")
    if len(rest) == n_inputs:
        return value, tuple(rest)
    raise ValueError(f"f returned {len(rest)} gradients for {n_inputs} input(s)")


def _as_grads(grads: Any, n_inputs: int, what: str) -> tuple:
    if n_inputs == 1 and not isinstance(grads, (tuple, list)):
        return (grads,)
    if not isinstance(grads, (tuple, list)) or len(grads) != n_inputs:
        got = len(grads) if isinstance(grads, (tuple, list)) else 1
        raise ValueError(f"{what} must give one gradient per input: expected {n_inputs}, got {got}")
    return tuple(grads)


def _least_precise(dtypes: Sequence[np.dtype]) -> np.dtype:
    order = [np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)]
    for d in order:
        if any(np.dtype(x) == d for x in dtypes):
            return d
    return np.dtype(np.float64)


def _check_tol(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float >= 0, got {type(value).__name__}")
    value = float(value)
    if not (np.isfinite(value) and value >= 0.0):
        raise ValueError(f"{name} must be a finite float >= 0, got {value}")
    return value


def gradcheck(f: Callable[..., Any], *inputs: Any, grad: Callable[..., Any] | None = None,
              eps: float = 1e-6, rtol: float | None = None, atol: float | None = None,
              names: Sequence[str] | None = None) -> GradcheckReport:
    r"""Compare the analytic gradient of ``f`` with central differences, input by input.

    Two ways to supply the analytic gradient, in the spirit of
    ``torch.autograd.gradcheck``:

    * ``grad=None``: ``f(*inputs)`` returns ``(value, grad)`` where ``grad`` is one array
      (one input) or a tuple with one gradient per input; ``(value, g1, ..., gk)`` with
      one gradient per input also works (e.g. ``linear_softmax_loss(..., b=b)``).
    * ``grad=callable``: ``f(*inputs)`` returns the value only and
      ``grad(*inputs)`` returns the gradient(s) in the same form.

    The value may be a scalar (gradients have the inputs' shapes) or an array of shape
    ``S`` (the "gradient" is the Jacobian, of shape ``S + input.shape``).

    The analytic gradient is evaluated at the inputs exactly as given, so float32 and
    float16 code paths are exercised in their own dtype. The numerical gradient of
    input ``k`` differentiates ``value(..., x_k, ...)`` at float64 copies of the same
    values (:func:`numerical_gradient`), the other inputs held at their float64 copies.
    ``f`` gets the caller's arrays once (for the analytic gradient) and fails the check
    if it modifies them.

    Pass criterion per input (see the module docstring): with ``scale = max|numerical|``,
    ``max|analytic - numerical| <= atol + rtol * scale``.

    Args:
        f: the function, called as ``f(*inputs)``.
        *inputs: the point, one array-like of real floats per differentiated argument.
            Close over arguments that are not differentiated (labels, options).
        grad: optional callable returning the analytic gradient(s) of a value-only ``f``.
        eps: finite-difference step (float > 0).
        rtol, atol: tolerances (floats >= 0). ``None`` picks them by the least precise
            float dtype among the inputs and the analytic gradients: float64
            ``(1e-6, 1e-9)``, float32 ``(1e-4, 1e-6)``, float16 ``(1e-2, 1e-3)``.
        names: optional names of the inputs for the report (default ``x0, x1, ...``).

    Returns:
        A :class:`GradcheckReport`; ``report.passed`` (or ``bool(report)``) tells whether
        every input passed, ``str(report)`` prints the table.

    Raises:
        TypeError: ``f`` or ``grad`` not callable; an input that is not a real float
            array; ``f`` not returning ``(value, grad...)`` without ``grad=``;
            non-real ``eps``/``rtol``/``atol``.
        ValueError: no inputs; non-finite inputs or values; a gradient whose shape is
            neither ``input.shape`` nor ``value.shape + input.shape``; a wrong number of
            gradients; ``names`` of the wrong length; bad ``eps``/``rtol``/``atol``.

    Examples:
        >>> import softgrad
        >>> z, y = np.array([[0.3, 0.5, 0.2]]), np.array([1])
        >>> report = gradcheck(lambda z: softgrad.softmax_cross_entropy(z, y), z)
        >>> report.passed
        True
        >>> bad = gradcheck(lambda z: softgrad.cross_entropy(z, y), z,
        ...                 grad=lambda z: softgrad.softmax(z))  # forgot "- y"
        >>> bool(bad), round(bad.inputs[0].max_abs_error, 6)
        (False, 1.0)
    """
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    if grad is not None and not callable(grad):
        raise TypeError(f"grad must be callable or None, got {type(grad).__name__}")
    if not inputs:
        raise ValueError("gradcheck needs at least one input to differentiate")
    eps = _check_eps(eps)
    rtol, atol = _check_tol(rtol, "rtol"), _check_tol(atol, "atol")
    if names is None:
        names = [f"x{i}" for i in range(len(inputs))]
    elif isinstance(names, str) or len(names) != len(inputs):
        raise ValueError(f"names must be a sequence of {len(inputs)} name(s), got {names!r}")

    arrays = []
    for i, x in enumerate(inputs):
        arr = np.asarray(x)
        if not np.issubdtype(arr.dtype, np.floating):
            raise TypeError(f"input {names[i]} must be a real floating array, got dtype {arr.dtype}")
        if not np.isfinite(arr).all():
            raise ValueError(f"input {names[i]} contains NaN or inf")
        _check_evaluations(arr.size, f"input {names[i]}")
        arrays.append(arr)
    saved = [a.copy() for a in arrays]

    # Analytic side: the inputs as given.
    if grad is None:
        value, grads = _split_result(f(*arrays), len(arrays))
    else:
        value = f(*arrays)
        grads = _as_grads(grad(*[a.copy() for a in arrays]), len(arrays), "grad")
    value = _value_array(value, "f")
    grads = [np.asarray(g) for g in grads]
    modified = [not np.array_equal(a, s) for a, s in zip(arrays, saved)]

    if rtol is None or atol is None:
        dtypes = [a.dtype for a in saved] + [g.dtype for g in grads if np.issubdtype(g.dtype, np.floating)]
        d_rtol, d_atol = _DEFAULT_TOLERANCES[_least_precise(dtypes)]
        rtol = d_rtol if rtol is None else rtol
        atol = d_atol if atol is None else atol

    # Numerical side: float64 copies of the same values.
    point = [s.astype(np.float64) for s in saved]
    value_of = (lambda *xs: f(*xs)) if grad is not None else (lambda *xs: f(*xs)[0])
    checks = []
    for i, (g, name) in enumerate(zip(grads, names)):
        shape = saved[i].shape
        if g.shape not in (shape, value.shape + shape):
            raise ValueError(
                f"the gradient for input {name} has shape {g.shape}; expected the input's shape "
                f"{shape}" + (f" or value.shape + input.shape = {value.shape + shape}" if value.shape else "")
            )

        def partial(x, i=i):
            args = [p.copy() for p in point]
            args[i] = x
            return value_of(*args)

        num = numerical_gradient(partial, point[i], eps=eps).reshape(g.shape)
        if not np.isfinite(g).all():
            diff = np.inf
        else:
            diff = float(np.max(np.abs(g.astype(np.float64) - num), initial=0.0))
        scale = float(np.max(np.abs(num), initial=0.0))
        rel = diff / scale if scale > 0 else (0.0 if diff == 0 else np.inf)
        ok = bool(diff <= atol + rtol * scale) and not modified[i]
        note = "f modified this input" if modified[i] else ("non-finite gradient" if diff == np.inf else "")
        checks.append(InputCheck(name, shape, g.dtype, diff, rel, scale, rtol, atol, ok, note))
    return GradcheckReport(tuple(checks), eps)
