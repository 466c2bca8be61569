"""Issue 12's classes of bad input, each reproduced on fresh inputs.

Every test builds its own input (seeded per test) of the kind the issue found to fail
and asserts the right answer or a clear error naming the argument or the file. The
classes owned elsewhere (read-only/memmap kernels, per-thread backends, ignore_index
range, class_weight options, the PyTorch side) have their own test modules.
"""

from __future__ import annotations

import gzip
import json
import struct
import time
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner

import softgrad
from softgrad import _safe_io, datasets

BIG_U64 = np.uint64(2 ** 64 - 100)  # wraps to -100 (the default ignore_index) as int64


# ------------------------------------------------------------ labels that wrap
@pytest.mark.parametrize("seed", [0, 1])
def test_uint64_labels_at_or_above_2_63_are_out_of_range_not_ignored(seed):
    rng = np.random.default_rng(seed)
    N, C = 5, 4
    z = rng.standard_normal((N, C))
    y = rng.integers(0, C, N).astype(np.uint64)
    y[rng.integers(N)] = BIG_U64
    for fn in (softgrad.cross_entropy, softgrad.softmax_cross_entropy):
        with pytest.raises(ValueError, match=r"^target contains class index 18446744073709551516"):
            fn(z, y)
    W = rng.standard_normal((3, C))
    with pytest.raises(ValueError, match=r"^y contains class index 18446744073709551516"):
        softgrad.linear_softmax_loss(W, rng.standard_normal((N, 3)), y)
    with pytest.raises(ValueError, match=r"^y contains class index 2\*\*63|^y contains class index 9223372036854775808"):
        softgrad.linear_svm_loss(W, rng.standard_normal((N, 3)), np.full(N, 2 ** 63, dtype=np.uint64))


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.uint32, np.uint64, np.int32])
def test_every_integer_label_dtype_gives_the_int64_answer(dtype):
    rng = np.random.default_rng(3)
    z = rng.standard_normal((6, 5))
    y = rng.integers(0, 5, 6)
    expected = softgrad.cross_entropy(z, y.astype(np.int64))
    np.testing.assert_allclose(softgrad.cross_entropy(z, y.astype(dtype)), expected, rtol=1e-15)


def test_unsigned_labels_equal_to_a_nonnegative_ignore_index_are_ignored():
    rng = np.random.default_rng(4)
    z = rng.standard_normal((4, 3))
    y = np.array([0, 7, 2, 7], dtype=np.uint64)
    got = softgrad.cross_entropy(z, y, ignore_index=7)
    np.testing.assert_allclose(got, softgrad.cross_entropy(z[[0, 2]], np.array([0, 2])), rtol=1e-15)


def test_float_class_ids_are_told_they_are_read_as_probabilities():
    z = np.random.default_rng(5).standard_normal((3, 4))
    for fn in (softgrad.cross_entropy, softgrad.softmax_cross_entropy, softgrad.softmax_mse):
        with pytest.raises(ValueError, match="float targets are read as probabilities"):
            fn(z, np.array([0.0, 1.0, 3.0]))


def test_classifier_save_load_keeps_uint64_labels(tmp_path):
    rng = np.random.default_rng(6)
    X = rng.standard_normal((60, 3))
    labels = np.array([3, 2 ** 63 + 5, 2 ** 64 - 1], dtype=np.uint64)
    y = labels[np.argmax(X, axis=1)]
    clf = softgrad.SoftmaxClassifier().fit(X, y)
    back = softgrad.SoftmaxClassifier.load(clf.save(tmp_path / "m.npz"))
    assert back.classes_.dtype == np.uint64
    np.testing.assert_array_equal(back.classes_, np.sort(labels))
    np.testing.assert_array_equal(back.predict(X), clf.predict(X))


