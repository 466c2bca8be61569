"""Shared fixtures: a per-test seeded generator, the dtype/tolerance table, backends, torch.

Triton kernels are exercised on CPU through its interpreter: ``TRITON_INTERPRET=1`` is
set here, before any test module imports triton, unless a CUDA device is present.
"""

from __future__ import annotations

import importlib.util
import os
import zlib

if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest

import softgrad

# (rtol, atol) for comparing a result computed in this dtype against a float64 reference.
TOLERANCES = {
    np.dtype(np.float64): (1e-10, 1e-12),
    np.dtype(np.float32): (2e-5, 1e-6),
    np.dtype(np.float16): (5e-3, 1e-3),
}
FLOAT_DTYPES = (np.float64, np.float32, np.float16)

HAS_TORCH = importlib.util.find_spec("torch") is not None
requires_torch = pytest.mark.skipif(not HAS_TORCH, reason="PyTorch is not installed")


def tolerance(dtype) -> dict:
    """``rtol``/``atol`` keyword arguments for ``np.testing.assert_allclose`` at ``dtype``."""
    rtol, atol = TOLERANCES[np.dtype(dtype)]
    return {"rtol": rtol, "atol": atol}


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A generator seeded from the test's node id: reproducible and distinct per test."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(params=softgrad.available_backends())
def backend(request):
    """Run the test once per importable backend (``numpy``, and ``numba`` once it lands)."""
    with softgrad.use_backend(request.param):
        yield request.param


@pytest.fixture
def torch():
    """The ``torch`` module, or a skip when PyTorch is absent."""
    return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def world_of_one():
    """A gloo process group of this process alone, torn down after the module (``tests/distributed``).

    Defined here, not in ``tests/distributed/conftest.py``: a second ``conftest`` module would
    shadow this one for the tests that ``from conftest import tolerance``.
    """
    dist = pytest.importorskip("torch.distributed")
    if dist.is_initialized():
        pytest.skip("a default process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()
