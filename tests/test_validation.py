"""Boundary checks: every bad input raises TypeError/ValueError naming the argument."""

from __future__ import annotations

import numpy as np
import pytest

import softgrad
from softgrad import _validation as v


def test_layout_round_trip_any_axis(rng):
    x = rng.normal(size=(2, 3, 4, 5))
    for axis in range(-4, 4):
        rows, layout = v.logits_rows(x, axis)
        assert rows.flags.c_contiguous and rows.shape == (x.size // x.shape[axis], x.shape[axis])
        np.testing.assert_array_equal(rows, np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis]))
        np.testing.assert_array_equal(layout.from_rows(rows), x)


@pytest.mark.parametrize(
    "dtype, compute",
    [(np.float16, np.float32), (np.float32, np.float32), (np.float64, np.float64), (np.longdouble, np.float64)],
)
def test_compute_dtype_and_back(dtype, compute):
    rows, layout = v.logits_rows(np.zeros((2, 3), dtype=dtype), -1)
    assert rows.dtype == compute
    assert layout.from_rows(rows).dtype == dtype


@pytest.mark.parametrize("bad", [np.array([[1, 2]]), np.array([[True, False]]), np.array([[1 + 2j, 0j]]),
                                 np.array([["a", "b"]]), [[object(), 1.0]]])
def test_non_float_logits_raise_type_error(bad):
    with pytest.raises(TypeError, match="logits"):
        softgrad.softmax(bad)


@pytest.mark.parametrize("value, what", [(np.nan, "NaN"), (np.inf, r"\+inf")])
def test_nan_and_pos_inf_raise(value, what):
    with pytest.raises(ValueError, match=f"logits contains {what}"):
        softgrad.softmax([[0.0, value]])


@pytest.mark.parametrize("row", [[np.nan, -np.inf, 0.0], [-np.inf, np.nan], [np.inf, np.nan], [-np.inf, np.inf],
                                 [np.nan, np.nan]])
def test_bad_values_found_among_neg_inf(row):
    # The row-maximum check must see a NaN/+inf even next to -inf entries, in any position.
    logits = np.zeros((3, len(row)))
    logits[1] = row
    with pytest.raises(ValueError, match=r"logits contains (NaN|\+inf)"):
        softgrad.softmax(logits)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_large_finite_values_pass_although_their_sum_overflows(dtype):
    # The one-pass sum check overflows here; the exact scans must then find nothing wrong.
    big = np.finfo(dtype).max
    x = np.full((4, 3), big, dtype=dtype)
    v.as_float_array(x, "x")
    out = softgrad.softmax_backward(x * 0, np.full((4, 3), 1 / 3, dtype=dtype))
    assert out.dtype == dtype
    np.testing.assert_array_equal(softgrad.softmax(x), np.full((4, 3), 1 / 3, dtype=dtype))


@pytest.mark.parametrize("value, what", [(np.nan, "NaN"), (np.inf, r"\+inf"), (-np.inf, "-inf")])
def test_finite_only_arrays_reject_non_finite(value, what):
    probs = np.full((3, 4), 0.25)
    grad = np.zeros((3, 4))
    grad[2, 1] = value
    with pytest.raises(ValueError, match=f"grad_probs contains {what}"):
        softgrad.softmax_backward(grad, probs)


def test_neg_inf_allowed_but_not_whole_slice():
    np.testing.assert_array_equal(softgrad.softmax([0.0, -np.inf]), [1.0, 0.0])
    with pytest.raises(ValueError, match="logits .*entirely -inf"):
        softgrad.softmax([[0.0, 1.0], [-np.inf, -np.inf]])
    with pytest.raises(ValueError, match="logits .*entirely -inf"):
        softgrad.cross_entropy([[-np.inf, -np.inf]], [0])


@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (0,)])
def test_empty_raises(shape):
    with pytest.raises(ValueError, match="logits is empty"):
        softgrad.softmax(np.zeros(shape))


def test_axis_checks():
    with pytest.raises(ValueError, match="axis=2"):
        softgrad.softmax(np.zeros((2, 2)), axis=2)
    with pytest.raises(TypeError, match="axis"):
        softgrad.softmax(np.zeros((2, 2)), axis=1.0)
    with pytest.raises(ValueError, match="axis"):
        softgrad.softmax(np.float64(1.0))


def test_target_checks():
    z = np.zeros((3, 4))
    with pytest.raises(ValueError, match="target contains class index 4"):
        softgrad.cross_entropy(z, [0, 1, 4])
    with pytest.raises(ValueError, match="target contains class index -1"):
        softgrad.cross_entropy(z, [0, -1, 2])
    with pytest.raises(ValueError, match=r"target must have shape \(3,\)"):
        softgrad.cross_entropy(z, [0, 1])
    with pytest.raises(TypeError, match="target"):
        softgrad.cross_entropy(z, np.array([True, False, True]))
    with pytest.raises(ValueError, match=r"target must have shape \(3, 4\)"):
        softgrad.cross_entropy(z, np.full((3, 3), 0.25))
    with pytest.raises(ValueError, match="target contains negative"):
        softgrad.cross_entropy(z, np.full((3, 4), -0.25))
    with pytest.raises(ValueError, match="target contains NaN"):
        softgrad.cross_entropy(z, np.full((3, 4), np.nan))
    # ignore_index is allowed even when it is out of range
    softgrad.cross_entropy(z, [0, -100, 3])
    softgrad.cross_entropy(z, [0, 7, 3], ignore_index=7)


def test_option_checks():
    z, y = np.zeros((3, 4)), np.array([0, 1, 2])
    with pytest.raises(ValueError, match="reduction"):
        softgrad.cross_entropy(z, y, reduction="avg")
    for bad in (-0.1, 1.5, np.nan):
        with pytest.raises(ValueError, match="label_smoothing"):
            softgrad.cross_entropy(z, y, label_smoothing=bad)
    with pytest.raises(TypeError, match="label_smoothing"):
        softgrad.cross_entropy(z, y, label_smoothing="0.1")
    with pytest.raises(ValueError, match=r"weight must have shape \(4,\)"):
        softgrad.cross_entropy(z, y, weight=np.ones(3))
    with pytest.raises(TypeError, match="weight"):
        softgrad.cross_entropy(z, y, weight=np.ones(4, dtype=int))
    with pytest.raises(ValueError, match="weight contains NaN"):
        softgrad.cross_entropy(z, y, weight=np.array([1.0, np.nan, 1.0, 1.0]))
    with pytest.raises(TypeError, match="ignore_index"):
        softgrad.cross_entropy(z, y, ignore_index=1.5)


def test_softmax_backward_checks():
    with pytest.raises(ValueError, match="grad_probs must have the shape of probs"):
        softgrad.softmax_backward(np.ones((2, 3)), np.ones((2, 2)) / 2)
    with pytest.raises(ValueError, match="probs contains -inf"):
        softgrad.softmax_backward(np.ones(2), [1.0, -np.inf])
    with pytest.raises(TypeError, match="grad_probs"):
        softgrad.softmax_backward(np.ones(2, dtype=int), [0.5, 0.5])


def test_from_probs_checks():
    with pytest.raises(ValueError, match="probs contains negative"):
        softgrad.cross_entropy_from_probs([[-0.1, 1.1]], [0])
    with pytest.raises(ValueError, match="eps"):
        softgrad.cross_entropy_from_probs([[0.5, 0.5]], [0], eps=0.0)
    with pytest.raises(TypeError, match="probs"):
        softgrad.cross_entropy_from_probs([[1, 0]], [0])
