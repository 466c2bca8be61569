"""The classifier benchmark runs end to end in its --quick mode (numbers meaningless, code paths real)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_classifier_benchmark_quick_mode_end_to_end():
    # correctness gate, timing, floor, ratios, table, JSON and PNG; results go to a temp dir
    script = ROOT / "benchmarks" / "bench_classifier.py"
    out = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    written = Path(out.stdout.strip().splitlines()[-1].removeprefix("wrote "))
    assert written.parent != ROOT / "benchmarks" / "results"
    assert written.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    payload = json.loads(written.read_text())
    assert payload["quick"] is True and len(payload["load_average_before"]) == 3
    rows = {(r["problem"], r["impl"]): r for r in payload["rows"]}
    try:
        import sklearnex  # noqa: F401

        intel = {"sklearnex_lbfgs"}
    except ImportError:
        intel = set()
    dense = {"sklearn_lbfgs", "softgrad_lbfgs", "softgrad_logreg", "softgrad_lbfgs_f64", "softgrad_gd",
             "softgrad_sgd"} | intel
    lean = {"sklearn_lbfgs", "softgrad_lbfgs", "softgrad_logreg"} | intel
    assert set(rows) == ({(p, i) for p in ("digits", "synthetic") for i in dense}
                         | {(p, i) for p in ("synthetic50_f32", "tfidf_sparse") for i in lean})
    assert rows["tfidf_sparse", "softgrad_lbfgs"]["sparse"] and rows["tfidf_sparse", "softgrad_lbfgs"]["peak_mb_over_csr"]
    assert rows["synthetic50_f32", "softgrad_lbfgs"]["dtype"] == "float32"
    for problem in ("digits", "synthetic", "synthetic50_f32", "tfidf_sparse"):
        assert rows[problem, "softgrad_logreg"]["objective_gap"] <= 1e-6
        assert rows[problem, "softgrad_lbfgs"]["objective_gap"] <= 1e-6  # the gate held (lower is fine)
        assert rows[problem, "sklearn_lbfgs"]["ratio_vs_sklearn"] == 1.0
        assert rows[problem, "sklearn_lbfgs"]["n_evals"] >= rows[problem, "sklearn_lbfgs"]["n_iter"] > 0
    assert "softgrad_lbfgs / sklearn_lbfgs fit time" in out.stdout
