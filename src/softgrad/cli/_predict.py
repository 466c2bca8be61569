"""``softgrad predict MODEL DATA``: apply a model saved by ``softgrad train`` (or ``SoftmaxClassifier.save``).

``DATA`` is a data spec as for ``softgrad train`` (``digits``, ``mnist:PATH``,
``csv:PATH``, a ``.csv``/``.npz`` path, ...). The model takes raw features when it was
saved with its preprocessing (``softgrad train`` and ``SoftmaxClassifier.save(path,
preprocessing=scaler)`` fold the standardisation into the weights); a model saved
without any record of it, applied to data that look unscaled, gets a warning.
Predictions are written as CSV (``row, prediction`` and, with ``--proba``, one
probability column per class) to ``--out`` or standard output; when the data has
labels, the accuracy goes to standard error.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import click
import numpy as np


@click.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(exists=True, dir_okay=False))
@click.argument("data_spec", metavar="DATA")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="CSV file for the predictions [default: standard output].")
@click.option("--proba", is_flag=True, help="Add the probability of every class.")
@click.option("--no-labels", is_flag=True, help="The CSV/NPZ data has no label column (all columns are features).")
@click.option("--label-column", default=None, metavar="INDEX|NAME",
              help="CSV/NPZ label column, as for softgrad train.")
def predict(model_path, data_spec, out_path, proba, no_labels, label_column):
    """Predict the classes of DATA with the saved model MODEL (an .npz file)."""
    from softgrad import datasets
    from softgrad._classifier import SoftmaxClassifier

    if out_path:
        folder = Path(out_path).expanduser().parent
        if not folder.is_dir():
            raise click.BadParameter(f"the folder {str(folder)!r} does not exist; create it first",
                                     param_hint="'--out'")
    try:
        model = SoftmaxClassifier.load(model_path)
        data = datasets.load(data_spec, labels=not no_labels, label_column=label_column)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        raise click.ClickException(str(exc)) from exc
    X, y = data.X, data.y
    if data.X_test is not None:
        X = np.concatenate([X, data.X_test])
        y = np.concatenate([y, data.y_test])
    X = np.asarray(X, dtype=np.float64)
    if X.shape[1] != model.n_features_in_:
        raise click.ClickException(
            f"{data.name} has {X.shape[1]} features but the model {model_path!r} expects {model.n_features_in_}")
    unscaled = _unscaled_summary(X) if model._saved_preprocessing is None else None
    if unscaled:
        click.echo(f"warning: {model_path} was saved without a record of its preprocessing and {data.name} "
                   f"looks unscaled ({unscaled}). If the model was fitted on standardised features its "
                   "predictions here are wrong: save it with SoftmaxClassifier.save(path, preprocessing=scaler) "
                   "(softgrad train does), or with preprocessing='none' if it was fitted on raw features.",
                   err=True)
    labels = model.predict(X)
    probs = model.predict_proba(X) if proba else None

    try:
        stream = open(out_path, "w", newline="") if out_path else sys.stdout
    except OSError as exc:
        raise click.ClickException(f"cannot write {out_path!r}: {exc.strerror or exc}") from exc
    try:
        writer = csv.writer(stream)
        writer.writerow(["row", "prediction"] + ([f"p_{c}" for c in model.classes_] if proba else []))
        for i, label in enumerate(labels.tolist()):
            writer.writerow([i, label] + ([f"{p:.6g}" for p in probs[i]] if proba else []))
    finally:
        if out_path:
            stream.close()
    message = f"predicted {X.shape[0]} rows of {data.name} with {model_path}"
    if y is not None:
        known = np.isin(y, model.classes_)
        accuracy = float(np.mean(labels == y))
        message += f"; accuracy {100 * accuracy:.2f} %"
        if not known.all():
            message += f" ({int((~known).sum())} rows have labels the model never saw)"
    if out_path:
        message += f"; wrote {out_path}"
    click.echo(message, err=True)


def _unscaled_summary(X):
    """A description of how ``X`` (N, D) departs from standardised features, or None.

    Features standardised with training statistics have per-column means near 0 and
    standard deviations near 1 on new data; the test looks at the medians over the
    non-constant columns, so a few odd columns do not trigger it.
    """
    if X.shape[0] < 2:
        return None
    mean, std = X.mean(axis=0), X.std(axis=0)
    varying = std > 0
    if not varying.any():
        return None
    mid_mean, mid_std = float(np.median(np.abs(mean[varying]))), float(np.median(std[varying]))
    if mid_mean <= 1.0 and 1 / 3 <= mid_std <= 3.0:
        return None
    return f"median |column mean| {mid_mean:.3g}, median column std {mid_std:.3g}; standardised data have 0 and 1"
