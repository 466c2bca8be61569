"""``softgrad check``: all-pass table, reproducibility, and failure on an injected broken function."""

from __future__ import annotations

import re

import numpy as np
import pytest
from click.testing import CliRunner

import softgrad
from softgrad.cli import main

CORE_FUNCTIONS = [
    "softmax", "log_softmax", "logsumexp", "softmax_backward", "softmax_jacobian", "cross_entropy",
    "softmax_cross_entropy", "cross_entropy_from_probs", "softmax_mse", "linear_softmax_loss",
    "linear_svm_loss", "softmax_layer_jacobian", "softmax_layer_cross_entropy_grad",
]


def _check(*args: str):
    return CliRunner().invoke(main, ["check", *args])


def _rows(output: str) -> list[list[str]]:
    """Table rows (split on runs of 2+ spaces), header excluded."""
    lines = output.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("function"))
    rows = []
    for ln in lines[start + 1:]:
        if not ln.strip():
            break
        rows.append(re.split(r"\s{2,}", ln.strip()))
    return rows


def test_all_pass(backend):
    result = _check("--seed", "7", "--backend", backend, "--verbose")
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"seed 7, backend {backend}" in out
    rows = _rows(out)
    assert len(rows) > 100
    assert {r[0] for r in rows} == set(CORE_FUNCTIONS)
    assert {r[2] for r in rows} == {"float64", "float32"}
    for r in rows:
        assert r[-1] == "pass", r
        assert float(r[3]) <= float(r[4])  # the reported error is within the tolerance
    assert re.search(rf"all {len(rows)} checks passed in [0-9.]+ s", out)


def test_options_covered():
    """The cross-entropy cases exercise every option of the public signature."""
    rows = _rows(_check("--seed", "1", "--backend", "numpy", "--dtype", "float64", "-k", "cross_entropy", "-v").output)
    cases = " ".join(r[1] for r in rows if r[0] == "softmax_cross_entropy")
    for option in ("weight", "ignore_index", "label_smoothing", "smoothing", "probability target",
                   "sum", "reduction=none", "axis=1", "-inf mask", "1e4"):
        assert option in cases, option


def test_same_seed_same_table():
    first = _check("--seed", "123", "--backend", "numpy", "-v")
    second = _check("--seed", "123", "--backend", "numpy", "-v")
    assert _rows(first.output) == _rows(second.output)


def test_fresh_seed_is_printed_for_reruns():
    out = _check("--backend", "numpy", "-k", "softmax_mse", "-v").output
    seed = int(re.search(r"seed (\d+)", out).group(1))
    again = _check("--backend", "numpy", "-k", "softmax_mse", "--seed", str(seed), "-v").output
    assert _rows(out) == _rows(again)


def test_broken_gradient_fails(monkeypatch):
    real = softgrad.softmax_backward
    monkeypatch.setattr(softgrad, "softmax_backward", lambda g, a, axis=-1: 1.01 * real(g, a, axis=axis))
    result = _check("--seed", "3", "--backend", "numpy", "-v")
    assert result.exit_code == 1
    rows = _rows(result.output)
    failed = [r for r in rows if r[-1] == "FAIL"]
    assert failed and {r[0] for r in failed} == {"softmax_backward"}
    assert all(r[-1] == "pass" for r in rows if r[0] != "softmax_backward")
    assert re.search(r"\d+ of \d+ checks FAILED .*rerun with --seed 3", result.output)
    # the failing cases' gradcheck reports are printed below the table
    assert "FAIL: softmax_backward" in result.output
    assert "gradcheck FAILED" in result.output


