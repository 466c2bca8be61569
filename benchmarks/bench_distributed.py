"""softgrad.distributed on 1, 2 and 3 CPU processes (gloo): time and bytes per step, and the all-reduce cost model.

For each world size ``P`` the benchmark spawns ``P`` processes (one thread each, joined by a
``file://`` store) that run, on one fixed total problem split ``P`` ways:

* ``vocab_ce``     -- ``vocab_parallel_cross_entropy`` forward + backward, ``N x V`` float32
                      logits split by columns (uneven when ``P`` does not divide ``V``);
* ``vocab_linear`` -- ``vocab_parallel_linear_cross_entropy`` forward + backward, ``(N, D)``
                      hidden, ``(V, D)`` weight split by rows;
* ``dp_fit``       -- ``fit_data_parallel`` of a ``SoftmaxClassifier`` (lbfgs, a fixed number
                      of iterations) on ``N_fit x D_fit`` synthetic rows split by rows;
* ``allreduce``    -- a bare float32 sum all-reduce of 8 B .. 8 MiB (P >= 2), to fit the
                      latency-bandwidth model ``t = a + b * bytes`` that docs/DISTRIBUTED.md uses.

Every measurement is gated: each rank first checks its sharded loss and gradients against the
unsharded computation on the same seeded data (and the fitted model against the one-process
fit, for ``dp_fit``), and the numbers only count if that passes. A step's time is the slowest
rank's (ranks meet at a barrier before each step); ``comm_ms`` replays the step's collectives
alone (same operations, same sizes) to split communication from computation; ``bytes`` is
what one rank passes to collectives per step (``softgrad.distributed._comm.record_collectives``).

On a machine with fewer cores than processes (the 2-core CI machine with ``P = 3``) the
processes share cores: such rows measure communication overhead, not speed-up.

Usage::

    python benchmarks/bench_distributed.py            # P = 1, 2, 3; writes results/bench_distributed_<device>.json + .png
    python benchmarks/bench_distributed.py --quick    # tiny shapes, P = 1 and 2, results to a temporary directory
    python benchmarks/bench_distributed.py --project benchmarks/results/bench_distributed_cpu-2-cores.json
                                                      # the scaling model of docs/DISTRIBUTED.md for 2 .. 1024 ranks
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402

FULL = dict(n=2048, v=32768, d=256, n_lin=1024, n_fit=60000, d_fit=128, c_fit=20, fit_iter=30, repeats=5,
            worlds=(1, 2, 3), allreduce_max_log2=23)
QUICK = dict(n=64, v=1000, d=16, n_lin=32, n_fit=600, d_fit=8, c_fit=4, fit_iter=5, repeats=2,
             worlds=(1, 2), allreduce_max_log2=12)


# ----------------------------------------------------------------------------- workers (run on every rank)
def _shard(total: int, rank: int, world: int) -> slice:
    widths = [total // world + (r < total % world) for r in range(world)]
    start = sum(widths[:rank])
    return slice(start, start + widths[rank])


def _timed(fn, repeats: int) -> list[float]:
    """Seconds of ``fn()`` on this rank, after a barrier, ``repeats`` times (one untimed warm-up)."""
    import torch.distributed as dist

    fn()
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _replay(log, repeats: int) -> list[float]:
    """Seconds of this step's collectives alone: the same operations on buffers of the same sizes."""
    import torch
    import torch.distributed as dist

    dtypes = {"float32": torch.float32, "float64": torch.float64, "int64": torch.int64}
    buffers = [(r.op, torch.zeros(r.numel, dtype=dtypes.get(r.dtype, torch.uint8))) for r in log]
    world = dist.get_world_size()

    def replay():
        for op, buf in buffers:
            if op == "all_reduce:max":
                dist.all_reduce(buf, op=dist.ReduceOp.MAX)
            elif op == "all_reduce:sum":
                dist.all_reduce(buf)
            elif op == "broadcast":
                dist.broadcast(buf, src=0)
            else:  # all_gather_object: a pickled object of this size, gathered
                dist.all_gather([torch.empty_like(buf) for _ in range(world)], buf)

    return _timed(replay, repeats)


