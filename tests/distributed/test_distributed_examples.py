"""``examples/train_data_parallel.py`` runs under ``torchrun`` with 2 processes and matches one process.

(``examples/train_vocab_parallel.py`` runs inside the spawned worlds of ``test_distributed_multiprocess.py``.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_data_parallel_example_under_torchrun_matches_one_process():
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    # --standalone: torchrun's rendezvous picks a free local port itself
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(EXAMPLES / "train_data_parallel.py"), "--check", "--timeout", "30"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "2 rank(s), training rows per rank [630, 629]" in out.stdout
    assert "agrees to 1e-8" in out.stdout
    accuracy = float(out.stdout.split("test accuracy")[1].split()[0])
    assert accuracy > 0.9