def test_load_npz_keeps_uint64_labels_and_refuses_inexact_float_labels(tmp_path):
    rng = np.random.default_rng(7)
    X = rng.standard_normal((3, 2))
    np.savez(tmp_path / "u.npz", X=X, y=np.array([0, 1, BIG_U64], dtype=np.uint64))
    y = datasets.load_npz(tmp_path / "u.npz").y
    assert y.dtype == np.uint64 and int(y[2]) == 2 ** 64 - 100
    np.savez(tmp_path / "f.npz", X=X, y=np.array([0.0, 1.0, 2.0 ** 60]))
    with pytest.raises(ValueError, match=r"f\.npz.*beyond 2\*\*53"):
        datasets.load_npz(tmp_path / "f.npz")


def test_load_csv_parses_integer_labels_as_integers(tmp_path):
    rng = np.random.default_rng(8)
    base = 10 ** 18 + int(rng.integers(1000))
    rows = [f"{rng.random():.3f},{rng.random():.3f},{base + i % 2}" for i in range(6)]
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    y = datasets.load_csv(tmp_path / "d.csv").y
    assert y.dtype == np.int64 and np.unique(y).tolist() == [base, base + 1]
    (tmp_path / "u.csv").write_text("1.0,2.0,18446744073709551615\n3.0,4.0,0\n")
    assert datasets.load_csv(tmp_path / "u.csv").y.tolist() == [2 ** 64 - 1, 0]


def _idx(shape, code, data: bytes) -> bytes:
    return bytes([0, 0, code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape) + data


def test_load_mnist_checks_float_label_files(tmp_path):
    n = 4
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx((n, 2, 2), 0x08, bytes(4 * n)))
    labels = np.array([0, 1, 2, 2.0 ** 62], dtype=">f8")
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx((n,), 0x0E, labels.tobytes()))
    with pytest.raises(ValueError, match=r"train-labels.*beyond 2\*\*53"):
        datasets.load_mnist(tmp_path)
    labels = np.array([0, 1, 2, 3.5], dtype=">f8")
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx((n,), 0x0E, labels.tobytes()))
    with pytest.raises(ValueError, match="non-integer"):
        datasets.load_mnist(tmp_path)


# ------------------------------------------------- overflow inside our formulas
@pytest.mark.parametrize("loss", [softgrad.linear_softmax_loss, softgrad.linear_svm_loss])
@pytest.mark.parametrize("method", ["vectorized", "naive"])
def test_huge_weights_with_reg_0_give_the_finite_data_loss(loss, method):
    rng = np.random.default_rng(9)
    W = rng.standard_normal((3, 4)) * 1e200
    X = rng.standard_normal((5, 3)) * 1e-200  # scores X @ W are O(1)
    y = rng.integers(0, 4, 5)
    value, dW = loss(W, X, y, reg=0.0, method=method)
    assert np.isfinite(value) and np.isfinite(dW).all()
    if loss is softgrad.linear_softmax_loss:
        expected = softgrad.cross_entropy(X @ W, y)
        np.testing.assert_allclose(value, expected, rtol=1e-12)
    with pytest.raises(ValueError, match=r"L2 penalty reg \* sum\(W\*\*2\).*overflows"):
        loss(W, X, y, reg=1e-3, method=method)


@pytest.mark.parametrize("solver", ["gd", "sgd"])
@pytest.mark.parametrize("scale", [1e100, 1e155])
def test_gd_and_sgd_refuse_features_whose_step_bound_overflows(solver, scale):
    rng = np.random.default_rng(10)
    X = rng.standard_normal((40, 3)) * scale
    y = rng.integers(0, 3, 40)
    with pytest.raises(ValueError, match="standardise X"):
        softgrad.SoftmaxClassifier(solver=solver, max_iter=5).fit(X, y)


def test_gd_with_a_diverging_step_stops_with_an_error_not_nan():
    rng = np.random.default_rng(11)
    X = rng.standard_normal((40, 3)) * 1e3
    y = rng.integers(0, 3, 40)
    with pytest.raises(ValueError, match=r"diverged: the objective became (inf|nan) at iteration"):
        softgrad.SoftmaxClassifier(solver="gd", learning_rate=1e300, max_iter=20).fit(X, y)


