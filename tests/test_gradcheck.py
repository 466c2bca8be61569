"""numerical_gradient and gradcheck: known derivatives, the report, the calling protocols, errors."""

from __future__ import annotations

import numpy as np
import pytest

import softgrad
from softgrad import GradcheckReport, gradcheck, numerical_gradient

# ---------------------------------------------------------------- numerical_gradient


def test_numerical_gradient_of_known_functions(rng):
    x = rng.normal(size=(3, 4))
    np.testing.assert_allclose(numerical_gradient(lambda v: np.sum(v ** 3), x), 3 * x ** 2, rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(numerical_gradient(lambda v: np.sin(v).sum(), x), np.cos(x), rtol=1e-8, atol=1e-9)
    # logsumexp's gradient is softmax
    z = rng.normal(size=6)
    np.testing.assert_allclose(numerical_gradient(softgrad.logsumexp, z), softgrad.softmax(z), rtol=1e-8, atol=1e-10)


def test_numerical_jacobian_of_array_function(rng):
    A = rng.normal(size=(2, 3))
    x = rng.normal(size=3)
    jac = numerical_gradient(lambda v: A @ v, x)
    assert jac.shape == (2, 3)
    np.testing.assert_allclose(jac, A, rtol=1e-8, atol=1e-9)
    z = rng.normal(size=4)
    np.testing.assert_allclose(numerical_gradient(softgrad.softmax, z), softgrad.softmax_jacobian(z),
                               rtol=1e-7, atol=1e-10)
    assert numerical_gradient(lambda v: np.outer(v, v), x).shape == (3, 3, 3)


def test_numerical_gradient_large_inputs_uses_actual_step():
    # at x = 1e8 the step 1e-6 is not representable (1e8 + 1e-6 rounds to 1e8 + 67 ulps,
    # 0.2% off); dividing by the step actually taken makes this exact linear f exact
    x = np.array([1e8])
    g = numerical_gradient(lambda v: 2.0 * (v[0] - 1e8), x)  # v[0] - 1e8 is exact
    np.testing.assert_allclose(g, [2.0], rtol=1e-12)


def test_numerical_gradient_never_modifies_x(rng):
    x = rng.normal(size=5)
    x0 = x.copy()
    seen = []

    def f(v):
        seen.append(v)
        v *= 2  # a hostile f that writes into its argument
        return float(v.sum())

    numerical_gradient(f, x)
    np.testing.assert_array_equal(x, x0)
    assert all(s.dtype == np.float64 for s in seen)


def test_numerical_gradient_float32_and_int_input():
    g = numerical_gradient(lambda v: np.sum(v ** 2), np.array([1, 2], dtype=np.int64))
    np.testing.assert_allclose(g, [2.0, 4.0], rtol=1e-8)
    g = numerical_gradient(lambda v: np.sum(v ** 2), np.array([1.5], dtype=np.float32))
    assert g.dtype == np.float64
    np.testing.assert_allclose(g, [3.0], rtol=1e-8)


def test_numerical_gradient_empty_and_scalar():
    assert numerical_gradient(lambda v: 1.0, np.zeros(0)).shape == (0,)
    np.testing.assert_allclose(numerical_gradient(lambda v: v ** 2, 3.0), 6.0, rtol=1e-8)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(eps=0.0), ValueError, r"^eps must be a finite float > 0"),
    (dict(eps=-1e-6), ValueError, r"^eps must be a finite float > 0"),
    (dict(eps="1e-6"), TypeError, r"^eps must be a positive float"),
    (dict(x=np.array([1.0, np.nan])), ValueError, r"^x contains NaN or inf"),
    (dict(x=np.array(["a"])), TypeError, r"^x must be an array of real numbers"),
    (dict(x=np.array([True])), TypeError, r"^x must be an array of real numbers"),
    (dict(f=lambda v: (v.sum(), v)), TypeError, r"^f returned a tuple"),
    (dict(f=lambda v: np.log(v[0] - 1.0)), ValueError, r"^f returned a non-finite value"),
    (dict(f=lambda v: np.zeros(int(v[0] > 1.0) + 1)), ValueError, r"^f returned values of changing shape"),
])
def test_numerical_gradient_errors(kwargs, exc, match):
    args = dict(f=lambda v: float(np.sum(v)), x=np.array([1.0, 0.5]))
    args.update(kwargs)
    f, x = args.pop("f"), args.pop("x")
    with pytest.raises(exc, match=match):
        numerical_gradient(f, x, **args)


