"""Shared pieces of the benchmarks: timing, provenance, and the JSON + PNG outputs.

Every benchmark gates on correctness first (`check_close`), then times each
implementation in the same process (`time_cpu` / `time_cuda`), and finally writes
``benchmarks/results/<benchmark>_<device>.json`` and a PNG chart beside it with
`write_results`. The JSON records the device, date, versions and thread counts next
to every number, so the README can quote the file rather than a memory.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_name() -> str:
    """Return a short description of the machine: the CUDA device if one is used, else the CPU."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} x{os.cpu_count()}"


def device_slug(name: str | None = None) -> str:
    """A file-name-safe version of `device_name()`, e.g. ``cpu-2-cores`` or ``nvidia-h100-80gb-hbm3``."""
    name = name or device_name()
    if "x" in name and name.split("x")[-1].isdigit() and "NVIDIA" not in name:
        return f"cpu-{name.split('x')[-1]}-cores"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def provenance() -> dict:
    """Device, date and library versions to store beside every number."""
    info = {
        "device": device_name(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
    }
    for module in ("softgrad", "numba", "scipy", "sklearn", "torch", "triton", "liger_kernel"):
        try:
            info[module] = __import__(module).__version__
        except Exception:  # noqa: BLE001 - a missing or broken peer is recorded as absent
            info[module] = None
    try:
        from threadpoolctl import threadpool_info

        info["blas"] = [
            {k: pool.get(k) for k in ("internal_api", "num_threads", "architecture")}
            for pool in threadpool_info()
        ]
    except ImportError:
        pass
    return info


def _summary(samples_s: Sequence[float]) -> dict:
    ms = sorted(1e3 * s for s in samples_s)
    return {
        "median_ms": statistics.median(ms),
        "p20_ms": float(np.percentile(ms, 20)),
        "p80_ms": float(np.percentile(ms, 80)),
        "runs": len(ms),
    }


def time_cpu(fn: Callable[[], object], *, repeats: int = 7, warmup: int = 1) -> dict:
    """Wall-clock `fn()` `repeats` times after `warmup` calls; median, p20 and p80 in ms."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return _summary(samples)


def time_cuda(fn: Callable[[], object], *, repeats: int = 20, warmup: int = 3) -> dict:
    """Time `fn()` on the current CUDA stream with CUDA events; median, p20 and p80 in ms."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return _summary(samples)


def check_close(name: str, actual, expected, *, rtol: float, atol: float) -> None:
    """Raise AssertionError with diagnostics unless `actual` matches `expected`: benchmarks gate on this."""
    np.testing.assert_allclose(
        np.asarray(actual, dtype=np.float64),
        np.asarray(expected, dtype=np.float64),
        rtol=rtol,
        atol=atol,
        err_msg=f"{name} disagrees with the reference; not benchmarking a wrong answer",
    )


def write_results(benchmark: str, rows: list[dict], *, chart: Callable | None = None, extra: dict | None = None) -> Path:
    """Write ``results/<benchmark>_<device>.json`` (+ ``.png`` if `chart` is given) and return the JSON path.

    `rows` is a list of flat dicts (one per measurement). `chart(rows, path)` draws the PNG.
    """
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem = f"{benchmark}_{device_slug()}"
    path = RESULTS_DIR / f"{stem}.json"
    payload = {"benchmark": benchmark, "provenance": provenance(), "rows": rows, **(extra or {})}
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    if chart is not None:
        import matplotlib

        matplotlib.use("Agg")
        chart(rows, RESULTS_DIR / f"{stem}.png")
    return path


def print_table(rows: list[dict], columns: Sequence[str]) -> None:
    """Print `rows` as an aligned text table with the given columns."""
    cells = [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in cells:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths)))


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)
