"""``softgrad check``: gradient-check every public function of the core.

Each case draws fresh random inputs, evaluates the analytic gradient the package
provides (a closed form, ``softmax_backward``, ``softmax_jacobian``, the fused gradient
of ``softmax_cross_entropy``, ``dW`` of the linear losses, ...) in the dtype under
test, and compares it with central differences in float64 through
:func:`softgrad.gradcheck`. The table lists one row per case; the exit status is 1
if any case fails (or raises).

The functions are looked up on the ``softgrad`` module when a case runs, so a test
can replace one with a broken version and watch ``check`` fail.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

import click
import numpy as np

import softgrad as sg

_DTYPES = {"float64": np.float64, "float32": np.float32, "float16": np.float16}
# Step for inputs of magnitude ~1e4: eps=1e-6 would lose ~1e-6 of the loss to rounding.
_EPS_LARGE = 1e-4


@dataclass(frozen=True)
class _Case:
    function: str
    case: str
    run: Callable[[], sg.GradcheckReport]


# ---------------------------------------------------------------- helpers


def _full_jacobian(jac_rows: np.ndarray, shape: tuple[int, ...], axis: int) -> np.ndarray:
    """Expand ``softmax_jacobian``'s per-slice ``batch + (C, C)`` into ``shape + shape``.

    Slices along ``axis`` are independent, so the full Jacobian is block diagonal:
    ``full[b, i, b', j] = delta_bb' J[b, i, j]`` with the class index moved back to ``axis``.
    """
    batch, C = jac_rows.shape[:-2], jac_rows.shape[-1]
    B = int(np.prod(batch, dtype=np.int64))
    full = np.zeros((B, C, B, C), dtype=np.float64)
    idx = np.arange(B)
    full[idx, :, idx, :] = jac_rows.reshape(B, C, C)
    full = full.reshape(batch + (C,) + batch + (C,))
    n = len(shape)
    full = np.moveaxis(full, n - 1, axis)
    return np.moveaxis(full, 2 * n - 1, n + axis)


def _masked(z: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """``z`` with ``-inf`` where ``mask`` is set (masked logits are constants, not inputs)."""
    if mask is None:
        return z
    out = np.array(z, copy=True)
    out[mask] = -np.inf
    return out


def _mask_for(rng: np.random.Generator, shape: tuple[int, ...], axis: int, keep=None) -> np.ndarray:
    """A random mask that leaves at least one class per slice (and class ``keep``) unmasked."""
    mask = rng.random(shape) < 0.3
    moved = np.moveaxis(mask, axis, -1)
    moved[..., 0] = False
    if keep is not None:
        np.put_along_axis(moved, np.expand_dims(keep, -1), False, axis=-1)
    return mask


def _describe(shape, axis=-1, **opts) -> str:
    parts = [str(shape)] + ([f"axis={axis}"] if axis != -1 else [])
    parts += [k if v is True else f"{k}={v}" for k, v in opts.items() if v not in (None, False)]
    return " ".join(parts)


# ---------------------------------------------------------------- the cases


def _softmax_family(rng, dt) -> list[_Case]:
    cases = []
    layouts = [((5,), -1, False), ((4, 6), -1, False), ((2, 5, 3), 1, False), ((3, 7), -1, True)]
    for shape, axis, with_mask in layouts:
        z = (rng.normal(size=shape) * 3).astype(dt)
        g = rng.normal(size=shape).astype(dt)
        mask = _mask_for(rng, shape, axis) if with_mask else None
        desc = _describe(shape, axis, **{"-inf mask": with_mask})
        ax = axis % len(shape)

        def run_softmax(z=z, g=g, mask=mask, axis=axis):
            # <g, softmax(z)>: gradient a * (g - <g, a>), written here from the seed's formula
            def grad(z):
                a = sg.softmax(_masked(z, mask), axis=axis).astype(np.float64)
                gg = g.astype(np.float64)
                return a * (gg - (gg * a).sum(axis=axis, keepdims=True))
            return sg.gradcheck(lambda z: np.sum(g * sg.softmax(_masked(z, mask), axis=axis)), z, grad=grad)

        def run_backward(z=z, g=g, mask=mask, axis=axis):
            return sg.gradcheck(
                lambda z: np.sum(g * sg.softmax(_masked(z, mask), axis=axis)), z,
                grad=lambda z: sg.softmax_backward(g, sg.softmax(_masked(z, mask), axis=axis), axis=axis))

        def run_jacobian(z=z, mask=mask, axis=axis, ax=ax, shape=shape):
            return sg.gradcheck(
                lambda z: sg.softmax(_masked(z, mask), axis=axis), z,
                grad=lambda z: _full_jacobian(sg.softmax_jacobian(_masked(z, mask), axis=axis), shape, ax))

        def run_log_softmax(z=z, g=g, mask=mask, axis=axis):
            # d<g, z - lse(z)>/dz = g - softmax(z) * sum(g); masked entries are constants (0)
            def grad(z):
                a = sg.softmax(_masked(z, mask), axis=axis).astype(np.float64)
                gg = np.where(mask, 0.0, g) if mask is not None else g.astype(np.float64)
                out = gg - a * gg.sum(axis=axis, keepdims=True)
                return out if mask is None else np.where(mask, 0.0, out)

            def value(z):
                lp = sg.log_softmax(_masked(z, mask), axis=axis)
                return np.sum(np.where(np.isneginf(lp), 0.0, g * lp))
            return sg.gradcheck(value, z, grad=grad)

        def run_logsumexp(z=z, g=g, mask=mask, axis=axis):
            gl = np.take(g, 0, axis=axis)  # an upstream gradient of the reduced shape
            return sg.gradcheck(
                lambda z: np.sum(gl * sg.logsumexp(_masked(z, mask), axis=axis)), z,
                grad=lambda z: np.expand_dims(gl, axis) * sg.softmax(_masked(z, mask), axis=axis))

        cases += [
            _Case("softmax", desc, run_softmax),
            _Case("softmax_backward", desc, run_backward),
            _Case("softmax_jacobian", desc, run_jacobian),
            _Case("log_softmax", desc, run_log_softmax),
            _Case("logsumexp", desc, run_logsumexp),
        ]
    # extreme logits: softmax saturates; the step grows with the magnitude
    z = np.array([[1e4, -1e4, 0.5e4, 1e4 - 1.0], [-1e4, -1e4 + 2.0, -1e4 + 1.0, -9999.5]], dtype=dt)
    g = rng.normal(size=z.shape).astype(dt)
    cases.append(_Case("softmax_backward", "(2, 4) logits ~ +-1e4", lambda z=z, g=g: sg.gradcheck(
        lambda z: np.sum(g * sg.softmax(z)), z,
        grad=lambda z: sg.softmax_backward(g, sg.softmax(z)), eps=_EPS_LARGE)))
    cases.append(_Case("logsumexp", "(2, 4) logits ~ +-1e4", lambda z=z, g=g: sg.gradcheck(
        lambda z: np.sum(g[:, 0] * sg.logsumexp(z)), z,
        grad=lambda z: g[:, :1] * sg.softmax(z), eps=_EPS_LARGE)))
    return cases


def _index_target(rng, shape, axis, ignore_index=None):
    C = shape[axis]
    y = rng.integers(0, C, size=tuple(np.delete(shape, axis)))
    if ignore_index is not None:
        flat = y.reshape(-1)
        flat[::3] = ignore_index
        # keep one counted row: a mean over zero weight is NaN by design, not a gradient
        flat[1] = (ignore_index + 1) % C
    return y


def _prob_target(rng, shape, axis, dt):
    C = shape[axis]
    batch = tuple(np.delete(shape, axis))
    t = rng.dirichlet(np.ones(C), size=batch)
    return np.moveaxis(t, -1, axis).astype(dt)


def _cross_entropy(rng, dt) -> list[_Case]:
    C = 5
    options = [
        # (description, shape, axis, target kind, options)
        ("plain", (6, C), -1, "index", {}),
        ("weight", (6, C), -1, "index", {"weight": True}),
        ("ignore_index", (6, C), -1, "index", {"ignore_index": 2}),
        ("label_smoothing=0.2", (6, C), -1, "index", {"label_smoothing": 0.2}),
        ("weight ignore_index smoothing sum", (6, C), -1, "index",
         {"weight": True, "ignore_index": -100, "label_smoothing": 0.1, "reduction": "sum"}),
        ("reduction=none (summed)", (6, C), -1, "index", {"reduction": "none"}),
        ("probability target", (6, C), -1, "probs", {}),
        ("probability target weight smoothing sum", (6, C), -1, "probs",
         {"weight": True, "label_smoothing": 0.3, "reduction": "sum"}),
        ("(N, C, d) ignore_index", (2, C, 3), 1, "index", {"ignore_index": 1}),
        ("-inf mask", (6, C), -1, "index", {"mask": True}),
        ("logits ~ +-1e4", (6, C), -1, "index", {"large": True}),
    ]
    cases = []
    for desc, shape, axis, kind, opts in options:
        opts = dict(opts)
        mask = opts.pop("mask", False)
        large = opts.pop("large", False)
        z = rng.normal(size=shape) * (1e4 if large else 3.0)
        z = z.astype(dt)
        if kind == "index":
            ignore = opts.get("ignore_index")
            y = _index_target(rng, shape, axis, ignore if ignore not in (None, -100) else None)
        else:
            y = _prob_target(rng, shape, axis, dt)
        if opts.pop("weight", False):
            opts["weight"] = rng.uniform(0.2, 2.0, size=C).astype(dt)
        m = _mask_for(rng, shape, axis, keep=y if mask else None) if mask else None
        reduction = opts.get("reduction", "mean")
        eps = _EPS_LARGE if large else 1e-6
        label = f"{desc}, {shape}" + (f" axis={axis}" if axis != -1 else "")

        def value(z, y=y, m=m, opts=opts, axis=axis, reduction=reduction):
            loss = sg.cross_entropy(_masked(z, m), y, axis=axis, **opts)
            return np.sum(loss) if reduction == "none" else loss

        def fused(z, y=y, m=m, opts=opts, axis=axis, reduction=reduction):
            loss, grad = sg.softmax_cross_entropy(_masked(z, m), y, axis=axis, **opts)
            return (np.sum(loss) if reduction == "none" else loss), grad

        cases.append(_Case("cross_entropy", label, lambda z=z, value=value, fused=fused, eps=eps: sg.gradcheck(
            value, z, grad=lambda z: fused(z)[1], eps=eps)))
        cases.append(_Case("softmax_cross_entropy", label, lambda z=z, fused=fused, eps=eps: sg.gradcheck(
            fused, z, eps=eps)))
    return cases


def _other_losses(rng, dt) -> list[_Case]:
    cases = []
    for desc, shape, axis, kind, reduction in [
        ("index target", (5, 4), -1, "index", "mean"),
        ("probability target", (5, 4), -1, "probs", "sum"),
        ("ignore_index, reduction=none (summed)", (5, 4), -1, "ignore", "none"),
        ("index target", (4, 3), 0, "index", "mean"),
    ]:
        a = _prob_target(rng, shape, axis, np.float64) * 0.8 + 0.2 / shape[axis]  # away from 0
        a = a.astype(dt)
        if kind == "probs":
            y = _prob_target(rng, shape, axis, dt)
        else:
            y = _index_target(rng, shape, axis, -100 if kind == "ignore" else None)

        def f(a, y=y, axis=axis, reduction=reduction):
            loss, grad = sg.cross_entropy_from_probs(a, y, reduction=reduction, axis=axis)
            return np.sum(loss), grad

        label = f"{desc}, {shape}" + (f" axis={axis}" if axis != -1 else "")
        cases.append(_Case("cross_entropy_from_probs", label, lambda a=a, f=f: sg.gradcheck(f, a)))

    for desc, shape, axis, kind in [("index target", (6, 5), -1, "index"),
                                    ("probability target", (6, 5), -1, "probs"),
                                    ("index target", (2, 4, 3), 1, "index")]:
        z = (rng.normal(size=shape) * 2).astype(dt)
        y = _prob_target(rng, shape, axis, dt) if kind == "probs" else _index_target(rng, shape, axis)
        label = f"{desc}, {shape}" + (f" axis={axis}" if axis != -1 else "")
        cases.append(_Case("softmax_mse", label, lambda z=z, y=y, axis=axis: sg.gradcheck(
            lambda z: sg.softmax_mse(z, y, axis=axis), z)))
    return cases


def _linear(rng, dt) -> list[_Case]:
    cases = []
    D, C, N = 6, 4, 9
    X = rng.normal(size=(N, D)).astype(dt)
    y = rng.integers(0, C, size=N)
    for name in ("linear_softmax_loss", "linear_svm_loss"):
        for method in ("naive", "vectorized"):
            W = (rng.normal(size=(D, C)) * 0.5).astype(dt)
            b = rng.normal(size=C).astype(dt)

            def run_plain(W=W, name=name, method=method):
                fn = getattr(sg, name)
                return sg.gradcheck(lambda W: fn(W, X, y, 0.0, method=method), W, names=["W"])

            def run_bias(W=W, b=b, name=name, method=method):
                fn = getattr(sg, name)
                return sg.gradcheck(lambda W, b: fn(W, X, y, 0.05, b=b, method=method), W, b,
                                    names=["W", "b"])

            cases.append(_Case(name, f"{method}, W {W.shape}, X {X.shape}, reg=0", run_plain))
            cases.append(_Case(name, f"{method}, W {W.shape}, X {X.shape}, reg=0.05, bias", run_bias))

    T, Nf = 4, 3
    W = rng.normal(size=(T, Nf)).astype(dt)
    x = rng.normal(size=Nf).astype(dt)
    label = rng.integers(0, T)
    cases.append(_Case("softmax_layer_jacobian", f"W {W.shape}, x {x.shape}", lambda: sg.gradcheck(
        lambda W: sg.softmax(W @ x), W,
        grad=lambda W: sg.softmax_layer_jacobian(W, x).reshape(T, T, Nf))))
    cases.append(_Case("softmax_layer_cross_entropy_grad", f"W {W.shape}, x {x.shape}, y={label}",
                       lambda: sg.gradcheck(lambda W: -sg.log_softmax(W @ x)[label], W,
                                            grad=lambda W: sg.softmax_layer_cross_entropy_grad(W, x, label))))
    return cases


def build_cases(rng: np.random.Generator, dtype) -> list[_Case]:
    """Every check for one dtype, with inputs drawn from ``rng``."""
    dt = np.dtype(dtype).type
    return _softmax_family(rng, dt) + _cross_entropy(rng, dt) + _other_losses(rng, dt) + _linear(rng, dt)


# ---------------------------------------------------------------- running and printing


def _error_text(exc: Exception, max_lines: int = 12) -> str:
    """The exception's type and message, cut to ``max_lines`` lines."""
    lines = f"{type(exc).__name__}: {exc}".splitlines()
    if len(lines) > max_lines:
        lines = lines[:max_lines] + [f"... ({len(lines) - max_lines} more lines)"]
    return "\n".join(lines)


def _run(case: _Case) -> tuple[bool, str, str, sg.GradcheckReport | str]:
    """Run one case: ``(passed, max rel error text, tolerance text, report or error text)``."""
    try:
        report = case.run()
    except Exception as exc:  # a crashing function is a failed check, reported, not fatal
        return False, f"error: {type(exc).__name__}", "", _error_text(exc)
    rtol = max(c.rtol for c in report.inputs)
    return report.passed, f"{report.max_rel_error:.2e}", f"{rtol:g}", report


def _ratio(report: sg.GradcheckReport | str) -> float:
    """Worst error of a case as a fraction of what its tolerance allows (> 1 fails); inf for a crash."""
    if isinstance(report, str):
        return float("inf")
    # gradcheck passes an input when max_abs_error <= atol + rtol * scale
    return max((c.max_abs_error / (c.atol + c.rtol * c.scale) for c in report.inputs), default=0.0)


def _echo_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    for r in [header] + rows:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


def _echo_summary(rows: list[tuple[str, ...]], ratios: list[float], several_backends: bool) -> None:
    """Per function (and backend): cases, passed, worst error / tolerance; then the worst case overall."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, r in enumerate(rows):
        key = r[:2] if several_backends else r[:1]
        groups.setdefault(key, []).append(i)
    header = (("backend",) if several_backends else ()) + ("function", "cases", "passed", "worst err / tol")
    table = []
    for key, members in groups.items():
        worst = max(ratios[i] for i in members)
        passed = sum(rows[i][-1] == "pass" for i in members)
        table.append(key + (str(len(members)), str(passed), "error" if worst == float("inf") else f"{worst:.2g}"))
    _echo_table(header, table)
    w = max(range(len(rows)), key=lambda i: ratios[i])
    r = rows[w]
    where = f"{r[0]}: " if several_backends else ""
    body = r[1:] if several_backends else r
    click.echo(f"\nworst case: {where}{body[0]} [{body[1]}] {body[2]}: max rel err {body[3]}"
               + (f" (rtol {body[4]})" if body[4] else "") + f", {body[5]}  (--verbose lists every case)")


@click.command()
@click.option("--seed", type=int, default=None,
              help="Seed of the random inputs (default: a fresh one, printed so a run can be repeated).")
@click.option("--backend", "backends", multiple=True,
              type=click.Choice(["numpy", "numba", "all"]),
              help="Kernel backend(s) to check; repeatable; 'all' = every importable one. "
                   "Default: the active backend.")
@click.option("--dtype", "dtypes", multiple=True, type=click.Choice(sorted(_DTYPES)),
              help="Dtype(s) of the inputs; repeatable. Default: float64 and float32.")
@click.option("-k", "--only", default=None, metavar="TEXT",
              help="Run only the cases whose function or description contains TEXT.")
@click.option("-v", "--verbose", count=True,
              help="-v: one row per case instead of the summary; -vv: also every case's full gradcheck report.")
def check(seed: int | None, backends: tuple[str, ...], dtypes: tuple[str, ...], only: str | None,
          verbose: int) -> None:
    """Gradient-check every public function against central differences.

    Prints a summary (per function: cases, passed, worst error as a fraction of its
    tolerance; then the worst case overall), the full report of every failing case, and
    exits with status 1 if any case fails. --verbose prints one row per case (function,
    case, dtype, max relative error, tolerance, result).
    """
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
    available = sg.available_backends()
    if not backends:
        backends = (sg.get_backend(),)
    elif "all" in backends:
        backends = tuple(available)
    missing = [b for b in backends if b not in available]
    if missing:
        raise click.BadParameter(f"backend {missing[0]!r} is not importable here; available: {available}",
                                 param_hint="'--backend'")
    dtypes = dtypes or ("float64", "float32")

    start = time.perf_counter()
    rows = []  # (backend, function, case, dtype, rel, tol, result)
    ratios = []  # per row: worst error / its allowed error (inf for a crash)
    failures = []
    for backend in backends:
        with sg.use_backend(backend):
            for dtype in dtypes:
                rng = np.random.default_rng([seed, list(_DTYPES).index(dtype)])
                for case in build_cases(rng, _DTYPES[dtype]):
                    if only and only not in case.function and only not in case.case:
                        continue
                    passed, rel, tol, report = _run(case)
                    rows.append((backend, case.function, case.case, dtype, rel, tol, "pass" if passed else "FAIL"))
                    ratios.append(_ratio(report))
                    if not passed or verbose >= 2:
                        failures.append((backend, case, dtype, rel, report, passed))
    elapsed = time.perf_counter() - start

    click.echo(f"softgrad check: analytic gradients vs central differences in float64 "
               f"(seed {seed}, backend {', '.join(backends)})")
    click.echo("")
    header = ("backend", "function", "case", "dtype", "max rel err", "rtol", "result")
    if len(backends) == 1:
        rows = [r[1:] for r in rows]
        header = header[1:]
    if rows and verbose:
        _echo_table(header, rows)
    elif rows:
        _echo_summary(rows, ratios, several_backends=len(backends) > 1)
    n_failed = sum(r[-1] == "FAIL" for r in rows)
    for backend, case, dtype, rel, report, passed in failures:
        click.echo("")
        click.echo(f"{'FAIL' if not passed else 'pass'}: {case.function} [{case.case}] {dtype} (backend {backend})")
        click.echo(str(report))
    click.echo("")
    if not rows:
        click.echo(f"no case matches --only {only!r}")
        raise SystemExit(1)
    if n_failed:
        click.echo(f"{n_failed} of {len(rows)} checks FAILED in {elapsed:.1f} s "
                   f"(rerun with --seed {seed})")
        raise SystemExit(1)
    click.echo(f"all {len(rows)} checks passed in {elapsed:.1f} s")
