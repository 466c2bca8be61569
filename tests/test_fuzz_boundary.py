"""Hypothesis fuzzing of every public function of ``softgrad`` at its boundary.

Each test draws arguments over dtypes (float64/32/16, int64, uint64, bool, object,
complex), shapes (empty, 1, up to a few hundred entries), layouts (C and Fortran order,
strided, negative strides, read-only, memory-mapped) and values (NaN, +-inf, +-1e308
mixed into normal draws), on both backends, and asserts for every call:

* either a right answer -- finite where the float64 naive reference (computed here from
  the same input values) is finite, and equal to it within the dtype's tolerance --
* or a ``TypeError``/``ValueError`` whose message names one of the function's arguments
  (nothing else escapes: no Numba ``TypingError``, ``OverflowError``, ``KeyError``);
* the caller's arrays are unchanged (compared with copies taken before the call);
* the call allocates at most a stated bound (``tracemalloc`` peak, which NumPy reports):
  ``_ALLOC_FACTOR`` times the bytes of its arguments and result in float64, plus 64 MiB
  (Numba compiling a kernel on first use allocates ~10 MB; the issue's cases are GB-scale).

For the softmax family the test also knows exactly when an error is due (non-float
dtype, empty input, NaN/+inf, an all ``-inf`` slice) and asserts it is raised then and
only then. Runtime: about 10-40 s in all (Numba's first compilations included) (``max_examples`` below).
"""

from __future__ import annotations

import itertools
import math
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import softgrad

SETTINGS = settings(max_examples=120, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

FLOATS = (np.float64, np.float32, np.float16)
DTYPES = FLOATS + (np.int64, np.uint64, np.bool_, object, np.complex128)
SPECIALS = (np.nan, np.inf, -np.inf, 1e308, -1e308)
LAYOUTS = ("C", "F", "strided", "reversed", "readonly", "memmap")
BACKENDS = tuple(softgrad.available_backends())
_ALLOC_FACTOR = 16
_ALLOC_SLACK = 64 << 20  # covers Numba compiling/loading a kernel on first use

# dtype -> (rtol, atol) for a result compared with the float64 reference of the same input
_TOL = {np.dtype(np.float64): (1e-9, 1e-12), np.dtype(np.float32): (2e-4, 2e-6),
        np.dtype(np.float16): (2e-2, 2e-3)}

_counter = itertools.count()


@pytest.fixture(scope="module")
def mmap_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("memmaps")


# ------------------------------------------------------------------ strategies
def _with_layout(values: np.ndarray, layout: str, mmap_dir) -> np.ndarray:
    """``values`` (any dtype) in ``layout``; equal entries, different memory."""
    if values.dtype == object or values.ndim == 0:
        layout = "C" if layout == "memmap" else layout
    if layout == "F":
        return np.asfortranarray(values)
    if layout == "strided" and values.ndim:
        big = np.zeros(values.shape[:-1] + (2 * values.shape[-1],), dtype=values.dtype)
        big[..., ::2] = values
        return big[..., ::2]
    if layout == "reversed" and values.ndim:
        return np.ascontiguousarray(values[::-1])[::-1]
    if layout == "readonly":
        out = values.copy()
        out.flags.writeable = False
        return out
    if layout == "memmap" and values.size:
        path = mmap_dir / f"a{next(_counter)}.npy"
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=values.dtype, shape=values.shape)
        mm[...] = values
        mm.flush()
        del mm
        return np.load(path, mmap_mode="r")
    return values.copy()


