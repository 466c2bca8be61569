"""softmax, log_softmax, logsumexp, softmax_jacobian, softmax_backward (public API).

Every test takes the ``backend`` fixture, so it runs once per importable backend.
References are scipy.special in float64 or explicit loops written here.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import scipy.special
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import softgrad
from conftest import FLOAT_DTYPES, tolerance

PROPERTY = settings(max_examples=40, deadline=None)
BACKENDS = softgrad.available_backends()
finite_rows = hnp.arrays(
    np.float64,
    hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=8),
    elements=st.floats(-50, 50, allow_nan=False, allow_infinity=False),
)


def _numerical_jacobian(f, z, h=1e-6):
    """Central-difference Jacobian of a vector function ``f`` at the 1-D point ``z``."""
    cols = []
    for k in range(z.size):
        zp, zm = z.copy(), z.copy()
        zp[k] += h
        zm[k] -= h
        cols.append((f(zp) - f(zm)) / (2 * h))
    return np.stack(cols, axis=-1)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_against_scipy(backend, rng, dtype):
    z = (rng.normal(size=(7, 11)) * 4).astype(dtype)
    z64 = z.astype(np.float64)
    for ours, ref in [
        (softgrad.softmax(z), scipy.special.softmax(z64, axis=-1)),
        (softgrad.log_softmax(z), scipy.special.log_softmax(z64, axis=-1)),
        (softgrad.logsumexp(z), scipy.special.logsumexp(z64, axis=-1)),
    ]:
        assert ours.dtype == dtype
        np.testing.assert_allclose(ours.astype(np.float64), ref, **tolerance(dtype))


@pytest.mark.parametrize("axis", [0, 1, 2, -1, -3])
def test_any_axis_equals_moveaxis(backend, rng, axis):
    z = rng.normal(size=(3, 4, 5))
    for f in (softgrad.softmax, softgrad.log_softmax):
        expected = np.moveaxis(f(np.moveaxis(z, axis, -1)), -1, axis)
        np.testing.assert_allclose(f(z, axis=axis), expected, rtol=1e-14)
    np.testing.assert_allclose(softgrad.logsumexp(z, axis=axis), scipy.special.logsumexp(z, axis=axis), rtol=1e-13)
    np.testing.assert_allclose(
        softgrad.logsumexp(z, axis=axis, keepdims=True),
        scipy.special.logsumexp(z, axis=axis, keepdims=True), rtol=1e-13)
    g = rng.normal(size=z.shape)
    a = softgrad.softmax(z, axis=axis)
    expected = np.moveaxis(softgrad.softmax_backward(np.moveaxis(g, axis, -1), np.moveaxis(a, axis, -1)), -1, axis)
    np.testing.assert_allclose(softgrad.softmax_backward(g, a, axis=axis), expected, rtol=1e-13)
    jac = softgrad.softmax_jacobian(z, axis=axis)
    np.testing.assert_allclose(jac, softgrad.softmax_jacobian(np.moveaxis(z, axis, -1)), rtol=1e-14)


def test_non_contiguous_and_1d_input(backend, rng):
    z = rng.normal(size=(6, 8))[::2, ::3]
    np.testing.assert_allclose(softgrad.softmax(z), scipy.special.softmax(z, axis=-1), rtol=1e-13)
    v = rng.normal(size=5)
    assert softgrad.logsumexp(v).shape == ()
    np.testing.assert_allclose(softgrad.softmax(v), scipy.special.softmax(v), rtol=1e-13)


def test_extreme_logits_with_neg_inf(backend):
    z = np.array([[1e4, -1e4, -np.inf, 1e4], [-1e4, -np.inf, -1e4 + 1.0, -1e4]])
    a = softgrad.softmax(z)
    assert np.isfinite(a).all()
    np.testing.assert_allclose(a, scipy.special.softmax(z, axis=-1), rtol=1e-13, atol=1e-300)
    np.testing.assert_allclose(softgrad.log_softmax(z)[:, [0, 1, 3]],
                               scipy.special.log_softmax(z, axis=-1)[:, [0, 1, 3]], rtol=1e-13)
    assert softgrad.log_softmax(z)[0, 2] == -np.inf and a[0, 2] == 0.0
    np.testing.assert_allclose(softgrad.logsumexp(z), [1e4 + np.log(2), scipy.special.logsumexp(z[1])], rtol=1e-15)
    for dtype in (np.float32, np.float16):
        zz = np.array([[-6e4, 6e4, -np.inf], [1e4, 1e4, 1e4]]).astype(dtype)
        a = softgrad.softmax(zz)
        assert a.dtype == dtype and np.isfinite(a).all()
        np.testing.assert_allclose(a.astype(np.float64), [[0, 1, 0], [1 / 3, 1 / 3, 1 / 3]], **tolerance(dtype))


def test_float16_computed_in_float32(backend, rng):
    z = rng.normal(size=(4, 9)).astype(np.float16)
    ref = scipy.special.softmax(z.astype(np.float32).astype(np.float64), axis=-1).astype(np.float16)
    out = softgrad.softmax(z)
    assert out.dtype == np.float16
    # at most one float16 ulp from the float32-computed reference
    np.testing.assert_allclose(out.astype(np.float64), ref.astype(np.float64), rtol=1e-3, atol=1e-7)


def test_jacobian_formula_and_numerical(backend, rng):
    z = rng.normal(size=5)
    jac = softgrad.softmax_jacobian(z)
    s = scipy.special.softmax(z)
    explicit = np.array([[s[i] * ((i == j) - s[j]) for j in range(5)] for i in range(5)])
    np.testing.assert_allclose(jac, explicit, rtol=1e-14, atol=1e-16)
    np.testing.assert_allclose(jac, _numerical_jacobian(lambda x: scipy.special.softmax(x), z), rtol=1e-6, atol=1e-9)
    batch = softgrad.softmax_jacobian(rng.normal(size=(2, 3, 4)), axis=1)
    assert batch.shape == (2, 4, 3, 3)
    np.testing.assert_allclose(batch.sum(axis=-1), 0.0, atol=1e-15)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_backward_is_jacobian_transpose_times_upstream(backend, rng, dtype):
    z = rng.normal(size=(3, 6))
    g = rng.normal(size=(3, 6))
    a = scipy.special.softmax(z, axis=-1)
    ref = np.einsum("nij,ni->nj", softgrad.softmax_jacobian(z), g)
    out = softgrad.softmax_backward(g.astype(dtype), a.astype(dtype))
    assert out.dtype == dtype
    np.testing.assert_allclose(out.astype(np.float64), ref, **tolerance(dtype))
    # independent check: J^T g with J from central differences of scipy's softmax
    num = np.stack([_numerical_jacobian(lambda x: scipy.special.softmax(x), z[i]).T @ g[i] for i in range(3)])
    np.testing.assert_allclose(softgrad.softmax_backward(g, a), num, rtol=1e-6, atol=1e-9)


def test_inputs_not_modified(backend, rng):
    z = rng.normal(size=(4, 5))
    g = rng.normal(size=(4, 5))
    z0, g0 = z.copy(), g.copy()
    a = softgrad.softmax(z)
    a0 = a.copy()
    for f in (softgrad.softmax, softgrad.log_softmax, softgrad.logsumexp, softgrad.softmax_jacobian):
        f(z)
    softgrad.softmax_backward(g, a)
    np.testing.assert_array_equal(z, z0)
    np.testing.assert_array_equal(g, g0)
    np.testing.assert_array_equal(a, a0)


@PROPERTY
@given(z=finite_rows, shift=st.floats(-1e3, 1e3))
def test_property_rows_sum_to_one_and_shift_invariance(z, shift):
    for name in BACKENDS:
        with softgrad.use_backend(name):
            a = softgrad.softmax(z)
            np.testing.assert_allclose(a.sum(axis=-1), 1.0, rtol=1e-13)
            assert (a >= 0).all()
            np.testing.assert_allclose(softgrad.softmax(z + shift), a, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(softgrad.logsumexp(z + shift), softgrad.logsumexp(z) + shift,
                                       rtol=1e-12, atol=1e-9)
            np.testing.assert_allclose(np.exp(softgrad.log_softmax(z)), a, rtol=1e-12, atol=1e-300)


@PROPERTY
@given(z=finite_rows, seed=st.integers(0, 2**32 - 1))
def test_property_backward_sums_to_zero(z, seed):
    g = np.random.default_rng(seed).normal(size=z.shape)
    for name in BACKENDS:
        with softgrad.use_backend(name):
            dz = softgrad.softmax_backward(g, softgrad.softmax(z))
            np.testing.assert_allclose(dz.sum(axis=-1), 0.0, atol=1e-12 * (1 + np.abs(g).max()))


def test_public_api_listed():
    for name in ("softmax", "log_softmax", "logsumexp", "softmax_jacobian", "softmax_backward"):
        assert name in softgrad.__all__ and callable(getattr(softgrad, name))


def test_import_pulls_in_no_optional_dependency():
    code = (
        "import sys, softgrad\n"
        "softgrad.softmax([1.0, 2.0]); softgrad.cross_entropy([[1.0, 2.0]], [0])\n"
        "bad = [m for m in ('torch', 'scipy', 'numba', 'triton', 'sklearn') if m in sys.modules]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    env = {"SOFTGRAD_BACKEND": "numpy", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
