"""The CPU kernel benchmark runs end to end in its --quick mode (numbers meaningless, code paths real)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_cpu_kernel_benchmark_quick_mode_end_to_end():
    # correctness gate, timing, floors, ratios, table, JSON and PNG; results go to a temp dir
    script = ROOT / "benchmarks" / "bench_cpu_kernels.py"
    out = subprocess.run([sys.executable, str(script), "--quick", "--repeats", "1", "--dtype", "float32"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    # the targets are for the full shapes: a quick run does not print a block of unmet ones
    assert "targets: not evaluated for the --quick shapes" in out.stdout
    assert "=False" not in out.stdout
    written = Path(out.stdout.strip().splitlines()[-1].removeprefix("wrote "))
    assert written.parent != ROOT / "benchmarks" / "results"
    payload = json.loads(written.read_text())
    assert written.with_suffix(".png").exists()
    timed = {(r["op"], r["impl"]) for r in payload["rows"] if "median_ms" in r}
    for op in ("softmax", "loss+grad"):
        assert {(op, name) for name in ("numba", "softgrad[numba]", "softgrad[numba]+out", "numpy_ref", "cs231n",
                                        "copy", "copy_fresh", "exp", "exp_arith")} <= timed
    assert ("loss+grad", "numba_inplace") in timed and ("linear", "numba") in timed
    assert {("softmax", "logsumexp"), ("loss+grad", "logsumexp")} <= timed
    if sys.platform.startswith("linux"):  # glibc: the fresh-result rows with freed memory kept
        kept = [r for r in payload["rows"] if r["impl"] in ("softgrad[numba]+kept", "copy_fresh+kept")]
        assert len(kept) == 2 * 2 * 2  # 2 rows x 2 ops x 2 quick shapes
        assert all(r["x_copy"] == r["median_ms"] / r["copy_ms_same_run"] > 0 for r in kept)
    peers = {name for _, name in timed}
    for module, name in (("scipy", "scipy"), ("torch", "torch"), ("sklearn", "sklearn")):
        if payload["provenance"].get(module):
            assert name in peers
    assert not [r for r in payload["rows"] if "failed" in r]
    numba_rows = [r for r in payload["rows"] if r["impl"] == "numba" and r["op"] != "linear"]
    assert all(r["x_copy"] > 0 for r in numba_rows)
    assert {t["op"] for t in payload["targets"]} == {"softmax", "loss+grad"}
    assert all(t["api_x_copy"] > 0 and t["api_out_x_copy"] > 0 and t["api_x_copy_fresh"] > 0
               for t in payload["targets"])
    from bench_cpu_kernels import markdown  # noqa: E402 - the README table has the API columns

    table = markdown(payload)
    assert "`softgrad.*` API, `out=`" in table and "`softgrad.*` API |" in table and "fresh copy" in table
    assert "logsumexp floor" in table
    assert payload["quick"] is True and len(payload["load_average_before"]) == 3


def test_softgrad_bench_runs_the_benchmark_script(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from softgrad.cli import _bench, main

    assert _bench._script() == ROOT / "benchmarks" / "bench_cpu_kernels.py"
    calls = []
    monkeypatch.setattr(_bench.subprocess, "call", lambda argv: calls.append(argv) or 0)
    result = CliRunner().invoke(main, ["bench", "--quick", "--repeats", "3", "--dtype", "float64"])
    assert result.exit_code == 0, result.output
    assert calls == [[sys.executable, str(_bench._script()), "--quick", "--repeats", "3", "--dtype", "float64"]]
    # a full run never writes the committed results unless --out says so
    calls.clear()
    monkeypatch.chdir(tmp_path)
    assert CliRunner().invoke(main, ["bench"]).exit_code == 0
    out = Path(calls[-1][calls[-1].index("--out") + 1])
    assert out.parent == tmp_path.resolve() / "runs" and out.name.startswith("bench-")
    assert CliRunner().invoke(main, ["bench", "--out", "mine"]).exit_code == 0
    assert calls[-1][-2:] == ["--out", str(tmp_path.resolve() / "mine")]
    monkeypatch.setattr(_bench.subprocess, "call", lambda argv: 3)
    assert CliRunner().invoke(main, ["bench"]).exit_code == 3
    monkeypatch.setattr(_bench, "_script", lambda: ROOT / "no_such_benchmark.py")
    missing = CliRunner().invoke(main, ["bench"])
    assert missing.exit_code == 1 and "not found" in missing.output
