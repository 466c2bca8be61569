"""The worked examples and formulas of the five source documents in ../shared/seeds/.

Printed numbers are compared to the digits the seed prints (half a unit of the last
printed digit); formulas are checked against the functions that implement them.
"""

from __future__ import annotations

import numpy as np
import pytest

import softgrad


def _printed(digits: int) -> dict:
    """Tolerance for a number printed with ``digits`` decimals: half a unit of the last one."""
    return {"rtol": 0, "atol": 0.5 * 10.0 ** -digits + 1e-15}


def _onehot(y, C):
    out = np.zeros(C)
    out[y] = 1.0
    return out


# ---------------------------------------------------------------- seed 004: the verification program

SEED4_X = np.array([0.3, 0.5, 0.2])
SEED4_TARGET = 1
SEED4_S = [0.31987306, 0.39069383, 0.28943311]
SEED4_J = [[0.21755428, -0.12497243, -0.09258185],
           [-0.12497243, 0.23805216, -0.11307973],
           [-0.09258185, -0.11307973, 0.20566159]]
SEED4_CE = 0.93983106
SEED4_DE_DA = [-0.0, -2.55954897, -0.0]
SEED4_NUM_DE_DA = [0.0, -2.55627891, 0.0]           # the seed's crude numerical gradient
SEED4_S_MINUS_Y = [0.31987306, -0.60930617, 0.28943311]
SEED4_NUM_S_MINUS_Y = [0.31998185, -0.60918713, 0.28953596]


def test_seed004_program_output(backend):
    y = _onehot(SEED4_TARGET, 3)
    s = softgrad.softmax(SEED4_X)
    np.testing.assert_allclose(s, SEED4_S, **_printed(8))
    np.testing.assert_allclose(softgrad.softmax_jacobian(SEED4_X), SEED4_J, **_printed(8))
    np.testing.assert_allclose(softgrad.cross_entropy(SEED4_X[None], [SEED4_TARGET]), SEED4_CE, **_printed(8))
    loss, dE_da = softgrad.cross_entropy_from_probs(s, SEED4_TARGET, reduction="sum")
    np.testing.assert_allclose(loss, SEED4_CE, **_printed(8))
    np.testing.assert_allclose(dE_da, SEED4_DE_DA, **_printed(8))
    _, dE_dz = softgrad.softmax_cross_entropy(SEED4_X[None], [SEED4_TARGET])
    np.testing.assert_allclose(dE_dz[0], SEED4_S_MINUS_Y, **_printed(8))
    np.testing.assert_allclose(dE_dz[0], s - y, rtol=1e-15, atol=1e-16)
    # the chain rule the seed verifies: J^T (-y/a) = s - y
    np.testing.assert_allclose(softgrad.softmax_backward(dE_da, s), s - y, rtol=1e-14, atol=1e-16)


def test_seed004_our_numerical_gradients_beat_the_seeds():
    """The seed's numerical gradients are off in the 3rd-4th digit; ours are within ~1e-9."""
    s = softgrad.softmax(SEED4_X)
    analytic_da = np.array(SEED4_DE_DA)
    ours_da = softgrad.numerical_gradient(
        lambda a: softgrad.cross_entropy_from_probs(a, SEED4_TARGET, reduction="sum")[0], s)
    analytic_dz = s - _onehot(SEED4_TARGET, 3)
    ours_dz = softgrad.numerical_gradient(lambda z: softgrad.cross_entropy(z[None], [SEED4_TARGET]), SEED4_X)
    for ours, seeds, analytic in [(ours_da, SEED4_NUM_DE_DA, analytic_da), (ours_dz, SEED4_NUM_S_MINUS_Y, analytic_dz)]:
        ours_err = np.abs(ours - analytic)
        seed_err = np.abs(np.array(seeds) - analytic)
        assert ours_err.max() < 1e-8
        assert seed_err.max() > 1e-5  # the comparison below is not vacuous
        assert (ours_err <= seed_err).all()


# ---------------------------------------------------------------- seed 003: L2 example, CE example, training loop

SEED3_Z = np.array([1.0, 2.0, 3.0, 0.0, 1.0])
SEED3_LABEL = 3
SEED3_GRAD = [-0.00969502, -0.01434905, 0.0496989, -0.01595981, -0.00969502]
SEED3_NUM_GRAD = [-0.0096953, -0.01434908, 0.04969886, -0.01596001, -0.00969502]  # delta = 1e-10


