"""cross_entropy, softmax_cross_entropy, cross_entropy_from_probs, softmax_mse.

Parity with torch.nn.functional.cross_entropy in float64 over the full option grid,
central-difference gradient checks, the worked example of seed 003, and properties.
"""

from __future__ import annotations

import itertools

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

# (logits shape, class axis)
LAYOUTS = [((6, 5), -1), ((3, 4, 2, 3), 1)]
GRID = list(itertools.product(
    LAYOUTS,
    ["index", "probs"],
    [False, True],          # weighted
    [-100, 2],              # ignore_index (2 is a real class: its rows are ignored)
    ["none", "mean", "sum"],
    [0.0, 0.25],            # label_smoothing
))


def _numerical_gradient(f, z, h=1e-6):
    """Central differences of the scalar function ``f`` at every entry of ``z`` (float64)."""
    g = np.zeros_like(z)
    for idx in np.ndindex(z.shape):
        zp, zm = z.copy(), z.copy()
        zp[idx] += h
        zm[idx] -= h
        g[idx] = (f(zp) - f(zm)) / (2 * h)
    return g


def _make_target(rng, kind, shape, axis, ignore_index):
    C = shape[axis]
    if kind == "probs":
        t = rng.dirichlet(np.ones(C), size=int(np.prod(shape)) // C)
        return np.moveaxis(t.reshape(tuple(np.delete(shape, axis)) + (C,)), -1, axis)
    batch = tuple(np.delete(shape, axis))
    y = rng.integers(0, C, size=batch)
    y.reshape(-1)[::4] = ignore_index
    return y


@pytest.mark.parametrize("layout, kind, weighted, ignore_index, reduction, smoothing", GRID)
def test_parity_with_torch(torch, backend, rng, layout, kind, weighted, ignore_index, reduction, smoothing):
    shape, axis = layout
    C = shape[axis]
    z = rng.normal(size=shape) * 3
    y = _make_target(rng, kind, shape, axis, ignore_index)
    w = rng.uniform(0.1, 2.0, size=C) if weighted else None
    opts = dict(weight=w, ignore_index=ignore_index, reduction=reduction, label_smoothing=smoothing)
    if kind == "probs" and ignore_index != -100:  # PyTorch rejects this combination; so do we
        with pytest.raises(ValueError, match="ignore_index"):
            softgrad.cross_entropy(z, y, axis=axis, **opts)
        return

    zt = torch.tensor(np.moveaxis(z, axis, 1), requires_grad=True)  # torch wants classes on dim 1
    yt = torch.tensor(np.moveaxis(y, axis, 1) if kind == "probs" else y)
    lt = torch.nn.functional.cross_entropy(
        zt, yt, weight=None if w is None else torch.tensor(w), ignore_index=ignore_index,
        reduction=reduction, label_smoothing=smoothing)
    # a random upstream gradient, not only .sum()
    upstream = rng.normal(size=tuple(lt.shape))
    (lt * torch.tensor(upstream)).sum().backward()
    grad_ref = np.moveaxis(zt.grad.numpy(), 1, axis)

    loss = softgrad.cross_entropy(z, y, axis=axis, **opts)
    loss2, grad = softgrad.softmax_cross_entropy(z, y, axis=axis, **opts)
    np.testing.assert_allclose(loss, lt.detach().numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(loss2, loss)
    # ours is the gradient of the (reduced or, for "none", summed) loss: scale rows by upstream
    scale = np.expand_dims(upstream, axis) if reduction == "none" else upstream
    np.testing.assert_allclose(grad * scale, grad_ref, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("kind", ["index", "probs"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_gradient_matches_central_differences(backend, rng, kind, reduction):
    shape, axis = (2, 4, 3), 1
    z = rng.normal(size=shape)
    y = _make_target(rng, kind, shape, axis, -100)
    opts = dict(weight=rng.uniform(0.5, 1.5, size=4), label_smoothing=0.1, reduction=reduction, axis=axis)
    _, grad = softgrad.softmax_cross_entropy(z, y, **opts)
    num = _numerical_gradient(lambda x: np.sum(softgrad.cross_entropy(x, y, **opts)), z)
    np.testing.assert_allclose(grad, num, rtol=1e-6, atol=1e-9)


def test_naive_reference_loop(backend, rng):
    z = rng.normal(size=(5, 4))
    y = np.array([0, 3, -100, 1, 1])
    w = np.array([0.5, 1.0, 2.0, 1.5])
    eps = 0.2
    total, denom = 0.0, 0.0
    for i in range(5):
        if y[i] == -100:
            continue
        logp = z[i] - scipy.special.logsumexp(z[i])
        total += (1 - eps) * w[y[i]] * -logp[y[i]] + eps / 4 * sum(w[c] * -logp[c] for c in range(4))
        denom += w[y[i]]
    np.testing.assert_allclose(softgrad.cross_entropy(z, y, weight=w, label_smoothing=eps), total / denom, rtol=1e-13)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_dtypes_kept(backend, rng, dtype):
    z = rng.normal(size=(8, 6))
    y = rng.integers(0, 6, size=8)
    ref_loss, ref_grad = softgrad.softmax_cross_entropy(z, y)
    loss, grad = softgrad.softmax_cross_entropy(z.astype(dtype), y)
    assert loss.dtype == dtype and grad.dtype == dtype
    np.testing.assert_allclose(float(loss), ref_loss, **tolerance(dtype))
    np.testing.assert_allclose(grad.astype(np.float64), ref_grad, **tolerance(dtype))


def test_extreme_logits(backend):
    z = np.array([[1e4, -1e4, -np.inf], [-1e4, -np.inf, 1e4]])
    loss, grad = softgrad.softmax_cross_entropy(z, [1, 2], reduction="none")
    np.testing.assert_allclose(loss, [2e4, 0.0])
    np.testing.assert_allclose(grad, [[1, -1, 0], [0, 0, 0]], atol=1e-300)
    assert softgrad.cross_entropy(z, [2, 2], reduction="none")[0] == np.inf  # target has probability 0
    loss, grad = softgrad.softmax_cross_entropy(np.array([[0.0, -np.inf]]), np.array([[1.0, 0.0]]))
    assert loss == 0.0 and np.isfinite(grad).all()  # 0 * log 0 counts as 0


def test_mean_over_no_targets_is_nan_with_zero_gradient(backend):
    z = np.zeros((3, 4))
    y = np.full(3, -100)
    loss, grad = softgrad.softmax_cross_entropy(z, y)
    assert np.isnan(loss)
    np.testing.assert_array_equal(grad, 0.0)
    assert softgrad.cross_entropy(z, y, reduction="sum") == 0.0
    # zero total weight without ignored rows behaves the same way
    loss, grad = softgrad.softmax_cross_entropy(z, np.array([1, 1, 2]), weight=np.array([1.0, 0.0, 0.0, 1.0]))
    assert np.isnan(loss)
    np.testing.assert_array_equal(grad, 0.0)
    loss, grad = softgrad.cross_entropy_from_probs(np.full((2, 2), 0.5), np.array([-100, -100]))
    assert np.isnan(loss)
    np.testing.assert_array_equal(grad, 0.0)


def test_index_equals_one_hot_for_sum(backend, rng):
    z = rng.normal(size=(6, 5))
    y = rng.integers(0, 5, size=6)
    w = rng.uniform(0.5, 2.0, size=5)
    for opts in (dict(), dict(weight=w, label_smoothing=0.3)):
        a = softgrad.softmax_cross_entropy(z, y, reduction="sum", **opts)
        b = softgrad.softmax_cross_entropy(z, np.eye(5)[y], reduction="sum", **opts)
        np.testing.assert_allclose(a[0], b[0], rtol=1e-13)
        np.testing.assert_allclose(a[1], b[1], rtol=1e-12, atol=1e-15)


def test_inputs_not_modified(backend, rng):
    z, y, w, t = rng.normal(size=(4, 3)), np.array([0, 2, 1, -100]), rng.uniform(size=3), rng.dirichlet(np.ones(3), 4)
    copies = [x.copy() for x in (z, y, w, t)]
    softgrad.softmax_cross_entropy(z, y, weight=w, label_smoothing=0.1)
    softgrad.softmax_cross_entropy(z, t, weight=w)
    softgrad.cross_entropy_from_probs(t, y)
    softgrad.softmax_mse(z, t)
    for x, x0 in zip((z, y, w, t), copies):
        np.testing.assert_array_equal(x, x0)


@PROPERTY
@given(z=hnp.arrays(np.float64, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=7),
                    elements=st.floats(-30, 30)),
       seed=st.integers(0, 2**32 - 1))
def test_property_gradient_rows_sum_to_zero(z, seed):
    y = np.random.default_rng(seed).integers(0, z.shape[1], size=z.shape[0])
    for name in BACKENDS:
        with softgrad.use_backend(name):
            _, grad = softgrad.softmax_cross_entropy(z, y, reduction="sum")
            np.testing.assert_allclose(grad.sum(axis=1), 0.0, atol=1e-12)
            np.testing.assert_allclose(grad, scipy.special.softmax(z, axis=1) - np.eye(z.shape[1])[y], atol=1e-12)


@PROPERTY
@given(n=st.integers(1, 6), c=st.integers(1, 9), seed=st.integers(0, 2**32 - 1))
def test_property_zero_logits_give_log_c(n, c, seed):
    y = np.random.default_rng(seed).integers(0, c, size=n)
    for name in BACKENDS:
        with softgrad.use_backend(name):
            np.testing.assert_allclose(softgrad.cross_entropy(np.zeros((n, c)), y), np.log(c), rtol=1e-14, atol=1e-15)


def test_public_api_listed():
    for name in ("cross_entropy", "softmax_cross_entropy", "cross_entropy_from_probs", "softmax_mse"):
        assert name in softgrad.__all__ and callable(getattr(softgrad, name))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_softmax_mse_dtypes_and_probability_targets(backend, rng, dtype):
    z = rng.normal(size=(4, 5))
    t = rng.dirichlet(np.ones(5), size=4)
    ref_loss, ref_grad = softgrad.softmax_mse(z, t)
    loss, grad = softgrad.softmax_mse(z.astype(dtype), t.astype(dtype))
    assert loss.dtype == dtype and grad.dtype == dtype
    np.testing.assert_allclose(float(loss), ref_loss, **tolerance(dtype))
    np.testing.assert_allclose(grad.astype(np.float64), ref_grad, rtol=tolerance(dtype)["rtol"], atol=1e-4 if dtype == np.float16 else 1e-9)


def test_from_probs_matches_cross_entropy_and_chain_rule(backend, rng):
    z = rng.normal(size=(5, 4))
    y = np.array([1, 0, 3, -100, 2])
    a = scipy.special.softmax(z, axis=1)
    for reduction in ("none", "mean", "sum"):
        loss, grad_a = softgrad.cross_entropy_from_probs(a, y, reduction=reduction)
        ce, grad_z = softgrad.softmax_cross_entropy(z, y, reduction=reduction)
        np.testing.assert_allclose(loss, ce, rtol=1e-12)
        # dE/dz = J^T (-y/a) = a - y: the fused form is the chain rule through the Jacobian
        np.testing.assert_allclose(softgrad.softmax_backward(grad_a, a), grad_z, rtol=1e-10, atol=1e-15)
    t = rng.dirichlet(np.ones(4), size=5)
    _, grad = softgrad.cross_entropy_from_probs(a, t, reduction="sum")
    np.testing.assert_allclose(grad, -t / a, rtol=1e-14)
    num = _numerical_gradient(lambda p: float(softgrad.cross_entropy_from_probs(p, t, reduction="sum")[0]), a, h=1e-7)
    np.testing.assert_allclose(grad, num, rtol=1e-5)


def test_from_probs_clamp():
    loss, grad = softgrad.cross_entropy_from_probs([[0.0, 1.0]], [0], reduction="sum")
    tiny = np.finfo(np.float64).tiny
    np.testing.assert_allclose(loss, -np.log(tiny))
    np.testing.assert_allclose(grad, [[-1 / tiny, 0.0]])
    loss, grad = softgrad.cross_entropy_from_probs(np.array([[0.0, 1.0]], dtype=np.float32), [0], eps=1e-6)
    assert loss.dtype == np.float32 and np.isfinite(grad).all()
    np.testing.assert_allclose(loss, -np.log(1e-6), rtol=1e-6)


def test_softmax_mse_reproduces_seed_003(backend):
    # /work/shared/seeds/003_*.txt: z = [1, 2, 3, 0, 1], one-hot label at index 3
    loss, grad = softgrad.softmax_mse(np.array([1.0, 2, 3, 0, 1]), 3)
    np.testing.assert_allclose(grad, [-0.00969502, -0.01434905, 0.0496989, -0.01595981, -0.00969502], atol=5e-9)
    a = scipy.special.softmax([1.0, 2, 3, 0, 1])
    np.testing.assert_allclose(loss, np.mean((a - np.eye(5)[3]) ** 2), rtol=1e-14)


@pytest.mark.parametrize("kind", ["index", "probs"])
def test_softmax_mse_gradient(backend, rng, kind):
    z = rng.normal(size=(3, 4, 2))
    y = _make_target(rng, kind, z.shape, 1, 0)

    def loss(x):
        a = scipy.special.softmax(x, axis=1)
        onehot = np.moveaxis(np.eye(4)[y], -1, 1) if kind == "index" else y
        return np.mean((a - onehot) ** 2)

    value, grad = softgrad.softmax_mse(z, y, axis=1)
    np.testing.assert_allclose(value, loss(z), rtol=1e-13)
    np.testing.assert_allclose(grad, _numerical_gradient(loss, z), rtol=1e-6, atol=1e-10)