def test_lbfgs_abnormal_stop_is_not_reported_as_max_iter():
    rng = np.random.default_rng(12)
    X = rng.standard_normal((40, 3)) * 1e155
    y = (X[:, 0] > 0).astype(int)
    with pytest.warns(Warning, match="stopped abnormally after 0 iterations") as record:
        softgrad.SoftmaxClassifier(max_iter=20).fit(X, y)
    assert not any("did not converge within" in str(w.message) for w in record)


# ------------------------------------------------------ unbounded work first
def test_softmax_jacobian_checks_the_result_size_before_computing():
    huge = np.broadcast_to(np.zeros(1, dtype=np.float32), (10 ** 6, 10 ** 5))  # no memory behind it
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"softmax_jacobian .* would need 71\.1 PiB"):
        softgrad.softmax_jacobian(huge)
    assert time.perf_counter() - start < 1.0


def test_numerical_gradient_checks_sizes_before_calling_f():
    calls = []

    def f(v):
        calls.append(1)
        return v.sum()

    with pytest.raises(ValueError, match=r"^x has 2000000 entries; numerical_gradient would call f 4000000 times"):
        softgrad.numerical_gradient(f, np.broadcast_to(np.zeros(1), (2_000_000,)))
    assert not calls
    with pytest.raises(ValueError, match=r"numerical_gradient's Jacobian .* would need 74\.5 GiB"):
        softgrad.numerical_gradient(lambda v: np.zeros(100_000) + v[0], np.zeros(100_000))
    with pytest.raises(ValueError, match="^input big has 1000001 entries"):
        softgrad.gradcheck(lambda v: v.sum(), np.zeros(10 ** 6 + 1), names=["big"])


@pytest.fixture
def small_budget(monkeypatch):
    monkeypatch.setattr(_safe_io, "MAX_DECOMPRESSED_BYTES", 1 << 20)


def test_gzip_bombs_stop_at_the_budget_naming_the_file(tmp_path, small_budget):
    path = tmp_path / "bomb.csv.gz"
    with gzip.open(path, "wb") as f:
        for _ in range(8):
            f.write(b"0," * (1 << 19))
    assert path.stat().st_size < 50_000
    with pytest.raises(ValueError, match=r"bomb\.csv\.gz.*exceeds the limit of 1\.0 MiB"):
        datasets.load_csv(path)
    with pytest.raises(ValueError, match=r"bomb\.csv\.gz.*exceeds the limit"):
        datasets.read_idx(path)


def _crafted_npz(path, name, shape, payload=b""):
    """An .npz whose member ``name`` declares ``shape`` (float64) but holds ``payload``."""
    header = {"descr": "<f8", "fortran_order": False, "shape": shape}
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(name + ".npy", buf.getvalue() + payload)


def test_npz_members_with_lying_headers_or_huge_sizes_are_refused(tmp_path, small_budget):
    _crafted_npz(tmp_path / "lie.npz", "X", (10 ** 12,), b"\0" * 64)
    with pytest.raises(ValueError, match=r"lie\.npz.*array 'X' declares shape \(1000000000000,\)"):
        datasets.load_npz(tmp_path / "lie.npz")
    with pytest.raises(ValueError, match=r"lie\.npz.*not a softgrad model file"):
        softgrad.SoftmaxClassifier.load(tmp_path / "lie.npz")
    _crafted_npz(tmp_path / "zip_bomb.npz", "X", (1 << 18,), b"\0" * (8 << 18))  # 2 MiB of zeros
    assert (tmp_path / "zip_bomb.npz").stat().st_size < 20_000
    for load in (datasets.load_npz, softgrad.SoftmaxClassifier.load):
        with pytest.raises(ValueError, match=r"zip_bomb\.npz.*exceeds the limit of 1\.0 MiB"):
            load(tmp_path / "zip_bomb.npz")


def test_model_load_reads_only_the_magic_of_a_large_foreign_file(tmp_path):
    path = tmp_path / "huge.bin"
    with open(path, "wb") as f:
        f.truncate(3 << 30)  # a sparse 3 GiB file of zeros
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"huge\.bin.*not an \.npz"):
        softgrad.SoftmaxClassifier.load(path)
    assert time.perf_counter() - start < 1.0