def _cast(values: np.ndarray, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        if dtype.kind == "f":
            return values.astype(dtype)
        if dtype.kind == "c":
            return values.astype(dtype)
        if dtype.kind == "b":
            return values > 0
        if dtype.kind in "iu":
            finite = np.nan_to_num(values, nan=0.0, posinf=1e3, neginf=-1e3)
            finite = np.clip(np.round(finite), -1e3, 1e3)
            return (np.abs(finite) if dtype.kind == "u" else finite).astype(dtype)
        return values.astype(object)


@st.composite
def float_arrays(draw, mmap_dir, shape=None, dtypes=DTYPES, specials=True, scale=None):
    """An array of a drawn dtype, layout and values (normal draws, sometimes specials)."""
    if shape is None:
        shape = draw(st.sampled_from([(0,), (1,), (5,), (1, 1), (3, 4), (0, 3), (3, 0), (2, 3, 4),
                                      (4, 70), (257,)]))
    dtype = draw(st.sampled_from(dtypes))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    scale = draw(st.sampled_from([1.0, 30.0, 1e3])) if scale is None else scale
    values = rng.standard_normal(shape) * scale
    if specials and values.size and draw(st.booleans()):
        for _ in range(draw(st.integers(1, 3))):
            values.flat[rng.integers(values.size)] = draw(st.sampled_from(SPECIALS))
    return _with_layout(_cast(values, dtype), draw(st.sampled_from(LAYOUTS)), mmap_dir)


@st.composite
def index_targets(draw, mmap_dir, batch_shape, num_classes):
    """Class indices of ``batch_shape``: mostly valid, sometimes out of range or of a bad dtype."""
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    dtype = draw(st.sampled_from([np.int64, np.int32, np.uint8, np.uint64, np.int8, np.bool_,
                                  np.float64, object]))
    values = rng.integers(0, max(num_classes, 1), batch_shape)
    size = int(np.prod(batch_shape, dtype=np.int64))
    bad = None
    if size and draw(st.booleans()):
        bad = draw(st.sampled_from([-1, -100, num_classes, 2 ** 63, 2 ** 64 - 100, 255]))
    with np.errstate(over="ignore"):
        if np.dtype(dtype).kind in "iu":
            info = np.iinfo(dtype)
            arr = values.astype(dtype)
            if bad is not None and info.min <= bad <= info.max:
                arr.flat[rng.integers(size)] = bad
        elif dtype is object:
            arr = values.astype(object)
            if bad is not None:
                arr.flat[rng.integers(size)] = bad
        else:
            arr = values.astype(dtype)
    return _with_layout(arr, draw(st.sampled_from(LAYOUTS)), mmap_dir)


# ------------------------------------------------------------------ the check
def _snapshot(x):
    if isinstance(x, np.ndarray):
        return x.copy()
    return None


def _same(a, b) -> bool:
    if a.dtype == object:
        return a.shape == b.shape and all(
            (u is v) or (u == v) or (isinstance(u, float) and isinstance(v, float) and math.isnan(u) and math.isnan(v))
            for u, v in zip(a.ravel().tolist(), b.ravel().tolist()))
    return a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")


def _nbytes(x) -> int:
    if isinstance(x, np.ndarray):
        return 8 * x.size * (2 if x.dtype.kind == "c" else 1)
    if isinstance(x, tuple):
        return sum(_nbytes(v) for v in x)
    return 8


def call(fn, args: tuple, kwargs: dict, names: tuple[str, ...], *, alloc_bound: int | None = None):
    """Call ``fn``; return ``("ok", result)`` or ``("error", exc)`` after the boundary checks.

    Asserts: only TypeError/ValueError escape, naming one of ``names``; every array
    argument unchanged; the tracemalloc peak within the bound.
    """
    arrays = [a for a in list(args) + list(kwargs.values()) if isinstance(a, np.ndarray)]
    before = [a.copy() for a in arrays]
    tracemalloc.start()
    try:
        result = fn(*args, **kwargs)
        outcome = ("ok", result)
    except (TypeError, ValueError) as exc:
        outcome = ("error", exc)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    for a, b in zip(arrays, before):
        assert _same(a, b), f"{fn.__name__} changed an argument"
    if outcome[0] == "error":
        message = str(outcome[1])
        assert any(n in message for n in names), (
            f"{fn.__name__} raised {type(outcome[1]).__name__} naming none of {names}: {message}")
    else:
        in_bytes = sum(_nbytes(a) for a in arrays) + _nbytes(outcome[1])
        bound = alloc_bound if alloc_bound is not None else _ALLOC_FACTOR * in_bytes + _ALLOC_SLACK
        assert peak <= bound, f"{fn.__name__} allocated {peak} bytes, bound {bound}"
    return outcome


def _close(result, reference, dtype):
    rtol, atol = _TOL[np.dtype(dtype)]
    result = np.asarray(result, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    assert result.shape == reference.shape
    # the right answer in the result's dtype: a value beyond its range is that infinity
    with np.errstate(over="ignore"):
        reference = np.where(np.isfinite(reference.astype(dtype)), reference, reference.astype(dtype))
    finite = np.isfinite(reference)
    assert np.isfinite(result[finite]).all(), "non-finite result where the reference is finite"
    scale = max(1.0, float(np.max(np.abs(reference[finite]), initial=0.0)))
    np.testing.assert_allclose(result[finite], reference[finite], rtol=rtol, atol=atol * scale)
    # an infinite reference (a true value beyond float64) must be the same infinity, never NaN
    np.testing.assert_array_equal(result[~finite], reference[~finite])


def _float_input(x) -> bool:
    return isinstance(x, np.ndarray) and x.dtype.kind == "f"


def _result_dtype(x):
    return np.dtype(np.float32) if x.dtype == np.float16 else x.dtype


# ------------------------------------------------------------------ references
def _ref_lse(z64, axis):
    m = np.max(z64, axis=axis, keepdims=True)
    m_safe = np.where(np.isneginf(m), 0.0, m)  # an all -inf slice: lse = -inf
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return np.squeeze(m_safe, axis) + np.log(np.sum(np.exp(z64 - m_safe), axis=axis))


def _ref_softmax(z64, axis):
    m = np.max(z64, axis=axis, keepdims=True)
    e = np.exp(z64 - m)
    return e / e.sum(axis=axis, keepdims=True)


def _ref_log_softmax(z64, axis):
    with np.errstate(over="ignore", invalid="ignore"):
        return z64 - np.expand_dims(_ref_lse(z64, axis), axis)


def _logits_should_fail(z, *, all_neg_inf_ok: bool = False) -> bool:
    """The softmax family's documented errors for ``z`` with the class axis last.

    ``all_neg_inf_ok``: logsumexp gives ``-inf`` for an all ``-inf`` slice (SciPy's value).
    """
    if not _float_input(z) or z.ndim == 0 or z.size == 0:
        return True
    z64 = z.astype(np.float64)
    all_neg_inf = False if all_neg_inf_ok else np.isneginf(z64).all(axis=-1).any()
    return bool(np.isnan(z64).any() or np.isposinf(z64).any() or all_neg_inf)


# ------------------------------------------------------------------ softmax family
@SETTINGS
@given(data=st.data())
def test_fuzz_softmax_log_softmax_logsumexp(data, mmap_dir):
    z = data.draw(float_arrays(mmap_dir))
    name = data.draw(st.sampled_from(["softmax", "log_softmax", "logsumexp"]))
    backend = data.draw(st.sampled_from(BACKENDS))
    fn = getattr(softgrad, name)
    with softgrad.use_backend(backend):
        kind, result = call(fn, (z,), {"axis": -1}, ("logits", "axis"))
    expect_error = _logits_should_fail(z, all_neg_inf_ok=name == "logsumexp")
    assert (kind == "error") == expect_error, f"{name} {z.dtype} {z.shape}: {kind} {result}"
    if kind == "ok":
        ref = {"softmax": _ref_softmax, "log_softmax": _ref_log_softmax, "logsumexp": _ref_lse}[name](
            z.astype(np.float64), -1)
        assert result.dtype == z.dtype or (name == "logsumexp" and result.dtype == _result_dtype(z)) \
            or result.dtype == z.dtype
        _close(result, ref, z.dtype)


@SETTINGS
@given(data=st.data())
def test_fuzz_softmax_jacobian(data, mmap_dir):
    z = data.draw(float_arrays(mmap_dir))
    with softgrad.use_backend(data.draw(st.sampled_from(BACKENDS))):
        C = z.shape[-1] if z.ndim else 1
        kind, result = call(softgrad.softmax_jacobian, (z,), {},
                            ("logits", "axis", "softmax_jacobian"),
                            alloc_bound=_ALLOC_FACTOR * 8 * max(z.size, 1) * max(C, 1) + _ALLOC_SLACK)
    assert (kind == "error") == _logits_should_fail(z), f"{z.dtype} {z.shape}: {kind} {result}"
    if kind == "ok":
        s = _ref_softmax(z.astype(np.float64), -1)
        ref = s[..., :, None] * (np.eye(C) - s[..., None, :])
        _close(result, ref, z.dtype)


def test_softmax_jacobian_refuses_a_huge_result_without_allocating():
    z = np.broadcast_to(np.zeros(1, dtype=np.float32), (10 ** 4, 10 ** 3))  # a 40 MB copy in call()
    kind, exc = call(softgrad.softmax_jacobian, (z,), {}, ("softmax_jacobian",), alloc_bound=1 << 20)
    assert kind == "error" and "would need" in str(exc)
    kind, exc = call(softgrad.softmax_jacobian, (z,), {}, ("softmax_jacobian",), alloc_bound=1 << 20)
    assert kind == "error" and "would need" in str(exc)


@SETTINGS
@given(data=st.data())
def test_fuzz_softmax_backward(data, mmap_dir):
    shape = data.draw(st.sampled_from([(1,), (4,), (3, 5), (2, 3, 4), (0, 3)]))
    p = data.draw(float_arrays(mmap_dir, shape=shape))
    g = data.draw(float_arrays(mmap_dir, shape=shape))
    with softgrad.use_backend(data.draw(st.sampled_from(BACKENDS))):
        kind, result = call(softgrad.softmax_backward, (g, p), {}, ("probs", "grad_probs", "axis"))
    if kind == "ok":
        assert _float_input(p) and _float_input(g) and p.size
        p64, g64 = p.astype(np.float64), g.astype(np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            ref = p64 * (g64 - np.sum(g64 * p64, axis=-1, keepdims=True))
        assert np.isfinite(p64).all() and np.isfinite(g64).all()
        _close(result, ref, np.result_type(p.dtype, g.dtype))
    else:
        bad = (not (_float_input(p) and _float_input(g)) or p.size == 0
               or not (np.isfinite(p.astype(np.float64)).all() and np.isfinite(g.astype(np.float64)).all()))
        assert bad, f"valid input refused: {result}"


# ------------------------------------------------------------------ losses
def _not_ignored(y: np.ndarray) -> np.ndarray:
    """Entries that are not ``ignore_index=-100``, compared in ``y``'s own dtype (no int64 cast)."""
    if y.dtype.kind == "i":
        return y != -100
    return np.ones(y.shape, dtype=bool)


def _ce_reference(z64, y, weight_free=True):
    lse = _ref_lse(z64, -1)
    return lse - np.take_along_axis(z64, y[..., None], axis=-1)[..., 0]


@SETTINGS
@given(data=st.data())
def test_fuzz_cross_entropy_and_softmax_cross_entropy(data, mmap_dir):
    z = data.draw(float_arrays(mmap_dir, shape=data.draw(st.sampled_from([(1, 1), (3, 4), (5, 2), (2, 3, 4), (4, 70)]))))
    y = data.draw(index_targets(mmap_dir, z.shape[:-1], z.shape[-1]))
    fused = data.draw(st.booleans())
    fn = softgrad.softmax_cross_entropy if fused else softgrad.cross_entropy
    with softgrad.use_backend(data.draw(st.sampled_from(BACKENDS))):
        kind, result = call(fn, (z, y), {"reduction": "none"}, ("logits", "target"))
    if kind == "error":
        return
    assert not _logits_should_fail(z)
    yi = np.asarray(y)
    assert yi.dtype.kind in "iu"
    valid = _not_ignored(yi)
    assert ((yi[valid] >= 0) & (yi[valid] < z.shape[-1])).all(), "an out-of-range label was accepted"
    loss = result[0] if fused else result
    safe_y = np.where(valid, yi.astype(np.int64), 0)
    ref = np.where(valid, _ce_reference(z.astype(np.float64), safe_y), 0.0)
    _close(loss, ref, z.dtype)
    if fused:
        s = _ref_softmax(z.astype(np.float64), -1)
        onehot = np.zeros_like(s)
        np.put_along_axis(onehot, safe_y[..., None], 1.0, axis=-1)
        _close(result[1], np.where(valid[..., None], s - onehot, 0.0), z.dtype)


@SETTINGS
@given(data=st.data())
def test_fuzz_cross_entropy_with_probability_targets(data, mmap_dir):
    z = data.draw(float_arrays(mmap_dir, shape=(3, 4), dtypes=FLOATS))
    t = data.draw(float_arrays(mmap_dir, shape=data.draw(st.sampled_from([(3, 4), (3,), (4, 3)]))))
    kind, result = call(softgrad.cross_entropy, (z, t), {"reduction": "sum"}, ("logits", "target"))
    if kind == "ok":
        t64 = t.astype(np.float64)
        assert t.shape == z.shape and np.isfinite(t64).all() and (t64 >= 0).all()
        with np.errstate(over="ignore", invalid="ignore"):
            ref = -np.sum(t64 * _ref_log_softmax(z.astype(np.float64), -1))
        if np.isfinite(ref):
            _close(result, ref, np.result_type(z.dtype, t.dtype) if t.dtype != np.float16 else z.dtype)
    elif t.shape == (3,) and _float_input(t):
        assert "float targets are read as probabilities" in str(result)


@SETTINGS
@given(data=st.data())
def test_fuzz_cross_entropy_from_probs(data, mmap_dir):
    p = data.draw(float_arrays(mmap_dir, shape=data.draw(st.sampled_from([(1, 2), (3, 4), (2, 2, 3)])), scale=1.0))
    if p.dtype.kind == "f" and data.draw(st.booleans()):
        p = _with_layout(np.abs(p), "C", mmap_dir)  # mostly valid probabilities
    y = data.draw(index_targets(mmap_dir, p.shape[:-1], p.shape[-1]))
    kind, result = call(softgrad.cross_entropy_from_probs, (p, y), {"reduction": "sum"}, ("probs", "target"))
    if kind == "ok":
        p64 = p.astype(np.float64)
        assert np.isfinite(p64).all() and (p64 >= 0).all()
        valid = _not_ignored(np.asarray(y))
        assert ((np.asarray(y)[valid] >= 0) & (np.asarray(y)[valid] < p.shape[-1])).all()
        yi = np.where(valid, np.asarray(y), 0).astype(np.int64)
        a = np.maximum(p64, np.finfo(_result_dtype(p)).tiny)
        picked = np.take_along_axis(a, np.where(valid, yi, 0)[..., None], axis=-1)[..., 0]
        _close(result[0], np.sum(np.where(valid, -np.log(picked), 0.0)), p.dtype)


@SETTINGS
@given(data=st.data())
def test_fuzz_softmax_mse(data, mmap_dir):
    z = data.draw(float_arrays(mmap_dir, shape=data.draw(st.sampled_from([(4,), (3, 4), (2, 3, 5)]))))
    y = data.draw(index_targets(mmap_dir, z.shape[:-1], z.shape[-1]))
    kind, result = call(softgrad.softmax_mse, (z, y), {}, ("logits", "target"))
    if kind == "ok":
        assert not _logits_should_fail(z)
        yi = np.asarray(y).astype(np.int64)
        assert ((yi >= 0) & (yi < z.shape[-1])).all()
        s = _ref_softmax(z.astype(np.float64), -1)
        onehot = np.zeros_like(s)
        np.put_along_axis(onehot, yi[..., None], 1.0, axis=-1)
        _close(result[0], np.mean((s - onehot) ** 2), z.dtype)


# ------------------------------------------------------------------ linear losses
@SETTINGS
@given(data=st.data())
def test_fuzz_linear_losses(data, mmap_dir):
    N, D, C = data.draw(st.sampled_from([(1, 1, 2), (5, 3, 4), (20, 7, 3), (0, 3, 2)]))
    W = data.draw(float_arrays(mmap_dir, shape=(D, C), scale=data.draw(st.sampled_from([0.1, 1.0, 1e200]))))
    X = data.draw(float_arrays(mmap_dir, shape=(N, D), scale=data.draw(st.sampled_from([1.0, 1e-200, 1e100]))))
    y = data.draw(index_targets(mmap_dir, (N,), C))
    reg = data.draw(st.sampled_from([0.0, 1e-3, 1.0]))
    svm = data.draw(st.booleans())
    fn = softgrad.linear_svm_loss if svm else softgrad.linear_softmax_loss
    kind, result = call(fn, (W, X, y), {"reg": reg}, ("W", "X", "y", "reg", "scores", "penalty"))
    if kind == "error":
        return
    W64, X64 = W.astype(np.float64), X.astype(np.float64)
    yi = np.asarray(y).astype(np.int64)
    assert ((yi >= 0) & (yi < C)).all()
    scores = X64 @ W64
    if svm:
        margins = np.maximum(0.0, scores - scores[np.arange(N), yi][:, None] + 1.0)
        margins[np.arange(N), yi] = 0.0
        data_loss = margins.sum() / N
    else:
        data_loss = float(np.mean(_ce_reference(scores, yi)))
    ref = data_loss + (reg * float(np.sum(W64 * W64)) if reg else 0.0)
    assert np.isfinite(result[0]) and np.isfinite(result[1]).all()
    _close(result[0], ref, np.result_type(W.dtype, X.dtype) if np.float16 not in (W.dtype, X.dtype) else np.float16)


# ------------------------------------------------------------------ gradient checking
@SETTINGS
@given(data=st.data())
def test_fuzz_numerical_gradient(data, mmap_dir):
    x = data.draw(float_arrays(mmap_dir, shape=data.draw(st.sampled_from([(0,), (1,), (3,), (2, 3)])), scale=1.0))
    kind, result = call(softgrad.numerical_gradient, (lambda v: float(np.sum(v * v)), x), {}, ("x", "f", "eps"))
    if kind == "ok":
        x64 = x.astype(np.float64)
        assert np.isfinite(x64).all()
        # central differences' rounding error is ~ eps64 * |f| / h = 2.2e-10 * |f| at h = 1e-6
        np.testing.assert_allclose(result, 2.0 * x64, rtol=1e-6, atol=1e-6 + 1e-9 * float(np.sum(x64 ** 2)))


def test_numerical_gradient_refuses_a_huge_x_before_calling_f():
    calls = []
    x = np.broadcast_to(np.zeros(1), (10 ** 7,))
    kind, exc = call(softgrad.numerical_gradient, (lambda v: calls.append(1) or 0.0, x), {}, ("x",),
                     alloc_bound=1 << 20)
    assert kind == "error" and "would call f" in str(exc) and not calls


@SETTINGS
@given(data=st.data())
def test_fuzz_gradcheck(data, mmap_dir):
    x = data.draw(float_arrays(mmap_dir, shape=data.draw(st.sampled_from([(1,), (4,), (2, 3)])), scale=1.0))

    def f(v):
        return float(np.sum(v ** 3)), 3.0 * v ** 2

    kind, result = call(softgrad.gradcheck, (f, x), {"names": ["x"]}, ("x", "input"))
    if kind == "ok":
        assert x.dtype.kind == "f" and np.isfinite(x.astype(np.float64)).all()
        assert result.passed, str(result)
