"""Fused linear + cross-entropy on a GPU: forward + backward of an LM head, side by side.

Implementations (all bf16 hidden/weight, gradients for hidden and weight):

* ``eager``       -- ``logits = h @ W.T`` then ``F.cross_entropy(logits.float(), t)``
* ``compile``     -- ``torch.compile`` of the same function
* ``liger``       -- Liger-Kernel ``LigerFusedLinearCrossEntropyLoss`` (if installed)
* ``cce``         -- Apple ``cut_cross_entropy.linear_cross_entropy`` (if installed)
* ``torch_lce``   -- PyTorch's ``F.linear_cross_entropy`` with ``LinearCrossEntropyOptions()`` (if present)
* ``softgrad``    -- ``softgrad.torch.linear_cross_entropy``
* ``floor``       -- the three bf16 matmuls (z = h W^T, z W, z^T h) of the same 6 N D V FLOPs

Shapes: Llama-3 head (N=8192, D=4096, V=128256) and Gemma head (N=8192, D=2304, V=256000).
Every implementation is checked against ``eager`` (loss and both gradients) before it is
timed; a wrong answer aborts the run. Peak extra memory is ``max_memory_allocated``
during one call minus what was allocated before it (inputs), so it includes the
weight gradient. Results: ``benchmarks/results/bench_gpu_linear_cross_entropy_<device>.json`` + PNG.

Usage::

    python benchmarks/bench_gpu_linear_cross_entropy.py            # the two heads, on CUDA
    python benchmarks/bench_gpu_linear_cross_entropy.py --tiny     # tiny shapes on CPU, smoke test only

``--tiny`` runs every available implementation end to end on tiny shapes on the CPU
(Liger and Cut Cross-Entropy need CUDA and are recorded as skipped) and writes its
JSON to a temporary directory, not to ``results/``: its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402

from softgrad.torch._linear_cross_entropy import linear_cross_entropy  # noqa: E402

HEADS = {"llama3": (8192, 4096, 128256), "gemma": (8192, 2304, 256000)}
TINY = {"tiny_a": (64, 32, 1000), "tiny_b": (48, 24, 2048)}


# ---------------------------------------------------------------------------- implementations
def _eager(h, w, t):
    return F.cross_entropy((h @ w.T).float(), t)


def _make_impls(device):
    """name -> (loss_fn(h, w, t) or None, reason when None)."""
    impls = {"eager": (_eager, None), "compile": (torch.compile(_eager), None)}
    if device.type == "cuda":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            liger = LigerFusedLinearCrossEntropyLoss()
            impls["liger"] = (lambda h, w, t: liger(w, h, t), None)
        except Exception as exc:  # noqa: BLE001 - an absent peer is recorded, not fatal
            impls["liger"] = (None, f"not importable: {exc!r}"[:200])
        try:
            from cut_cross_entropy import linear_cross_entropy as cce

            impls["cce"] = (lambda h, w, t: cce(h, w, t), None)
        except Exception as exc:  # noqa: BLE001
            impls["cce"] = (None, f"not importable: {exc!r}"[:200])
    else:
        impls["liger"] = (None, "needs CUDA")
        impls["cce"] = (None, "needs CUDA")
    if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        opts = torch.nn.LinearCrossEntropyOptions()
        impls["torch_lce"] = (lambda h, w, t: F.linear_cross_entropy(h, w, t, options=opts), None)
    else:
        impls["torch_lce"] = (None, f"torch {torch.__version__} has no F.linear_cross_entropy")
    impls["softgrad"] = (lambda h, w, t: linear_cross_entropy(h, w, t), None)
    return impls


def _floor(h, w, _t):
    # the same 6 N D V FLOPs as forward + backward, as three plain bf16 matmuls
    z = h @ w.T
    return z @ w, z.T @ h


# ---------------------------------------------------------------------------- measurement
def _fwd_bwd(fn, h, w, t):
    loss = fn(h, w, t)
    gh, gw = torch.autograd.grad(loss, (h, w))
    return loss, gh, gw


def _peak_extra_bytes(call, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = call()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return peak
    return None  # CPU peak memory is measured per process in bench_cpu_linear_cross_entropy.py


def run(shapes, device, *, repeats, warmup):
    timer = _harness.time_cuda if device.type == "cuda" else _harness.time_cpu
    impls = _make_impls(device)
    rows = []
    for shape_name, (n, d, v) in shapes.items():
        g = torch.Generator(device=device).manual_seed(0)
        h = (torch.randn(n, d, device=device, generator=g) * 1.0).to(torch.bfloat16).requires_grad_()
        w = (torch.randn(v, d, device=device, generator=g) * d**-0.5).to(torch.bfloat16).requires_grad_()
        t = torch.randint(0, v, (n,), device=device, generator=g)
        ref_loss, ref_gh, ref_gw = (x.detach().float().cpu() for x in _fwd_bwd(_eager, h, w, t))
        flops = 6.0 * n * d * v
        for name, (fn, reason) in list(impls.items()) + [("floor", (_floor, None))]:
            row = {"shape": shape_name, "N": n, "D": d, "V": v, "impl": name}
            if fn is None:
                rows.append({**row, "skipped": reason})
                print(f"{shape_name:8s} {name:10s} skipped: {reason}")
                continue
            if name != "floor":
                loss, gh, gw = _fwd_bwd(fn, h, w, t)
                _harness.check_close(f"{name} loss", loss.detach().float().cpu(), ref_loss, rtol=1e-2, atol=1e-3)
                for label, a, e in (("grad_hidden", gh, ref_gh), ("grad_weight", gw, ref_gw)):
                    scale = float(e.abs().max())
                    _harness.check_close(f"{name} {label}", a.float().cpu(), e, rtol=5e-2, atol=2e-2 * scale)
                del loss, gh, gw
                call = lambda fn=fn: _fwd_bwd(fn, h, w, t)  # noqa: E731
            else:
                call = lambda: _floor(h, w, t)  # noqa: E731
            timing = timer(call, repeats=repeats, warmup=warmup)
            peak = _peak_extra_bytes(call, device)
            row.update(timing)
            row["peak_extra_gb"] = None if peak is None else peak / 1e9
            row["tflops"] = flops / (timing["median_ms"] * 1e-3) / 1e12
            rows.append(row)
            print(f"{shape_name:8s} {name:10s} {timing['median_ms']:9.2f} ms  "
                  f"{'-' if peak is None else f'{peak / 1e9:.2f} GB'}")
        for row in rows:
            if row["shape"] == shape_name and "median_ms" in row:
                base = {r["impl"]: r for r in rows if r["shape"] == shape_name and "median_ms" in r}
                row["vs_floor"] = row["median_ms"] / base["floor"]["median_ms"] if "floor" in base else None
                row["vs_compile"] = row["median_ms"] / base["compile"]["median_ms"] if "compile" in base else None
        del h, w, t
    return rows


def _chart(rows, path):
    import matplotlib.pyplot as plt

    shapes = sorted({r["shape"] for r in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        rs = [r for r in rows if r["shape"] == shape and "median_ms" in r]
        ax.barh([r["impl"] for r in rs], [r["median_ms"] for r in rs], color="tab:blue")
        for i, r in enumerate(rs):
            mem = "" if r.get("peak_extra_gb") is None else f"  {r['peak_extra_gb']:.2f} GB"
            ax.text(r["median_ms"], i, f" {r['median_ms']:.1f} ms{mem}", va="center", fontsize=8)
        n, d, v = rs[0]["N"], rs[0]["D"], rs[0]["V"]
        ax.set_title(f"{shape}: N={n} D={d} V={v}, bf16 fwd+bwd")
        ax.set_xlabel("median time (ms)")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU; results go to a temp dir")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    if args.tiny:
        device, shapes = torch.device("cpu"), TINY
        repeats, warmup = args.repeats or 2, 1
        _harness.RESULTS_DIR = Path(tempfile.mkdtemp(prefix="softgrad_lce_tiny_"))
    else:
        if not torch.cuda.is_available():
            raise SystemExit("needs a CUDA device; use --tiny for a CPU smoke run")
        device, shapes = torch.device("cuda"), HEADS
        repeats, warmup = args.repeats or 10, 2
    torch.manual_seed(0)
    np.random.seed(0)
    rows = run(shapes, device, repeats=repeats, warmup=warmup)
    _harness.print_table(rows, ["shape", "impl", "median_ms", "peak_extra_gb", "tflops", "vs_floor", "vs_compile",
                                "skipped"])
    path = _harness.write_results("bench_gpu_linear_cross_entropy", rows, chart=_chart,
                                  extra={"tiny": args.tiny})
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
