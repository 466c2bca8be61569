"""Start-up cost of the numba backend: import and first calls with an empty and with a warm kernel cache.

Each measurement is a fresh Python process (what the command line pays) that imports
softgrad, makes one ``softmax_cross_entropy`` call (float64, the command line's case),
then calls every kernel in float32 and float64. ``cold`` points ``NUMBA_CACHE_DIR`` at
an empty folder, so every kernel compiles; ``warm`` runs again on the folder the cold
run filled; ``numpy`` is the reference backend, for comparison. Each result is checked
against the NumPy backend in the same process.

Usage::

    python benchmarks/bench_startup.py [--repeats 3]

Writes ``benchmarks/results/bench_startup_<device>.json`` (+ PNG).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402

_CHILD = r"""
import json, time
t0 = time.perf_counter()
import numpy as np
import softgrad
t1 = time.perf_counter()
loss, grad = softgrad.softmax_cross_entropy(np.zeros((4, 3)), [0, 1, 2, 0])
t2 = time.perf_counter()
results = []
for dt in (np.float32, np.float64):
    z = np.linspace(-3, 3, 12).reshape(4, 3).astype(dt)
    results += [softgrad.softmax(z), softgrad.log_softmax(z), softgrad.logsumexp(z),
                softgrad.softmax_backward(z, z),
                *softgrad.softmax_cross_entropy(z, [0, 1, 2, 0], weight=np.ones(3, dt)),
                *softgrad.softmax_cross_entropy(z, np.full((4, 3), 1 / 3, dt))]
t3 = time.perf_counter()
with softgrad.use_backend("numpy"):
    ref = []
    for dt in (np.float32, np.float64):
        z = np.linspace(-3, 3, 12).reshape(4, 3).astype(dt)
        ref += [softgrad.softmax(z), softgrad.log_softmax(z), softgrad.logsumexp(z),
                softgrad.softmax_backward(z, z),
                *softgrad.softmax_cross_entropy(z, [0, 1, 2, 0], weight=np.ones(3, dt)),
                *softgrad.softmax_cross_entropy(z, np.full((4, 3), 1 / 3, dt))]
for a, b in zip(results, ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
print(json.dumps({"backend": softgrad.get_backend(), "import_s": t1 - t0, "first_call_s": t2 - t1,
                  "all_kernels_s": t3 - t2}))
"""


def _child(env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"start-up child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(repeats: int) -> list[dict]:
    base = {k: v for k, v in os.environ.items() if k not in ("SOFTGRAD_BACKEND", "NUMBA_CACHE_DIR")}
    samples: dict[str, list[dict]] = {"cold": [], "warm": [], "numpy": []}
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="softgrad_numba_cache_") as cache:
            env = {**base, "NUMBA_CACHE_DIR": cache}
            samples["cold"].append(_child(env))
            samples["warm"].append(_child(env))
        samples["numpy"].append(_child({**base, "SOFTGRAD_BACKEND": "numpy"}))
    rows = []
    for case, runs in samples.items():
        row = {"case": case, "backend": runs[0]["backend"], "runs": len(runs)}
        for key in ("import_s", "first_call_s", "all_kernels_s"):
            row[key] = statistics.median(r[key] for r in runs)
        row["total_s"] = row["import_s"] + row["first_call_s"] + row["all_kernels_s"]
        rows.append(row)
        print(f"{case:6s} {row['backend']:6s} import {row['import_s']:.2f} s, first call {row['first_call_s']:.2f} s, "
              f"every kernel in both dtypes {row['all_kernels_s']:.2f} s", flush=True)
    return rows


def _chart(rows, path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 2.6))
    left = [0.0] * len(rows)
    for key, color in (("import_s", "tab:gray"), ("first_call_s", "tab:green"), ("all_kernels_s", "tab:blue")):
        vals = [r[key] for r in rows]
        ax.barh([f"{r['case']} ({r['backend']})" for r in rows], vals, left=left, color=color, label=key[:-2])
        left = [a + b for a, b in zip(left, vals)]
    ax.set_xlabel("seconds (median over fresh processes)")
    ax.legend(fontsize=8)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per case")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    rows = run(args.repeats)
    path = _harness.write_results("bench_startup", rows, chart=_chart,
                                  extra={"load_average_before": load_before, "load_average_after": os.getloadavg()})
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
