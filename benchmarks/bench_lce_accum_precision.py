"""How precisely ``linear_cross_entropy`` computes a bf16 head's weight gradient, against float64.

A language-model head in bf16 accumulates ``grad_W += G_c^T h_c`` over the chunks of rows.
Rounding that running sum to bf16 after every chunk costs about ``2^-9`` relative per chunk on
rows that receive same-signed contributions from many chunks (frequent tokens); accumulating in
float32 (``accum_dtype=None``, the default for bf16/fp16 weights) rounds once, at the end.

The problem: N tokens whose hidden states cluster around ``K`` frequent target tokens, the
targets' weight rows aligned with their cluster (so ``p(y)`` approaches 1 and the gradient is a
small difference), V = 262144 classes. The error is ``||grad_W - grad_W64|| / ||grad_W64||``
over the target rows, where ``grad_W64`` is float64 autograd of ``F.cross_entropy`` on the same
bf16 inputs. Writes ``benchmarks/results/bench_lce_accum_precision_<device>.json``.
This measures precision, not time: the machine's load does not matter.

    python benchmarks/bench_lce_accum_precision.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from softgrad.torch import linear_cross_entropy  # noqa: E402


def weight_grad_error(accum_dtype, *, n: int, v: int, chunk: int, d: int = 32, k: int = 8, peak: float = 0.5,
                      return_p: bool = False):
    """Relative error of a bf16 head's ``grad_W`` (target rows) against float64 autograd on the same inputs."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(k, d, generator=g, dtype=torch.float64)
    cluster = torch.randint(0, k, (n,), generator=g)
    h = base[cluster] + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64) * 0.02
    targets = torch.randperm(v, generator=g)[:k]
    w[targets] = base * peak  # each frequent token's row points at its cluster: p(y) -> 1
    t = targets[cluster]
    hb, wb = h.bfloat16(), w.bfloat16().requires_grad_()
    linear_cross_entropy(hb, wb, t, reduction="sum", chunk_size=chunk, accum_dtype=accum_dtype).backward()
    w64 = wb.detach().double().requires_grad_()
    logits64 = hb.double() @ w64.T
    F.cross_entropy(logits64, t, reduction="sum").backward()
    err = float((wb.grad.double() - w64.grad)[targets].norm() / w64.grad[targets].norm())
    if not return_p:
        return err
    p_y = float(torch.softmax(logits64.detach(), dim=1)[torch.arange(n), t].mean())
    return err, p_y


def _chart(rows, path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    labels = [f"{r['chunks']} chunks\n{r['accum_dtype']}" for r in rows]
    ax.bar(range(len(rows)), [r["rel_error_vs_float64"] for r in rows],
           color=["tab:blue" if r["accum_dtype"].startswith("float32") else "tab:orange" for r in rows])
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("relative error of grad_W vs float64")
    ax.set_title(f"bf16 head, V={rows[0]['V']}, N={rows[0]['N']}: grad_W accumulation dtype", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="V = 16384 and fewer tokens (a smoke run)")
    args = parser.parse_args(argv)
    n, v = (512, 16384) if args.quick else (2048, 262144)
    rows = []
    for chunk in (16, 64):
        for name, accum in (("float32 (default)", None), ("bfloat16", torch.bfloat16)):
            err, p_y = weight_grad_error(accum, n=n, v=v, chunk=chunk, return_p=True)
            rows.append({"N": n, "V": v, "chunk_rows": chunk, "chunks": -(-n // chunk), "accum_dtype": name,
                         "rel_error_vs_float64": err, "mean_p_target": p_y})
            print(f"N={n} V={v} chunk={chunk:3d} ({-(-n // chunk):4d} chunks) accum {name:18s} "
                  f"error {err:.2e}  mean p(y) {p_y:.3f}")
    name = "bench_lce_accum_precision" + ("_quick" if args.quick else "")
    path = _harness.write_results(name, rows, chart=_chart, extra={"quick": args.quick})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
