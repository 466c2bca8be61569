"""``softgrad explain``: seed 004's printout, seed 003's L2 example, option parsing and errors."""

from __future__ import annotations

import re

import numpy as np
import pytest
from click.testing import CliRunner

from softgrad.cli import main


def _run(*args: str):
    return CliRunner().invoke(main, ["explain", *args])


def _numbers(line: str) -> np.ndarray:
    """The numbers inside the last [...] of ``line``."""
    body = line[line.rindex("[") + 1:line.rindex("]")]
    return np.array([float(t) for t in body.split()])


def _line(output: str, label: str) -> str:
    """The first line after the title whose label column starts with ``label``."""
    matches = [ln for ln in output.splitlines()[2:] if ln.startswith(label)]
    assert matches, f"no line starting with {label!r} in:\n{output}"
    return matches[0]


def test_seed004_example():
    result = _run("--logits", "0.3", "0.5", "0.2", "--target", "1")
    assert result.exit_code == 0, result.output
    out = result.output
    np.testing.assert_array_equal(_numbers(_line(out, "logits")), [0.3, 0.5, 0.2])
    np.testing.assert_array_equal(_numbers(_line(out, "target (one-hot)")), [0.0, 1.0, 0.0])
    assert "[0.31987306 0.39069383 0.28943311]" in _line(out, "softmax")
    # the Jacobian as the seed prints it, one row per line
    for row in ("[[ 0.21755428 -0.12497243 -0.09258185]",
                "[-0.12497243  0.23805216 -0.11307973]",
                "[-0.09258185 -0.11307973  0.20566159]]"):
        assert row in out
    assert "0.93983106" in _line(out, "cross-entropy")
    np.testing.assert_array_equal(_numbers(_line(out, "dE/da")), [0.0, -2.55954897, 0.0])
    np.testing.assert_array_equal(_numbers(_line(out, "dE/dz")), [0.31987306, -0.60930617, 0.28943311])
    np.testing.assert_array_equal(_numbers(_line(out, "  chain rule")), [0.31987306, -0.60930617, 0.28943311])
    numerical = [ln for ln in out.splitlines() if ln.startswith("  numerical")]
    assert len(numerical) == 2  # dE/da, then dE/dz
    np.testing.assert_allclose(_numbers(numerical[0]), [0.0, -2.55954897, 0.0], atol=1e-8)
    np.testing.assert_allclose(_numbers(numerical[1]), [0.31987306, -0.60930617, 0.28943311], atol=1e-8)
    difference = float(re.search(r"= ([0-9.e+-]+)", _line(out, "  difference")).group(1))
    assert 0 <= difference < 1e-8
    # sections come in the seed's order
    order = ["logits", "target", "softmax", "Jacobian", "cross-entropy", "dE/da", "dE/dz", "  difference"]
    positions = [out.index("\n" + label) for label in order]
    assert positions == sorted(positions)


def test_seed003_mse_example():
    result = _run("--logits", "1", "2", "3", "0", "1", "--target", "3", "--loss", "mse")
    assert result.exit_code == 0, result.output
    grad = "[-0.00969502 -0.01434905  0.0496989  -0.01595981 -0.00969502]"
    assert grad in _line(result.output, "dL/dz")
    assert grad in _line(result.output, "  chain rule")
    assert "mean squared error" in result.output


def test_values_aligned_in_a_column():
    out = _run("--logits", "0.3", "0.5", "0.2", "--target", "1").output
    body = [ln for ln in out.splitlines()[2:] if ln]
    assert len(body) >= 12
    # every line's content starts at column 18 (the Jacobian's later rows one further,
    # under its "[[")
    for ln in body:
        assert ln[17] == " " and (ln[18] != " " or ln[18:].startswith(" [")), ln
    assert sum(ln[18:].startswith(" [") for ln in body) == 2  # the Jacobian's rows 2 and 3


@pytest.mark.parametrize("args", [
    ["--logits", "-1", "-2.5", "3e0", "--target", "2"],
    ["--logits=-1,-2.5,3e0", "--target", "2"],
    ["--target", "2", "--logits", "-1, -2.5, 3"],
    ["--logits", "-1", "-2.5", "3", "--target=2", "--precision", "3"],
])
def test_logits_forms(args):
    result = _run(*args)
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(_numbers(_line(result.output, "logits")), [-1.0, -2.5, 3.0])


def test_precision():
    out = _run("--logits", "0.3", "0.5", "0.2", "--target", "1", "--precision", "3").output
    assert "[0.32  0.391 0.289]" in _line(out, "softmax")


@pytest.mark.parametrize("args, message", [
    (["--logits", "0.3", "abc", "--target", "1"], "Invalid value for '--logits': 'abc' is not a number"),
    (["--logits", "0.3", "inf", "--target", "0"], "Invalid value for '--logits': must be finite"),
    (["--logits", "0.3", "0.5", "--target", "2"], "Invalid value for '--target': 2 is not a class of the 2 logits"),
    (["--logits", "0.3", "0.5", "--target", "-1"], "Invalid value for '--target'"),
    (["--logits", "0.3", "0.5", "--target", "x"], "Invalid value for '--target'"),
    (["--target", "1"], "Missing option '--logits'"),
    (["--logits", "0.3", "0.5"], "Missing option '--target'"),
    (["--target", "1", "--logits"], "Option '--logits' requires an argument"),
    (["--logits", "1", "2", "--target", "1", "--eps", "0"], "Invalid value for '--eps'"),
    (["--logits", "1", "2", "--target", "1", "--loss", "hinge"], "Invalid value for '--loss'"),
])
def test_bad_input_names_the_option(args, message):
    result = _run(*args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_help_lists_the_options():
    result = _run("--help")
    assert result.exit_code == 0
    for option in ("--logits", "--target", "--loss", "--eps", "--precision"):
        assert option in result.output


@pytest.mark.parametrize("command", [["explain", "--help"], ["check", "--help"], ["train", "--help"],
                                     ["explain", "--logits", "0.3", "0.5", "0.2", "--target", "1"],
                                     ["explain", "--logits", "1", "2", "3", "--target", "0", "--loss", "mse"]])
def test_no_numbered_seed_references_in_user_facing_text(command):
    """Help and output cite derivations by name, never the project's internal 'seed 00N' numbering."""
    from click.testing import CliRunner
    from softgrad.cli import main

    result = CliRunner().invoke(main, command)
    assert result.exit_code == 0, result.output
    assert not re.search(r"seed 0\d\d", result.output, re.IGNORECASE)
