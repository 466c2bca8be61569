"""``softgrad.torch._settings``: the kernel setting is marked constant for Dynamo without importing it early."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("torch")


def test_the_marker_is_the_one_torchs_decorator_sets(monkeypatch):
    import torch

    from softgrad.torch import _settings

    def marked_by_torch():
        return "x"

    def marked_by_us():
        return "x"

    before = set(vars(marked_by_torch))
    torch.compiler.assume_constant_result(marked_by_torch)
    set_by_torch = {k: v for k, v in vars(marked_by_torch).items() if k not in before}
    assert set_by_torch, "torch's assume_constant_result no longer sets an attribute; update _settings"
    monkeypatch.delitem(sys.modules, "torch._dynamo")  # the branch taken before Dynamo is loaded
    assert _settings._assume_constant_result(marked_by_us) is marked_by_us
    assert vars(marked_by_us) == set_by_torch
    assert {k: getattr(_settings._get_kernel_for_tracing, k, None) for k in set_by_torch} == set_by_torch


def test_import_does_not_load_dynamo():
    code = "import sys, softgrad.torch; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
