"""SciPy's ``scipy.special`` conventions for logsumexp / softmax / log_softmax, against SciPy itself.

The cases follow the themes of SciPy's own ``special/tests/test_logsumexp.py`` (scale
factors ``b``, ``return_sign``, tuples of axes, ``keepdims``, infinities), written anew
here and compared with ``scipy.special`` on the same inputs. Our documented differences
(integer input, NaN/+inf logits, negative sums without ``return_sign``) are tested as errors.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special as sp

import softgrad


# ----------------------------------------------------------------------------- b=
def test_b_scales_each_term(backend, rng):
    a = np.arange(150.0)
    b = np.arange(150.0, 0.0, -1.0)
    np.testing.assert_allclose(softgrad.logsumexp(a, b=b), sp.logsumexp(a, b=b), rtol=1e-14)
    np.testing.assert_allclose(softgrad.logsumexp([800.0, 800.0], b=[0.7, 0.7]), 800 + math.log(1.4), rtol=1e-15)


def test_b_with_tiny_terms_along_each_axis(backend):
    # a million-ish terms of 1e-40 each, scaled by b, in log space: the sums must survive
    x = np.full(50_000, 1e-40)
    b = np.linspace(1.0, 1000.0, x.size)
    logX, B = np.log(np.stack([x, x])), np.stack([b, b])
    for axis in (None, 0, 1, (0, 1)):
        got = softgrad.logsumexp(logX, axis=axis, b=B)
        np.testing.assert_allclose(got, sp.logsumexp(logX, axis=axis, b=B), rtol=1e-12)
        np.testing.assert_allclose(np.exp(got), (B * np.stack([x, x])).sum(axis=axis), rtol=1e-10)


def test_zero_b_removes_a_term_even_at_minus_inf(backend):
    np.testing.assert_allclose(softgrad.logsumexp([1.0, 5000.0], b=[1.0, 0.0]), 1.0, rtol=1e-15)
    np.testing.assert_allclose(softgrad.logsumexp([-np.inf, 2.0], b=[0.0, 3.0]), sp.logsumexp([-np.inf, 2.0], b=[0, 3]))
    lse, sign = softgrad.logsumexp([1.0, 2.0], b=[0.0, 0.0], return_sign=True)
    assert lse == -np.inf and sign == 0.0


def test_b_broadcasts_against_logits(backend, rng):
    a = rng.normal(size=(4, 1, 2, 1))
    b = rng.uniform(0.5, 2.0, size=(3, 1, 5))
    got = softgrad.logsumexp(a, axis=None, b=b)
    np.testing.assert_allclose(got, sp.logsumexp(a, b=b), rtol=1e-14)
    got = softgrad.logsumexp(a, axis=(1, 3), b=b, keepdims=True)
    ref = sp.logsumexp(a, axis=(1, 3), b=b, keepdims=True)
    assert got.shape == ref.shape == (4, 1, 2, 1)
    np.testing.assert_allclose(got, ref, rtol=1e-14)
    with pytest.raises(ValueError, match=r"b of shape \(3,\) does not broadcast against logits of shape \(2, 2\)"):
        softgrad.logsumexp(np.zeros((2, 2)), b=np.ones(3))


@pytest.mark.parametrize("b_dtype", [np.int64, np.float32, np.float64])
@pytest.mark.parametrize("a_dtype", [np.float32, np.float64])
def test_b_dtypes(backend, a_dtype, b_dtype):
    a = np.array([2.0, 1.0], dtype=a_dtype)
    b = np.array([1, -1], dtype=b_dtype)
    got = softgrad.logsumexp(a, b=b)
    ref = sp.logsumexp(a, b=b)
    assert got.dtype == ref.dtype == np.result_type(a_dtype, b_dtype)  # NumPy's promotion, as SciPy
    np.testing.assert_allclose(got, math.log(math.e**2 - math.e), rtol=1e-6 if got.dtype == np.float32 else 1e-14)


def test_b_checks():
    with pytest.raises(TypeError, match="b must have a real"):
        softgrad.logsumexp([1.0, 2.0], b=[1j, 1.0])
    with pytest.raises(TypeError, match="b must have a real"):
        softgrad.logsumexp([1.0, 2.0], b=[True, False])
    with pytest.raises(ValueError, match="b contains NaN or an infinity"):
        softgrad.logsumexp([1.0, 2.0], b=[np.nan, 1.0])


# ----------------------------------------------------------------------------- return_sign=
def test_return_sign_negative_sum(backend):
    lse, sign = softgrad.logsumexp([1.0, 1.0, 1.0], b=[1.0, -1.0, -1.0], return_sign=True)
    ref_lse, ref_sign = sp.logsumexp([1.0, 1.0, 1.0], b=[1, -1, -1], return_sign=True)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-15)
    assert lse == pytest.approx(1.0) and sign == ref_sign == -1.0


def test_return_sign_zero_sum(backend):
    lse, sign = softgrad.logsumexp([1.0, 1.0], b=[1.0, -1.0], return_sign=True)
    assert lse == -np.inf and sign == 0.0
    assert sp.logsumexp([1.0, 1.0], b=[1, -1], return_sign=True)[1] == 0.0


def test_return_sign_shapes(backend):
    a = np.ones((1, 2, 3, 4))
    for axis, shape in ((2, (1, 2, 4)), ((1, 3), (1, 3))):
        lse, sign = softgrad.logsumexp(a, axis=axis, b=np.ones_like(a), return_sign=True)
        assert lse.shape == sign.shape == shape
        lse, sign = softgrad.logsumexp(a, axis=axis, return_sign=True)  # without b: sign 1
        assert lse.shape == sign.shape == shape and (sign == 1.0).all()


def test_largest_term_with_a_negative_factor(backend):
    # the term at the maximum has a negative weight, the sum is still positive
    a = np.array([3.06409428, 0.37251854, 3.87471931])
    b = np.array([1.88190708, 2.84174795, -0.85016884])
    np.testing.assert_allclose(softgrad.logsumexp(a, b=b), sp.logsumexp(a, b=b), rtol=1e-13)
    np.testing.assert_allclose(softgrad.logsumexp(a, b=b), softgrad.logsumexp(a, b=b, return_sign=True)[0])
    # ... and negative: SciPy returns NaN, we raise (no silent NaN)
    b[2] = -3.85016884
    assert np.isnan(sp.logsumexp(a, b=b))
    with pytest.raises(ValueError, match=r"negative in 1 slice\(s\).*return_sign=True"):
        softgrad.logsumexp(a, b=b)
    lse, sign = softgrad.logsumexp(a, b=b, return_sign=True)
    ref = sp.logsumexp(a, b=b, return_sign=True)
    np.testing.assert_allclose(lse, ref[0], rtol=1e-13)
    assert sign == ref[1] == -1.0


def test_random_signed_factors_against_scipy(backend, rng):
    a = rng.normal(size=(5, 6, 7)) * 3
    b = rng.normal(size=(5, 6, 7))
    for axis in (-1, 0, (0, 2), None):
        for keepdims in (False, True):
            lse, sign = softgrad.logsumexp(a, axis=axis, b=b, keepdims=keepdims, return_sign=True)
            ref_lse, ref_sign = sp.logsumexp(a, axis=axis, b=b, keepdims=keepdims, return_sign=True)
            assert np.shape(lse) == np.shape(ref_lse)
            np.testing.assert_allclose(lse, ref_lse, rtol=1e-11, atol=1e-12)
            np.testing.assert_array_equal(sign, ref_sign)


# ----------------------------------------------------------------------------- axes, keepdims, infinities
def test_logsumexp_axis_tuple_none_and_keepdims(backend, rng):
    a = np.array([[1e10, 1e-10], [-1e10, -np.inf]])
    np.testing.assert_allclose(softgrad.logsumexp(a, axis=-1), [1e10, -1e10], rtol=1e-15)
    np.testing.assert_allclose(softgrad.logsumexp(a, axis=-1, keepdims=True), [[1e10], [-1e10]], rtol=1e-15)
    np.testing.assert_allclose(softgrad.logsumexp(a, axis=(-1, -2)), 1e10, rtol=1e-15)
    z = rng.normal(size=(2, 3, 4, 5))
    for axis in (None, (0,), (1, 3), (3, 0, 2), (-1, -4), ()):
        for keepdims in (False, True):
            got = softgrad.logsumexp(z, axis=axis, keepdims=keepdims)
            ref = sp.logsumexp(z, axis=axis, keepdims=keepdims)
            assert np.shape(got) == np.shape(ref)
            np.testing.assert_allclose(got, ref, rtol=1e-13)


def test_logsumexp_large_and_mixed_magnitudes(backend):
    np.testing.assert_allclose(softgrad.logsumexp(np.arange(200.0)), sp.logsumexp(np.arange(200.0)), rtol=1e-15)
    np.testing.assert_allclose(softgrad.logsumexp(np.full(1000, 10000.0)), 10000 + math.log(1000), rtol=1e-15)
    x = np.log(np.full((2, 200_000), 1e-40))
    for axis in (None, 0, 1):
        np.testing.assert_allclose(np.exp(softgrad.logsumexp(x, axis=axis)), np.full((2, 200_000), 1e-40).sum(axis=axis),
                                   rtol=1e-12)


def test_infinities_and_nan(backend):
    # -inf follows SciPy (log 0 = -inf); NaN and +inf are errors by design (SciPy: nan, inf)
    assert softgrad.logsumexp([-np.inf]) == sp.logsumexp([-np.inf]) == -np.inf
    assert softgrad.logsumexp([-np.inf, -np.inf]) == -np.inf
    assert sp.logsumexp([np.inf]) == np.inf
    with pytest.raises(ValueError, match=r"logits contains \+inf"):
        softgrad.logsumexp([np.inf])
    with pytest.raises(ValueError, match=r"logits contains \+inf"):
        softgrad.logsumexp([np.inf, 1.0], b=[-1.0, 1.0], return_sign=True)
    with pytest.raises(ValueError, match="logits contains NaN"):
        softgrad.logsumexp([np.nan, 0.0])
    with pytest.raises(ValueError, match="logits contains NaN"):
        softgrad.logsumexp([np.nan, 0.0], b=[1.0, 2.0])


def test_integer_input_stays_a_type_error():
    # SciPy promotes integer input to float; softgrad refuses it (see softgrad._validation)
    np.testing.assert_allclose(sp.logsumexp([1000, 1000]), 1000 + math.log(2))
    for f in (softgrad.logsumexp, softgrad.softmax, softgrad.log_softmax):
        with pytest.raises(TypeError, match="logits must have a real floating dtype"):
            f([1000, 1000])


def test_inputs_not_written(backend):
    a, b = np.array([5.0, 4.0]), np.array([3.0, 2.0])
    softgrad.logsumexp(a)
    softgrad.logsumexp(a, b=b, return_sign=True)
    np.testing.assert_array_equal(a, [5.0, 4.0])
    np.testing.assert_array_equal(b, [3.0, 2.0])


def test_axis_checks():
    z = np.zeros((2, 3))
    with pytest.raises(ValueError, match=r"axis=\(0, 0\) names an axis more than once"):
        softgrad.logsumexp(z, axis=(0, 0))
    with pytest.raises(ValueError, match=r"axis=\(0, 2\) is out of range"):
        softgrad.softmax(z, axis=(0, 2))
    with pytest.raises(TypeError, match="axis must be an int, a tuple of ints or None"):
        softgrad.log_softmax(z, axis=(0, 1.0))
    with pytest.raises(TypeError, match="axis must be an int"):
        softgrad.cross_entropy(z, [0, 1], axis=(0, 1))  # the losses keep one class axis


# ----------------------------------------------------------------------------- softmax / log_softmax
def test_softmax_fixtures(backend):
    np.testing.assert_allclose(softgrad.softmax([1000.0, 0.0, 0.0, 0.0]), [1.0, 0.0, 0.0, 0.0], rtol=1e-13)
    x = np.arange(4.0)
    expected = np.exp(x) / np.exp(x).sum()
    np.testing.assert_allclose(softgrad.softmax(x), expected, rtol=1e-13)
    np.testing.assert_allclose(softgrad.softmax(x + 100), expected, rtol=1e-13)
    # axis=None: the whole array is one slice, the shape is kept
    np.testing.assert_allclose(softgrad.softmax(x.reshape(2, 2), axis=None), expected.reshape(2, 2), rtol=1e-13)


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_softmax_multi_axes_against_scipy(backend, rng, name):
    ours, ref = getattr(softgrad, name), getattr(sp, name)
    x = np.array([[-25.0, 0.0, 25.0, 50.0], [1.0, 325.0, 749.0, 750.0]])
    np.testing.assert_allclose(ours(x, axis=1), ref(x, axis=1), rtol=1e-13)
    np.testing.assert_allclose(ours(x.T, axis=0), ref(x.T, axis=0), rtol=1e-13)
    x3 = x.reshape(2, 2, 2)
    np.testing.assert_allclose(ours(x3, axis=(1, 2)), ref(x3, axis=(1, 2)), rtol=1e-13)
    z = rng.normal(size=(3, 4, 5)) * 5
    for axis in (None, (0, 2), (2, 0), (0, 1, 2), (1,)):
        np.testing.assert_allclose(ours(z, axis=axis), ref(z, axis=axis), rtol=1e-12, atol=1e-300)
    if name == "softmax":
        np.testing.assert_allclose(ours(z, axis=(0, 2)).sum(axis=(0, 2)), 1.0, rtol=1e-13)