def _vocab_ce(rank, world, cfg):
    import torch

    from softgrad.distributed import vocab_parallel_cross_entropy
    from softgrad.distributed._comm import record_collectives
    from softgrad.torch import cross_entropy

    n, v = cfg["n"], cfg["v"]
    g = torch.Generator().manual_seed(0)
    full = torch.randn(n, v, generator=g) * 4  # the same on every rank
    target = torch.randint(0, v, (n,), generator=g)
    sh = _shard(v, rank, world)
    shard = full[:, sh].contiguous().requires_grad_()
    opts = dict(label_smoothing=0.1, z_loss=1e-4)
    # gate: the sharded loss and gradient equal the unsharded ones (float32 rounding)
    loss = vocab_parallel_cross_entropy(shard, target, **opts)
    (grad,) = torch.autograd.grad(loss, shard)
    ref_in = full.clone().requires_grad_()
    ref = cross_entropy(ref_in, target, **opts)
    (ref_grad,) = torch.autograd.grad(ref, ref_in)
    torch.testing.assert_close(loss, ref, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad[:, sh], rtol=2e-5, atol=1e-6)
    del full, ref_in, ref_grad

    def step():
        out = vocab_parallel_cross_entropy(shard, target, **opts)
        out.backward()

    with record_collectives() as log:
        step()
    times = _timed(step, cfg["repeats"])
    comm = _replay(log, cfg["repeats"])
    return {"op": "vocab_ce", "shape": f"N={n} V={v}", "local": f"{n}x{sh.stop - sh.start}", "times": times,
            "comm": comm, "bytes": sum(r.nbytes for r in log), "collectives": len(log),
            "log": [(r.op, r.nbytes) for r in log]}


def _vocab_linear(rank, world, cfg):
    import torch

    from softgrad.distributed import vocab_parallel_linear_cross_entropy
    from softgrad.distributed._comm import record_collectives
    from softgrad.torch import linear_cross_entropy

    n, v, d = cfg["n_lin"], cfg["v"], cfg["d"]
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(n, d, generator=g).requires_grad_()
    weight = torch.randn(v, d, generator=g) * d**-0.5
    target = torch.randint(0, v, (n,), generator=g)
    sh = _shard(v, rank, world)
    w_shard = weight[sh].clone().requires_grad_()
    loss = vocab_parallel_linear_cross_entropy(hidden, w_shard, target)
    gh, gw = torch.autograd.grad(loss, (hidden, w_shard))
    w_full = weight.clone().requires_grad_()
    ref = linear_cross_entropy(hidden, w_full, target)
    ref_gh, ref_gw = torch.autograd.grad(ref, (hidden, w_full))
    torch.testing.assert_close(loss, ref, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, ref_gw[sh], rtol=1e-4, atol=1e-5)
    del w_full, ref_gw

    def step():
        vocab_parallel_linear_cross_entropy(hidden, w_shard, target).backward()

    with record_collectives() as log:
        step()
    times = _timed(step, cfg["repeats"])
    comm = _replay(log, cfg["repeats"])
    return {"op": "vocab_linear", "shape": f"N={n} D={d} V={v}", "local": f"{sh.stop - sh.start}x{d}",
            "times": times, "comm": comm, "bytes": sum(r.nbytes for r in log), "collectives": len(log),
            "log": [(r.op, r.nbytes) for r in log]}


def _fit_data(cfg):
    from sklearn.datasets import make_classification

    X, y = make_classification(n_samples=cfg["n_fit"], n_features=cfg["d_fit"], n_informative=cfg["d_fit"] // 2,
                               n_classes=cfg["c_fit"], random_state=0)
    return X, y


def _dp_fit(rank, world, cfg):
    import warnings

    from softgrad import SoftmaxClassifier
    from softgrad.distributed import fit_data_parallel
    from softgrad.distributed._comm import record_collectives

    X, y = _fit_data(cfg)
    sh = _shard(X.shape[0], rank, world)
    params = dict(alpha=1e-4, solver="lbfgs", tol=0.0, max_iter=cfg["fit_iter"], precision="float64")

    def fit():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # stopping at max_iter is the point: a fixed amount of work
            return fit_data_parallel(SoftmaxClassifier(**params), X[sh], y[sh])

    with record_collectives() as log:
        clf = fit()
    evaluations = sum(1 for r in log if r.what == "objective and gradient")
    times = _timed(fit, cfg["repeats"])
    per_eval = [r for r in log if r.what == "objective and gradient"][:1]
    comm = _replay(per_eval, cfg["repeats"]) if per_eval else [0.0] * cfg["repeats"]
    return {"op": "dp_fit", "shape": f"N={X.shape[0]} D={X.shape[1]} C={cfg['c_fit']}",
            "local": f"{sh.stop - sh.start}x{X.shape[1]}", "times": times,
            "comm": [c * evaluations for c in comm], "bytes": sum(r.nbytes for r in log),
            "collectives": len(log), "evaluations": evaluations, "n_iter": clf.n_iter_,
            "log": [(r.op, r.nbytes) for r in log],
            "coef": clf.coef_, "intercept": clf.intercept_}


