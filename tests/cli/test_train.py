"""``softgrad train``: the report, the run folder, the options, and refusing a wrong gradient."""

from __future__ import annotations

import json
import re
import struct

import numpy as np
import pytest
from click.testing import CliRunner

import softgrad._linear_model
from softgrad.cli import main


def _train(*args):
    return CliRunner().invoke(main, ["train", *args], catch_exceptions=False)


def test_default_run_on_digits(tmp_path):
    out = tmp_path / "run"
    result = _train("--out", str(out))
    assert result.exit_code == 0, result.output
    text = result.output
    assert "data     digits: 1797 samples, 64 features, 10 classes; images 8x8" in text
    assert "gradcheck passed" in text
    assert "log C = log 10 = 2.3026 (ok)" in text
    for row in ("train accuracy", "validation accuracy", "test accuracy", "final objective", "fit time"):
        assert row in text
    assert "sklearn LogisticRegression(lbfgs)" in text
    files = {p.name for p in out.iterdir()}
    assert files == {"metrics.json", "model.npz", "loss_curve.png", "weights.png", "confusion_matrix.png"}
    for png in ("loss_curve.png", "weights.png", "confusion_matrix.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    m = json.loads((out / "metrics.json").read_text())
    ours, theirs = m["softgrad_classifier"], m["sklearn_logistic_regression"]
    # same split, matched regularisation: the same minimum
    assert abs(ours["objective"] - theirs["objective"]) <= 1e-5 * theirs["objective"]
    assert ours["test_accuracy"] > 0.9 and m["gradcheck"]["passed"]
    assert m["split"] == {"seed": 0, "train": 1259, "val": 269, "test": 269, "standardized": True}
    assert len(m["loss_curve"]) == ours["n_iter"]
    assert theirs["C"] == pytest.approx(1 / (1e-3 * 1259))


def test_spiral_with_gd_draws_decision_regions(tmp_path):
    out = tmp_path / "spiral"
    result = _train("--data", "spiral:4", "--solver", "gd", "--max-iter", "300", "--lr", "1.0",
                    "--no-sklearn", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {"metrics.json", "model.npz", "loss_curve.png",
                                               "confusion_matrix.png", "decision_regions.png"}
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_classes"] == 4 and m["params"]["learning_rate"] == 1.0
    assert m["sklearn_logistic_regression"] is None


def test_sgd_epochs_quiet_no_plots_on_csv(tmp_path, rng):
    X = rng.normal(size=(90, 3))
    names = np.array(["red", "green", "blue"])
    y = names[np.argmax(X @ rng.normal(size=(3, 3)), axis=1)]
    lines = ["f1,f2,f3,colour"] + [f"{a:.6f},{b:.6f},{c:.6f},{lab}" for (a, b, c), lab in zip(X, y)]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "csv"
    result = _train("--data", f"csv:{tmp_path / 'd.csv'}", "--solver", "sgd", "--epochs", "4", "--batch-size",
                    "16", "--quiet", "--no-plots", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert len(result.output.strip().splitlines()) == 1 and "test accuracy" in result.output
    assert {p.name for p in out.iterdir()} == {"metrics.json", "model.npz"}
    m = json.loads((out / "metrics.json").read_text())
    assert m["softgrad_classifier"]["n_iter"] == 4 and m["params"]["batch_size"] == 16


def test_mnist_files_give_weight_images(tmp_path, rng):
    def idx(a):
        return bytes([0, 0, 8, a.ndim]) + b"".join(struct.pack(">I", n) for n in a.shape) + a.tobytes()

    y = np.repeat(np.arange(3, dtype=np.uint8), 20)
    X = rng.integers(0, 60, size=(60, 5, 5), dtype=np.uint8)
    X[np.arange(60), y, y] = 255  # a class-specific bright pixel
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx(X))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx(y))
    out = tmp_path / "run"
    result = _train("--data", f"mnist:{tmp_path}", "--out", str(out), "--no-sklearn")
    assert result.exit_code == 0, result.output
    assert (out / "weights.png").exists()
    assert json.loads((out / "metrics.json").read_text())["softgrad_classifier"]["test_accuracy"] > 0.9


@pytest.mark.parametrize("args, message", [
    (["--data", "imagenet"], "unknown data spec 'imagenet'"),
    (["--data", "mnist:/no/such/dir"], "is not a directory"),
    (["--lr", "fast"], "positive number or 'auto'"),
    (["--lr", "-1"], "must be > 0"),
    (["--solver", "adam"], "'adam' is not one of"),
    (["--reg", "-1"], "-1"),
])
def test_bad_options_fail_clearly(tmp_path, args, message):
    result = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "x"), *args])
    assert result.exit_code != 0
    assert message in result.output


def test_refuses_to_train_on_a_wrong_gradient(tmp_path, monkeypatch):
    real = softgrad._linear_model.objective_and_gradient

    def broken(*args, **kwargs):
        J, gW, gb = real(*args, **kwargs)
        return J, 2.0 * gW, gb  # a factor-2 bug in dW

    monkeypatch.setattr(softgrad._linear_model, "objective_and_gradient", broken)
    result = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "x")])
    assert result.exit_code == 1
    assert "gradcheck FAILED" in result.output and "not training on a wrong gradient" in result.output
    assert not (tmp_path / "x").exists()


def test_progress_bar_starts_without_a_nan_objective():
    from softgrad.cli._train import _objective_text

    assert _objective_text(float("nan")) == "objective -"
    assert _objective_text(0.5) == "objective 0.500000"


def test_sgd_counts_epochs_and_sklearn_iterations_and_times_are_not_compared(tmp_path):
    result = _train("--data", "spiral:3", "--solver", "sgd", "--epochs", "3", "--no-plots", "--out", str(tmp_path / "s"))
    assert result.exit_code == 0, result.output
    assert "nan" not in result.output
    row = next(ln for ln in result.output.splitlines() if ln.startswith("epochs / iterations"))
    assert "3 epochs" in row and re.search(r"\d+ iterations", row)
    assert "fit times not comparable (sgd" in result.output and "fit time ratio" not in result.output


def test_lbfgs_reports_the_time_ratio_and_plain_iterations(tmp_path):
    result = _train("--data", "spiral:3", "--no-plots", "--out", str(tmp_path / "l"))
    assert result.exit_code == 0, result.output
    assert "fit time ratio softgrad / sklearn" in result.output
    assert not any(ln.startswith("epochs") for ln in result.output.splitlines())
    assert re.search(r"^iterations\s+\d+\s+\d+$", result.output, re.MULTILINE)


def test_decision_region_title_uses_the_printed_accuracy(tmp_path, monkeypatch):
    from softgrad import _plots

    seen = {}
    real = _plots.decision_regions

    def spy(predict, X, y, classes, path, *, title):
        seen["accuracy"] = float(np.mean(np.asarray(predict(X)) == np.asarray(y)))
        seen["title"] = title
        return real(predict, X, y, classes, path, title=title)

    monkeypatch.setattr(_plots, "decision_regions", spy)
    out = tmp_path / "gd"
    result = _train("--data", "spiral:3", "--solver", "gd", "--max-iter", "50", "--no-sklearn", "--out", str(out))
    assert result.exit_code == 0, result.output
    m = json.loads((out / "metrics.json").read_text())
    assert seen["accuracy"] == pytest.approx(m["softgrad_classifier"]["test_accuracy"])
    assert "test points" in seen["title"]


def test_every_option_has_help():
    from softgrad.cli._train import train

    for param in train.params:
        assert getattr(param, "help", None), param.name
