"""``softgrad bench``: run the CPU kernel benchmark of a source checkout.

The benchmark itself is ``benchmarks/bench_cpu_kernels.py`` (ours against the NumPy
formulations, SciPy, PyTorch and scikit-learn, with the copy and exp floors); this
command finds it next to the package source and runs it in a fresh process with the
same interpreter. The ``benchmarks/`` folder is not part of an installed wheel, so
the command needs a checkout (``pip install -e .``). A full run writes to a new
``runs/bench-<timestamp>`` folder unless ``--out`` names one: the committed
``benchmarks/results/`` change only when asked for.
"""

from __future__ import annotations

import datetime as _dt
import subprocess
import sys
from pathlib import Path

import click


def _script() -> Path:
    """Path of ``benchmarks/bench_cpu_kernels.py`` in the checkout this package runs from."""
    import softgrad

    return Path(softgrad.__file__).resolve().parents[2] / "benchmarks" / "bench_cpu_kernels.py"


@click.command()
@click.option("--quick", is_flag=True, help="Small shapes, a smoke run; results go to a temporary folder.")
@click.option("--repeats", type=click.IntRange(min=1), default=None,
              help="Timed runs per implementation (default 7, or 2 with --quick).")
@click.option("--dtype", "dtypes", multiple=True, type=click.Choice(["float32", "float64"]),
              help="Only this dtype (repeatable; default both).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for the JSON and PNG [default: runs/bench-<timestamp>; a temporary folder with "
                   "--quick]. --out benchmarks/results replaces the committed results.")
def bench(quick: bool, repeats: int | None, dtypes: tuple[str, ...], out_dir: str | None) -> None:
    """Benchmark softmax and the fused loss + gradient against peers and the memory floor.

    Without --quick it runs (N, C) = (4096, 32000), (65536, 1000), (256, 262144) in
    float32 and float64 and writes bench_cpu_kernels_<device>.json and .png to a new
    runs/bench-<timestamp> folder, or to --out. Run it on an otherwise idle machine.
    """
    script = _script()
    if not script.is_file():
        raise click.ClickException(
            f"{script} not found: the benchmarks ship with the source, not the installed package; "
            "run this from a checkout installed with `pip install -e .`"
        )
    argv = [sys.executable, str(script)]
    if quick:
        argv.append("--quick")
    if repeats is not None:
        argv += ["--repeats", str(repeats)]
    for dtype in dtypes:
        argv += ["--dtype", dtype]
    if out_dir is None and not quick:
        # never the committed benchmarks/results/ unless asked for with --out
        out_dir = str(Path("runs") / _dt.datetime.now().strftime("bench-%Y%m%d-%H%M%S"))
    if out_dir is not None:
        argv += ["--out", str(Path(out_dir).resolve())]
    code = subprocess.call(argv)
    if code != 0:
        raise SystemExit(code)
