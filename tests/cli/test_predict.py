"""``softgrad predict``: applying a saved model to raw data, with and without labels."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from click.testing import CliRunner

from softgrad import SoftmaxClassifier
from softgrad.cli import main


@pytest.fixture
def trained(tmp_path_factory):
    """A model trained by ``softgrad train`` on digits (standardisation folded in)."""
    out = tmp_path_factory.mktemp("run")
    result = CliRunner().invoke(main, ["train", "--out", str(out), "--no-plots", "--no-sklearn", "--quiet"])
    assert result.exit_code == 0, result.output
    return out / "model.npz"


def test_predict_digits_matches_the_estimator(trained, tmp_path):
    result = CliRunner().invoke(main, ["predict", str(trained), "digits"])
    assert result.exit_code == 0, result.output
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0] == ["row", "prediction"] and len(rows) == 1798
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    expected = SoftmaxClassifier.load(trained).predict(X)
    np.testing.assert_array_equal([int(r[1]) for r in rows[1:]], expected)
    accuracy = float(np.mean(expected == y))
    assert f"accuracy {100 * accuracy:.2f} %" in result.stderr
    assert accuracy > 0.95  # raw pixels in, standardisation folded into the weights


def test_predict_proba_to_file_and_unlabelled_csv(trained, tmp_path, rng):
    from sklearn.datasets import load_digits

    X = load_digits().data[:5]
    (tmp_path / "x.csv").write_text("\n".join(",".join(str(v) for v in row) for row in X) + "\n")
    out = tmp_path / "pred.csv"
    result = CliRunner().invoke(main, ["predict", str(trained), f"csv:{tmp_path / 'x.csv'}", "--no-labels",
                                       "--proba", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["row", "prediction"] + [f"p_{k}" for k in range(10)]
    probs = np.array([[float(v) for v in r[2:]] for r in rows[1:]])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert "accuracy" not in result.stderr and "wrote" in result.stderr


def test_predict_errors(trained, tmp_path):
    (tmp_path / "narrow.csv").write_text("1,2,0\n3,4,1\n")
    result = CliRunner().invoke(main, ["predict", str(trained), f"csv:{tmp_path / 'narrow.csv'}"])
    assert result.exit_code != 0 and "has 2 features but the model" in result.output
    (tmp_path / "fake.npz").write_bytes(b"PK\x03\x04 not really")
    result = CliRunner().invoke(main, ["predict", str(tmp_path / "fake.npz"), "digits"])
    assert result.exit_code != 0 and "not a softgrad model file" in result.output


def test_train_records_its_preprocessing(trained, tmp_path):
    """``softgrad train`` folds the standardisation in and says so: no warning on raw digits."""
    assert SoftmaxClassifier.load(trained)._saved_preprocessing.startswith("standardize")
    result = CliRunner().invoke(main, ["predict", str(trained), "digits", "--out", str(tmp_path / "p.csv")])
    assert result.exit_code == 0 and "warning" not in result.stderr, result.output


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # raw pixels, 50 iterations
def test_predict_warns_on_unscaled_data_for_a_model_without_preprocessing(tmp_path):
    from softgrad.datasets import digits, prepare

    data = prepare(digits(), seed=0)
    clf = SoftmaxClassifier(alpha=1e-3).fit(data.X_train, data.y_train)
    bare = clf.save(tmp_path / "bare.npz")
    raw = CliRunner().invoke(main, ["predict", str(bare), "digits", "--out", str(tmp_path / "p.csv")])
    assert raw.exit_code == 0, raw.output
    assert "was saved without a record of its preprocessing and digits looks unscaled" in raw.stderr
    assert "preprocessing=scaler" in raw.stderr
    # standardised data with the same model: no warning
    np.savez(tmp_path / "std.npz", X=data.X_test, y=data.y_test)
    scaled = CliRunner().invoke(main, ["predict", str(bare), f"npz:{tmp_path / 'std.npz'}",
                                       "--out", str(tmp_path / "q.csv")])
    assert scaled.exit_code == 0 and "warning" not in scaled.stderr, scaled.output
    # the same model saved with its scaler: raw digits are right and nothing is said
    folded = clf.save(tmp_path / "folded.npz", preprocessing=data.scaler)
    good = CliRunner().invoke(main, ["predict", str(folded), "digits", "--out", str(tmp_path / "r.csv")])
    assert good.exit_code == 0 and "warning" not in good.stderr, good.output
    accuracy = float(good.stderr.split("accuracy ")[1].split(" %")[0])
    bad_accuracy = float(raw.stderr.split("accuracy ")[1].split(" %")[0])
    assert accuracy > 95 and bad_accuracy < accuracy - 5
    # a model saved as fitted on raw features is not second-guessed
    raw_model = SoftmaxClassifier(max_iter=50).fit(digits().X, digits().y).save(tmp_path / "rawfit.npz",
                                                                                preprocessing="none")
    quiet = CliRunner().invoke(main, ["predict", str(raw_model), "digits", "--out", str(tmp_path / "s.csv")])
    assert quiet.exit_code == 0 and "warning" not in quiet.stderr, quiet.output