def test_seed003_l2_example(backend):
    loss, grad = softgrad.softmax_mse(SEED3_Z, SEED3_LABEL)
    np.testing.assert_allclose(grad, SEED3_GRAD, **_printed(8))
    # the seed's two steps: dL/da = 2 (a - y) / C, then dL/dz = a (dL/da - <dL/da, a>)
    a = softgrad.softmax(SEED3_Z)
    y = _onehot(SEED3_LABEL, 5)
    np.testing.assert_allclose(loss, np.mean((a - y) ** 2), rtol=1e-15)
    dL_da = (a - y) * 2 / 5
    np.testing.assert_allclose(softgrad.softmax_backward(dL_da, a), grad, rtol=1e-14, atol=1e-17)
    np.testing.assert_allclose(a * (dL_da - (dL_da * a).sum()), grad, rtol=1e-14, atol=1e-17)
    # one-hot probability target == integer target
    np.testing.assert_allclose(softgrad.softmax_mse(SEED3_Z, y)[1], grad, rtol=1e-15)


def test_seed003_our_numerical_gradient_beats_the_seeds():
    ours = softgrad.numerical_gradient(lambda z: softgrad.softmax_mse(z, SEED3_LABEL)[0], SEED3_Z)
    analytic = softgrad.softmax_mse(SEED3_Z, SEED3_LABEL)[1]
    seed_err = np.abs(np.array(SEED3_NUM_GRAD) - analytic)
    assert np.abs(ours - analytic).max() < 1e-9 < seed_err.max()


def test_seed003_cross_entropy_example(backend):
    z = np.array([2.0, 3.0, 4.0])
    np.testing.assert_allclose(softgrad.softmax(z), [0.0900, 0.2447, 0.6652], **_printed(4))
    loss, grad = softgrad.softmax_cross_entropy(z[None], [1])
    np.testing.assert_allclose(loss, 1.4076, **_printed(4))
    np.testing.assert_allclose(grad[0], [0.0900, -0.7553, 0.6652], **_printed(4))
    # dL/da = -1/a_t at the target, 0 elsewhere, and the chain rule gives a - y
    a = softgrad.softmax(z)
    _, dL_da = softgrad.cross_entropy_from_probs(a, 1, reduction="sum")
    np.testing.assert_allclose(dL_da, [0.0, -1 / a[1], 0.0], rtol=1e-15)
    # per position: a_t (1 - a_t) (-1/a_t) = a_t - 1 and -(1/a_t)(-a_k a_t) = a_k
    np.testing.assert_allclose(softgrad.softmax_backward(dL_da, a), grad[0], rtol=1e-14, atol=1e-16)


def test_seed003_mean_over_batch_divides_by_n(backend, rng):
    """'the gradient is also divided by n (batch size)' -- the mean reduction."""
    z = rng.normal(size=(4, 3))
    y = rng.integers(0, 3, size=4)
    _, g_mean = softgrad.softmax_cross_entropy(z, y)
    _, g_sum = softgrad.softmax_cross_entropy(z, y, reduction="sum")
    np.testing.assert_allclose(g_mean, g_sum / 4, rtol=1e-15)