def test_crashing_function_fails(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(softgrad, "linear_svm_loss", broken)
    result = _check("--seed", "3", "--backend", "numpy", "--dtype", "float64", "-v")
    assert result.exit_code == 1
    rows = _rows(result.output)
    svm = [r for r in rows if r[0] == "linear_svm_loss"]
    assert svm and all(r[-1] == "FAIL" and "error: RuntimeError" in r for r in svm)
    assert "RuntimeError: kernel exploded" in result.output


def test_only_and_dtype_and_verbose():
    result = _check("--seed", "2", "--backend", "numpy", "--dtype", "float16", "-k", "logsumexp", "-vv")
    assert result.exit_code == 0, result.output
    rows = _rows(result.output)
    assert rows and {r[0] for r in rows} == {"logsumexp"} and {r[2] for r in rows} == {"float16"}
    assert result.output.count("gradcheck passed") == len(rows)  # -vv prints every report


def test_only_without_match_fails():
    result = _check("--backend", "numpy", "-k", "no_such_function")
    assert result.exit_code == 1
    assert "no case matches" in result.output


def test_several_backends_add_a_column():
    backends = softgrad.available_backends()
    args = [a for b in backends for a in ("--backend", b)]
    result = _check("--seed", "5", "--dtype", "float64", "-k", "softmax_layer", "-v", *args)
    rows = [ln.split() for ln in result.output.splitlines() if ln.startswith(tuple(backends))]
    assert {r[0] for r in rows} == set(backends)


@pytest.mark.parametrize("args", [["--backend", "gpu"], ["--dtype", "int8"], ["--seed", "x"]])
def test_bad_options(args):
    result = _check(*args)
    assert result.exit_code == 2
    assert "Invalid value" in result.output


def test_full_jacobian_helper_matches_numerical(rng):
    from softgrad.cli._check import _full_jacobian

    z = rng.normal(size=(2, 3, 4))
    for axis in range(3):
        full = _full_jacobian(softgrad.softmax_jacobian(z, axis=axis), z.shape, axis)
        num = softgrad.numerical_gradient(lambda v: softgrad.softmax(v, axis=axis), z)
        np.testing.assert_allclose(full, num, rtol=1e-7, atol=1e-9)


def _summary(output: str) -> dict[str, list[str]]:
    """The summary table: function -> [cases, passed, worst err / tol]."""
    lines = output.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("function"))
    assert lines[start].split() == ["function", "cases", "passed", "worst", "err", "/", "tol"]
    table = {}
    for ln in lines[start + 1:]:
        if not ln.strip():
            break
        name, *cells = ln.split()
        table[name] = cells
    return table


def test_default_output_is_a_summary_consistent_with_the_rows():
    args = ("--seed", "11", "--backend", "numpy", "--dtype", "float64")
    summary_out = _check(*args).output
    rows = _rows(_check(*args, "--verbose").output)
    table = _summary(summary_out)
    assert set(table) == {r[0] for r in rows}
    assert len(summary_out.splitlines()) < 30  # one line per function, not per case
    for name, (cases, passed, worst) in table.items():
        mine = [r for r in rows if r[0] == name]
        assert int(cases) == len(mine) and int(passed) == sum(r[-1] == "pass" for r in mine)
        assert 0 <= float(worst) <= 1  # every case passed, so within its tolerance
    worst_line = next(ln for ln in summary_out.splitlines() if ln.startswith("worst case: "))
    worst_fn = max(table, key=lambda name: float(table[name][2]))
    assert worst_line.startswith(f"worst case: {worst_fn} [") and "--verbose" in worst_line
    assert re.search(rf"all {len(rows)} checks passed", summary_out)


def test_summary_counts_failures_and_shows_their_reports(monkeypatch):
    real = softgrad.softmax_backward
    monkeypatch.setattr(softgrad, "softmax_backward", lambda g, a, axis=-1: 1.01 * real(g, a, axis=axis))
    result = _check("--seed", "3", "--backend", "numpy", "--dtype", "float64")
    assert result.exit_code == 1
    table = _summary(result.output)
    cases, passed, worst = table["softmax_backward"]
    assert int(passed) == 0 < int(cases) and float(worst) > 1
    assert all(int(c) == int(p) for name, (c, p, _) in table.items() if name != "softmax_backward")
    assert re.search(r"worst case: softmax_backward \[.*FAIL", result.output)
    assert "FAIL: softmax_backward" in result.output and "gradcheck FAILED" in result.output
