"""Backend choice (default, override, fallback without Numba) and thread limits.

Process-wide behaviour (the default backend, the fallback warning, environment
variables, joblib workers) is checked in fresh subprocesses, so the tests cannot
see each other's state.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import softgrad
from softgrad import _backend

HAS_NUMBA = importlib.util.find_spec("numba") is not None
requires_numba = pytest.mark.skipif(not HAS_NUMBA, reason="Numba is not installed")

# Blocks `import numba` as if it were not installed.
_BLOCK_NUMBA = textwrap.dedent("""
    import importlib.abc, sys
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "numba" or name.startswith("numba."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, _Block())
""")


def _run(code: str, **env_extra) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("SOFTGRAD_BACKEND", "NUMBA_NUM_THREADS")}
    env.update(env_extra)
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


# ----------------------------------------------------------------------------- choice
@requires_numba
def test_default_is_numba_when_it_loads():
    out = _run("""
        import warnings; warnings.simplefilter("error")
        import softgrad
        print(softgrad.get_backend(), softgrad.available_backends())
    """)
    assert out.stdout.split("\n")[0] == "numba ['numpy', 'numba']"


def test_environment_variable_selects_the_backend():
    out = _run("import softgrad; print(softgrad.get_backend())", SOFTGRAD_BACKEND="NumPy")
    assert out.stdout.strip() == "numpy"
    bad = subprocess.run([sys.executable, "-c", "import softgrad; softgrad.softmax([1.0])"],
                         env={**os.environ, "SOFTGRAD_BACKEND": "cuda"}, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode != 0 and "SOFTGRAD_BACKEND='cuda' is not a backend" in bad.stderr


def test_without_numba_falls_back_with_one_truthful_warning():
    out = _run(_BLOCK_NUMBA + textwrap.dedent("""
        import sys, warnings
        import numpy as np
        import softgrad
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            a = softgrad.softmax([0.0, 0.0])
            loss, grad = softgrad.softmax_cross_entropy(np.zeros((2, 4)), [1, 3])
        assert a.tolist() == [0.5, 0.5] and abs(float(loss) - np.log(4)) < 1e-15
        assert softgrad.get_backend() == "numpy" and softgrad.available_backends() == ["numpy"]
        assert "numba" not in sys.modules
        print(len(caught)); print(caught[0].message)
    """))
    count, message = out.stdout.strip().split("\n", 1)
    assert count == "1"
    assert "numba is not installed" in message and "softgrad[fast]" in message


@requires_numba
def test_numba_installed_but_failing_says_so():
    out = _run("""
        import warnings
        import numba
        def broken(*args, **kwargs):
            raise RuntimeError("no LLVM for this CPU")
        numba.njit = broken
        import softgrad
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            softgrad.softmax([1.0, 2.0]); softgrad.softmax([1.0, 2.0])
        print(len(caught)); print(caught[0].message)
    """)
    count, message = out.stdout.strip().split("\n", 1)
    assert count == "1"
    assert "not installed" not in message
    assert "the numba backend failed to load (RuntimeError: no LLVM for this CPU)" in message
    assert "SOFTGRAD_BACKEND=numpy" in message


def test_set_backend_and_use_backend():
    before = softgrad.get_backend()
    for name in softgrad.available_backends():
        with softgrad.use_backend(name):
            assert softgrad.get_backend() == name
            np.testing.assert_allclose(softgrad.softmax([0.0, np.log(3.0)]), [0.25, 0.75], rtol=1e-15)
        assert softgrad.get_backend() == before
    with pytest.raises(ValueError, match="backend must be one of"):
        softgrad.set_backend("cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        softgrad.set_backend(None)
    assert softgrad.get_backend() == before


def test_use_backend_is_local_to_the_thread():
    """Two threads in different use_backend blocks each see their own; the process default is untouched."""
    import threading

    before = softgrad.get_backend()
    seen, errors = {}, []
    barrier = threading.Barrier(2)

    def worker(name):
        try:
            with softgrad.use_backend(name):
                barrier.wait(timeout=10)  # both blocks are open at once
                seen[name] = [softgrad.get_backend() for _ in range(100)]
                barrier.wait(timeout=10)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    names = ["numpy", "numba" if "numba" in softgrad.available_backends() else "numpy"]
    threads = [threading.Thread(target=worker, args=(n,)) for n in dict.fromkeys(names)]
    if len(threads) == 1:
        threads.append(threading.Thread(target=worker, args=("numpy",)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for name, values in seen.items():
        assert set(values) == {name}
    assert softgrad.get_backend() == before


def test_use_backend_restores_after_an_exception_and_nests():
    before = softgrad.get_backend()
    with pytest.raises(RuntimeError):
        with softgrad.use_backend("numpy"):
            raise RuntimeError("inside")
    assert softgrad.get_backend() == before
    with softgrad.use_backend("numpy"):
        for name in softgrad.available_backends():
            with softgrad.use_backend(name):
                assert softgrad.get_backend() == name
            assert softgrad.get_backend() == "numpy"


def test_set_backend_reports_a_module_that_fails(monkeypatch):
    monkeypatch.setitem(_backend._MODULES, "broken", "softgrad._no_such_kernels")
    with pytest.raises(ImportError):
        softgrad.set_backend("broken")
    assert "broken" not in softgrad.available_backends()


# ----------------------------------------------------------------------------- threads
@requires_numba
def test_threadpool_limits_make_the_kernels_single_threaded():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    import numba

    from softgrad._kernels import _numba  # noqa: F401 - registers the controller

    @numba.njit(parallel=True)
    def thread_ids(n):
        ids = np.empty(n, np.int64)
        for i in numba.prange(n):
            ids[i] = numba.get_thread_id()
        return ids

    info = [i for i in threadpoolctl.threadpool_info() if i["internal_api"] == "numba"]
    assert len(info) == 1 and info[0]["num_threads"] == numba.get_num_threads()
    before = numba.get_num_threads()
    with threadpoolctl.threadpool_limits(1):
        assert numba.get_num_threads() == 1
        assert set(thread_ids(64).tolist()) == {0}
        softgrad.softmax(np.zeros((64, 10)))  # and the kernels run under the limit
    with threadpoolctl.threadpool_limits(limits={"numba": 1}):
        assert numba.get_num_threads() == 1
    with threadpoolctl.threadpool_limits(10_000):  # more than launched: capped, no error
        assert numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS
    assert numba.get_num_threads() == before
    if numba.config.NUMBA_NUM_THREADS > 1:
        assert len(set(thread_ids(64).tolist())) > 1


@requires_numba
def test_numba_num_threads_is_respected():
    out = _run("""
        import numba, softgrad, threadpoolctl
        softgrad.softmax([[1.0, 2.0]])
        assert softgrad.get_backend() == "numba"
        print(numba.get_num_threads(),
              [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["internal_api"] == "numba"])
    """, NUMBA_NUM_THREADS="1")
    assert out.stdout.strip() == "1 [1]"


@requires_numba
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores to split between workers")
def test_joblib_workers_get_their_share_of_threads():
    # joblib's process workers set NUMBA_NUM_THREADS to cpu_count // n_jobs, which Numba
    # reads when it starts in the worker: two workers on two cores run one thread each.
    joblib = pytest.importorskip("joblib")
    out = _run("""
        import joblib
        def work():
            import numba, numpy as np, softgrad
            loss, grad = softgrad.softmax_cross_entropy(np.zeros((8, 5)), np.arange(8) % 5)
            return softgrad.get_backend(), numba.get_num_threads()
        got = joblib.Parallel(n_jobs=2, backend="loky")(joblib.delayed(work)() for _ in range(4))
        print(sorted(set(got)), joblib.cpu_count())
    """)
    got, cpus = out.stdout.strip().rsplit(" ", 1)
    assert joblib is not None and got == f"[('numba', {max(1, int(cpus) // 2)})]"


@requires_numba
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_forked_children_of_an_openmp_parent_compute_serially():
    # GNU OpenMP cannot start a parallel region after fork(); Numba would terminate the
    # child. Children of a parent that used the kernels run serial builds instead.
    out = _run("""
        import multiprocessing as mp
        import numpy as np, numba, softgrad
        from softgrad._kernels import _numba
        def work(i):
            z = np.arange(4.0) + i
            return softgrad.softmax(z).tolist(), _numba._FORKED_FROM_OPENMP
        if __name__ == "__main__":
            softgrad.softmax(np.zeros((64, 3)))  # the parent's threading layer is running
            with mp.get_context("fork").Pool(2) as pool:
                got = pool.map(work, range(3))
            want = [softgrad.softmax(np.arange(4.0) + i).tolist() for i in range(3)]
            assert [g for g, _ in got] == want, got
            print(numba.threading_layer(), sorted({f for _, f in got}))
    """)
    layer, flags = out.stdout.strip().split(" ", 1)
    assert flags == ("[True]" if layer == "omp" else "[False]")
