"""Run every benchmark that applies to this machine, one after another (``make bench``).

Benchmarks are discovered, not listed: every ``benchmarks/bench_*.py``. Those whose
name contains ``gpu`` need a CUDA device and are skipped without one (reported as
such). Each runs in its own process with its default (full) settings and writes its
own ``results/<benchmark>_<device>.json`` + PNG; the machine should be otherwise idle.

Usage::

    python benchmarks/run_all.py                  # everything that applies
    python benchmarks/run_all.py --list           # what would run, and what is skipped
    python benchmarks/run_all.py -k cpu_kernels   # only names containing the substring

Exit status: 0 if every benchmark that ran succeeded, 1 otherwise.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def discover(select: str | None = None) -> list[tuple[Path, str | None]]:
    """``(script, reason to skip or None)`` for every ``bench_*.py`` matching ``select``."""
    cuda = None
    plan = []
    for script in sorted(HERE.glob("bench_*.py")):
        if select and select not in script.stem:
            continue
        reason = None
        if "gpu" in script.stem:
            cuda = _has_cuda() if cuda is None else cuda
            if not cuda:
                reason = "needs a CUDA device"
        plan.append((script, reason))
    return plan


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-k", dest="select", help="only benchmarks whose file name contains this")
    parser.add_argument("--list", action="store_true", help="print the plan and exit")
    args = parser.parse_args(argv)
    plan = discover(args.select)
    if not plan:
        print("no benchmark matches")
        return 1
    failed = []
    for script, reason in plan:
        if reason or args.list:
            print(f"{script.name}: {'skipped, ' + reason if reason else 'would run'}")
            continue
        print(f"=== {script.name}", flush=True)
        start = time.perf_counter()
        code = subprocess.call([sys.executable, str(script)])
        print(f"=== {script.name}: {'ok' if code == 0 else f'FAILED (exit {code})'} "
              f"in {time.perf_counter() - start:.0f} s", flush=True)
        if code != 0:
            failed.append(script.name)
    if failed:
        print("failed: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