# ---------------------------------------------------------------- gradcheck: protocols


def _quadratic(A):
    """``f(x) = x^T A x / 2`` and its gradient ``(A + A^T) x / 2``."""
    return lambda x: (0.5 * x @ A @ x, 0.5 * (A + A.T) @ x)


def test_gradcheck_value_grad_tuple(rng):
    A = rng.normal(size=(4, 4))
    report = gradcheck(_quadratic(A), rng.normal(size=4))
    assert isinstance(report, GradcheckReport)
    assert report.passed and bool(report)
    (entry,) = report.inputs
    assert entry.name == "x0" and entry.shape == (4,) and entry.dtype == np.float64
    assert entry.max_abs_error < 1e-8 and entry.max_rel_error < 1e-7
    assert report.max_rel_error == entry.max_rel_error


def test_gradcheck_several_inputs_both_forms(rng):
    a, b = rng.normal(size=3), rng.normal(size=(2, 3))

    def f_tuple(a, b):  # (value, (ga, gb))
        return np.sum(a * b), (b.sum(axis=0), np.broadcast_to(a, b.shape))

    def f_flat(a, b):  # (value, ga, gb), like linear_softmax_loss(..., b=b)
        value, (ga, gb) = f_tuple(a, b)
        return value, ga, gb

    for f in (f_tuple, f_flat):
        report = gradcheck(f, a, b, names=["a", "b"])
        assert report.passed, str(report)
        assert [c.name for c in report.inputs] == ["a", "b"]
        assert [c.shape for c in report.inputs] == [(3,), (2, 3)]


def test_gradcheck_value_only_with_grad_callable(rng):
    z = rng.normal(size=(3, 5))
    y = rng.integers(0, 5, size=3)
    report = gradcheck(lambda z: softgrad.cross_entropy(z, y), z,
                       grad=lambda z: softgrad.softmax_cross_entropy(z, y)[1])
    assert report.passed, str(report)


def test_gradcheck_array_valued_jacobian(rng):
    z = rng.normal(size=4)
    assert gradcheck(softgrad.softmax, z, grad=softgrad.softmax_jacobian).passed
    wrong = gradcheck(softgrad.softmax, z, grad=lambda z: softgrad.softmax_jacobian(z).T * 1.5)
    assert not wrong.passed


def test_gradcheck_detects_wrong_gradients(rng):
    z = rng.normal(size=(2, 3))
    y = np.array([0, 2])
    # the classic mistake: forget to subtract the one-hot target
    report = gradcheck(lambda z: softgrad.cross_entropy(z, y), z, grad=lambda z: softgrad.softmax(z) / 2)
    assert not report.passed and not bool(report)
    assert report.inputs[0].max_abs_error == pytest.approx(0.5, rel=1e-6)
    # a gradient off by a small relative factor fails too
    A = rng.normal(size=(3, 3))
    f = _quadratic(A)
    report = gradcheck(lambda x: (f(x)[0], f(x)[1] * (1 + 1e-4)), rng.normal(size=3))
    assert not report.passed


def test_gradcheck_tolerances(rng):
    A = rng.normal(size=(3, 3))
    f = _quadratic(A)
    x = rng.normal(size=3)
    off = lambda x: (f(x)[0], f(x)[1] * (1 + 1e-4))  # noqa: E731
    assert not gradcheck(off, x).passed
    assert gradcheck(off, x, rtol=1e-3).passed
    # atol alone passes a gradient that is wrong by less than atol
    assert gradcheck(lambda x: (0.0, np.full(3, 1e-10)), x).passed          # default atol 1e-9
    assert not gradcheck(lambda x: (0.0, np.full(3, 1e-10)), x, atol=0.0).passed


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-6), (np.float32, 1e-4), (np.float16, 1e-2)])
def test_gradcheck_default_tolerance_follows_dtype(rng, dtype, rtol):
    z = (rng.normal(size=(4, 5)) * 2).astype(dtype)
    y = rng.integers(0, 5, size=4)
    report = gradcheck(lambda z: softgrad.softmax_cross_entropy(z, y), z)
    assert report.passed, str(report)
    assert report.inputs[0].rtol == rtol
    assert report.inputs[0].dtype == dtype  # the analytic gradient ran in the input's dtype


