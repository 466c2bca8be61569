"""Fused linear + cross-entropy on the CPU: peak memory and time, ours vs unfused vs PyTorch's chunked.

Forward + backward (gradients for hidden and weight), float32, one shape:

* ``unfused``    -- ``F.cross_entropy(h @ W.T, t)``: materialises the ``(N, V)`` logits and their gradient
* ``torch_lce``  -- PyTorch 2.13's ``F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())``
* ``softgrad``   -- ``softgrad.torch.linear_cross_entropy`` (automatic chunk size, 64 MiB budget)

Each variant runs in its own subprocess so that its peak resident memory can be read
cleanly: the child resets the kernel's high-water mark (``/proc/self/clear_refs``)
after building its inputs and reports ``VmHWM - VmRSS_before`` after the calls, so the
figure includes the gradients of hidden and weight and every temporary. Losses and
gradients are checked against ``unfused`` (computed in the parent) before the numbers
count. Linux only (reads ``/proc``).

Usage::

    python benchmarks/bench_cpu_linear_cross_entropy.py [--n 2048 --d 256 --v 32000 --threads 1]

Writes ``benchmarks/results/bench_cpu_linear_cross_entropy_<device>.json`` (+ PNG).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402

VARIANTS = ("unfused", "torch_lce", "softgrad")


def _child(variant, n, d, v, threads, repeats):
    import time

    import torch
    import torch.nn.functional as F

    from softgrad.torch._linear_cross_entropy import linear_cross_entropy

    torch.set_num_threads(threads)

    def status_kib(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
        raise KeyError(key)

    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g).requires_grad_()
    w = (torch.randn(v, d, generator=g) * d**-0.5).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    t[::17] = -100  # some ignored rows
    if variant == "unfused":
        fn = lambda: F.cross_entropy(h @ w.T, t)  # noqa: E731
    elif variant == "torch_lce":
        opts = torch.nn.LinearCrossEntropyOptions()
        fn = lambda: F.linear_cross_entropy(h, w, t, options=opts)  # noqa: E731
    else:
        fn = lambda: linear_cross_entropy(h, w, t)  # noqa: E731
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS high-water mark to the current RSS
    before = status_kib("VmRSS")
    times = []
    loss = gh = gw = None
    for _ in range(repeats):
        del loss, gh, gw  # the previous call's results do not count towards this call's peak
        start = time.perf_counter()
        loss = fn()
        gh, gw = torch.autograd.grad(loss, (h, w))
        times.append(time.perf_counter() - start)
    peak_kib = status_kib("VmHWM") - before
    checksum = {"loss": loss.item(), "gh": gh[:4].reshape(-1)[:64].tolist(), "gw_norm": float(gw.norm()),
                "gh_norm": float(gh.norm())}
    print(json.dumps({"variant": variant, "peak_extra_mib": peak_kib / 1024, "times_s": times, **checksum}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args.child, args.n, args.d, args.v, args.threads, args.repeats)
        return None
    results = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--child", variant, "--n", str(args.n), "--d", str(args.d),
               "--v", str(args.v), "--threads", str(args.threads), "--repeats", str(args.repeats)]
        # A fixed mmap threshold makes glibc hand large freed blocks back to the kernel at
        # once, so resident memory tracks live tensors instead of the allocator's cache.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    ref = results["unfused"]
    for variant in VARIANTS[1:]:  # correctness gate before any number counts
        r = results[variant]
        _harness.check_close(f"{variant} loss", r["loss"], ref["loss"], rtol=1e-5, atol=1e-6)
        _harness.check_close(f"{variant} grad_hidden", r["gh"], ref["gh"], rtol=1e-4, atol=1e-7)
        _harness.check_close(f"{variant} |grad_weight|", r["gw_norm"], ref["gw_norm"], rtol=1e-4, atol=0)
    logits_mib = args.n * args.v * 4 / 2**20
    rows = []
    for variant in VARIANTS:
        r = results[variant]
        timing = _harness._summary(r["times_s"][1:] or r["times_s"])  # first call is warm-up
        rows.append({"impl": variant, "N": args.n, "D": args.d, "V": args.v, "dtype": "float32",
                     "threads": args.threads, **timing, "peak_extra_mib": r["peak_extra_mib"],
                     "peak_vs_logits": r["peak_extra_mib"] / logits_mib})
    for row in rows:
        row["time_vs_unfused"] = row["median_ms"] / rows[0]["median_ms"]
        row["peak_vs_unfused"] = row["peak_extra_mib"] / rows[0]["peak_extra_mib"]
    _harness.print_table(rows, ["impl", "median_ms", "peak_extra_mib", "peak_vs_logits", "time_vs_unfused",
                                "peak_vs_unfused"])

    def chart(rows, path):
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
        names = [r["impl"] for r in rows]
        a.barh(names, [r["median_ms"] for r in rows])
        a.set_xlabel("median fwd+bwd time (ms)")
        b.barh(names, [r["peak_extra_mib"] for r in rows], color="tab:orange")
        b.axvline(logits_mib, color="k", ls="--", lw=1, label="one N x V float32")
        b.set_xlabel("peak extra RSS (MiB)")
        b.legend(fontsize=8)
        fig.suptitle(f"linear + CE, CPU float32, N={args.n} D={args.d} V={args.v}, {args.threads} thread(s)")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    path = _harness.write_results("bench_cpu_linear_cross_entropy", rows, chart=chart,
                                  extra={"logits_mib": logits_mib, "malloc_mmap_threshold": 1 << 20,
                                         "grad_weight_mib": args.v * args.d * 4 / 2**20})
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
