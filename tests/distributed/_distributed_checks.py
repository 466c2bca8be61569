"""Checks that run inside every rank of a spawned process group (see ``test_distributed_multiprocess.py``).

:func:`run_checks` runs every check of :data:`CHECKS` on one rank and returns, per check,
``("ok", data)`` or ``("fail", traceback)``. Inside a check the comparisons are collected
(:class:`Mismatches`) and raised only at its end, so that a rank whose numbers disagree still
issues the same collectives as the others and the group stays in step for the next check.

Every rank builds the same full problem from the same seed, takes its shard, and compares the
sharded result with the unsharded one computed locally: ``softgrad.torch.cross_entropy`` /
``linear_cross_entropy`` and an independent float64 reference in plain autograd
(softcap, then ``F.cross_entropy``, then the z-loss).
"""

from __future__ import annotations

import itertools
import time
import traceback

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from softgrad.distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy
from softgrad.distributed._comm import record_collectives
from softgrad.torch import cross_entropy, linear_cross_entropy

F64 = dict(rtol=1e-10, atol=1e-12)
V = 11  # classes of the cross-entropy checks
# uneven column splits of V per world size; the second one of 3 ranks leaves rank 1 empty
SPLITS = {1: [[V]], 2: [[4, 7], [9, 2]], 3: [[3, 5, 3], [5, 0, 6]]}


class Mismatches:
    """Collects failed comparisons; :meth:`raise_any` raises them all at the end of a check."""

    def __init__(self):
        self.errors: list[str] = []

    def close(self, label, actual, expected, **tol):
        try:
            torch.testing.assert_close(actual, expected, **tol)
        except AssertionError as exc:
            self.errors.append(f"{label}: {exc}")

    def true(self, label, condition):
        if not condition:
            self.errors.append(f"{label}: condition is false")

    def raise_any(self):
        if self.errors:
            raise AssertionError(f"{len(self.errors)} mismatch(es):\n" + "\n\n".join(self.errors[:6]))


class Ctx:
    def __init__(self, rank, world, device):
        self.rank, self.world, self.device = rank, world, torch.device(device)

    def shard(self, widths):
        start = sum(widths[:self.rank])
        return slice(start, start + widths[self.rank])


def _reference(z, y, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
               softcap=None):
    """Plain float64 autograd: softcap, then F.cross_entropy, then the z-loss with PyTorch's denominators."""
    s = softcap * torch.tanh(z / softcap) if softcap is not None else z
    loss = F.cross_entropy(s, y, weight=weight, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    if z_loss:
        lse = torch.logsumexp(s, dim=1)
        valid = torch.ones_like(lse, dtype=torch.bool) if y.is_floating_point() else y != ignore_index
        z_rows = torch.where(valid, z_loss * lse**2, torch.zeros_like(lse))
        loss = loss + (z_rows if reduction == "none" else z_rows.sum() / (valid.sum() if reduction == "mean" else 1))
    return loss


def _grad(fn, x, upstream):
    x = x.detach().clone().requires_grad_()
    loss = fn(x)
    (g,) = torch.autograd.grad(loss, x, upstream(loss))
    return loss.detach(), g


def _problem(seed, n, device, *, ignore_index=-100, n_ignored=2, scale=3.0):
    rng = np.random.default_rng(seed)
    z = torch.from_numpy(rng.normal(size=(n, V)) * scale).to(device)
    y = torch.from_numpy(rng.integers(0, V, size=n)).to(device)
    y[torch.from_numpy(rng.permutation(n)[:n_ignored]).to(device)] = ignore_index
    w = torch.from_numpy(rng.uniform(0.2, 2.0, size=V)).to(device)
    up = torch.from_numpy(rng.normal(size=n)).to(device)
    return z, y, w, up


def _upstream(up):
    return lambda loss: up if loss.dim() else torch.tensor(3.0, dtype=loss.dtype, device=loss.device)


# ----------------------------------------------------------------------------- checks
CHECKS = {}


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


@check
def ce_index_grid(ctx):
    """Index targets, float64, every option combination, uneven shards: loss and gradient equal the unsharded ones."""
    m = Mismatches()
    cases = 0
    for seed, (widths, (reduction, weighting, ignore_index, eps, zl, cap)) in enumerate(
            itertools.product(SPLITS[ctx.world], CE_GRID)):
        z, y, w, up = _problem(seed, 6, ctx.device, ignore_index=ignore_index)
        sh = ctx.shard(widths)
        opts = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=eps, z_loss=zl, softcap=cap)
        weight = None if weighting is None else (w if weighting == "full" else w[sh])
        loss, grad = _grad(lambda x: vocab_parallel_cross_entropy(x, y, weight=weight, **opts), z[:, sh], _upstream(up))
        ref, ref_grad = _grad(lambda x: cross_entropy(x, y, weight=None if weighting is None else w, **opts), z,
                              _upstream(up))
        plain, plain_grad = _grad(lambda x: _reference(x, y, weight=None if weighting is None else w, **opts), z,
                                  _upstream(up))
        label = f"widths={widths} {opts} weight={weighting}"
        m.close(f"loss vs softgrad.torch, {label}", loss, ref, **F64)
        m.close(f"grad vs softgrad.torch, {label}", grad, ref_grad[:, sh], **F64)
        m.close(f"loss vs plain autograd, {label}", loss, plain, **F64)
        m.close(f"grad vs plain autograd, {label}", grad, plain_grad[:, sh], **F64)
        if zl == 0.0 and cap is None:
            m.close(f"loss vs F.cross_entropy, {label}", loss,
                    F.cross_entropy(z, y, weight=None if weighting is None else w, ignore_index=ignore_index,
                                    reduction=reduction, label_smoothing=eps), **F64)
        cases += 1
    m.raise_any()
    return cases


