"""``softgrad explain``: every quantity of softmax + loss backward for one logit vector.

It prints what the numerical verification of the cccbook/py2gpt wiki's softmax page
prints -- logits, one-hot target,
softmax, its Jacobian, the loss, the gradient with respect to the probabilities, the
analytic gradient with respect to the logits, the numerical gradient and their
difference -- plus the chain rule ``J^T (dL/da)`` that links the two gradients.
``--loss mse`` explains softmax followed by a mean squared error instead (the L2 example
of the step-by-step softmax derivative the README cites as [D]).
"""

from __future__ import annotations

import numpy as np
import click

import softgrad

_LABEL_WIDTH = 18


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _join_multi_values(args: list[str], options: tuple[str, ...]) -> list[str]:
    """Turn ``--logits 0.3 0.5 0.2`` into ``--logits "0.3 0.5 0.2"``.

    click options take a fixed number of values; this lets an option in ``options``
    take every following token that is not an option (negative numbers included).
    """
    out: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        out.append(token)
        i += 1
        if token == "--":
            out.extend(args[i:])
            break
        if token in options:
            values = []
            while i < len(args) and (not args[i].startswith("-") or _is_number(args[i])):
                values.append(args[i])
                i += 1
            if values:  # no values: leave it to click to report the missing value
                out.append(" ".join(values))
    return out


class _MultiValueCommand(click.Command):
    """A command whose ``--logits`` option takes any number of space-separated values."""

    multi_value_options = ("--logits",)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, _join_multi_values(list(args), self.multi_value_options))


class _FloatList(click.ParamType):
    """One or more finite floats separated by spaces or commas."""

    name = "FLOAT..."

    def convert(self, value, param, ctx):
        if isinstance(value, np.ndarray):
            return value
        tokens = [t for t in str(value).replace(",", " ").split() if t]
        if not tokens:
            self.fail("needs at least one number, e.g. --logits 0.3 0.5 0.2", param, ctx)
        numbers = []
        for t in tokens:
            try:
                numbers.append(float(t))
            except ValueError:
                self.fail(f"{t!r} is not a number", param, ctx)
        arr = np.array(numbers, dtype=np.float64)
        if not np.isfinite(arr).all():
            self.fail(f"must be finite numbers, got {' '.join(tokens)}", param, ctx)
        return arr


def _fmt(x: np.ndarray) -> str:
    return np.array2string(np.asarray(x), separator=" ")


def _line(label: str, text: str) -> str:
    """``label`` padded to a column, then ``text``; continuation lines are aligned under it."""
    pad = " " * _LABEL_WIDTH
    lines = text.split("\n")
    first = label.ljust(_LABEL_WIDTH) + lines[0]
    return "\n".join([first] + [pad + rest for rest in lines[1:]])


def _with_prefix(prefix: str, array: np.ndarray) -> str:
    """``prefix`` followed by ``array``, its later lines aligned under the array's first."""
    body = _fmt(array)
    return prefix + body.replace("\n", "\n" + " " * len(prefix))


def _numerical_dE_da(a: np.ndarray, target: int, eps: float) -> tuple[np.ndarray, float]:
    """Central differences of ``E(a) = -log a[target]`` (``cross_entropy_from_probs``), entry by entry.

    Each entry gets a step it can take: ``a[target]`` at most ``1e-4 * a[target]``, so it
    stays positive (a small probability stepped by a fixed ``eps`` would leave the domain
    of log) and the truncation error stays ~3e-9 relative; the other entries ``eps``,
    clipped at 0 (E does not depend on them, so they stay valid probabilities).
    Returns the gradient and the target's step.
    """
    def E(p):
        return softgrad.cross_entropy_from_probs(np.maximum(p, 0.0), np.array(target), reduction="sum")[0]

    eps_a = min(eps, 1e-4 * float(a[target]))

    def at_target(t):
        p = a.copy()
        p[target] = t[0]
        return E(p)

    def others(p):
        p = p.copy()
        p[target] = a[target]
        return E(p)

    grad = softgrad.numerical_gradient(others, a, eps=eps)
    grad[target] = softgrad.numerical_gradient(at_target, a[target:target + 1], eps=eps_a)[0]
    return grad, eps_a