def test_gradcheck_detects_modified_input(rng):
    x = rng.normal(size=3)
    x0 = x.copy()

    def f(v):
        value, g = float(np.sum(v ** 2)), 2 * v.copy()
        v += 1.0  # modifies the caller's array
        return value, g

    report = gradcheck(f, x)
    assert not report.passed
    assert "modified" in str(report)
    x[:] = x0


def test_gradcheck_non_finite_gradient_fails(rng):
    report = gradcheck(lambda x: (float(x.sum()), np.full(2, np.nan)), rng.normal(size=2))
    assert not report.passed
    assert "non-finite gradient" in str(report)


def test_gradcheck_leaves_inputs_unchanged(rng):
    W = rng.normal(size=(3, 2))
    W0 = W.copy()
    gradcheck(lambda W: (np.sum(W ** 2), 2 * W), W)
    np.testing.assert_array_equal(W, W0)


# ---------------------------------------------------------------- gradcheck: the report


def test_report_str_is_an_aligned_table(rng):
    a, b = rng.normal(size=3), rng.normal(size=(2, 3))
    good = gradcheck(lambda a, b: (np.sum(a * b), b.sum(axis=0), np.broadcast_to(a, b.shape)), a, b,
                     names=["weights", "b"])
    text = str(good)
    lines = text.splitlines()
    assert lines[0].startswith("gradcheck passed (2 input(s)")
    assert lines[1].split()[:4] == ["input", "shape", "dtype", "max"]
    assert lines[2].split()[0] == "weights" and lines[3].split()[0] == "b"
    # columns line up: each column starts at the same offset on every row
    for col in ("shape", "dtype", "max abs err", "max rel err", "result"):
        start = lines[1].index(col)
        assert all(line[start - 2:start] == "  " for line in lines[2:]), (col, text)
    assert lines[2].rstrip().endswith("pass") and lines[3].rstrip().endswith("pass")

    bad = gradcheck(lambda a, b: (np.sum(a * b), b.sum(axis=0), np.zeros_like(b)), a, b, names=["a", "b"])
    text = str(bad)
    assert text.splitlines()[0].startswith("gradcheck FAILED (1 of 2 input(s)")
    assert text.splitlines()[-1].rstrip().endswith("FAIL")
    assert f"{bad.inputs[1].max_abs_error:.3e}" in text


# ---------------------------------------------------------------- gradcheck: errors


@pytest.mark.parametrize("call, exc, match", [
    (lambda: gradcheck(3, np.zeros(2)), TypeError, r"^f must be callable"),
    (lambda: gradcheck(lambda x: (0.0, x), np.zeros(2), grad=3), TypeError, r"^grad must be callable"),
    (lambda: gradcheck(lambda x: (0.0, x)), ValueError, r"needs at least one input"),
    (lambda: gradcheck(lambda x: (0.0, x), np.zeros(2, dtype=int)), TypeError, r"^input x0 must be a real floating"),
    (lambda: gradcheck(lambda x: (0.0, x), np.array([np.inf])), ValueError, r"^input x0 contains NaN or inf"),
    (lambda: gradcheck(lambda x: 0.0, np.zeros(2)), TypeError, r"^f must return \(value, grad\)"),
    (lambda: gradcheck(lambda x: (0.0, np.zeros(3)), np.zeros(2)), ValueError,
     r"gradient for input x0 has shape \(3,\); expected the input's shape \(2,\)"),
    (lambda: gradcheck(lambda a, b: (0.0, a, b, a), np.zeros(2), np.zeros(2)), ValueError,
     r"f returned 3 gradients for 2 input"),
    (lambda: gradcheck(lambda a, b: 0.0, np.zeros(2), np.zeros(2), grad=lambda a, b: a), ValueError,
     r"^grad must give one gradient per input: expected 2, got 1"),
    (lambda: gradcheck(lambda x: (0.0, x), np.zeros(2), names=["a", "b"]), ValueError, r"^names must be"),
    (lambda: gradcheck(lambda x: (0.0, x), np.zeros(2), rtol=-1.0), ValueError, r"^rtol must be"),
    (lambda: gradcheck(lambda x: (0.0, x), np.zeros(2), atol="0"), TypeError, r"^atol must be"),
    (lambda: gradcheck(lambda x: (0.0, x), np.zeros(2), eps=0), ValueError, r"^eps must be"),
    (lambda: gradcheck(lambda x: (np.nan, x), np.zeros(2)), ValueError, r"^f returned a non-finite"),
])
def test_gradcheck_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