# The options of the cross-entropy grid: every (reduction, weighting, ignore_index) once with the
# plain loss and once with one of the seven other (label_smoothing, z_loss, softcap) combinations,
# cycled, so that every combination meets several reductions and weightings.
_EXTRAS = [x for x in itertools.product([0.0, 0.2], [0.0, 1e-2], [None, 3.0]) if x != (0.0, 0.0, None)]
CE_GRID = [base + extra
           for i, base in enumerate(itertools.product(["mean", "sum", "none"], [None, "full", "shard"], [-100, 2]))
           for extra in ((0.0, 0.0, None), _EXTRAS[i % len(_EXTRAS)])]


@check
def ce_probability_targets(ctx):
    """Probability targets sharded by the same columns: loss, logits gradient and target gradient."""
    m = Mismatches()
    grid = itertools.product(SPLITS[ctx.world], ["mean", "sum", "none"], [False, True],
                             [(0.0, 0.0, None), (0.3, 1e-2, 2.5)])
    for seed, (widths, reduction, weighted, (eps, zl, cap)) in enumerate(grid):
        z, _, w, up = _problem(1000 + seed, 5, ctx.device)
        t = torch.from_numpy(np.random.default_rng(seed).dirichlet(np.ones(V), size=5)).to(ctx.device)
        t[0, 3] = 0.0
        sh = ctx.shard(widths)
        opts = dict(reduction=reduction, label_smoothing=eps, z_loss=zl, softcap=cap)
        ts = t[:, sh].clone().requires_grad_()
        zs = z[:, sh].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(zs, ts, weight=w if weighted else None, **opts)
        loss.backward(_upstream(up)(loss))
        tr = t.clone().requires_grad_()
        zr = z.clone().requires_grad_()
        ref = _reference(zr, tr, weight=w if weighted else None, **opts)
        ref.backward(_upstream(up)(ref))
        label = f"widths={widths} {opts} weighted={weighted}"
        m.close(f"loss, {label}", loss.detach(), ref.detach(), **F64)
        m.close(f"logits grad, {label}", zs.grad, zr.grad[:, sh], **F64)
        m.close(f"target grad, {label}", ts.grad, tr.grad[:, sh], **F64)
    m.raise_any()


@check
def ce_extremes(ctx):
    """-inf entries and whole shards of -inf, logits near 1e4, all rows ignored, bf16 and float32 logits."""
    m = Mismatches()
    for widths in SPLITS[ctx.world]:
        sh = ctx.shard(widths)
        z, y, w, up = _problem(7, 6, ctx.device)
        z[0, :] = -float("inf")
        z[0, 5] = 1.0  # a row with a single finite logit: every other shard's part of it is -inf
        y[0] = 5
        z[1, 2] = -float("inf")
        y[2] = 2
        z[2, 2] = -float("inf")  # the target class has probability 0: an infinite loss, as in PyTorch
        for opts in ({}, {"label_smoothing": 0.0, "z_loss": 1e-3}, {"softcap": 5.0}):
            loss, grad = _grad(lambda x: vocab_parallel_cross_entropy(x, y, reduction="none", **opts), z[:, sh],
                               _upstream(up))
            ref, ref_grad = _grad(lambda x: cross_entropy(x, y, reduction="none", **opts), z, _upstream(up))
            m.close(f"-inf rows loss {widths} {opts}", loss, ref, **F64)
            m.close(f"-inf rows grad {widths} {opts}", grad, ref_grad[:, sh], **F64)
        # a common offset of 1e4 costs no precision, and +-1e4 spreads are exact
        z, y, w, up = _problem(8, 6, ctx.device)
        for big in (z + 1e4, z * 3e3):
            for opts in ({}, {"label_smoothing": 0.1, "z_loss": 1e-4}):
                loss, grad = _grad(lambda x: vocab_parallel_cross_entropy(x, y, **opts), big[:, sh], _upstream(up))
                ref, ref_grad = _grad(lambda x: cross_entropy(x, y, **opts), big, _upstream(up))
                m.close(f"large logits loss {widths} {opts}", loss, ref, rtol=1e-10, atol=1e-8)
                m.close(f"large logits grad {widths} {opts}", grad, ref_grad[:, sh], **F64)
        # every row ignored: a mean over nothing is NaN with a zero gradient, as in PyTorch
        y_all = torch.full_like(y, -100)
        loss, grad = _grad(lambda x: vocab_parallel_cross_entropy(x, y_all), z[:, sh], _upstream(up))
        m.true(f"all ignored: NaN loss {widths}", bool(torch.isnan(loss)))
        m.true(f"all ignored: zero grad {widths}", bool((grad == 0).all()))
        # low precision: within what the float32 computation of the same rows gives
        for dtype, tol in ((torch.float32, dict(rtol=2e-5, atol=1e-6)), (torch.bfloat16, dict(rtol=2e-2, atol=2e-3))):
            zl = z.to(dtype)
            opts = {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 20.0}
            loss, grad = _grad(lambda x: vocab_parallel_cross_entropy(x, y, **opts), zl[:, sh], _upstream(up))
            ref, ref_grad = _grad(lambda x: cross_entropy(x, y, **opts), zl.to(torch.float64), _upstream(up))
            m.true(f"{dtype} dtypes", loss.dtype == dtype and grad.dtype == dtype)
            m.close(f"{dtype} loss {widths}", loss.to(torch.float64), ref, **tol)
            m.close(f"{dtype} grad {widths}", grad.to(torch.float64), ref_grad[:, sh], **tol)
    m.raise_any()