# ------------------------------------------------------ model files trusted too far
@pytest.fixture(scope="module")
def model_arrays(tmp_path_factory):
    rng = np.random.default_rng(13)
    X = rng.standard_normal((60, 3))
    y = np.array(["a", "b", "c"])[np.argmax(X, axis=1)]
    clf = softgrad.SoftmaxClassifier().fit(X, y)
    path = clf.save(tmp_path_factory.mktemp("model") / "m.npz")
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    return arrays, json.loads(arrays["header"].tobytes())


def _with(arrays, saved_header, header_changes=None, **array_changes):
    out = {**arrays, **array_changes}
    if header_changes is not None:
        out["header"] = np.frombuffer(json.dumps({**saved_header, **header_changes}).encode(), dtype=np.uint8)
    return out


@pytest.mark.parametrize("case, match", [
    (dict(header_changes={"n_features_in": 1e400}), "'n_features_in' must be of type int"),
    (dict(header_changes={"n_features_in": "3"}), "'n_features_in' must be of type int"),
    (dict(header_changes={"n_features_in": True}), "'n_features_in' must be of type int"),
    (dict(header_changes={"label_kind": "int"}), "label_kind 'int' does not match"),
    (dict(header_changes={"label_kind": "pickle"}), "'label_kind'.*must be one of"),
    (dict(header_changes={"params": []}), "'params' must be of type dict"),
    (dict(header_changes={"params": {"max_iter": "many"}}), "invalid parameters in header"),
    (dict(header_changes={"params": {"class_weight": {"labels": ["a"]}}}), "class_weight must have the keys"),
    (dict(header_changes={"objective": "low"}), "'objective' must be of type"),
    (dict(classes=np.array(["a", "a", "c"])), "duplicated labels"),
    (dict(feature_names_in=np.array(["f0", "f1"])), r"feature_names_in must be \(3,\) strings"),
    (dict(loss_curve=np.zeros((2, 2))), "loss_curve must be a 1-D"),
    (dict(header=np.zeros(3, dtype=np.float64)), "1-D uint8 array of JSON"),
])
def test_model_headers_inconsistent_with_their_arrays_are_refused(tmp_path, model_arrays, case, match):
    arrays, header = model_arrays
    path = tmp_path / "bad.npz"
    np.savez(path, **_with(arrays, header, **case))
    with pytest.raises(ValueError, match=r"bad\.npz' is not a valid softgrad model file: .*" + match):
        softgrad.SoftmaxClassifier.load(path)


def test_unknown_optional_header_keys_and_arrays_are_tolerated(tmp_path, model_arrays):
    arrays, header = model_arrays
    path = tmp_path / "newer.npz"
    # keys a later writer might add ("preprocessing" is a known key since the format records it)
    np.savez(path, **_with(arrays, header, {"calibration": {"kind": "isotonic"}},
                            calibration_table=np.zeros(3)))
    assert softgrad.SoftmaxClassifier.load(path).classes_.tolist() == ["a", "b", "c"]


@pytest.mark.parametrize("content", [b"PK", b"PK\x03\x04", b"PK\x05\x06" + bytes(18)])
def test_empty_or_truncated_zip_files_are_named_not_told_about_pickle(tmp_path, content):
    path = tmp_path / "empty.npz"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"empty\.npz.*not a softgrad model file") as info:
        softgrad.SoftmaxClassifier.load(path)
    assert "pickle" not in str(info.value)


# ------------------------------------------------------ data files read wrongly
def _blobs(seed, n=60):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    X = rng.standard_normal((n, 4)) + 3.0 * y[:, None]
    return X, y