def test_seed003_training_loop_step(backend, rng):
    """One step of the CS231n loop: reg_loss = 0.5 reg sum W^2, dW += reg W, db = sum dscores.

    Our penalty is reg' sum W^2 with gradient 2 reg' W, so reg' = reg / 2 reproduces it.
    """
    N, D, K = 30, 2, 3
    X = rng.normal(size=(N, D))
    y = rng.integers(0, K, size=N)
    W = 0.01 * rng.normal(size=(D, K))
    b = np.zeros(K)
    reg = 1e-3
    # the seed's loop body, written out
    scores = X @ W + b
    exp_scores = np.exp(scores)
    probs = exp_scores / exp_scores.sum(axis=1, keepdims=True)
    loss_ref = -np.log(probs[np.arange(N), y]).sum() / N + 0.5 * reg * np.sum(W * W)
    dscores = probs.copy()
    dscores[np.arange(N), y] -= 1
    dscores /= N
    dW_ref = X.T @ dscores + reg * W
    db_ref = dscores.sum(axis=0)
    loss, dW, db = softgrad.linear_softmax_loss(W, X, y, reg / 2, b=b)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-13)
    np.testing.assert_allclose(dW, dW_ref, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(db, db_ref, rtol=1e-12, atol=1e-15)


def test_seed003_training_loop_decreases_loss(backend, rng):
    N, K = 60, 3
    centers = np.array([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
    y = np.repeat(np.arange(K), N // K)
    X = centers[y] + 0.5 * rng.normal(size=(N, 2))
    W, b = 0.01 * rng.normal(size=(2, K)), np.zeros(K)
    first = None
    for _ in range(100):
        loss, dW, db = softgrad.linear_softmax_loss(W, X, y, 5e-4, b=b)
        first = loss if first is None else first
        W, b = W - 1.0 * dW, b - 1.0 * db
    assert first > 1.0 and loss < 0.2
    assert (np.argmax(X @ W + b, axis=1) == y).mean() > 0.9


# ---------------------------------------------------------------- seed 002: softmax, stability, layer Jacobian


def test_seed002_examples(backend):
    np.testing.assert_allclose(softgrad.softmax([1.0, 2.0, 3.0]), [0.09003057, 0.24472847, 0.66524096],
                               **_printed(8))
    # The seed prints [0.02, 0.05, 0.93] for [1, 2, 5]; the exact values are
    # [0.0171, 0.0466, 0.9362], so its last entry is truncated, not rounded (0.94).
    # We hold it to the seed's two decimals within one unit of the last digit.
    np.testing.assert_allclose(softgrad.softmax([1.0, 2.0, 5.0]), [0.02, 0.05, 0.93], rtol=0, atol=0.01)
    np.testing.assert_allclose(softgrad.softmax([1.0, 2.0, 5.0]), [0.0171, 0.0466, 0.9362], **_printed(4))
    # the naive exp overflows to nan here; the max-shifted form gives [0, 0, 1]
    with np.errstate(over="ignore", invalid="ignore"):
        naive = np.exp([1000.0, 2000.0, 3000.0]) / np.exp([1000.0, 2000.0, 3000.0]).sum()
    assert np.isnan(naive).all()
    np.testing.assert_array_equal(softgrad.softmax([1000.0, 2000.0, 3000.0]), [0.0, 0.0, 1.0])


def test_seed002_shift_invariance(backend, rng):
    """S(a + D) = S(a) for any constant D; D = -max a is the stable choice."""
    a = rng.normal(size=6) * 5
    for D in (-a.max(), 123.0, -1e3):
        np.testing.assert_allclose(softgrad.softmax(a + D), softgrad.softmax(a), rtol=1e-12)


def test_seed002_jacobian_formula(backend, rng):
    """D_j S_i = S_i (delta_ij - S_j): diagonal S_i (1 - S_i), off-diagonal -S_j S_i."""
    a = rng.normal(size=5)
    S = softgrad.softmax(a)
    J = softgrad.softmax_jacobian(a)
    for i in range(5):
        for j in range(5):
            expected = S[i] * (1 - S[j]) if i == j else -S[j] * S[i]
            assert J[i, j] == pytest.approx(expected, rel=1e-13, abs=1e-17)


def test_seed002_layer_jacobian_and_cross_entropy(backend, rng):
    T, N = 4, 3
    W, x = rng.normal(size=(T, N)), rng.normal(size=N)
    y = 2
    S = softgrad.softmax(W @ x)
    DP = softgrad.softmax_layer_jacobian(W, x)
    assert DP.shape == (T, N * T)  # "T rows, NT columns"
    # D_ij P_t = S_t (delta_ti - S_i) x_j at column i N + j (0-based row-major)
    t, i, j = 1, 2, 0
    assert DP[t, i * N + j] == pytest.approx(S[t] * (0 - S[i]) * x[j], rel=1e-13)
    t = i
    assert DP[t, i * N + j] == pytest.approx(S[t] * (1 - S[i]) * x[j], rel=1e-13)
    # D_ij xent = -1/S_y * D_ij P_y = (S_i - delta_yi) x_j
    G = softgrad.softmax_layer_cross_entropy_grad(W, x, y)
    np.testing.assert_allclose(G.ravel(), -DP[y] / S[y], rtol=1e-12, atol=1e-16)
    np.testing.assert_allclose(G, np.outer(S - _onehot(y, T), x), rtol=1e-13, atol=1e-16)
    report = softgrad.gradcheck(lambda W: -np.log(softgrad.softmax(W @ x)[y]), W,
                                grad=lambda W: softgrad.softmax_layer_cross_entropy_grad(W, x, y))
    assert report.passed, str(report)


# ---------------------------------------------------------------- seed 001: CS231n softmax classifier


def test_seed001_naive_equals_vectorized(backend, rng):
    N, D, C = 25, 40, 10
    W = 0.01 * rng.normal(size=(D, C))
    X = rng.normal(size=(N, D)) * 20
    y = rng.integers(0, C, size=N)
    naive = softgrad.linear_softmax_loss(W, X, y, 0.05, method="naive")
    vec = softgrad.linear_softmax_loss(W, X, y, 0.05, method="vectorized")
    np.testing.assert_allclose(vec[0], naive[0], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(vec[1], naive[1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["naive", "vectorized"])
def test_seed001_sanity_check_log_10(backend, rng, method):
    """W = 1e-4 randn(3073, 10), reg 0: the loss is close to -log(0.1) = 2.302585."""
    W = rng.normal(size=(3073, 10)) * 0.0001
    X = rng.normal(size=(50, 3073))
    y = rng.integers(0, 10, size=50)
    loss, grad = softgrad.linear_softmax_loss(W, X, y, 0.0, method=method)
    # scores ~ 1e-4 sqrt(3073) ~ 5.5e-3 per entry: the mean loss deviates from log 10 by
    # about 5.5e-3 / sqrt(50) ~ 8e-4; 5e-3 is six standard deviations
    assert float(loss) == pytest.approx(-np.log(0.1), abs=5e-3)
    assert grad.shape == W.shape


def test_seed001_svm_unchanged_by_a_well_classified_point_softmax_is_not():
    """Inline question 2: with summed losses, a point that satisfies every margin adds 0
    to the SVM loss but a positive amount to the softmax loss."""
    W = np.array([[3.0, 0.0, -3.0]])
    x_new = np.array([[2.0]])  # scores [6, 0, -6]: class 0 wins by more than delta = 1
    svm, _ = softgrad.linear_svm_loss(W, x_new, [0])
    softmax_loss, _ = softgrad.linear_softmax_loss(W, x_new, [0])
    assert float(svm) == 0.0
    assert float(softmax_loss) > 0.0


# ---------------------------------------------------------------- seed 000: Caffe layers and the FC layer


def test_seed000_softmax_layer_backward_caffe(backend, rng):
    """SoftmaxLayer: bottom_diff = (top_diff - dot(top_diff, top_data)) * top_data."""
    z = rng.normal(size=(4, 6))
    top_data = softgrad.softmax(z)
    top_diff = rng.normal(size=(4, 6))
    caffe = (top_diff - np.sum(top_diff * top_data, axis=1, keepdims=True)) * top_data
    np.testing.assert_allclose(softgrad.softmax_backward(top_diff, top_data), caffe, rtol=1e-13, atol=1e-16)
    # ... which is dE/da times the Jacobian (column k: (e_k - a) a_k)
    J = softgrad.softmax_jacobian(z)
    np.testing.assert_allclose(np.einsum("ni,nij->nj", top_diff, J), caffe, rtol=1e-12, atol=1e-15)
    k = 2
    np.testing.assert_allclose(J[0][:, k], (np.eye(6)[k] - top_data[0]) * top_data[0, k], rtol=1e-13)


def test_seed000_softmax_with_loss_caffe(backend, rng):
    """SoftmaxWithLossLayer: bottom_diff = prob_data - label_data (per sample, summed loss)."""
    z = rng.normal(size=(5, 4))
    y = rng.integers(0, 4, size=5)
    prob = softgrad.softmax(z)
    label = np.eye(4)[y]
    _, grad = softgrad.softmax_cross_entropy(z, y, reduction="sum")
    np.testing.assert_allclose(grad, prob - label, rtol=1e-14, atol=1e-16)
    # E = -sum y log a and dE/da_j = -y_j / a_j
    loss, dE_da = softgrad.cross_entropy_from_probs(prob, y, reduction="sum")
    np.testing.assert_allclose(loss, -np.sum(label * np.log(prob)), rtol=1e-13)
    np.testing.assert_allclose(dE_da, -label / prob, rtol=1e-14)


def test_seed000_fully_connected_layer(backend, rng):
    """z_j = sum_i w_ij a_i + b_j: dE/db_j = a_j - y_j and dE/dw_ij = (a_j - y_j) a_i."""
    D, K = 5, 4
    a_prev = rng.normal(size=D)        # a^l
    w = rng.normal(size=(D, K))        # w_ij: input i -> output j
    b = rng.normal(size=K)
    y = 1
    a = softgrad.softmax(a_prev @ w + b)  # a^{l+1}
    _, dW, db = softgrad.linear_softmax_loss(w, a_prev[None], [y], 0.0, b=b)
    np.testing.assert_allclose(db, a - _onehot(y, K), rtol=1e-13, atol=1e-16)
    np.testing.assert_allclose(dW, np.outer(a_prev, a - _onehot(y, K)), rtol=1e-13, atol=1e-16)