@check
def ce_conformance_oracle(ctx):
    """The conformance test's cases and float64 oracle (tests/test_cross_entropy_conformance.py), on sharded columns."""
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    import test_cross_entropy_conformance as conf

    m = Mismatches()
    cases = 0
    for case in conf.CASES:
        z, y, weight = conf._problem(np.random.default_rng(len(case)), case)
        n_cols = z.shape[1]
        # uneven shards, one of them empty when there are more ranks than columns allow
        widths = [n_cols // ctx.world + (r < n_cols % ctx.world) for r in range(ctx.world)]
        sh = ctx.shard(widths)
        if case == "masked" and ctx.world > 1:  # a shard whose part of a row is all -inf is part of the point
            m.true("masked case: some shard row is all -inf", conf._row_all_masked_on_some_shard(z, widths))
        for options, reduction, weighted in itertools.product(conf.OPTIONS, conf.REDUCTIONS, [False, True]):
            if conf._skip_undefined(case, options, weighted):
                continue
            rng = np.random.default_rng(cases)
            w = (weight if case == "zero_weight_on_masked_class" else rng.uniform(0.5, 2.0, size=n_cols)) \
                if weighted else None
            if w is None and case == "zero_weight_on_masked_class" and options.get("label_smoothing"):
                continue
            upstream = rng.normal(size=z.shape[0]) if reduction == "none" else np.array(1.7)
            want_loss, want_grad = conf._expected(z, y, w, options, reduction, upstream)
            x = torch.from_numpy(z[:, sh].copy()).to(ctx.device).requires_grad_()
            loss = vocab_parallel_cross_entropy(x, torch.from_numpy(y).to(ctx.device),
                                                weight=None if w is None else torch.from_numpy(w).to(ctx.device),
                                                reduction=reduction, **options)
            (grad,) = torch.autograd.grad(loss, x, torch.as_tensor(upstream).to(ctx.device))
            where = f"{case} {options} {reduction} weighted={weighted}"
            m.close(f"loss {where}", loss.detach().cpu().double(), torch.as_tensor(want_loss).double(),
                    rtol=1e-9, atol=1e-9, equal_nan=True)
            m.close(f"grad {where}", grad.cpu(), torch.from_numpy(want_grad[:, sh].copy()), rtol=1e-5,
                    atol=1e-6 + 1e-10 * conf._scale(want_loss))
            cases += 1
    m.true("cases ran", cases > 100)
    m.raise_any()


@check
def ce_same_pass_statistics(ctx):
    """Entropy, global argmax (ties across shards: the lowest class) and token accuracy equal the unsharded ones."""
    m = Mismatches()
    for widths in SPLITS[ctx.world]:
        sh = ctx.shard(widths)
        z, y, w, up = _problem(31, 6, ctx.device)
        z[0, 2] = z[0, 9] = z[0].max() + 1.0  # a tie between columns on different shards (2 wins)
        z[1, :] = -float("inf")
        z[1, 10] = 0.0  # one finite class: zero entropy, argmax on the last shard
        flags = dict(return_token_accuracy=True, return_predicted_tokens=True, return_entropy=True)
        for opts in ({}, {"softcap": 3.0, "label_smoothing": 0.1}):
            ours = vocab_parallel_cross_entropy(z[:, sh], y, **opts, **flags)
            ref = cross_entropy(z, y, **opts, **flags)
            m.close(f"entropy {widths} {opts}", ours.entropy, ref.entropy, **F64)
            m.true(f"argmax {widths} {opts}", torch.equal(ours.predicted_tokens, ref.predicted_tokens))
            m.true(f"tie to the lowest class {widths}", int(ours.predicted_tokens[0]) == 2)
            m.close(f"accuracy {widths} {opts}", ours.token_accuracy, ref.token_accuracy)
            m.close(f"loss {widths} {opts}", ours.loss, ref.loss, **F64)
        h = torch.from_numpy(np.random.default_rng(5).normal(size=(6, 3))).to(ctx.device)
        W = torch.from_numpy(np.random.default_rng(6).normal(size=(V, 3))).to(ctx.device)
        ours = vocab_parallel_linear_cross_entropy(h, W[sh], y, chunk_size=4, **flags)
        ref = linear_cross_entropy(h, W, y, **flags)
        valid = y != -100
        m.close(f"linear entropy {widths}", ours.entropy[valid], ref.entropy[valid], **F64)
        m.true(f"linear argmax {widths}", torch.equal(ours.predicted_tokens[valid], ref.predicted_tokens[valid]))
        m.close(f"linear accuracy {widths}", ours.token_accuracy, ref.token_accuracy)
    m.raise_any()


@check
def ce_inplace_lse_and_retain_graph(ctx):
    """inplace_backward, return_lse, a second backward with retain_graph, no grad mode."""
    m = Mismatches()
    widths = SPLITS[ctx.world][-1]
    sh = ctx.shard(widths)
    rng = np.random.default_rng(3)
    h = torch.from_numpy(rng.normal(size=(7, 4))).to(ctx.device).requires_grad_()
    W = torch.from_numpy(rng.normal(size=(V, 4))).to(ctx.device)
    y = torch.from_numpy(rng.integers(0, V, size=7)).to(ctx.device)
    opts = {"label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 4.0}
    results = []
    for inplace in (False, True):
        h.grad = None
        out = vocab_parallel_cross_entropy(h @ W[sh].T, y, return_lse=True, inplace_backward=inplace, **opts)
        out.loss.backward()
        results.append((out.loss.detach(), out.lse, out.z_loss, h.grad.clone()))
    h.grad = None
    ref = cross_entropy(h @ W.T, y, return_lse=True, **opts)
    ref.loss.backward()
    for inplace, (loss, lse, zpart, gh) in zip((False, True), results):
        m.close(f"loss inplace={inplace}", loss, ref.loss.detach(), **F64)
        m.close(f"lse inplace={inplace}", lse, ref.lse, **F64)
        m.close(f"z part inplace={inplace}", zpart, ref.z_loss, **F64)
        # dloss/dh = sum over shards of G_k W_k: each rank's part, summed over the group
        dist.all_reduce(gh)
        m.close(f"grad through the shard inplace={inplace}", gh, h.grad, **F64)
    z = torch.from_numpy(rng.normal(size=(7, V))).to(ctx.device)
    zs = z[:, sh].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(zs, y, **opts)
    (g1,) = torch.autograd.grad(loss, zs, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, zs)
    m.close("retain_graph: second backward", g2, g1, rtol=0, atol=0)
    with torch.no_grad():
        m.close("no_grad loss", vocab_parallel_cross_entropy(zs, y, **opts), loss.detach(), **F64)
    m.raise_any()


@check
def ce_errors_on_every_rank(ctx):
    """Bad input on one rank (or all) raises the same ValueError on every rank; the group stays usable."""
    widths = SPLITS[ctx.world][0]
    sh = ctx.shard(widths)
    z, y, w, _ = _problem(11, 6, ctx.device)
    first = ctx.rank == 0
    last = ctx.rank == ctx.world - 1
    y_bad = y.clone()
    y_bad[1] = V
    y_other = y.clone()
    y_other[2] = (y[2] + 1) % V
    w_nan = w.clone()
    w_nan[0] = float("nan")
    z_nan = z[:, sh].clone()
    if last:
        z_nan[4, 0] = float("nan")
    cases = {
        "target out of range": (lambda: vocab_parallel_cross_entropy(z[:, sh], y_bad), f"class index {V} outside"),
        "target differs": (lambda: vocab_parallel_cross_entropy(z[:, sh], y_other if first else y),
                           "target differs between ranks"),
        "rows differ": (lambda: vocab_parallel_cross_entropy(z[: 5 if first else 6, sh], y[: 5 if first else 6]),
                        "number of rows"),
        "options differ": (lambda: vocab_parallel_cross_entropy(z[:, sh], y, label_smoothing=0.1 if first else 0.0),
                           "different options"),
        "NaN weight on rank 0": (lambda: vocab_parallel_cross_entropy(z[:, sh], y, weight=w_nan if first else w),
                                 "weight contains NaN or infinite entries (on rank 0)"),
        "weight of the wrong length": (lambda: vocab_parallel_cross_entropy(z[:, sh], y, weight=w[:-1] if first else w),
                                       "weight on rank 0 has"),
        "NaN logit on the last rank": (lambda: vocab_parallel_cross_entropy(z_nan, y), "logits contain NaN"),
        "linear: D differs": (lambda: vocab_parallel_linear_cross_entropy(
            torch.ones(6, 3 if first else 4, dtype=torch.float64, device=ctx.device),
            torch.ones(widths[ctx.rank], 3 if first else 4, dtype=torch.float64, device=ctx.device), y.clamp(min=0)),
            "hidden size or bias"),
    }
    seen = {}
    for name, (call, match) in cases.items():
        try:
            call()
        except ValueError as exc:
            seen[name] = str(exc)
            if match not in str(exc):
                raise AssertionError(f"{name}: message {str(exc)!r} does not contain {match!r}") from exc
        else:
            raise AssertionError(f"{name}: no ValueError on rank {ctx.rank}")
    # the group is still in step: a normal call after all those errors works
    vocab_parallel_cross_entropy(z[:, sh], y)
    return seen


@check
def ce_communication_is_order_n(ctx):
    """Bytes passed to collectives depend on N only: the same for V = 11 and V = 3000, and the stated formula."""
    rng = np.random.default_rng(5)
    n = 16
    sent = {}
    for vocab in (11, 3000):
        widths = [vocab // ctx.world + (r < vocab % ctx.world) for r in range(ctx.world)]
        y = torch.from_numpy(rng.integers(0, vocab, size=n)).to(ctx.device)  # the same on every rank
        local = np.random.default_rng(100 + ctx.rank)
        z = torch.from_numpy(local.normal(size=(n, widths[ctx.rank]))).to(ctx.device).requires_grad_()
        w_shard = torch.ones(widths[ctx.rank], dtype=torch.float64, device=ctx.device)
        for name, kwargs in (("plain", {}), ("smoothing", {"label_smoothing": 0.1}),
                             ("shard weight", {"weight": w_shard}), ("all", {"weight": w_shard, "label_smoothing": 0.1,
                                                                             "z_loss": 1e-3, "softcap": 5.0})):
            with record_collectives() as log:
                vocab_parallel_cross_entropy(z, y, **kwargs).backward()
            sent[(vocab, name)] = [(r.op, r.nbytes) for r in log]
        hidden = torch.from_numpy(rng.normal(size=(n, 8))).to(ctx.device).requires_grad_()
        wt = torch.from_numpy(local.normal(size=(widths[ctx.rank], 8))).to(ctx.device).requires_grad_()
        with record_collectives() as log:
            vocab_parallel_linear_cross_entropy(hidden, wt, y, chunk_size=5).backward()
        sent[(vocab, "linear")] = [(r.op, r.nbytes) for r in log]
    for key in [k for k in sent if k[0] == 11]:
        if sent[key] != sent[(3000, key[1])]:
            raise AssertionError(f"{key[1]}: bytes depend on V: {sent[key]} vs {sent[(3000, key[1])]}")
    f = 8  # float64 logits: the row statistics travel in float64
    meta = ("all_reduce:max", (2 * ctx.world + 16) * 8)  # layout and checks: 2 P + 16 int64
    expected = {
        "plain": [meta, ("all_reduce:max", n * f), ("all_reduce:sum", 2 * n * f)],
        "smoothing": [meta, ("all_reduce:max", n * f), ("all_reduce:sum", 4 * n * f)],
        "shard weight": [meta, ("all_reduce:max", n * f), ("all_reduce:sum", 3 * n * f)],
        "all": [meta, ("all_reduce:max", n * f), ("all_reduce:sum", 5 * n * f)],
        "linear": [meta, ("all_reduce:max", n * f), ("all_reduce:sum", 2 * n * f),
                   ("all_reduce:sum", n * 8 * f)],
    }
    for name, want in expected.items():
        if sent[(11, name)] != want:
            raise AssertionError(f"{name}: collectives {sent[(11, name)]}, expected {want}")
    return {name: sum(b for _, b in sent[(11, name)]) for name in expected}


@check
def linear_head_grid(ctx):
    """The sharded fused linear head equals linear_cross_entropy on the full weight: loss and every gradient."""
    m = Mismatches()
    vocab, d = 13, 5
    splits = {1: [[13]], 2: [[6, 7], [12, 1]], 3: [[4, 4, 5], [7, 0, 6]]}[ctx.world]
    grid = itertools.product(splits, ["mean", "sum", "none"], [(0.0, 0.0, None), (0.2, 0.0, None), (0.0, 1e-2, 3.0),
                                                               (0.2, 1e-2, 3.0)], [False, True])
    for seed, (widths, reduction, (eps, zl, cap), use_bias) in enumerate(grid):
        rng = np.random.default_rng(2000 + seed)
        h = torch.from_numpy(rng.normal(size=(2, 4, d))).to(ctx.device)  # (B, T, D)
        W = torch.from_numpy(rng.normal(size=(vocab, d))).to(ctx.device)
        b = torch.from_numpy(rng.normal(size=vocab)).to(ctx.device)
        t = torch.from_numpy(rng.integers(0, vocab, size=(2, 4))).to(ctx.device)
        t[0, 1] = -100
        up = torch.from_numpy(rng.normal(size=(2, 4))).to(ctx.device)
        start = sum(widths[:ctx.rank])
        sh = slice(start, start + widths[ctx.rank])
        opts = dict(reduction=reduction, label_smoothing=eps, z_loss=zl, softcap=cap)
        hs, ws, bs = (x.clone().requires_grad_() for x in (h, W[sh], b[sh]))
        loss = vocab_parallel_linear_cross_entropy(hs, ws, t, bs if use_bias else None, chunk_size=3, **opts)
        loss.backward(_upstream(up)(loss))
        hr, wr, br = (x.clone().requires_grad_() for x in (h, W, b))
        ref = linear_cross_entropy(hr, wr, t, br if use_bias else None, **opts)
        ref.backward(_upstream(up)(ref))
        label = f"widths={widths} {opts} bias={use_bias}"
        m.close(f"loss {label}", loss.detach(), ref.detach(), **F64)
        m.close(f"grad hidden {label}", hs.grad, hr.grad, **F64)
        m.close(f"grad weight shard {label}", ws.grad, wr.grad[sh], **F64)
        if use_bias:
            m.close(f"grad bias shard {label}", bs.grad, br.grad[sh], **F64)
        else:
            m.true(f"no bias grad {label}", bs.grad is None)
    # float32 with the default chunk size: equal to float rounding
    rng = np.random.default_rng(9)
    widths = splits[0]
    start = sum(widths[:ctx.rank])
    sh = slice(start, start + widths[ctx.rank])
    h = torch.from_numpy(rng.normal(size=(9, d))).float().to(ctx.device).requires_grad_()
    W = torch.from_numpy(rng.normal(size=(vocab, d))).float().to(ctx.device).requires_grad_()
    t = torch.from_numpy(rng.integers(0, vocab, size=9)).to(ctx.device)
    loss = vocab_parallel_linear_cross_entropy(h, W[sh].detach().requires_grad_(), t, label_smoothing=0.1)
    (gh,) = torch.autograd.grad(loss, h)
    ref = linear_cross_entropy(h, W, t, label_smoothing=0.1)
    ref_gh, _ = torch.autograd.grad(ref, (h, W))
    m.true("float32 dtype", loss.dtype == torch.float32)
    m.close("float32 loss", loss, ref, rtol=2e-5, atol=1e-6)
    m.close("float32 grad hidden", gh, ref_gh, rtol=2e-5, atol=1e-6)
    m.raise_any()


@check
def triton_kernels_through_the_interpreter(ctx):
    """The same sharded computation with the Triton row kernels (Triton's interpreter on CPU)."""
    if ctx.device.type != "cuda":
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            return "skipped: TRITON_INTERPRET is not set"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "skipped: triton is not installed"
    from softgrad.torch import use_kernel

    m = Mismatches()
    widths = SPLITS[ctx.world][-1]
    sh = ctx.shard(widths)
    z, y, w, up = _problem(21, 4, ctx.device)
    rng = np.random.default_rng(4)
    h = torch.from_numpy(rng.normal(size=(4, 3))).to(ctx.device)
    W = torch.from_numpy(rng.normal(size=(V, 3))).to(ctx.device)
    opts = {"weight": w, "label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 3.0, "reduction": "none"}
    with use_kernel("triton:two_pass:16"):
        loss, grad = _grad(lambda x: vocab_parallel_cross_entropy(x, y, **opts), z[:, sh], _upstream(up))
        hs = h.clone().requires_grad_()
        lin = vocab_parallel_linear_cross_entropy(hs, W[sh], y, label_smoothing=0.2, chunk_size=3)
        lin.backward()
    ref, ref_grad = _grad(lambda x: cross_entropy(x, y, **opts), z, _upstream(up))
    hr = h.clone().requires_grad_()
    lin_ref = linear_cross_entropy(hr, W, y, label_smoothing=0.2)
    lin_ref.backward()
    m.close("triton loss", loss, ref, **F64)
    m.close("triton grad", grad, ref_grad[:, sh], **F64)
    m.close("triton linear loss", lin.detach(), lin_ref.detach(), **F64)
    m.close("triton linear grad hidden", hs.grad, hr.grad, **F64)
    m.raise_any()
    return "ran"


# ----------------------------------------------------------------------------- data-parallel classifier
def classifier_data():
    """Digits, standardised; rows sorted by label and cut unevenly, so that every rank lacks some classes."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = (X - X.mean(0)) / (X.std(0) + 1e-3)
    w = np.random.default_rng(0).uniform(0.5, 2.0, size=X.shape[0])
    return X, y, w


def classifier_cuts(n, world):
    fractions = {1: [1.0], 2: [0.62, 0.38], 3: [0.45, 0.2, 0.35]}[world]
    cuts = np.concatenate([[0], np.round(np.cumsum(fractions) * n).astype(int)])
    order = np.argsort(classifier_data()[1], kind="stable")
    return [order[a:b] for a, b in zip(cuts[:-1], cuts[1:])]


CLASSIFIER_CASES = {
    "lbfgs": dict(alpha=1e-2, solver="lbfgs", tol=1e-6, max_iter=500),
    # sample weights, class_weight="balanced" (global counts), string labels, no intercept
    "lbfgs_weighted_strings": dict(alpha=1e-3, solver="lbfgs", tol=1e-6, max_iter=500, class_weight="balanced",
                                   fit_intercept=False),
    # the automatic step needs the distributed power iteration; stops at max_iter, like the single process
    "gd_auto_step": dict(alpha=1e-2, solver="gd", tol=1e-3, max_iter=40),
    "gd_adaptive": dict(alpha=1e-2, solver="gd", learning_rate=2.0, schedule="adaptive", tol=1e-3, max_iter=30),
    # CSR shards (the digits' small entries zeroed), sample weights and "balanced" by summed weight
    "lbfgs_sparse": dict(alpha=1e-2, solver="lbfgs", tol=1e-6, max_iter=500, class_weight="balanced"),
}


def classifier_cases(world):
    """Every case on 2 ranks; on 3 (slower to spawn on 2 cores) the two that differ most."""
    return sorted(CLASSIFIER_CASES) if world < 3 else ["gd_auto_step", "lbfgs_weighted_strings"]


def classifier_case_inputs(name):
    X, y, w = classifier_data()
    sample_weight = None
    if name == "lbfgs_weighted_strings":
        sample_weight = w
        y = np.array(["digit-" + str(v) for v in y], dtype=object)
    if name == "lbfgs_sparse":
        import scipy.sparse as sp

        X = sp.csr_matrix(np.where(np.abs(X) < 0.5, 0.0, X))
        sample_weight = w
    return X, y, sample_weight


@check
def data_parallel_classifier(ctx):
    """fit_data_parallel on each case; returns the fitted attributes for the parent to compare."""
    import warnings

    from softgrad import SoftmaxClassifier
    from softgrad.distributed import fit_data_parallel

    out = {}
    for name, params in CLASSIFIER_CASES.items():
        if name not in classifier_cases(ctx.world):
            continue
        X, y, sample_weight = classifier_case_inputs(name)
        rows = classifier_cuts(X.shape[0], ctx.world)[ctx.rank]
        seen = []
        clf = SoftmaxClassifier(**params, callback=lambda n, J: seen.append(J))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a ConvergenceWarning is part of the parity, compared by n_iter_
            fit_data_parallel(clf, X[rows], y[rows], sample_weight=None if sample_weight is None
                              else sample_weight[rows])
        out[name] = {"coef": clf.coef_, "intercept": clf.intercept_, "classes": clf.classes_.tolist(),
                     "n_iter": clf.n_iter_, "objective": clf.objective_, "loss_curve": clf.loss_curve_,
                     "callback_values": seen, "score": clf.score(X, y), "local_classes": np.unique(y[rows]).tolist(),
                     "n_features_in": clf.n_features_in_}
    # invalid input on one rank is reported on every rank
    X, y, _ = classifier_case_inputs("lbfgs")
    rows = classifier_cuts(X.shape[0], ctx.world)[ctx.rank]
    Xbad = X[rows].copy()
    if ctx.rank == ctx.world - 1:
        Xbad[0, 0] = np.nan
    try:
        fit_data_parallel(SoftmaxClassifier(), Xbad, y[rows])
    except ValueError as exc:
        out["error_message"] = str(exc)
    else:
        raise AssertionError("NaN in the last rank's X_shard did not raise")
    try:
        fit_data_parallel(SoftmaxClassifier(solver="sgd"), X[rows], y[rows])
    except ValueError as exc:
        out["sgd_message"] = str(exc)
    return out


@check
def vocab_parallel_example(ctx):
    """examples/train_vocab_parallel.py on this group: a few steps, and its own check against the unsharded head."""
    if ctx.device.type != "cpu":
        return "skipped: the example runs on CPU"
    import contextlib
    import io
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
    import train_vocab_parallel

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = train_vocab_parallel.main(["--vocab", "301", "--steps", "3", "--batch", "64", "--check"])
    return status, out.getvalue()


# ----------------------------------------------------------------------------- RL head (linear_logprobs)
@check
def logprobs_head_grid(ctx):
    """vocab_parallel_linear_logprobs equals linear_logprobs on the full weight: both outputs and every gradient."""
    from softgrad.distributed import vocab_parallel_linear_logprobs
    from softgrad.torch import linear_logprobs

    m = Mismatches()
    vocab, d = 13, 5
    splits = {1: [[13]], 2: [[6, 7], [12, 1]], 3: [[4, 4, 5], [7, 0, 6]]}[ctx.world]
    grid = itertools.product(splits, ["scalar", "tensor"], [False, True], [False, True])
    for seed, (widths, temperature, use_bias, entropy) in enumerate(grid):
        rng = np.random.default_rng(3000 + seed)
        h = torch.from_numpy(rng.normal(size=(2, 4, d))).to(ctx.device)  # (B, T, D)
        W = torch.from_numpy(rng.normal(size=(vocab, d))).to(ctx.device)
        b = torch.from_numpy(rng.normal(size=vocab)).to(ctx.device)
        t = torch.from_numpy(rng.integers(0, vocab, size=(2, 4))).to(ctx.device)
        t[0, 1] = -100
        tau = 0.7 if temperature == "scalar" else torch.from_numpy(rng.uniform(0.4, 1.6, size=(2, 4))).to(ctx.device)
        up = [torch.from_numpy(rng.normal(size=(2, 4))).to(ctx.device) for _ in range(2)]
        sh = ctx.shard(widths)
        opts = dict(temperature=tau, return_entropy=entropy)
        hs, ws, bs = (x.clone().requires_grad_() for x in (h, W[sh], b[sh]))
        out = vocab_parallel_linear_logprobs(hs, ws, t, bs if use_bias else None, chunk_size=3, **opts)
        hr, wr, br = (x.clone().requires_grad_() for x in (h, W, b))
        ref = linear_logprobs(hr, wr, t, br if use_bias else None, **opts)
        outs, refs = (tuple(out), tuple(ref)) if entropy else ((out,), (ref,))
        params, ref_params = ([hs, ws, bs], [hr, wr, br]) if use_bias else ([hs, ws], [hr, wr])
        got = torch.autograd.grad(outs, params, up[:len(outs)])
        want = torch.autograd.grad(refs, ref_params, up[:len(outs)])
        label = f"widths={widths} temperature={temperature} bias={use_bias} entropy={entropy}"
        for i, (a, e) in enumerate(zip(outs, refs)):
            m.close(f"output {i} {label}", a.detach(), e.detach(), **F64)
        m.close(f"grad hidden {label}", got[0], want[0], **F64)
        m.close(f"grad weight shard {label}", got[1], want[1][sh], **F64)
        if use_bias:
            m.close(f"grad bias shard {label}", got[2], want[2][sh], **F64)
    # float32, default chunk size, only the entropy's gradient
    rng = np.random.default_rng(31)
    sh = ctx.shard(splits[-1])
    h = torch.from_numpy(rng.normal(size=(9, d))).float().to(ctx.device).requires_grad_()
    W = torch.from_numpy(rng.normal(size=(vocab, d))).float().to(ctx.device)
    t = torch.from_numpy(rng.integers(0, vocab, size=9)).to(ctx.device)
    out = vocab_parallel_linear_logprobs(h, W[sh], t, temperature=1.3, return_entropy=True)
    (gh,) = torch.autograd.grad(out.entropy.sum(), h)
    ref = linear_logprobs(h, W, t, temperature=1.3, return_entropy=True)
    (ref_gh,) = torch.autograd.grad(ref.entropy.sum(), h)
    m.true("float32 dtype", out.logprobs.dtype == torch.float32)
    m.close("float32 logprobs", out.logprobs, ref.logprobs, rtol=2e-5, atol=1e-6)
    m.close("float32 entropy", out.entropy, ref.entropy, rtol=2e-5, atol=1e-6)
    m.close("float32 entropy grad hidden", gh, ref_gh, rtol=2e-5, atol=1e-6)
    # a temperature that differs on one rank, and a bad target: the same error on every rank
    messages = {}
    tau = torch.ones(9, dtype=torch.float32, device=ctx.device)
    if ctx.rank == ctx.world - 1:
        tau[4] = 2.0
    for name, call in [("temperature", lambda: vocab_parallel_linear_logprobs(h, W[sh], t, temperature=tau)),
                       ("target", lambda: vocab_parallel_linear_logprobs(h, W[sh], torch.full_like(t, vocab)))]:
        try:
            call()
        except ValueError as exc:
            messages[name] = str(exc)
        else:
            m.true(f"{name} mismatch raised", False)
    m.true("temperature message", "temperature differs between ranks" in messages.get("temperature", ""))
    m.true("target message", f"outside [0, {vocab})" in messages.get("target", ""))
    m.raise_any()
    return messages


def run_checks(rank, world, device="cpu", names=None):
    """Run the checks in order on this rank; ``{name: ("ok", data) or ("fail", traceback)}``."""
    ctx = Ctx(rank, world, device)
    results = {}
    for name, fn in CHECKS.items():
        if names is not None and name not in names:
            continue
        start = time.perf_counter()
        try:
            results[name] = ("ok", fn(ctx))
        except Exception:  # noqa: BLE001 - reported per check to the parent
            results[name] = ("fail", traceback.format_exc())
        SECONDS[name] = time.perf_counter() - start
    results["seconds"] = ("ok", dict(SECONDS))
    return results


SECONDS: dict = {}