def test_csv_label_column_by_name_index_and_auto(tmp_path):
    X, y = _blobs(14)
    body = "\n".join(f"{c}," + ",".join(f"{v:.6f}" for v in row) for c, row in zip(y, X))
    (tmp_path / "named.csv").write_text("Label,p0,p1,p2,p3\n" + body + "\n")
    (tmp_path / "bare.csv").write_text(body + "\n")
    for kwargs, path in [({}, "named.csv"), ({"label_column": "Label"}, "named.csv"),
                         ({"label_column": 0}, "bare.csv")]:
        d = datasets.load_csv(tmp_path / path, **kwargs)
        np.testing.assert_array_equal(d.y, y)
        np.testing.assert_allclose(d.X, X, atol=1e-6)
    assert datasets.load(str(tmp_path / "bare.csv"), label_column="0").X.shape == (60, 4)
    with pytest.raises(ValueError, match="label_column applies to CSV and NPZ data"):
        datasets.load("digits", label_column=0)


def test_csv_numeric_pandas_headers_are_headers(tmp_path):
    pd = pytest.importorskip("pandas")
    X, y = _blobs(15)
    frame = pd.DataFrame(X)
    frame[4] = y
    frame.to_csv(tmp_path / "range.csv", index=False)  # header "0,1,2,3,4"
    frame.to_csv(tmp_path / "index.csv")               # header ",0,1,2,3,4" and a row index
    named = pd.DataFrame(X, columns=[0.5, 1.5, 2.5, 3.5])
    named["label"] = y
    named.to_csv(tmp_path / "floats.csv", index=False)  # numeric feature names, a label name
    for name in ("range.csv", "index.csv", "floats.csv"):
        d = datasets.load_csv(tmp_path / name)
        assert d.X.shape == (60, 4), name
        np.testing.assert_array_equal(d.y, y)
        np.testing.assert_allclose(d.X, X, rtol=1e-12)


# ------------------------------------------------------ CLI
def _cli(*args):
    from softgrad.cli import main

    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize("logits, target", [(["10", "-5"], "0"), (["10", "-5"], "1"),
                                            (["30", "0", "-30"], "2"), (["0.3", "0.5", "0.2"], "1")])
def test_explain_handles_small_probabilities(logits, target):
    result = _cli("explain", "--logits", *logits, "--target", target)
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.output.splitlines() if "central differences" in ln]
    assert len(lines) == 2


def test_explain_with_an_underflowed_target_probability_is_a_usage_error():
    result = _cli("explain", "--logits", "1000", "-1000", "--target", "1")
    assert result.exit_code == 2 and "underflows to 0" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_train_and_predict_report_unusable_out_paths(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = _cli("train", "--out", str(blocker / "run"), "--quiet", "--no-sklearn")
    assert result.exit_code == 1 and "cannot create the output folder" in result.output
    assert isinstance(result.exception, SystemExit)
    assert not (blocker / "run").exists()

    X, y = _blobs(16)
    model = softgrad.SoftmaxClassifier().fit(X, y).save(tmp_path / "m.npz")
    np.savez(tmp_path / "d.npz", X=X, y=y)
    result = _cli("predict", str(model), str(tmp_path / "d.npz"), "--out", str(tmp_path / "missing" / "p.csv"))
    assert result.exit_code == 2 and "does not exist; create it first" in result.output
    assert isinstance(result.exception, SystemExit)


def test_train_label_column(tmp_path):
    X, y = _blobs(17, n=90)
    np.savetxt(tmp_path / "first.csv", np.column_stack([y, X]), delimiter=",", fmt="%.6f")
    result = _cli("train", "--data", str(tmp_path / "first.csv"), "--label-column", "0", "--out",
                  str(tmp_path / "run"), "--quiet", "--no-sklearn", "--no-plots")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["n_features"] == 4 and metrics["n_classes"] == 3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_explain_numerical_dE_da_matches_minus_one_over_a(seed):
    from softgrad.cli._explain import _numerical_dE_da

    rng = np.random.default_rng(seed)
    z = rng.standard_normal(5) * 15.0
    target = int(np.argmin(z))  # the smallest probability: the case that used to step below 0
    a = softgrad.softmax(z)
    grad, _ = _numerical_dE_da(a, target, 1e-6)
    expected = np.zeros(5)
    expected[target] = -1.0 / a[target]
    np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-6)
