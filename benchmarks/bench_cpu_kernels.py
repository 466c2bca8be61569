"""Softmax and fused cross-entropy loss + gradient on the CPU: our kernels against the peers and the floors.

For every shape ``(N, C)`` and dtype (float32, float64), in one process:

``softmax`` (probabilities of every row):

* ``numba``          -- ``softgrad._kernels._numba.softmax`` (the kernel: output buffer given)
* ``softgrad[numba]``-- the public ``softgrad.softmax`` on the numba backend (adds the argument checks and a
  fresh result array; the values are checked inside the kernel's pass)
* ``softgrad[numba]+out`` -- the same with ``out=`` a preallocated array (no allocation)
* ``softgrad[numba]+kept`` -- the fresh-result call again, with glibc's malloc told to keep freed
  memory (see below)
* ``numpy_ref``      -- ``softgrad._kernels._numpy.softmax``, our readable reference
* ``cs231n``         -- ``e = exp(z - max); e / sum(e)`` in plain NumPy
* ``scipy``          -- ``scipy.special.softmax``
* ``torch``          -- ``torch.softmax`` (CPU)

``loss+grad`` (mean cross-entropy over integer targets and its gradient w.r.t. the logits):

* ``numba`` / ``numba_inplace`` -- ``cross_entropy_index`` writing the gradient to a buffer / over the logits
* ``softgrad[numba]`` -- the public ``softgrad.softmax_cross_entropy`` (fresh gradient array)
* ``softgrad[numba]+out`` -- the same with ``grad_out=`` a preallocated array
* ``softgrad[numba]+kept`` -- the fresh-result call again, freed memory kept (see below)
* ``numpy_ref``       -- ``softgrad._kernels._numpy.cross_entropy_index``
* ``cs231n``          -- probabilities, ``-log p_y``, ``p - onehot``, all divided by N
* ``scipy``           -- ``scipy.special.log_softmax`` based
* ``torch``           -- ``F.cross_entropy`` forward + backward (CPU)
* ``sklearn``         -- ``HalfMultinomialLoss.loss_gradient`` (sample weights 1/N, so its gradient is the mean's)

Floors, on the same array: ``copy`` (``np.copyto``: one read and one write of the
array, what any out-of-place kernel must at least move), ``copy_fresh``
(``x.copy()``: the same into a newly allocated array, whose first touch page-faults
-- the floor of any function that returns a new array; the ``softgrad.*`` API with a
fresh result is compared with it as well as with the copy), ``exp`` (the fastest exp
available -- ours, or NumPy's SIMD one -- from the shifted logits into a second
array: the copy's traffic plus the arithmetic), ``exp_arith`` (the exp's
arithmetic alone: its rate on an L1-resident block times ``N * C``, divided over the
threads) and ``logsumexp`` (our logsumexp kernel: the row-max and exp passes of the softmax
kernel over every entry, writing only ``N`` numbers -- what softmax costs before it writes
its ``(N, C)`` result).

Fresh results and the allocator: a result of this size is allocated with ``mmap`` and
returned to the kernel by ``free``, so every call's new array page-faults again, and the
kernel zeroes each page (huge pages included) before first use. ``copy_fresh+kept`` and
``softgrad[numba]+kept`` repeat ``copy_fresh`` and the fresh-result API call with glibc
told, through ``mallopt``, to serve large blocks from its heap and not trim it
(``M_MMAP_MAX = 0``, ``M_TRIM_THRESHOLD`` = 1 GiB; the same as starting Python with
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1073741824``), so a new result reuses pages
already mapped; the settings are restored afterwards. Skipped where the C library has no
``mallopt``. ``linear`` rows time the estimator's objective + gradient (``X @ W``,
fused loss kernel in place, ``X.T @ G``) against the same on the NumPy backend and
scikit-learn's ``LinearModelLoss``.

Every implementation's output is compared with a float64 reference before it is
timed; a wrong answer from one of ours aborts the run, a peer's is recorded and
the peer skipped. Times are the median of ``--repeats`` runs with p20/p80. The load
average before and after is stored with the results (the machine may be shared).

Usage::

    python benchmarks/bench_cpu_kernels.py              # the issue's shapes; writes results/
    python benchmarks/bench_cpu_kernels.py --quick      # small shapes, results to a temp dir

Writes ``benchmarks/results/bench_cpu_kernels_<device>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning. Numba's, PyTorch's and scikit-learn's
# OpenMP runtimes are separate; with spinning, the threads of the one that ran last keep
# the two cores busy for a while and the next one's first calls stall ~10 ms. Set before
# any runtime starts; costs microseconds per parallel region, against calls of >= 10 ms.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402

import softgrad  # noqa: E402
from softgrad import _linear_model  # noqa: E402
from softgrad._kernels import _numba as NB  # noqa: E402
from softgrad._kernels import _numpy as REF  # noqa: E402

FULL_SHAPES = [(4096, 32000), (65536, 1000), (256, 262144)]
QUICK_SHAPES = [(64, 1000), (8, 9001)]
FULL_LINEAR = [(65536, 64, 1000)]  # (N, D, C)
QUICK_LINEAR = [(512, 16, 10)]
DTYPES = (np.float32, np.float64)
OURS = {"numba", "numba_inplace", "softgrad[numba]", "softgrad[numba]+out", "softgrad[numba]+kept", "numpy_ref"}
# Untimed rounds over every implementation before the timed ones (the gate's call is
# another untimed one).
WARMUP = 1
# Gate: rtol, and atol relative to the largest reference entry.
GATE = {np.dtype(np.float32): (1e-4, 1e-6), np.dtype(np.float64): (1e-9, 1e-12)}


# ----------------------------------------------------------------------------- floors
def _exp_kernels():
    import numba

    from softgrad._kernels._numba import _exp

    # not cached: Numba's cache would not notice a change of _exp in another file
    @numba.njit(parallel=True)
    def exp_rows(src, dst):
        for i in numba.prange(src.shape[0]):
            for k in range(src.shape[1]):
                dst[i, k] = _exp(src[i, k])

    @numba.njit
    def exp_block(x, out, reps):
        for _ in range(reps):
            for k in range(x.shape[0]):
                out[k] = _exp(x[k])

    return exp_rows, exp_block


def _exp_arith_ms(dtype, n_elements, threads, exp_block):
    """Time of the exp arithmetic alone: rate on a 16 KiB block (in L1), scaled."""
    x = -np.linspace(0.0, 20.0, 16384 // np.dtype(dtype).itemsize).astype(dtype)
    out = np.empty_like(x)
    reps = 2000
    exp_block(x, out, 1)
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        exp_block(x, out, reps)
        best = min(best, time.perf_counter() - start)
    ns_per_elem = best / (reps * x.size) * 1e9
    return ns_per_elem * n_elements / threads / 1e6, ns_per_elem


# ----------------------------------------------------------------------------- softmax
def _softmax_impls(x, peers):
    out = np.empty_like(x)
    api_out = np.empty_like(x)
    impls = {
        "numba": lambda: (NB.softmax(x, out), out)[1],
        "softgrad[numba]": lambda: softgrad.softmax(x),
        "softgrad[numba]+out": lambda: softgrad.softmax(x, out=api_out),
        "numpy_ref": lambda: (REF.softmax(x, out), out)[1],
    }

    def cs231n():
        e = np.exp(x - x.max(axis=1, keepdims=True))
        e /= e.sum(axis=1, keepdims=True)
        return e

    impls["cs231n"] = cs231n
    if "scipy" in peers:
        impls["scipy"] = lambda: peers["scipy"].softmax(x, axis=1)
    if "torch" in peers:
        torch = peers["torch"]
        xt = torch.from_numpy(x)
        impls["torch"] = lambda: torch.softmax(xt, dim=1).numpy()
    return impls


# ----------------------------------------------------------------------------- loss + grad
def _loss_grad_impls(x, y, peers):
    N, C = x.shape
    rows = np.arange(N)
    scale = np.full(N, 1.0 / N)
    loss_rows = np.empty(N)
    grad = np.empty_like(x)
    api_grad = np.empty_like(x)
    work = x.copy()  # the in-place variant overwrites this with its gradient every call

    def ours(kernels, g):
        def run():
            kernels.cross_entropy_index(g if g is work else x, y, None, -100, 0.0, scale, loss_rows, g)
            return loss_rows.sum() / N, g
        return run

    impls = {
        "numba": ours(NB, grad),
        "numba_inplace": ours(NB, work),
        "softgrad[numba]": lambda: softgrad.softmax_cross_entropy(x, y),
        "softgrad[numba]+out": lambda: softgrad.softmax_cross_entropy(x, y, grad_out=api_grad),
        "numpy_ref": ours(REF, grad),
    }

    def cs231n():
        shifted = x - x.max(axis=1, keepdims=True)
        p = np.exp(shifted)
        p /= p.sum(axis=1, keepdims=True)
        loss = -np.log(p[rows, y]).sum() / N
        p[rows, y] -= 1
        p /= N
        return loss, p

    impls["cs231n"] = cs231n
    if "scipy" in peers:
        def scipy_ls():
            logp = peers["scipy"].log_softmax(x, axis=1)
            loss = -logp[rows, y].sum() / N
            g = np.exp(logp)
            g[rows, y] -= 1
            g /= N
            return loss, g
        impls["scipy"] = scipy_ls
    if "torch" in peers:
        torch = peers["torch"]
        F = torch.nn.functional
        yt = torch.from_numpy(y)

        def torch_ce():
            xt = torch.from_numpy(x).requires_grad_()
            loss = F.cross_entropy(xt, yt)
            loss.backward()
            return loss.item(), xt.grad.numpy()
        impls["torch"] = torch_ce
    if "sklearn_loss" in peers:
        hml = peers["sklearn_loss"]()
        y_float = y.astype(x.dtype)
        sw = np.full(N, 1.0 / N, dtype=x.dtype)
        lo, go = np.empty(N, dtype=x.dtype), np.empty_like(x)
        threads = peers["threads"]

        def sk():
            loss, g = hml.loss_gradient(y_float, x, sample_weight=sw, loss_out=lo, gradient_out=go,
                                        n_threads=threads)
            return float(loss.sum(dtype=np.float64)), g
        impls["sklearn"] = sk
    return impls, work


def _reference_loss_grad(x, y):
    x64 = x.astype(np.float64)
    N = x.shape[0]
    loss_rows, g = np.empty(N), np.empty_like(x64)
    REF.cross_entropy_index(x64, y, None, -100, 0.0, np.full(N, 1.0 / N), loss_rows, g)
    return loss_rows.sum() / N, g


# ----------------------------------------------------------------------------- runner
def _gate(name, actual, expected, dtype):
    rtol, atol_rel = GATE[np.dtype(dtype)]
    atol = atol_rel * float(np.abs(expected).max())
    _harness.check_close(name, actual, expected, rtol=rtol, atol=atol)


def _time_interleaved(fns, repeats, warmup=WARMUP):
    """Time every callable of ``fns`` in rounds (one call of each per round, order rotating).

    On a shared machine the load changes over seconds to minutes; interleaving gives
    every implementation the same conditions, so their ratios stay meaningful.
    Returns ``name -> {median_ms, p20_ms, p80_ms, runs}``.
    """
    names = list(fns)
    samples = {name: [] for name in names}
    for r in range(warmup + repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            start = time.perf_counter()
            fns[name]()
            elapsed = time.perf_counter() - start
            if r >= warmup:
                samples[name].append(1e3 * elapsed)
    return {name: {"median_ms": statistics.median(ms), "p20_ms": float(np.percentile(ms, 20)),
                   "p80_ms": float(np.percentile(ms, 80)), "runs": len(ms)} for name, ms in samples.items()}


def _gate_all(op, label, impls, reference, dtype, rows, base, prepare=None):
    """Run each implementation once against `reference`; return those that pass."""
    passed = {}
    for name, fn in impls.items():
        try:
            if prepare is not None:
                prepare(name)
            result = fn()
            if isinstance(reference, tuple):
                _gate(f"{op} {name} loss", result[0], reference[0], dtype)
                _gate(f"{op} {name} grad", result[1], reference[1], dtype)
            else:
                _gate(f"{op} {name}", result, reference, dtype)
            del result
        except AssertionError as exc:
            if name in OURS:
                raise
            rows.append({**base, "impl": name, "failed": str(exc).splitlines()[0][:200]})
            print(f"{op:9s} {label:>14s} {base['dtype']:7s} {name:16s} WRONG ANSWER, not timed")
            continue
        passed[name] = fn
    return passed


def _floor_fns(x, exp_rows):
    """The copy, the two exps (ours, NumPy's) on the shifted logits into one buffer, and logsumexp."""
    out = np.empty_like(x)
    lse = np.empty(x.shape[0], dtype=x.dtype)
    shifted = x - x.max(axis=1, keepdims=True)
    exp_rows(shifted, out)
    np.testing.assert_allclose(out, np.exp(shifted.astype(np.float64)), rtol=GATE[x.dtype][0], atol=1e-30)
    NB.logsumexp(x, lse)
    expected = np.empty(x.shape[0])
    REF.logsumexp(x.astype(np.float64), expected)
    _gate("logsumexp floor", lse, expected, x.dtype)
    return {
        "copy": lambda: np.copyto(out, x),
        "copy_fresh": lambda: x.copy(),
        "exp[softgrad]": lambda: exp_rows(shifted, out),
        "exp[numpy]": lambda: np.exp(shifted, out=out),
        "logsumexp": lambda: NB.logsumexp(x, lse),
    }


class _KeptFreedMemory:
    """glibc's malloc keeps freed memory while active (``mallopt``); ``available`` is False elsewhere.

    ``M_MMAP_MAX = 0`` serves every block from the heap, ``M_TRIM_THRESHOLD`` = 1 GiB keeps
    freed heap memory mapped. On exit the defaults are set back (128 KiB, 65536) and
    ``malloc_trim(0)`` returns what was kept.
    """

    _M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4

    def __init__(self):
        import ctypes
        import ctypes.util

        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            self._mallopt, self._trim = libc.mallopt, libc.malloc_trim
        except (OSError, AttributeError):
            self._mallopt = None
        self.available = self._mallopt is not None

    def __enter__(self):
        ok = self._mallopt(self._M_MMAP_MAX, 0) and self._mallopt(self._M_TRIM_THRESHOLD, 1 << 30)
        if not ok:
            raise RuntimeError("mallopt refused the settings")
        return self

    def __exit__(self, *exc):
        self._mallopt(self._M_TRIM_THRESHOLD, 128 * 1024)
        self._mallopt(self._M_MMAP_MAX, 65536)
        self._trim(0)


def _bench_one(rows, op, shape, dtype, impls, reference, floor_fns, exp_arith, repeats, prepare=None):
    """Gate every implementation on `reference`, then time them all interleaved; append rows.

    Then, where glibc's ``mallopt`` is available, the fresh-result API call and the fresh
    copy again (with the copy, interleaved) while freed memory is kept: the ``+kept`` rows.
    """
    N, C = shape
    nbytes = 2 * N * C * np.dtype(dtype).itemsize  # one read + one write of the array
    base = {"op": op, "shape": f"{N}x{C}", "N": N, "C": C, "dtype": np.dtype(dtype).name}
    passed = _gate_all(op, base["shape"], impls, reference, dtype, rows, base, prepare)
    timings = _time_interleaved({**passed, **floor_fns}, repeats)
    exp_name = min(("exp[softgrad]", "exp[numpy]"), key=lambda n: timings[n]["median_ms"])
    timings["exp"] = {**timings[exp_name], "exp_impl": exp_name}
    timings["exp_arith"] = exp_arith
    kept = _KeptFreedMemory()
    names = list(passed) + ["copy", "copy_fresh", "exp", "exp_arith", "logsumexp"]
    if kept.available and "softgrad[numba]" in passed:
        with kept:
            again = _time_interleaved({"softgrad[numba]+kept": passed["softgrad[numba]"],
                                       "copy_fresh+kept": floor_fns["copy_fresh"], "copy+kept": floor_fns["copy"]},
                                      repeats)
        # their x_copy is taken against the copy timed in the same rounds
        for name in ("softgrad[numba]+kept", "copy_fresh+kept"):
            timings[name] = {**again[name], "copy_ms_same_run": again["copy+kept"]["median_ms"]}
        names += ["softgrad[numba]+kept", "copy_fresh+kept"]
    for name in names:
        t = timings[name]
        gbps = None if name == "exp_arith" else nbytes / (t["median_ms"] * 1e-3) / 1e9
        rows.append({**base, "impl": name, **t, "gbps": gbps})
        print(f"{op:9s} {base['shape']:>14s} {base['dtype']:7s} {name:16s} {t['median_ms']:9.2f} ms", flush=True)


def _linear_rows(rows, shapes, dtypes, repeats, peers):
    for (N, D, C) in shapes:
        for dtype in dtypes:
            rng = np.random.default_rng(1)
            X = rng.normal(size=(N, D)).astype(dtype)
            y = rng.integers(0, C, size=N)
            W = (rng.normal(size=(C, D)) * 0.1).astype(dtype)  # (C, D), the classifier's coef_ layout
            b = (rng.normal(size=C) * 0.1).astype(dtype)
            alpha = 1e-3
            J_ref, gW_ref, gb_ref = _linear_model.objective_reference(W, b, X, y, None, alpha)
            work, loss_rows, r = np.empty((N, C), dtype=dtype), np.empty(N), np.full(N, 1.0 / N)

            def ours(backend):
                def run():
                    with softgrad.use_backend(backend):
                        J, gW, gb = _linear_model.objective_and_gradient(W, b, X, y, r, alpha, work, loss_rows)
                    return J, np.concatenate([gW.ravel(), gb])
                return run

            impls = {"numba": ours("numba"), "numpy_ref": ours("numpy")}
            if "sklearn_linear" in peers:
                LinearModelLoss, HalfMultinomialLoss = peers["sklearn_linear"]
                lml = LinearModelLoss(base_loss=HalfMultinomialLoss(n_classes=C), fit_intercept=True)
                coef = np.ascontiguousarray(np.hstack([W, b[:, None]]))  # (C, D + 1), intercept last
                y_float = y.astype(dtype)

                def sk():
                    J, g = lml.loss_gradient(coef, X, y_float, l2_reg_strength=alpha, n_threads=peers["threads"])
                    g = g.reshape(C, D + 1)
                    return J, np.concatenate([g[:, :D].ravel(), g[:, D]])
                impls["sklearn"] = sk
            reference = (J_ref, np.concatenate([gW_ref.ravel(), gb_ref]))
            base = {"op": "linear", "shape": f"{N}x{D}x{C}", "N": N, "D": D, "C": C,
                    "dtype": np.dtype(dtype).name}
            passed = _gate_all("linear", base["shape"], impls, reference, dtype, rows, base)
            for name, t in _time_interleaved(passed, repeats).items():
                rows.append({**base, "impl": name, **t})
                print(f"linear    {base['shape']:>14s} {base['dtype']:7s} {name:16s} {t['median_ms']:9.2f} ms",
                      flush=True)


def _add_ratios(rows):
    groups = {}
    for r in rows:
        groups.setdefault((r["op"], r["shape"], r["dtype"]), []).append(r)
    for group in groups.values():
        by = {r["impl"]: r for r in group if "median_ms" in r}
        for r in group:
            if "median_ms" not in r:
                continue
            if "copy_ms_same_run" in r:  # the +kept rows: timed in their own rounds
                r["x_copy"] = r["median_ms"] / r["copy_ms_same_run"]
                continue
            for floor in ("copy", "copy_fresh", "exp"):
                if floor in by:
                    r[f"x_{floor}"] = r["median_ms"] / by[floor]["median_ms"]
            if "numba" in by and r["impl"] not in ("numba",):
                r["numba_speedup"] = r["median_ms"] / by["numba"]["median_ms"]


def _peers():
    peers = {}
    try:
        import scipy.special

        peers["scipy"] = scipy.special
    except ImportError:
        pass
    try:
        import torch

        peers["torch"] = torch
    except ImportError:
        pass
    try:
        from sklearn._loss.loss import HalfMultinomialLoss
        from sklearn.linear_model._linear_loss import LinearModelLoss

        peers["sklearn_loss"] = HalfMultinomialLoss
        peers["sklearn_linear"] = (LinearModelLoss, HalfMultinomialLoss)
    except ImportError:
        pass
    return peers


def run(shapes, linear_shapes, dtypes, repeats):
    import numba

    threads = numba.get_num_threads()
    peers = _peers()
    peers["threads"] = threads
    if "torch" in peers:
        peers["torch"].set_num_threads(threads)
    exp_rows, exp_block = _exp_kernels()
    rows = []
    with softgrad.use_backend("numba"):
        for shape in shapes:
            for dtype in dtypes:
                rng = np.random.default_rng(0)
                x = (rng.standard_normal(size=shape, dtype=np.float32) * 3).astype(dtype)
                y = rng.integers(0, shape[1], size=shape[0])
                floor_fns = _floor_fns(x, exp_rows)
                ms, ns = _exp_arith_ms(x.dtype, x.size, threads, exp_block)
                exp_arith = {"median_ms": ms, "p20_ms": ms, "p80_ms": ms, "runs": 5, "ns_per_elem_per_thread": ns}

                ref = np.empty(shape, dtype=np.float64)
                REF.softmax(x.astype(np.float64), ref)
                _bench_one(rows, "softmax", shape, dtype, _softmax_impls(x, peers), ref, floor_fns, exp_arith,
                           repeats)
                del ref

                reference = _reference_loss_grad(x, y)
                impls, work = _loss_grad_impls(x, y, peers)

                def prepare(name, work=work, x=x):
                    if name == "numba_inplace":
                        np.copyto(work, x)  # the gate sees the gradient of the real logits

                _bench_one(rows, "loss+grad", shape, dtype, impls, reference, floor_fns, exp_arith, repeats,
                           prepare)
                del reference, impls, work, x, floor_fns
    _linear_rows(rows, linear_shapes, dtypes, repeats, peers)
    _add_ratios(rows)
    return rows, threads


def _targets(rows):
    """The issue's targets, per shape and dtype: met or not, with the numbers."""
    out = []
    by = {(r["op"], r["shape"], r["dtype"], r["impl"]): r for r in rows if "median_ms" in r}
    for (op, shape, dtype, impl), r in sorted(by.items()):
        if impl != "numba" or op == "linear":
            continue
        entry = {"op": op, "shape": shape, "dtype": dtype, "x_copy": r.get("x_copy"), "x_exp": r.get("x_exp")}
        # the public functions: <= 1.5x the copy with a fresh result, <= 1.3x with out=/grad_out=
        api = by.get((op, shape, dtype, "softgrad[numba]"), {}).get("x_copy")
        api_out = by.get((op, shape, dtype, "softgrad[numba]+out"), {}).get("x_copy")
        api_fresh = by.get((op, shape, dtype, "softgrad[numba]"), {}).get("x_copy_fresh")
        entry["api_x_copy"], entry["api_out_x_copy"], entry["api_x_copy_fresh"] = api, api_out, api_fresh
        entry["copy_fresh_x_copy"] = by.get((op, shape, dtype, "copy_fresh"), {}).get("x_copy")
        api_kept = by.get((op, shape, dtype, "softgrad[numba]+kept"), {}).get("x_copy")
        entry["api_kept_x_copy"] = api_kept
        entry["logsumexp_x_copy"] = by.get((op, shape, dtype, "logsumexp"), {}).get("x_copy")
        entry["api_le_1p5x_copy"] = None if api is None else api <= 1.5
        # with freed memory kept, a fresh result costs what out= costs
        entry["api_kept_le_1p5x_copy"] = None if api_kept is None else api_kept <= 1.5
        # a fresh result cannot beat a fresh copy: the same target against that floor
        entry["api_le_1p5x_copy_fresh"] = None if api_fresh is None else api_fresh <= 1.5
        entry["api_out_le_1p3x_copy"] = None if api_out is None else api_out <= 1.3
        if op == "softmax":
            entry["softmax_le_2x_copy"] = r.get("x_copy", math.inf) <= 2.0
        else:
            numpy_peers = [by[(op, shape, dtype, p)]["median_ms"] for p in ("numpy_ref", "cs231n", "scipy")
                           if (op, shape, dtype, p) in by]
            best_numpy = min(numpy_peers) if numpy_peers else None
            torch_t = by.get((op, shape, dtype, "torch"), {}).get("median_ms")
            entry["loss_grad_le_2p5x_copy"] = r.get("x_copy", math.inf) <= 2.5
            entry["vs_best_numpy"] = None if best_numpy is None else best_numpy / r["median_ms"]
            entry["ge_3x_best_numpy"] = None if best_numpy is None else best_numpy / r["median_ms"] >= 3.0
            entry["vs_torch"] = None if torch_t is None else torch_t / r["median_ms"]
            entry["ge_8x_torch"] = None if torch_t is None else torch_t / r["median_ms"] >= 8.0
        out.append(entry)
    return out


def _chart(rows, path):
    import matplotlib.pyplot as plt

    keys = []
    for r in rows:
        if r["op"] != "linear" and "median_ms" in r and (r["op"], r["shape"], r["dtype"]) not in keys:
            keys.append((r["op"], r["shape"], r["dtype"]))
    ncols = 2
    nrows = max(1, math.ceil(len(keys) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(13, 3.2 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        rs = [r for r in rows if (r["op"], r["shape"], r["dtype"]) == key and "median_ms" in r]
        copy = next((r["median_ms"] for r in rs if r["impl"] == "copy"), None)
        floors = ("copy", "copy_fresh", "exp", "exp_arith", "logsumexp", "copy_fresh+kept")
        colors = ["tab:green" if r["impl"] in OURS else "tab:gray" if r["impl"] in floors else "tab:blue"
                  for r in rs]
        ax.barh([r["impl"] for r in rs], [r["median_ms"] for r in rs], color=colors)
        for i, r in enumerate(rs):
            ratio = f" ({r['median_ms'] / copy:.1f}x copy)" if copy else ""
            ax.text(r["median_ms"], i, f" {r['median_ms']:.1f} ms{ratio}", va="center", fontsize=7)
        ax.set_title(f"{key[0]}  {key[1]}  {key[2]}", fontsize=9)
        ax.set_xlabel("median time (ms)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.invert_yaxis()
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


_MD_COLUMNS = [("copy", "copy"), ("copy_fresh", "fresh copy"), ("exp", "exp floor"),
               ("logsumexp", "logsumexp floor"), ("numba", "**numba kernel**"),
               ("numba_inplace", "numba in place"), ("softgrad[numba]", "`softgrad.*` API"),
               ("softgrad[numba]+out", "`softgrad.*` API, `out=`"),
               ("softgrad[numba]+kept", "`softgrad.*` API, freed memory kept"),
               ("numpy_ref", "NumPy reference"), ("cs231n", "CS231n NumPy"), ("scipy", "SciPy"),
               ("torch", "PyTorch"), ("sklearn", "scikit-learn")]


def markdown(payload: dict) -> str:
    """README tables (one per dtype) from a results payload: median ms, ours with the ratio to the copy."""
    rows = [r for r in payload["rows"] if "median_ms" in r and r["op"] != "linear"]
    lines = []
    for dtype in sorted({r["dtype"] for r in rows}, key=lambda d: d != "float32"):
        cols = [(k, h) for k, h in _MD_COLUMNS if any(r["impl"] == k and r["dtype"] == dtype for r in rows)]
        lines += [f"{dtype}, median ms (kernels and `softgrad.*` API: x copy time)", "",
                  "| op | N x C | " + " | ".join(h for _, h in cols) + " |",
                  "|---|---|" + "---:|" * len(cols)]
        keys = []
        for r in rows:
            if r["dtype"] == dtype and (r["op"], r["shape"]) not in keys:
                keys.append((r["op"], r["shape"]))
        for op, shape in keys:
            by = {r["impl"]: r for r in rows if (r["op"], r["shape"], r["dtype"]) == (op, shape, dtype)}
            cells = []
            for k, _ in cols:
                if k not in by:
                    cells.append("-")
                    continue
                cell = f"{by[k]['median_ms']:.0f}" if by[k]["median_ms"] >= 10 else f"{by[k]['median_ms']:.1f}"
                if k in ("numba", "numba_inplace", "softgrad[numba]", "softgrad[numba]+out", "softgrad[numba]+kept",
                         "copy_fresh", "logsumexp") \
                        and "x_copy" in by[k]:
                    suffix = ""
                    if k == "softgrad[numba]" and "x_copy_fresh" in by[k]:
                        suffix = f"; {by[k]['x_copy_fresh']:.2f}x fresh"
                    elif "copy_ms_same_run" in by[k]:  # timed in its own rounds, against their copy
                        suffix = f" of {by[k]['copy_ms_same_run']:.0f}"
                    cell += f" ({by[k]['x_copy']:.2f}x{suffix})"
                cells.append(cell)
            lines.append(f"| {op} | {shape.replace('x', ' x ')} | " + " | ".join(cells) + " |")
        lines.append("")
    linear = [r for r in payload["rows"] if r["op"] == "linear" and "median_ms" in r]
    if linear:
        lines += ["linear model objective + gradient (N x D x C), median ms", "",
                  "| dtype | N x D x C | numba backend | NumPy backend | scikit-learn `LinearModelLoss` |",
                  "|---|---|---:|---:|---:|"]
        for dtype in sorted({r["dtype"] for r in linear}, key=lambda d: d != "float32"):
            for shape in sorted({r["shape"] for r in linear if r["dtype"] == dtype}):
                by = {r["impl"]: r for r in linear if (r["dtype"], r["shape"]) == (dtype, shape)}
                cells = [f"{by[k]['median_ms']:.0f}" if k in by else "-" for k in ("numba", "numpy_ref", "sklearn")]
                lines.append(f"| {dtype} | {shape.replace('x', ' x ')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--markdown", metavar="JSON", help="print the README tables of a results file and exit")
    parser.add_argument("--quick", action="store_true", help="small shapes, results to a temporary directory")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per implementation")
    parser.add_argument("--dtype", choices=["float32", "float64"], action="append",
                        help="restrict to this dtype (repeatable)")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="folder for the JSON and PNG [default: benchmarks/results; a temporary folder with --quick]")
    args = parser.parse_args(argv)
    if args.markdown:
        import json

        print(markdown(json.loads(Path(args.markdown).read_text())))
        return None
    dtypes = tuple(np.dtype(d).type for d in args.dtype) if args.dtype else DTYPES
    if args.quick:
        shapes, linear, repeats = QUICK_SHAPES, QUICK_LINEAR, args.repeats or 2
        _harness.RESULTS_DIR = Path(args.out or tempfile.mkdtemp(prefix="softgrad_cpu_kernels_quick_"))
    else:
        shapes, linear, repeats = FULL_SHAPES, FULL_LINEAR, args.repeats or 7
        if args.out:
            _harness.RESULTS_DIR = Path(args.out)
    load_before = os.getloadavg()
    start = time.time()
    rows, threads = run(shapes, linear, dtypes, repeats)
    extra = {
        "quick": args.quick,
        "threads": threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "timing": f"interleaved rounds: {WARMUP} untimed, then --repeats timed; one call of each per round",
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "wall_s": time.time() - start,
        "targets": _targets(rows),
    }
    _harness.print_table(rows, ["op", "shape", "dtype", "impl", "median_ms", "p20_ms", "p80_ms", "gbps",
                                "x_copy", "x_exp", "numba_speedup", "failed"])
    if args.quick:
        # the targets are stated for the full shapes; small quick shapes are not meant to meet them
        print("\ntargets: not evaluated for the --quick shapes (they apply to the full shapes)")
    else:
        print("\ntargets:")
        for t in extra["targets"]:
            print("  " + ", ".join(f"{k}={_harness._fmt(v)}" for k, v in t.items()))
    print(f"load average before {load_before}, after {extra['load_average_after']}")
    path = _harness.write_results("bench_cpu_kernels", rows, chart=_chart, extra=extra)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
