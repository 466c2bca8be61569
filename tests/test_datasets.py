"""softgrad.datasets: built-in data, loaders on small files written here (good and malformed), split, standardise."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from softgrad import datasets


# ---------------------------------------------------------------- writers
def _idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    dtype = {0x08: ">u1", 0x0B: ">i2", 0x0D: ">f4"}[code]
    head = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    return head + array.astype(dtype).tobytes()


def _write(path, data: bytes, gz: bool = False):
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def _mnist_dir(tmp_path, rng, n_train=12, n_test=5, gz=False):
    suffix = ".gz" if gz else ""
    Xtr = rng.integers(0, 256, size=(n_train, 4, 3), dtype=np.uint8)
    ytr = rng.integers(0, 10, size=n_train, dtype=np.uint8)
    Xte = rng.integers(0, 256, size=(n_test, 4, 3), dtype=np.uint8)
    yte = rng.integers(0, 10, size=n_test, dtype=np.uint8)
    _write(tmp_path / f"train-images-idx3-ubyte{suffix}", _idx_bytes(Xtr), gz)
    _write(tmp_path / f"train-labels-idx1-ubyte{suffix}", _idx_bytes(ytr), gz)
    _write(tmp_path / f"t10k-images-idx3-ubyte{suffix}", _idx_bytes(Xte), gz)
    _write(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", _idx_bytes(yte), gz)
    return Xtr, ytr, Xte, yte


def _cifar_bytes(rng, n):
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    pixels = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    return np.column_stack([labels, pixels]).astype(np.uint8).tobytes(), pixels, labels


# ---------------------------------------------------------------- built in
def test_spiral_is_seeded_and_shaped():
    a, b, c = datasets.spiral(60, 4, seed=3), datasets.spiral(60, 4, seed=3), datasets.spiral(60, 4, seed=4)
    assert a.X.shape == (240, 2) and a.y.dtype == np.int64
    np.testing.assert_array_equal(a.X, b.X)
    assert not np.array_equal(a.X, c.X)
    np.testing.assert_array_equal(np.bincount(a.y), [60] * 4)
    radius = np.hypot(a.X[:, 0], a.X[:, 1])
    assert radius.max() <= 1.0 + 1e-12  # CS231n: r = linspace(0, 1)
    noiseless = datasets.spiral(5, 2, noise=0.0)
    t = np.linspace(4.0, 8.0, 5)  # arm 1, point 4: r = 1
    np.testing.assert_allclose(noiseless.X[9], [np.sin(t[4]), np.cos(t[4])], rtol=1e-12)


@pytest.mark.parametrize("kwargs, match", [({"n_per_class": 0}, "n_per_class"), ({"n_classes": 1}, "n_classes"),
                                           ({"noise": -1.0}, "noise")])
def test_spiral_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        datasets.spiral(**kwargs)


def test_digits_offline():
    d = datasets.digits()
    assert d.X.shape == (1797, 64) and d.image_shape == (8, 8) and set(np.unique(d.y)) == set(range(10))


# ---------------------------------------------------------------- IDX
@pytest.mark.parametrize("gz", [False, True])
def test_mnist_directory(tmp_path, rng, gz):
    Xtr, ytr, Xte, yte = _mnist_dir(tmp_path, rng, gz=gz)
    d = datasets.load_mnist(tmp_path)
    np.testing.assert_array_equal(d.X, Xtr.reshape(12, -1))
    np.testing.assert_array_equal(d.y, ytr)
    np.testing.assert_array_equal(d.X_test, Xte.reshape(5, -1))
    np.testing.assert_array_equal(d.y_test, yte)
    assert d.image_shape == (4, 3)
    fashion = datasets.load(f"fashion-mnist:{tmp_path}")
    assert fashion.class_names[9] == "Ankle boot"


def test_read_idx_other_types(tmp_path, rng):
    a = rng.normal(size=(3, 2)).astype(np.float32)
    np.testing.assert_array_equal(datasets.read_idx(_write(tmp_path / "f", _idx_bytes(a, 0x0D))), a)
    b = rng.integers(-300, 300, size=7).astype(np.int16)
    np.testing.assert_array_equal(datasets.read_idx(_write(tmp_path / "i", _idx_bytes(b, 0x0B))), b)


def test_idx_malformed_files(tmp_path, rng):
    good = _idx_bytes(rng.integers(0, 256, size=(4, 2, 2), dtype=np.uint8))
    cases = {
        "magic": (b"\x01\x02" + good[2:], "two zero bytes"),
        "code": (good[:2] + b"\x42" + good[3:], "unknown IDX type code 0x42"),
        "truncated": (good[:-3], "truncated"),
        "header": (good[:6], "header truncated"),
        "badgz": (b"\x1f\x8b" + b"garbage", "gzip"),
    }
    for name, (content, match) in cases.items():
        with pytest.raises(ValueError, match=match):
            datasets.read_idx(_write(tmp_path / name, content))
    with pytest.raises(FileNotFoundError):
        datasets.read_idx(tmp_path / "absent")


def test_mnist_inconsistent_or_missing(tmp_path, rng):
    _mnist_dir(tmp_path, rng)
    _write(tmp_path / "train-labels-idx1-ubyte", _idx_bytes(np.zeros(11, dtype=np.uint8)))
    with pytest.raises(ValueError, match="12 images .* but 11 labels"):
        datasets.load_mnist(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="train-images"):
        datasets.load_mnist(empty)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        datasets.load_mnist(tmp_path / "nope")


# ---------------------------------------------------------------- CIFAR-10
def test_cifar10_binary_directory_and_file(tmp_path, rng):
    root = tmp_path / "cifar-10-batches-bin"
    root.mkdir()
    b1, p1, l1 = _cifar_bytes(rng, 4)
    b2, p2, l2 = _cifar_bytes(rng, 3)
    bt, pt, lt = _cifar_bytes(rng, 2)
    (root / "data_batch_1.bin").write_bytes(b1)
    (root / "data_batch_2.bin").write_bytes(b2)
    (root / "test_batch.bin").write_bytes(bt)
    for where in (root, tmp_path):  # the folder itself or its parent
        d = datasets.load_cifar10(where)
        np.testing.assert_array_equal(d.X, np.concatenate([p1, p2]))
        np.testing.assert_array_equal(d.y, np.concatenate([l1, l2]))
        np.testing.assert_array_equal(d.X_test, pt)
        assert d.image_shape == (3, 32, 32) and d.class_names[0] == "airplane"
    single = datasets.load(f"cifar10:{root / 'data_batch_2.bin'}")
    np.testing.assert_array_equal(single.y, l2)


def test_cifar10_malformed(tmp_path, rng):
    good, _, _ = _cifar_bytes(rng, 2)
    with pytest.raises(ValueError, match="multiple of 3073"):
        datasets.load_cifar10(_write(tmp_path / "short.bin", good[:-1]))
    with pytest.raises(ValueError, match="pickled 'python version'"):
        datasets.load_cifar10(_write(tmp_path / "data_batch_1", b"\x80\x04" + b"x" * 100))
    bad_label = bytearray(good)
    bad_label[0] = 12
    with pytest.raises(ValueError, match="label 12"):
        datasets.load_cifar10(_write(tmp_path / "label.bin", bytes(bad_label)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="binary version"):
        datasets.load_cifar10(empty)


# ---------------------------------------------------------------- CSV / NPZ
def test_csv_variants(tmp_path):
    (tmp_path / "h.csv").write_text("a,b,label\n1,2,cat\n3,4.5,dog\n-1,0,cat\n")
    d = datasets.load_csv(tmp_path / "h.csv")
    np.testing.assert_array_equal(d.X, [[1, 2], [3, 4.5], [-1, 0]])
    np.testing.assert_array_equal(d.y, ["cat", "dog", "cat"])
    (tmp_path / "n.csv").write_text("7;1.0;2.0\n3;0.5;0.25\n")
    d = datasets.load_csv(tmp_path / "n.csv", label_column=0)
    assert d.y.dtype == np.int64 and d.y.tolist() == [7, 3]
    np.testing.assert_array_equal(d.X, [[1.0, 2.0], [0.5, 0.25]])
    (tmp_path / "first.csv").write_text("kind,x\n2,0.5\n-1,1.5\n")
    by_name = datasets.load_csv(tmp_path / "first.csv", label_column="kind")
    np.testing.assert_array_equal(by_name.y, [2, -1])
    np.testing.assert_array_equal(by_name.X, [[0.5], [1.5]])
    _write(tmp_path / "z.csv.gz", b"1,2,0\n3,4,1\n", gz=True)
    assert datasets.load(str(tmp_path / "z.csv.gz")).y.tolist() == [0, 1]
    unlabelled = datasets.load(f"csv:{tmp_path / 'z.csv.gz'}", labels=False)
    assert unlabelled.y is None and unlabelled.X.shape == (2, 3)


@pytest.mark.parametrize("content, kwargs, match", [
    ("a,b,label\n1,x,0\n", {}, "line 2: feature 'x' is not a number"),
    ("1,2,0\n3,4\n", {}, "line 2: 2 fields, expected 3"),
    ("", {}, "is empty"),
    ("a,b,c\n", {}, "no data rows"),
    ("a,b,c\n1,2,3\n", {"label_column": "zzz"}, "no column named 'zzz'"),
    ("1,2,3\n", {"label_column": 5}, "out of range"),
    ("1,2,0.5\n", {}, "non-integer"),
    ("1,nan,0\n", {}, "NaN"),
])
def test_csv_malformed(tmp_path, content, kwargs, match):
    (tmp_path / "bad.csv").write_text(content)
    with pytest.raises(ValueError, match=match):
        datasets.load_csv(tmp_path / "bad.csv", **kwargs)


def test_npz_layouts(tmp_path, rng):
    X, y = rng.normal(size=(6, 3)), rng.integers(0, 3, size=6)
    np.savez(tmp_path / "xy.npz", X=X, y=y, X_test=X[:2], y_test=y[:2])
    d = datasets.load(str(tmp_path / "xy.npz"))
    np.testing.assert_array_equal(d.X, X)
    np.testing.assert_array_equal(d.y_test, y[:2])
    np.savez(tmp_path / "one.npz", data=np.column_stack([X, y]))
    d = datasets.load_npz(tmp_path / "one.npz")
    np.testing.assert_array_equal(d.X, X)
    np.testing.assert_array_equal(d.y, y)
    np.savez(tmp_path / "strings.npz", X=X, y=np.array(list("abcabc")))
    assert datasets.load_npz(tmp_path / "strings.npz").y.tolist() == list("abcabc")
    np.savez(tmp_path / "features.npz", X=X)
    assert datasets.load(f"npz:{tmp_path / 'features.npz'}", labels=False).y is None
    np.savez(tmp_path / "matrix.npz", X)
    np.testing.assert_array_equal(datasets.load(str(tmp_path / "matrix.npz"), labels=False).X, X)


def test_npz_malformed(tmp_path, rng):
    np.savez(tmp_path / "obj.npz", X=np.array([[1, None]], dtype=object), y=np.zeros(1))
    with pytest.raises(ValueError, match="without pickle"):
        datasets.load_npz(tmp_path / "obj.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="not a readable .npz"):
        datasets.load_npz(tmp_path / "text.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(3), b=np.zeros(3))
    with pytest.raises(ValueError, match="expected arrays 'X' and 'y'"):
        datasets.load_npz(tmp_path / "other.npz")
    np.savez(tmp_path / "len.npz", X=np.zeros((3, 2)), y=np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match="X \\(n, d\\) and y \\(n,\\)"):
        datasets.load_npz(tmp_path / "len.npz")


def test_load_spec_errors():
    with pytest.raises(ValueError, match="unknown data spec 'imagenet'"):
        datasets.load("imagenet")
    with pytest.raises(ValueError, match="spiral:K"):
        datasets.load("spiral:three")
    assert datasets.load("spiral:4").X.shape == (400, 2)


# ------------------------------------------------------- split, standardise
def test_split_is_stratified_disjoint_and_seeded(rng):
    y = np.repeat(np.arange(3), [40, 100, 60])
    X = np.arange(y.shape[0])[:, None]
    parts = datasets.split(X, y, val_fraction=0.2, test_fraction=0.1, seed=7)
    X_tr, y_tr, X_va, y_va, X_te, y_te = parts
    ids = np.concatenate([X_tr[:, 0], X_va[:, 0], X_te[:, 0]])
    np.testing.assert_array_equal(np.sort(ids), np.arange(200))  # a partition
    np.testing.assert_array_equal(np.bincount(y_va), [8, 20, 12])
    np.testing.assert_array_equal(np.bincount(y_te), [4, 10, 6])
    again = datasets.split(X, y, val_fraction=0.2, test_fraction=0.1, seed=7)
    for a, b in zip(parts, again):
        np.testing.assert_array_equal(a, b)
    other = datasets.split(X, y, val_fraction=0.2, test_fraction=0.1, seed=8)
    assert not np.array_equal(other[0], X_tr)
    with pytest.raises(ValueError, match="must be < 1"):
        datasets.split(X, y, val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match="rows"):
        datasets.split(X[:3], y)


def test_standardizer_and_fold(rng):
    X = rng.normal(loc=5.0, scale=[1.0, 10.0, 0.0], size=(50, 3))
    s = datasets.Standardizer().fit(X)
    Z = s.transform(X)
    np.testing.assert_allclose(Z.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(Z.std(axis=0), [1.0, 1.0, 0.0], atol=1e-12)  # constant column only centred
    coef, intercept = rng.normal(size=(4, 3)), rng.normal(size=4)
    coef_raw, intercept_raw = s.fold(coef, intercept)
    np.testing.assert_allclose(X @ coef_raw.T + intercept_raw, Z @ coef.T + intercept, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="not fitted"):
        datasets.Standardizer().transform(X)
    with pytest.raises(ValueError, match="3 columns"):
        s.transform(X[:, :2])


def test_prepare_keeps_a_predefined_test_part(tmp_path, rng):
    _mnist_dir(tmp_path, rng, n_train=40, n_test=7)
    parts = datasets.prepare(datasets.load_mnist(tmp_path), val_fraction=0.25, seed=0)
    assert parts.X_test.shape == (7, 12)
    assert parts.X_train.shape[0] + parts.X_val.shape[0] == 40
    assert parts.X_train.dtype == np.float64
    np.testing.assert_allclose(parts.X_train.mean(axis=0), 0.0, atol=1e-12)
