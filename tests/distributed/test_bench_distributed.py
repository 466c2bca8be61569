"""The distributed benchmark runs end to end in its --quick mode (2 processes; numbers meaningless, code paths real)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[2]


def test_distributed_benchmark_quick_mode_end_to_end():
    # correctness gates, timing, collective replay, byte counts, all-reduce fit, JSON and PNG in a temp dir
    script = ROOT / "benchmarks" / "bench_distributed.py"
    out = subprocess.run([sys.executable, str(script), "--quick", "--repeats", "1"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    written = Path(out.stdout.strip().splitlines()[-1].removeprefix("wrote "))
    assert written.parent != ROOT / "benchmarks" / "results"
    assert written.with_suffix(".png").exists()
    payload = json.loads(written.read_text())
    assert payload["quick"] is True and payload["backend"] == "gloo"
    steps = {r["op"]: r for r in payload["rows"] if r["op"] != "allreduce"}
    assert set(steps) == {"vocab_ce", "vocab_linear", "dp_fit"}
    n, v, d = (payload["config"][k] for k in ("n", "v", "d"))
    # the byte counts of docs/DISTRIBUTED.md: 2 P + 16 int64, then N and 4N float32 (label smoothing on)
    meta = (2 * 2 + 16) * 8
    assert steps["vocab_ce"]["bytes_per_rank"] == meta + n * 4 + 4 * n * 4
    n_lin = payload["config"]["n_lin"]
    assert steps["vocab_linear"]["bytes_per_rank"] == meta + n_lin * 4 + 2 * n_lin * 4 + n_lin * d * 4
    assert all(r["world"] == 2 and r["median_ms"] > 0 and r["comm_ms"] >= 0 for r in steps.values())
    assert steps["dp_fit"]["evaluations"] >= steps["dp_fit"]["n_iter"]
    assert "2" in payload["allreduce_model"]
    assert {r["bytes"] for r in payload["rows"] if r["op"] == "allreduce"} >= {8, 2048}