def _allreduce_sweep(rank, world, cfg):
    import torch
    import torch.distributed as dist

    rows = []
    for log2 in range(3, cfg["allreduce_max_log2"] + 1, 2):
        nbytes = 2**log2
        buf = torch.zeros(nbytes // 4)
        reps = max(cfg["repeats"], 40 if nbytes < 2**16 else cfg["repeats"])
        times = _timed(lambda: dist.all_reduce(buf), reps)
        rows.append({"op": "allreduce", "bytes": nbytes, "times": times})
    return rows


def worker(rank, world, cfg):
    import torch

    torch.set_num_threads(1)
    out = [_vocab_ce(rank, world, cfg), _vocab_linear(rank, world, cfg), _dp_fit(rank, world, cfg)]
    if world > 1:
        out += _allreduce_sweep(rank, world, cfg)
    return out


# ----------------------------------------------------------------------------- parent: gate, reduce, report
def _summ(per_rank_times: list[list[float]]) -> dict:
    slowest = [max(ts) for ts in zip(*per_rank_times)]  # a step ends when its slowest rank ends
    return {"median_ms": 1e3 * statistics.median(slowest), "p20_ms": 1e3 * float(np.percentile(slowest, 20)),
            "p80_ms": 1e3 * float(np.percentile(slowest, 80)), "runs": len(slowest)}


def run(cfg: dict) -> tuple[list[dict], dict]:
    from softgrad.distributed._launch import SINGLE_THREAD_ENV, run_workers

    rows = []
    fits = {}
    for world in cfg["worlds"]:
        per_rank = run_workers(worker, world, cfg, timeout=1800, pg_timeout=600, env=dict(SINGLE_THREAD_ENV))
        for i, first in enumerate(per_rank[0]):
            items = [ranks_items[i] for ranks_items in per_rank]
            row = {"op": first["op"], "world": world}
            if first["op"] == "allreduce":
                row.update({"bytes": first["bytes"], **_summ([it["times"] for it in items])})
            else:
                row.update({"shape": first["shape"], "local_rank0": first["local"], "bytes_per_rank": first["bytes"],
                            "log": first["log"],
                            "collectives": first["collectives"], **_summ([it["times"] for it in items])})
                row["comm_ms"] = _summ([it["comm"] for it in items])["median_ms"]
                if first["op"] == "dp_fit":
                    row["evaluations"] = first["evaluations"]
                    row["n_iter"] = first["n_iter"]
                    row["ms_per_evaluation"] = row["median_ms"] / first["evaluations"]
                    fits[world] = (first["coef"], first["intercept"])
                    for it in items[1:]:  # every rank holds the same model
                        np.testing.assert_array_equal(it["coef"], first["coef"])
            rows.append(row)
    # gate: the data-parallel fits equal the one-process fit
    coef1, b1 = fits[1] if 1 in fits else _one_process_fit(cfg)
    for world, (coef, b) in fits.items():
        _harness.check_close(f"dp_fit P={world} coef", coef, coef1, rtol=0, atol=1e-8)
        _harness.check_close(f"dp_fit P={world} intercept", b, b1, rtol=0, atol=1e-8)
    for row in rows:
        base = next((r for r in rows if r["op"] == row["op"] and r["world"] == 1), None)
        if base is not None and row["op"] != "allreduce":
            row["speedup_vs_1"] = base["median_ms"] / row["median_ms"]
    model = _fit_allreduce(rows)
    for row in rows:
        if row["op"] != "allreduce" and str(row["world"]) in model:
            m = model[str(row["world"])]
            # the model's time for this step's collectives: a + b * bytes each (an all-gather of
            # a few bytes, or a pickled object, counted as one latency)
            row["comm_model_ms"] = 1e3 * sum(m["a_s"] + (m["b_s_per_byte"] * nbytes if op.startswith("all_reduce")
                                                         else 0.0) for op, nbytes in row.pop("log"))
        else:
            row.pop("log", None)
    return rows, model


def _one_process_fit(cfg):
    from softgrad import SoftmaxClassifier

    X, y = _fit_data(cfg)
    clf = SoftmaxClassifier(alpha=1e-4, solver="lbfgs", tol=0.0, max_iter=cfg["fit_iter"], precision="float64")
    clf.fit(X, y)
    return clf.coef_, clf.intercept_


def _fit_allreduce(rows: list[dict]) -> dict:
    """Least-squares ``t = a + b * bytes`` per world size, and the ring model's alpha and beta from it.

    Ring all-reduce (reduce-scatter + all-gather): ``2 (P - 1)`` steps of latency ``alpha`` and
    ``2 (P - 1) / P * bytes`` per rank at ``beta`` seconds per byte, so
    ``alpha = a / (2 (P - 1))`` and ``beta = b / (2 (P - 1) / P)``.
    """
    model = {}
    for world in sorted({r["world"] for r in rows if r["op"] == "allreduce"}):
        pts = [(r["bytes"], r["median_ms"] * 1e-3) for r in rows if r["op"] == "allreduce" and r["world"] == world]
        x, t = np.array(pts, dtype=float).T
        b, a = np.polyfit(x, t, 1)
        model[str(world)] = {"a_s": float(a), "b_s_per_byte": float(b),
                             "alpha_s": float(a) / (2 * (world - 1)),
                             "beta_s_per_byte": float(b) / (2 * (world - 1) / world),
                             "bandwidth_gbps": float(2 * (world - 1) / world / b / 1e9) if b > 0 else None}
    return model


def _chart(rows, path):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    for ax, op in zip(axes[:3], ("vocab_ce", "vocab_linear", "dp_fit")):
        sel = [r for r in rows if r["op"] == op]
        worlds = [r["world"] for r in sel]
        total = [r["median_ms"] for r in sel]
        comm = [min(r["comm_ms"], r["median_ms"]) for r in sel]
        ax.bar(worlds, [t - c for t, c in zip(total, comm)], label="computation (rest)")
        ax.bar(worlds, comm, bottom=[t - c for t, c in zip(total, comm)], label="collectives (replayed)")
        for w, t, r in zip(worlds, total, sel):
            ax.annotate(f"{t:.0f} ms\n{r['bytes_per_rank'] / 1024:.1f} KiB", (w, t), ha="center", va="bottom",
                        fontsize=8)
        ax.set_title(f"{op}: {sel[0]['shape']}", fontsize=9)
        ax.set_xlabel("processes P")
        ax.set_ylabel("ms per step" if op != "dp_fit" else "ms per fit")
        ax.set_xticks(worlds)
        ax.set_ylim(0, 1.3 * max(total))
        ax.legend(fontsize=7, loc="lower right")
    ax = axes[3]
    for world in sorted({r["world"] for r in rows if r["op"] == "allreduce"}):
        sel = [r for r in rows if r["op"] == "allreduce" and r["world"] == world]
        ax.loglog([r["bytes"] for r in sel], [r["median_ms"] * 1e3 for r in sel], "o-", label=f"P={world}")
    ax.set_xlabel("bytes all-reduced")
    ax.set_ylabel("µs (slowest rank, median)")
    ax.set_title("gloo float32 sum all-reduce", fontsize=9)
    ax.legend(fontsize=7)
    fig.suptitle("softgrad.distributed on CPU processes sharing the machine's cores "
                 "(P > cores measures overhead, not speed-up)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- the scaling model of docs/DISTRIBUTED.md
def ring_allreduce_s(p: int, nbytes: float, alpha: float, beta: float) -> float:
    """Ring all-reduce: reduce-scatter + all-gather, ``2 (P - 1)`` latencies, ``2 (P - 1) / P * bytes`` per rank."""
    return 0.0 if p == 1 else 2 * (p - 1) * alpha + 2 * (p - 1) / p * nbytes * beta


def tree_allreduce_s(p: int, nbytes: float, alpha: float, beta: float) -> float:
    """Tree all-reduce (reduce up, broadcast down, pipelined): ``2 log2 P`` latencies, about ``2 * bytes`` per rank."""
    return 0.0 if p == 1 else 2 * math.ceil(math.log2(p)) * alpha + 2 * nbytes * beta


def step_collectives(op: str, cfg: dict, p: int, evaluations: int = 1) -> list[tuple[str, int]]:
    """``(collective, bytes per rank)`` of one step of ``op`` on ``p`` ranks (all all-reduces), as docs/DISTRIBUTED.md
    counts them.

    ``vocab_ce`` runs with label smoothing (an ``(N, 4)`` sum block), ``vocab_linear`` without
    (``(N, 2)``) and with the backward's ``(N, D)`` float32 all-reduce of the hidden gradient;
    ``dp_fit`` is one all-reduce of ``1 + C D + C`` float64 per objective evaluation.
    """
    if op == "vocab_ce":
        n = cfg["n"]
        return [("all_reduce", 8 * (2 * p + 16)), ("all_reduce", 4 * n), ("all_reduce", 4 * 4 * n)]
    if op == "vocab_linear":
        n, d = cfg["n_lin"], cfg["d"]
        return [("all_reduce", 8 * (2 * p + 16)), ("all_reduce", 4 * n), ("all_reduce", 2 * 4 * n),
                ("all_reduce", 4 * n * d)]
    c, d = cfg["c_fit"], cfg["d_fit"]
    return [("all_reduce", 8 * (1 + c * d + c))] * evaluations


def project(payload: dict, worlds=(2, 3, 8, 64, 256, 1024)) -> str:
    """Markdown table: the model ``T(P) = T(1) / P + collectives(P)`` with the measured P = 2 ``alpha``, ``beta``."""
    model = payload["allreduce_model"]["2"]
    alpha, beta = model["alpha_s"], model["beta_s_per_byte"]
    cfg = payload["config"]
    lines = [f"alpha = {alpha * 1e6:.0f} us, beta = {beta * 1e9:.2f} ns/byte (ring fit of the P = 2 all-reduce sweep)",
             "", "| op | P | measured ms | model ms, ring | model ms, tree | ring: collectives share | "
                 "ring: efficiency T(1)/(P T(P)) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for op in ("vocab_ce", "vocab_linear", "dp_fit"):
        rows = {r["world"]: r for r in payload["rows"] if r["op"] == op}
        t1 = rows[1]["median_ms"] * 1e-3
        for p in worlds:
            steps = step_collectives(op, cfg, p, rows[1].get("evaluations", 1))
            ring = sum(ring_allreduce_s(p, b, alpha, beta) for _, b in steps)
            tree = sum(tree_allreduce_s(p, b, alpha, beta) for _, b in steps)
            total_ring, total_tree = t1 / p + ring, t1 / p + tree
            measured = f"{rows[p]['median_ms']:.0f}" if p in rows else "-"
            lines.append(f"| {op} | {p} | {measured} | {1e3 * total_ring:.0f} | {1e3 * total_tree:.0f} | "
                         f"{ring / total_ring:.0%} | {t1 / (p * total_ring):.0%} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, P = 1 and 2, results to a temporary directory")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per measurement")
    parser.add_argument("--project", metavar="JSON", help="print the scaling model's table for a results file and exit")
    args = parser.parse_args(argv)
    if args.project:
        import json

        print(project(json.loads(Path(args.project).read_text())))
        return None
    cfg = dict(QUICK if args.quick else FULL)
    if args.repeats:
        cfg["repeats"] = args.repeats
    if args.quick:
        _harness.RESULTS_DIR = Path(tempfile.mkdtemp(prefix="softgrad_distributed_quick_"))
    load_before = os.getloadavg()
    start = time.time()
    rows, model = run(cfg)
    extra = {"quick": args.quick, "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
             "allreduce_model": model, "threads_per_process": 1, "backend": "gloo",
             "timing": "slowest rank per step (barrier before each), median of the steps; comm_ms replays the "
                       "step's collectives alone",
             "load_average_before": load_before, "load_average_after": os.getloadavg(),
             "wall_s": time.time() - start}
    _harness.print_table([r for r in rows if r["op"] != "allreduce"],
                         ["op", "world", "shape", "local_rank0", "median_ms", "p20_ms", "p80_ms", "comm_ms",
                          "comm_model_ms", "bytes_per_rank", "collectives", "speedup_vs_1"])
    _harness.print_table([r for r in rows if r["op"] == "allreduce"], ["world", "bytes", "median_ms", "p20_ms",
                                                                        "p80_ms"])
    for world, m in model.items():
        print(f"all-reduce model P={world}: t = {m['a_s'] * 1e6:.1f} us + bytes * {m['b_s_per_byte'] * 1e9:.3f} ns"
              f"  (ring: alpha {m['alpha_s'] * 1e6:.1f} us, beta {m['beta_s_per_byte'] * 1e9:.3f} ns/B)")
    print(f"load average before {load_before}, after {extra['load_average_after']}")
    path = _harness.write_results("bench_distributed", rows, chart=_chart, extra=extra)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
