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
    sparse = rows["tfidf_sparse", "softgrad_lbfgs"]
    assert sparse["sparse"] and sparse["peak_over_csr"] > 0 and rows["tfidf_sparse", "sklearn_lbfgs"]["peak_over_csr"] > 0
    # the pairs' floor is part of every L-BFGS fit's peak, SciPy's workspace of scikit-learn's
    sklearn_peak = rows["tfidf_sparse", "sklearn_lbfgs"]["peak_over_csr"]
    assert 0 < sparse["lbfgs_pairs_over_csr"] < min(sparse["peak_over_csr"], sklearn_peak)
    assert sparse["lbfgs_pairs_over_csr"] < sparse["lbfgsb_workspace_over_csr"] < sklearn_peak
    for problem in ("digits", "synthetic", "synthetic50_f32", "tfidf_sparse"):
        # each fit's solver time (outside the objective) is measured; the fit time includes it
        for impl in ("sklearn_lbfgs", "softgrad_lbfgs"):
            assert 0 < rows[problem, impl]["solver_s"] < rows[problem, impl]["fit_s"]
    assert rows["synthetic50_f32", "softgrad_lbfgs"]["dtype"] == "float32"
    for problem in ("digits", "synthetic", "synthetic50_f32", "tfidf_sparse"):
        assert rows[problem, "softgrad_logreg"]["objective_gap"] <= 1e-6
        assert rows[problem, "softgrad_lbfgs"]["objective_gap"] <= 1e-6  # the gate held (lower is fine)
        assert rows[problem, "sklearn_lbfgs"]["ratio_vs_sklearn"] == 1.0
        assert rows[problem, "sklearn_lbfgs"]["n_evals"] >= rows[problem, "sklearn_lbfgs"]["n_iter"] > 0
    assert "softgrad_lbfgs / sklearn_lbfgs fit time" in out.stdout