def _explain_ce(z: np.ndarray, y: np.ndarray, target: int, eps: float) -> list[str]:
    a = softgrad.softmax(z)
    J = softgrad.softmax_jacobian(z)
    loss = float(softgrad.cross_entropy(z[None], np.array([target])))
    # dE/da = -y/a (cross_entropy_from_probs: reduction "sum" keeps one row unscaled)
    _, dE_da = softgrad.cross_entropy_from_probs(a, np.array(target), reduction="sum")
    num_dE_da, eps_a = _numerical_dE_da(a, target, eps)
    _, dE_dz = softgrad.softmax_cross_entropy(z[None], np.array([target]))
    dE_dz = dE_dz[0]
    chain = J.T @ dE_da
    num_dE_dz = softgrad.numerical_gradient(
        lambda v: softgrad.cross_entropy(v[None], np.array([target])), z, eps=eps)
    return [
        "softmax + cross-entropy: the backward pass is a - y",
        "",
        _line("logits", _with_prefix("z = ", z)),
        _line("target (one-hot)", _with_prefix("y = ", y)),
        _line("softmax", _with_prefix("a = softmax(z) = ", a)),
        _line("Jacobian", "J = da/dz, J_ij = a_i (delta_ij - a_j) =\n" + _fmt(J)),
        _line("cross-entropy", f"E = -sum_k y_k log a_k = {loss:.8f}"),
        _line("dE/da", _with_prefix("-y/a = ", dE_da)),
        _line("  numerical", _with_prefix("central differences = ", num_dE_da)
              + ("" if eps_a == eps else f"   (eps = {eps_a:.3g} = 1e-4 a_target)")),
        _line("dE/dz", _with_prefix("a - y = ", dE_dz)),
        _line("  chain rule", _with_prefix("J^T (-y/a) = ", chain)),
        _line("  numerical", _with_prefix("central differences = ", num_dE_dz)),
        _line("  difference", f"max |(a - y) - numerical| = {np.max(np.abs(dE_dz - num_dE_dz)):.2e}"
                              f"   (eps = {eps:g})"),
    ]


def _explain_mse(z: np.ndarray, y: np.ndarray, target: int, eps: float) -> list[str]:
    C = z.size
    a = softgrad.softmax(z)
    J = softgrad.softmax_jacobian(z)
    loss, dL_dz = softgrad.softmax_mse(z, np.array(target))
    dL_da = 2.0 * (a - y) / C
    chain = J.T @ dL_da
    num_dL_dz = softgrad.numerical_gradient(lambda v: softgrad.softmax_mse(v, np.array(target))[0], z, eps=eps)
    return [
        "softmax + mean squared error: dL/dz = a * (dL/da - <dL/da, a>)",
        "",
        _line("logits", _with_prefix("z = ", z)),
        _line("target (one-hot)", _with_prefix("y = ", y)),
        _line("softmax", _with_prefix("a = softmax(z) = ", a)),
        _line("Jacobian", "J = da/dz, J_ij = a_i (delta_ij - a_j) =\n" + _fmt(J)),
        _line("mean sq. error", f"L = mean_k (a_k - y_k)^2 = {float(loss):.8f}"),
        _line("dL/da", _with_prefix(f"2 (a - y) / {C} = ", dL_da)),
        _line("dL/dz", _with_prefix("a * (dL/da - <dL/da, a>) = ", dL_dz)),
        _line("  chain rule", _with_prefix("J^T dL/da = ", chain)),
        _line("  numerical", _with_prefix("central differences = ", num_dL_dz)),
        _line("  difference", f"max |analytic - numerical| = {np.max(np.abs(dL_dz - num_dL_dz)):.2e}"
                              f"   (eps = {eps:g})"),
    ]


@click.command(cls=_MultiValueCommand)
@click.option("--logits", "logits", type=_FloatList(), required=True,
              help="The logits z, space- or comma-separated, e.g. --logits 0.3 0.5 0.2")
@click.option("--target", type=int, required=True, help="The true class, an index in [0, number of logits).")
@click.option("--loss", type=click.Choice(["ce", "mse"]), default="ce", show_default=True,
              help="ce: cross-entropy; mse: mean squared error on the softmax.")
@click.option("--eps", type=float, default=1e-6, show_default=True,
              help="Step of the central differences for the numerical gradients.")
@click.option("--precision", type=click.IntRange(1, 17), default=8, show_default=True,
              help="Digits after the decimal point in the printed arrays.")
def explain(logits: np.ndarray, target: int, loss: str, eps: float, precision: int) -> None:
    """Print softmax, its Jacobian, a loss and its gradients for one logit vector.

    Example: softgrad explain --logits 0.3 0.5 0.2 --target 1
    """
    C = logits.size
    if not 0 <= target < C:
        raise click.BadParameter(f"{target} is not a class of the {C} logits; use 0 to {C - 1}",
                                 param_hint="'--target'")
    if not (np.isfinite(eps) and eps > 0):
        raise click.BadParameter(f"must be a finite number > 0, got {eps}", param_hint="'--eps'")
    y = np.zeros(C)
    y[target] = 1.0
    if loss == "ce" and not softgrad.softmax(logits)[target] > 0.0:
        raise click.BadParameter(
            f"the target's probability softmax(z)[{target}] underflows to 0 in float64, so the "
            f"loss is infinite and dE/da = -1/a has no finite value; use logits closer together",
            param_hint="'--logits'")
    with np.printoptions(precision=precision, floatmode="maxprec", suppress=False, linewidth=100):
        try:
            lines = (_explain_ce if loss == "ce" else _explain_mse)(logits, y, target, eps)
        except ValueError as exc:  # e.g. eps so large that a numerical step overflows
            raise click.ClickException(str(exc)) from exc
    click.echo("\n".join(lines))
