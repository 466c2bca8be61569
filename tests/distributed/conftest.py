"""Fixtures of the tests in this directory."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def world_of_one():
    """A gloo process group of this process alone, torn down after the module."""
    dist = pytest.importorskip("torch.distributed")
    if dist.is_initialized():
        pytest.skip("a default process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()
