"""``out=`` / ``grad_out=`` buffers, read-only and memory-mapped inputs, and the kernels' fused value checks.

Every test takes the ``backend`` fixture (once per backend that loads). References are
scipy.special and the functions' own allocating forms in float64.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import scipy.special

import softgrad
from softgrad._backend import kernels
from conftest import tolerance

DTYPES = (np.float32, np.float64)


def _logits(rng, shape=(6, 9001), dtype=np.float64):
    return (rng.normal(size=shape) * 4).astype(dtype)


# ----------------------------------------------------------------------------- out=
@pytest.mark.parametrize("dtype", DTYPES + (np.float16,))
@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_out_matches_fresh_result_and_is_returned(backend, rng, name, dtype):
    f = getattr(softgrad, name)
    z = _logits(rng, (5, 777), dtype)
    out = np.full(z.shape, 7.0, dtype=dtype)
    got = f(z, out=out)
    assert got is out
    np.testing.assert_array_equal(out, f(z))
    ref = getattr(scipy.special, name)(z.astype(np.float64), axis=-1)
    np.testing.assert_allclose(out.astype(np.float64), ref, **tolerance(dtype))


@pytest.mark.parametrize("axis", [0, 1, (0, 2), None])
def test_out_with_other_axes_goes_through_a_temporary(backend, rng, axis):
    z = rng.normal(size=(3, 4, 5))
    out = np.empty_like(z)
    assert softgrad.softmax(z, axis=axis, out=out) is out
    np.testing.assert_allclose(out, scipy.special.softmax(z, axis=axis), rtol=1e-13)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_backward_out(backend, rng, dtype):
    a = softgrad.softmax(_logits(rng, (4, 300), dtype))
    g = rng.normal(size=a.shape).astype(dtype)
    out = np.empty_like(a)
    assert softgrad.softmax_backward(g, a, out=out) is out
    np.testing.assert_array_equal(out, softgrad.softmax_backward(g, a))
    out_t = np.empty((300, 4), dtype=dtype)
    softgrad.softmax_backward(g.T, a.T, axis=0, out=out_t)
    np.testing.assert_array_equal(out_t, softgrad.softmax_backward(g, a).T)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["index", "probs"])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "reduction": "sum"},
                                     {"softcap": 5.0, "z_loss": 1e-3}, {"ignore_index": 2}])
def test_grad_out_matches_fresh_gradient(backend, rng, dtype, kind, options):
    if kind == "probs" and "ignore_index" in options:
        options = {}
    z = _logits(rng, (7, 513), dtype)
    y = rng.integers(0, 513, size=7) if kind == "index" else rng.dirichlet(np.ones(513), size=7).astype(dtype)
    loss_ref, grad_ref = softgrad.softmax_cross_entropy(z, y, **options)
    grad_out = np.full_like(z, np.nan)
    loss, grad = softgrad.softmax_cross_entropy(z, y, grad_out=grad_out, **options)
    assert grad is grad_out
    np.testing.assert_array_equal(loss, loss_ref)
    np.testing.assert_array_equal(grad_out, grad_ref)


def test_grad_out_class_axis_first_and_float16(backend, rng):
    z = rng.normal(size=(4, 10, 3)).astype(np.float16)  # classes on axis 1, as in PyTorch
    y = rng.integers(0, 10, size=(4, 3))
    grad_out = np.empty_like(z)
    loss, grad = softgrad.softmax_cross_entropy(z, y, axis=1, grad_out=grad_out)
    assert grad is grad_out
    np.testing.assert_array_equal(grad_out, softgrad.softmax_cross_entropy(z, y, axis=1)[1])


def _bad_out_cases(z):
    fortran = np.asfortranarray(np.empty_like(z))
    readonly = np.empty_like(z)
    readonly.setflags(write=False)
    return [
        ([1.0], TypeError, "must be a NumPy ndarray"),
        (np.empty(z.shape, np.float32), TypeError, "must have dtype float64"),
        (np.empty((z.shape[0], z.shape[1] + 1)), ValueError, "must have shape"),
        (fortran, ValueError, "must be C-contiguous"),
        (readonly, ValueError, "is read-only"),
    ]


def test_bad_out_raises_naming_the_argument_and_writes_nothing(backend, rng):
    z = _logits(rng, (4, 6))
    g = rng.normal(size=z.shape)
    a = softgrad.softmax(z)
    for out, exc, match in _bad_out_cases(z):
        before = None if not isinstance(out, np.ndarray) else out.copy()
        for call in (lambda: softgrad.softmax(z, out=out), lambda: softgrad.log_softmax(z, out=out),
                     lambda: softgrad.softmax_backward(g, a, out=out)):
            with pytest.raises(exc, match="out " + match):
                call()
        with pytest.raises(exc, match="grad_out"):
            softgrad.softmax_cross_entropy(z, [0, 1, 2, 3], grad_out=out)
        if before is not None:
            np.testing.assert_array_equal(out, before)


def test_out_aliasing_an_input_raises_and_leaves_it_intact(backend, rng):
    z = _logits(rng, (4, 6))
    z0 = z.copy()
    with pytest.raises(ValueError, match="out shares memory with logits"):
        softgrad.softmax(z, out=z)
    big = np.zeros((8, 6))
    big[:4] = z
    with pytest.raises(ValueError, match="out shares memory with logits"):
        softgrad.log_softmax(big[:6], out=big[2:8])  # partial overlap
    with pytest.raises(ValueError, match="grad_out shares memory with logits"):
        softgrad.softmax_cross_entropy(z, [0, 1, 2, 3], grad_out=z)
    t = softgrad.softmax(z)
    with pytest.raises(ValueError, match="grad_out shares memory with target"):
        softgrad.softmax_cross_entropy(z, t, grad_out=t)
    a, g = softgrad.softmax(z), rng.normal(size=z.shape)
    with pytest.raises(ValueError, match="out shares memory with probs"):
        softgrad.softmax_backward(g, a, out=a)
    with pytest.raises(ValueError, match="out shares memory with grad_probs"):
        softgrad.softmax_backward(g, a, out=g)
    np.testing.assert_array_equal(z, z0)
    # disjoint halves of one buffer are fine
    softgrad.softmax(big[:4], out=big[4:])
    np.testing.assert_allclose(big[4:], scipy.special.softmax(z, axis=-1), rtol=1e-13)


@pytest.mark.parametrize("dtype", DTYPES)
def test_repeated_calls_with_out_allocate_nothing_of_the_input_size(backend, rng, dtype):
    if backend != "numba":
        pytest.skip("the NumPy reference works in row blocks with float64 temporaries of a fixed size")
    z = _logits(rng, (64, 4096), dtype)
    y = rng.integers(0, 4096, size=64)
    out, grad_out = np.empty_like(z), softgrad.softmax(z)  # grad_out is also probs below: finite from the start
    g = rng.normal(size=z.shape).astype(dtype)

    def calls():
        softgrad.softmax(z, out=out)
        softgrad.log_softmax(z, out=out)
        softgrad.softmax_backward(g, grad_out, out=out)
        softgrad.softmax_cross_entropy(z, y, grad_out=grad_out)

    calls()  # compile and warm up
    tracemalloc.start()
    try:
        calls()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < z.nbytes / 8, peak
    # without buffers the same calls allocate results of the input's size (the check can fail)
    tracemalloc.start()
    try:
        softgrad.softmax(z)
        _, peak_fresh = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak_fresh >= z.nbytes


# ----------------------------------------------------------------------------- read-only inputs
def _close(got, want):
    # a read-only array gets its own compiled Numba specialisation: equal to rounding, not bitwise
    want = np.asarray(want)
    np.testing.assert_allclose(got, want, **tolerance(want.dtype if want.dtype != np.float16 else np.float32))


def _readonly(x):
    x = np.array(x)
    x.setflags(write=False)
    return x


@pytest.mark.parametrize("dtype", DTYPES)
def test_read_only_inputs_work_with_every_kernel(backend, rng, dtype):
    z = _logits(rng, (5, 4100), dtype)
    z[0, :10] = -np.inf
    y = rng.integers(0, 4100, size=5)
    t = rng.dirichlet(np.ones(4100), size=5).astype(dtype)
    w = rng.uniform(0.5, 2.0, size=4100).astype(dtype)
    zr, yr, tr, wr = _readonly(z), _readonly(y), _readonly(t), _readonly(w)
    for f in (softgrad.softmax, softgrad.log_softmax, softgrad.logsumexp):
        _close(f(zr), f(z))
    for kw in ({}, {"weight": wr, "label_smoothing": 0.2}, {"softcap": 3.0}, {"ignore_index": int(y[1])}):
        for target, target_rw in ((yr, y), (tr, t)):
            if target is tr and "ignore_index" in kw:
                continue
            got = softgrad.softmax_cross_entropy(zr, target, **kw)
            want = softgrad.softmax_cross_entropy(z, target_rw, **{k: (w if v is wr else v) for k, v in kw.items()})
            _close(got[0], want[0])
            _close(got[1], want[1])
            _close(softgrad.cross_entropy(zr, target, **kw), want[0])
    a, g = softgrad.softmax(z), rng.normal(size=z.shape).astype(dtype)
    _close(softgrad.softmax_backward(_readonly(g), _readonly(a)), softgrad.softmax_backward(g, a))
    np.testing.assert_array_equal(zr, z)


def test_memory_mapped_logits(backend, rng, tmp_path):
    z = _logits(rng, (9, 2049), np.float32)
    y = rng.integers(0, 2049, size=9)
    np.save(tmp_path / "z.npy", z)
    zm = np.load(tmp_path / "z.npy", mmap_mode="r")
    assert isinstance(zm, np.memmap) and not zm.flags.writeable
    _close(softgrad.softmax(zm), softgrad.softmax(z))
    _close(softgrad.log_softmax(zm, out=np.empty_like(z)), softgrad.log_softmax(z))
    _close(softgrad.logsumexp(zm), softgrad.logsumexp(z))
    grad_out = np.empty_like(z)
    loss, _ = softgrad.softmax_cross_entropy(zm, y, grad_out=grad_out, label_smoothing=0.1)
    loss_ref, grad_ref = softgrad.softmax_cross_entropy(z, y, label_smoothing=0.1)
    _close(loss, loss_ref)
    _close(grad_out, grad_ref)
    _close(softgrad.softmax_backward(zm, zm), softgrad.softmax_backward(z, z))


def test_read_only_arrays_straight_into_the_kernels(rng):
    # the kernels themselves, not only the public layer, accept read-only arrays
    K = kernels()
    z = _readonly(_logits(rng, (3, 5000)))
    out, lse, loss = np.empty(z.shape), np.empty(3), np.empty(3)
    assert K.softmax(z, out) == 0 and K.log_softmax(z, out) == 0 and K.logsumexp(z, lse) == 0
    assert K.cross_entropy_index(z, _readonly([0, 1, 2]), None, -100, 0.0, _readonly(np.ones(3)), loss, None) == 0
    assert K.softmax_backward(z, z, out) == 0


# ----------------------------------------------------------------------------- fused value checks
BAD_ROWS = [
    ("nan", "logits contains NaN"),
    ("posinf", r"logits contains \+inf"),
    ("all_neginf", r"logits has 2 slice\(s\) along the class axis that are entirely -inf \(first at flattened "
                   r"row 1\); softmax of such a slice is undefined"),
]


def _with_bad_rows(rng, what, C=5003, dtype=np.float64):
    z = _logits(rng, (6, C), dtype)
    if what == "nan":
        z[3, C - 2] = np.nan  # in the last block of the row
    elif what == "posinf":
        z[4, C // 2] = np.inf
    else:
        z[[1, 4]] = -np.inf
    return z


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("what, message", BAD_ROWS)
def test_kernels_report_invalid_rows_and_public_functions_raise_the_same_errors(backend, rng, what, message, dtype):
    z = _with_bad_rows(rng, what, dtype=dtype)
    bad_row, col = {"nan": (3, z.shape[1] - 2), "posinf": (4, z.shape[1] // 2), "all_neginf": (1, 0)}[what]
    y = rng.integers(0, z.shape[1], size=6)
    t = np.full(z.shape, 1.0 / z.shape[1], dtype=dtype)
    calls = [lambda: softgrad.softmax(z), lambda: softgrad.log_softmax(z),
             lambda: softgrad.softmax(z, out=np.empty_like(z)),
             lambda: softgrad.cross_entropy(z, y), lambda: softgrad.softmax_cross_entropy(z, y),
             lambda: softgrad.softmax_cross_entropy(z, y, grad_out=np.empty_like(z)),
             lambda: softgrad.softmax_cross_entropy(z, t, label_smoothing=0.1),
             lambda: softgrad.softmax_cross_entropy(z, y, softcap=4.0),
             lambda: softgrad.softmax_cross_entropy(z, y, ignore_index=int(y[3])),
             lambda: softgrad.softmax_mse(z, y)]
    if what != "all_neginf":
        calls.append(lambda: softgrad.logsumexp(z))
    for call in calls:
        with pytest.raises(ValueError, match=message):
            call()
    with pytest.raises(ValueError, match=message.replace("2 slice", "1 slice")):
        softgrad.softmax_jacobian(z[[0, bad_row]][:, [0, col, -1]])
    K = kernels()
    out = np.empty_like(z)
    assert K.softmax(z, out) == (2 if what == "all_neginf" else 1)
    bad = [1, 4] if what == "all_neginf" else [3] if what == "nan" else [4]
    assert np.isnan(out[bad]).all() and np.isfinite(out[[0, 2, 5]]).all()


def test_logsumexp_of_an_all_neg_inf_slice_is_neg_inf(backend):
    z = np.array([[0.0, 1.0], [-np.inf, -np.inf]])
    np.testing.assert_array_equal(softgrad.logsumexp(z), scipy.special.logsumexp(z, axis=-1))
    lse, sign = softgrad.logsumexp(z, return_sign=True)
    np.testing.assert_array_equal(sign, [1.0, 0.0])


def test_softmax_backward_finds_non_finite_entries_through_the_dot(backend, rng):
    a = softgrad.softmax(rng.normal(size=(4, 7)))
    g = rng.normal(size=(4, 7))
    for arr, name in ((a, "probs"), (g, "grad_probs")):
        for value, what in ((np.nan, "NaN"), (np.inf, r"\+inf"), (-np.inf, "-inf")):
            bad = arr.copy()
            bad[2, 3] = value
            args = (g, bad) if name == "probs" else (bad, a)
            with pytest.raises(ValueError, match=f"{name} contains {what}"):
                softgrad.softmax_backward(*args)
    zero_prob = a.copy()
    zero_prob[1, 1] = 0.0
    inf_grad = g.copy()
    inf_grad[1, 1] = np.inf  # 0 * inf = NaN in the dot: still found
    with pytest.raises(ValueError, match=r"grad_probs contains \+inf"):
        softgrad.softmax_backward(inf_grad, zero_prob)
