"""The distributed benchmark runs end to end in its --quick mode (2 processes; numbers meaningless, code paths real)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))  # in this process and in the ranks it spawns

import bench_distributed  # noqa: E402


def test_distributed_benchmark_quick_mode_end_to_end():
    # correctness gates, timing, collective replay, byte counts, all-reduce fit, JSON and PNG in a temp dir;
    # in this process (saves an interpreter start), the ranks spawned as the script spawns them
    results_dir = bench_distributed._harness.RESULTS_DIR
    try:
        written = Path(bench_distributed.main(["--quick", "--repeats", "1"]))
    finally:
        bench_distributed._harness.RESULTS_DIR = results_dir
    assert written.parent != ROOT / "benchmarks" / "results"
    assert written.with_suffix(".png").exists()
    payload = json.loads(written.read_text())
    assert payload["quick"] is True and payload["backend"] == "gloo"
    steps = {r["op"]: r for r in payload["rows"] if r["op"] != "allreduce" and r["world"] == 2}
    assert set(steps) == {"vocab_ce", "vocab_linear", "dp_fit"}
    n, v, d = (payload["config"][k] for k in ("n", "v", "d"))
    # the byte counts of docs/DISTRIBUTED.md: 2 P + 16 int64, then N and 4N float32 (label smoothing on)
    meta = (2 * 2 + 16) * 8
    assert steps["vocab_ce"]["bytes_per_rank"] == meta + n * 4 + 4 * n * 4
    n_lin = payload["config"]["n_lin"]
    assert steps["vocab_linear"]["bytes_per_rank"] == meta + n_lin * 4 + 2 * n_lin * 4 + n_lin * d * 4
    assert all(r["median_ms"] > 0 and r["comm_ms"] >= 0 for r in steps.values())
    assert {r["world"] for r in payload["rows"] if r["op"] == "vocab_ce"} == {1, 2}
    assert steps["dp_fit"]["evaluations"] >= steps["dp_fit"]["n_iter"]
    assert "2" in payload["allreduce_model"]
    assert {r["bytes"] for r in payload["rows"] if r["op"] == "allreduce"} >= {8, 2048}
    table = bench_distributed.project(payload, worlds=(2, 8, 1024))
    assert "| vocab_ce | 1024 |" in table and "| dp_fit | 2 |" in table


def test_scaling_model_formulas():
    a, b = 1e-4, 1e-9
    assert bench_distributed.ring_allreduce_s(1, 1e6, a, b) == 0.0
    assert bench_distributed.ring_allreduce_s(4, 1e6, a, b) == pytest.approx(6 * a + 1.5e6 * b)
    assert bench_distributed.tree_allreduce_s(1024, 1e6, a, b) == pytest.approx(20 * a + 2e6 * b)
    cfg = {"n": 10, "n_lin": 5, "d": 3, "c_fit": 4, "d_fit": 2}
    assert bench_distributed.step_collectives("vocab_ce", cfg, 2) == [("all_reduce", 160), ("all_reduce", 40),
                                                                      ("all_reduce", 160)]
    assert bench_distributed.step_collectives("dp_fit", cfg, 2, evaluations=3) == [("all_reduce", 8 * 13)] * 3
