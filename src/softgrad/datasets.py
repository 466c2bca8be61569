"""Data sets for the classifier: built-in ones, loaders for files on disk, split and standardise.

Built in: :func:`spiral` (CS231n's toy problem: ``K`` spiral arms in 2-D) and
:func:`digits` (8x8 handwritten digits shipped inside scikit-learn, so it works
offline). On disk: CIFAR-10's *binary* format (:func:`load_cifar10`), MNIST /
Fashion-MNIST IDX files, optionally gzipped (:func:`load_mnist`, :func:`read_idx`),
and CSV / NPZ files with a label column (:func:`load_csv`, :func:`load_npz`).
:func:`load` maps a command-line spec such as ``"mnist:~/data/mnist"`` to one of them.

No loader unpickles anything: CIFAR-10's "python version" is a pickle and is refused
in favour of the binary version; NPZ files are read with ``allow_pickle=False``.
Malformed files raise ``ValueError`` naming the file and the problem.

:func:`split` makes a seeded, stratified train/validation/test split and
:class:`Standardizer` centres and scales features with statistics of the training part.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from softgrad import _safe_io

__all__ = [
    "Dataset",
    "Split",
    "Standardizer",
    "digits",
    "load",
    "load_cifar10",
    "load_csv",
    "load_mnist",
    "load_npz",
    "prepare",
    "read_idx",
    "spiral",
    "split",
]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


@dataclass
class Dataset:
    """Features and labels, with an optional predefined test part.

    Attributes:
        name: a short description (``"digits"``, ``"mnist:/data/mnist"``).
        X: ``(N, D)`` features (``uint8`` for image files, float64 otherwise).
        y: ``(N,)`` labels (int64, or strings from a CSV); ``None`` for unlabelled data
            (``label_column=None``).
        image_shape: shape of one row as an image, e.g. ``(8, 8)``, ``(28, 28)``, or
            ``(3, 32, 32)`` (channels first, CIFAR-10's layout); ``None`` for other data.
        class_names: names of the classes by label, if known.
        X_test, y_test: a test part that comes with the data (MNIST's ``t10k`` files,
            CIFAR-10's ``test_batch.bin``), else ``None``.
    """

    name: str
    X: np.ndarray
    y: np.ndarray | None
    image_shape: tuple[int, ...] | None = None
    class_names: tuple[str, ...] | None = None
    X_test: np.ndarray | None = None
    y_test: np.ndarray | None = None


# ---------------------------------------------------------------- built in
def spiral(n_per_class: int = 100, n_classes: int = 3, *, noise: float = 0.2,
           seed: int | None = 0) -> Dataset:
    r"""CS231n's spiral data: ``n_classes`` arms of ``n_per_class`` points in 2-D.

    Arm ``k`` has radii :math:`r = \mathrm{linspace}(0, 1)` and angles
    :math:`t = \mathrm{linspace}(4k, 4(k+1)) + \mathcal N(0, \text{noise}^2)`, and the
    points :math:`(r \sin t, r \cos t)`. A linear classifier cannot separate it well
    (about half of the points for three arms), which is the point of the example.

    Args:
        n_per_class: points per arm, ``>= 1``.
        n_classes: arms ``K >= 2``.
        noise: standard deviation of the angle noise, ``>= 0``.
        seed: seed of ``numpy.random.default_rng``.

    Returns:
        :class:`Dataset` with ``X`` float64 ``(K * n_per_class, 2)`` and ``y`` int64.

    Raises:
        ValueError: a count below its minimum or a negative ``noise``.

    Examples:
        >>> d = spiral(50, 4, seed=1)
        >>> d.X.shape, np.bincount(d.y).tolist()
        ((200, 2), [50, 50, 50, 50])
    """
    if int(n_per_class) < 1:
        raise ValueError(f"n_per_class must be >= 1, got {n_per_class}")
    if int(n_classes) < 2:
        raise ValueError(f"n_classes must be >= 2, got {n_classes}")
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    rng = np.random.default_rng(seed)
    n, K = int(n_per_class), int(n_classes)
    X = np.empty((n * K, 2))
    y = np.repeat(np.arange(K, dtype=np.int64), n)
    r = np.linspace(0.0, 1.0, n)
    for k in range(K):
        t = np.linspace(4.0 * k, 4.0 * (k + 1), n) + rng.normal(scale=noise, size=n)
        X[k * n:(k + 1) * n, 0] = r * np.sin(t)
        X[k * n:(k + 1) * n, 1] = r * np.cos(t)
    return Dataset(f"spiral(K={K})", X, y)


def digits() -> Dataset:
    """The 1797 8x8 handwritten digits that ship with scikit-learn (no download).

    Returns:
        :class:`Dataset` with ``X`` float64 ``(1797, 64)`` (pixel values 0..16),
        ``y`` int64 in ``[0, 10)``, ``image_shape=(8, 8)``.

    Raises:
        ImportError: scikit-learn is not installed (``pip install softgrad[sklearn]``).

    Examples:
        >>> d = digits()
        >>> d.X.shape, d.image_shape
        ((1797, 64), (8, 8))
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - exercised only without scikit-learn
        raise ImportError("the digits data ships with scikit-learn: pip install 'softgrad[sklearn]'") from exc
    X, y = load_digits(return_X_y=True)
    return Dataset("digits", X.astype(np.float64), y.astype(np.int64), image_shape=(8, 8),
                   class_names=tuple(str(i) for i in range(10)))


# ---------------------------------------------------------------- readers
def _read_bytes(path: Path) -> bytes:
    """File contents, gunzipped if the file starts with gzip's magic bytes.

    Decompression is streamed and stops at ``softgrad._safe_io.MAX_DECOMPRESSED_BYTES``
    (2 GiB) with a ``ValueError`` naming the file, so a gzip bomb costs no more than that.
    """
    return _safe_io.read_bytes(path)


# IDX type codes -> big-endian dtypes
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (MNIST's format), plain or gzipped.

    Layout: two zero bytes, a type code (``0x08`` uint8 ... ``0x0E`` float64), the
    number of dimensions ``d``, ``d`` big-endian uint32 sizes, then the data in C order.

    Returns:
        The array in native byte order (MNIST: uint8 ``(n, 28, 28)`` or ``(n,)``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: bad magic number, unknown type code, or a data length that does not
            match the header (e.g. a truncated file).
    """
    path = Path(path).expanduser()
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{str(path)!r} is not an IDX file (it must start with two zero bytes)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_TYPES:
        raise ValueError(f"{str(path)!r}: unknown IDX type code 0x{code:02x}")
    if ndim == 0 or len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{str(path)!r}: IDX header truncated ({ndim} dimensions announced)")
    shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_TYPES[code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    body = len(raw) - 4 - 4 * ndim
    if body != expected:
        raise ValueError(f"{str(path)!r}: the header announces shape {shape} ({expected} bytes of data) "
                         f"but the file holds {body} bytes; truncated or not an IDX file")
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def _find(directory: Path, stems: Sequence[str]) -> Path | None:
    for stem in stems:
        for suffix in ("", ".gz"):
            p = directory / (stem + suffix)
            if p.is_file():
                return p
    return None


def _idx_pair(directory: Path, images_stems, labels_stems, what):
    images, labels = _find(directory, images_stems), _find(directory, labels_stems)
    if images is None or labels is None:
        return None
    X, y = read_idx(images), read_idx(labels)
    if X.ndim < 2 or y.ndim != 1:
        raise ValueError(f"{str(images)!r} / {str(labels)!r}: expected images (n, rows, cols) and labels (n,), "
                         f"got {X.shape} and {y.shape}")
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"{what}: {X.shape[0]} images in {images.name} but {y.shape[0]} labels in {labels.name}")
    return X, _labels(y, repr(str(labels)))


def load_mnist(path: str | os.PathLike, *, fashion: bool = False) -> Dataset:
    """MNIST or Fashion-MNIST from a directory of IDX files (plain or ``.gz``).

    The directory must hold ``train-images-idx3-ubyte`` and ``train-labels-idx1-ubyte``
    (``-`` or ``.`` before ``idx``, each optionally ``.gz``); ``t10k-images...`` /
    ``t10k-labels...`` become the predefined test part when present.

    Args:
        path: the directory.
        fashion: name the classes as Fashion-MNIST's (the files are identical in format).

    Returns:
        :class:`Dataset` with uint8 ``X (n, rows * cols)``, int64 ``y``,
        ``image_shape=(rows, cols)``.

    Raises:
        FileNotFoundError: not a directory, or no training files in it.
        ValueError: malformed or inconsistent files (see :func:`read_idx`).
    """
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"MNIST path {str(directory)!r} is not a directory")
    train = _idx_pair(directory, ["train-images-idx3-ubyte", "train-images.idx3-ubyte"],
                      ["train-labels-idx1-ubyte", "train-labels.idx1-ubyte"], str(directory))
    if train is None:
        raise FileNotFoundError(f"no train-images-idx3-ubyte[.gz] / train-labels-idx1-ubyte[.gz] in {str(directory)!r}")
    test = _idx_pair(directory, ["t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"],
                     ["t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"], str(directory))
    X, y = train
    image_shape = X.shape[1:]
    X = X.reshape(X.shape[0], -1)
    X_test = y_test = None
    if test is not None:
        if test[0].shape[1:] != image_shape:
            raise ValueError(f"{str(directory)!r}: test images are {test[0].shape[1:]}, training images {image_shape}")
        X_test, y_test = test[0].reshape(test[0].shape[0], -1), test[1]
    names = FASHION_MNIST_CLASSES if fashion else tuple(str(i) for i in range(10))
    n_labels = int(max(y.max(), -1 if y_test is None else y_test.max())) + 1
    return Dataset(("fashion-mnist:" if fashion else "mnist:") + str(directory), X, y,
                   image_shape=tuple(image_shape),
                   class_names=names if n_labels <= len(names) else None,
                   X_test=X_test, y_test=y_test)


_CIFAR_RECORD = 1 + 3 * 32 * 32


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = _read_bytes(path)
    if len(raw) == 0 or len(raw) % _CIFAR_RECORD:
        hint = " (this looks like the pickled 'python version'; use the binary version)" if raw[:1] == b"\x80" else ""
        raise ValueError(f"{str(path)!r} is not a CIFAR-10 binary batch: its size {len(raw)} is not a "
                         f"positive multiple of {_CIFAR_RECORD} bytes{hint}")
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
    y = records[:, 0].astype(np.int64)
    if y.max() >= 10:
        raise ValueError(f"{str(path)!r}: label {int(y.max())} outside [0, 10); not a CIFAR-10 binary batch")
    return np.ascontiguousarray(records[:, 1:]), y


def load_cifar10(path: str | os.PathLike) -> Dataset:
    """CIFAR-10 in its binary format ("CIFAR-10 binary version", never the pickled one).

    Each record is 1 label byte and 3072 pixel bytes: the red, green and blue 32x32
    planes, row-major. ``path`` is the directory holding ``data_batch_1.bin`` ...
    ``data_batch_5.bin`` and ``test_batch.bin`` (or its parent with
    ``cifar-10-batches-bin/``), or a single ``.bin`` batch file. Whatever batches exist
    are read (a subset is fine); ``test_batch.bin`` becomes the predefined test part.

    Returns:
        :class:`Dataset` with uint8 ``X (n, 3072)``, int64 ``y``, ``image_shape=(3, 32, 32)``.

    Raises:
        FileNotFoundError: nothing to read at ``path``.
        ValueError: a file whose size is not a multiple of 3073 bytes or with labels >= 10.
    """
    p = Path(path).expanduser()
    if p.is_file():
        X, y = _read_cifar_batch(p)
        return Dataset(f"cifar10:{p}", X, y, image_shape=(3, 32, 32), class_names=CIFAR10_CLASSES)
    if (p / "cifar-10-batches-bin").is_dir():
        p = p / "cifar-10-batches-bin"
    if not p.is_dir():
        raise FileNotFoundError(f"CIFAR-10 path {str(p)!r} does not exist")
    train = [_read_cifar_batch(b) for i in range(1, 6) if (b := p / f"data_batch_{i}.bin").is_file()]
    test = _read_cifar_batch(p / "test_batch.bin") if (p / "test_batch.bin").is_file() else None
    if not train:
        if test is None:
            raise FileNotFoundError(f"no data_batch_*.bin or test_batch.bin in {str(p)!r} "
                                    "(CIFAR-10 binary version expected)")
        train, test = [test], None
    X = np.concatenate([b[0] for b in train])
    y = np.concatenate([b[1] for b in train])
    return Dataset(f"cifar10:{p}", X, y, image_shape=(3, 32, 32), class_names=CIFAR10_CLASSES,
                   X_test=None if test is None else test[0], y_test=None if test is None else test[1])


# Whole numbers up to 2**53 are exact in float64; beyond it neighbouring ids merge.
_FLOAT_EXACT_INT = 2 ** 53
_INT64_MAX = int(np.iinfo(np.int64).max)


def _labels(values: np.ndarray, source: str) -> np.ndarray:
    """Labels as int64 when they are whole numbers (uint64 when some exceed int64), else as strings.

    Integer text is parsed as integers, never through float (``10**18`` and
    ``10**18 + 1`` stay two classes). Float labels must be whole numbers of magnitude
    at most ``2**53``, where float64 still tells neighbouring integers apart.
    """
    kind = values.dtype.kind
    if kind in "ib":
        return values.astype(np.int64)
    if kind == "u":
        big = values.size and int(values.max()) > _INT64_MAX
        return values.astype(np.uint64 if big else np.int64)
    if kind == "f":
        if not np.isfinite(values).all():
            raise ValueError(f"{source}: the label column contains NaN or infinity")
        if not np.all(values == np.round(values)):
            raise ValueError(f"{source}: the label column holds non-integer numbers; labels must be "
                             "class names or whole numbers")
        largest = float(np.max(np.abs(values))) if values.size else 0.0
        if largest > _FLOAT_EXACT_INT:
            raise ValueError(f"{source}: float label {largest:.17g} is beyond 2**53, where float64 no "
                             "longer holds every integer (neighbouring class ids would merge); "
                             "store the labels as integers")
        return values.astype(np.int64)
    strings = values.astype(str)
    as_ints = _parse_ints(strings.tolist(), source)
    if as_ints is not None:
        return as_ints
    try:
        as_float = np.array([float(s) for s in strings.tolist()])
    except ValueError:
        return strings  # class names
    return _labels(as_float, source)


def _parse_ints(texts: list[str], source: str) -> np.ndarray | None:
    """``texts`` as int64 (or uint64 when some exceed int64) if every one is an integer, else None."""
    try:
        values = [int(t) for t in texts]
    except ValueError:
        return None
    if not values:
        return np.empty(0, dtype=np.int64)
    lo, hi = min(values), max(values)
    if lo >= -_INT64_MAX - 1 and hi <= _INT64_MAX:
        return np.array(values, dtype=np.int64)
    if lo >= 0 and hi < 2 ** 64:
        return np.array(values, dtype=np.uint64)
    raise ValueError(f"{source}: label {hi if hi > _INT64_MAX else lo} does not fit in 64 bits")


def _column_index(label_column, columns: int, header: list[str] | None, source: str) -> int:
    if isinstance(label_column, str):
        if header is None or label_column not in header:
            raise ValueError(f"{source}: no column named {label_column!r} "
                             f"(header: {header if header is not None else 'none'})")
        return header.index(label_column)
    if isinstance(label_column, bool) or not isinstance(label_column, (int, np.integer)):
        raise TypeError(f"label_column must be an int or a column name, got {type(label_column).__name__}")
    if not -columns <= label_column < columns:
        raise ValueError(f"{source}: label_column={label_column} is out of range for {columns} columns")
    return int(label_column) % columns


#: Header names that ``label_column="auto"`` takes as the label column (compared case-insensitively).
LABEL_NAMES = ("label", "labels", "target", "class", "y")


def _auto_label_column(names: list[str] | None, width: int) -> int:
    """The one column named as in :data:`LABEL_NAMES`, else the last column."""
    if names is not None:
        hits = [i for i, n in enumerate(names) if n.strip().lower() in LABEL_NAMES]
        if len(hits) == 1:
            return hits[0]
    return width - 1


def _looks_like_header(first: list[str], second: list[str] | None, label: int | None, numeric) -> bool:
    """Whether the first CSV row names the columns.

    It does when a feature field is not a number; when its label field is not a number
    but the next row's is; or when its fields are the integers ``0 .. width - 1`` (or
    ``1 .. width``), the column names pandas writes for a frame without names.
    """
    if not numeric([v for i, v in enumerate(first) if i != label]):
        return True
    if (label is not None and second is not None and len(second) == len(first)
            and not numeric([first[label]]) and numeric([second[label]])):
        return True
    try:
        as_ints = [int(v) for v in first]
    except ValueError:
        return False
    width = len(first)
    return as_ints in (list(range(width)), list(range(1, width + 1))) and width > 2


def _is_row_index(body: list[list[str]]) -> bool:
    """Whether the first field of the rows counts 0, 1, 2, ... (a pandas row index)."""
    try:
        return all(int(row[0]) == i for i, row in enumerate(body))
    except (ValueError, IndexError):
        return False


def load_csv(path: str | os.PathLike, *, label_column: int | str | None = "auto", delimiter: str | None = None,
             header: bool | None = None) -> Dataset:
    """Features and labels from a CSV file (plain or gzipped), one sample per line.

    Format: one sample per line, fields separated by ``delimiter``, one column of
    labels and the rest numeric features, optionally a first line of column names.

    Args:
        path: the file.
        label_column: index or header name of the labels; ``"auto"`` (default): the one
            header column named ``label``, ``labels``, ``target``, ``class`` or ``y``
            (any case), else the last column; ``None`` when every column is a feature
            (``y`` is then ``None``). Labels may be whole numbers (parsed as integers,
            never through float: int64, or uint64 above 2**63 - 1) or any strings.
        delimiter: field separator; ``None`` sniffs ``,``, ``;``, tab or space.
        header: whether the first line names the columns; ``None`` detects it: a
            feature field that is not a number, a non-numeric label field above a numeric
            one, or the column names ``0 .. width - 1`` that pandas writes. An unnamed
            first header column whose values count ``0, 1, 2, ...`` is pandas' row index
            and is dropped.

    Returns:
        :class:`Dataset` with float64 ``X`` and int64 or string ``y``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: empty file, ragged rows, a non-numeric feature (with its line
            number), a missing label column, or fewer than 2 columns.
    """
    p = Path(path).expanduser()
    source = str(p)
    try:
        text = _read_bytes(p).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{source!r} is not a UTF-8 text file: {exc}") from exc
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"{source!r} is empty")
    if delimiter is None:
        try:
            delimiter = csv.Sniffer().sniff(lines[0], delimiters=",;\t ").delimiter
        except csv.Error:
            delimiter = ","
    rows = list(csv.reader(io.StringIO("\n".join(lines)), delimiter=delimiter, skipinitialspace=True))
    width = len(rows[0])
    if width < 1 + (label_column is not None):
        raise ValueError(f"{source!r}: need at least 2 columns (features and a label), found {width} "
                         f"with delimiter {delimiter!r}")

    def numeric(fields):
        try:
            [float(v) for v in fields]
        except ValueError:
            return False
        return True

    first = rows[0]
    auto = isinstance(label_column, str) and label_column == "auto"
    if header is None:
        if auto:
            provisional = _auto_label_column([v.strip() for v in first], width)
        else:
            provisional = (None if label_column is None else
                           _column_index(label_column, width, first if isinstance(label_column, str) else None,
                                         source))
        header = _looks_like_header(first, rows[1] if len(rows) > 1 else None, provisional, numeric)
    names = [v.strip() for v in first] if header else None
    body = rows[1:] if header else rows
    if not body:
        raise ValueError(f"{source!r}: no data rows")
    if names is not None and names[0] in ("", "Unnamed: 0") and _is_row_index(body):
        # pandas' DataFrame.to_csv writes the row index as an unnamed first column: not a feature
        names, body, width = names[1:], [row[1:] for row in body], width - 1
    if auto:
        col = _auto_label_column(names, width) if names is not None else width - 1
    else:
        col = None if label_column is None else _column_index(label_column, width, names, source)
    X = np.empty((len(body), width - (col is not None)))
    labels = []
    for n, row in enumerate(body):
        line = n + 1 + int(bool(header))
        if len(row) != width:
            raise ValueError(f"{source!r} line {line}: {len(row)} fields, expected {width}")
        if col is None:
            feats = row
        else:
            labels.append(row[col].strip())
            feats = row[:col] + row[col + 1:]
        try:
            X[n] = [float(v) for v in feats]
        except ValueError:
            bad = next(v for v in feats if not numeric([v]))
            raise ValueError(f"{source!r} line {line}: feature {bad!r} is not a number") from None
    if not np.isfinite(X).all():
        raise ValueError(f"{source!r}: features contain NaN or infinity")
    return Dataset(f"csv:{p}", X, None if col is None else _labels(np.array(labels), repr(source)))


def load_npz(path: str | os.PathLike, *, label_column: int | None = -1) -> Dataset:
    """Features and labels from an ``.npz`` file, read with ``allow_pickle=False``.

    Accepted layouts: arrays ``X`` (2-D) and ``y`` (1-D), optionally ``X_test`` and
    ``y_test``; or one 2-D array whose ``label_column`` holds the labels. With
    ``label_column=None`` the labels are optional: ``X`` alone, or one 2-D array of
    features, gives ``y = None`` (``X`` and ``y`` together still give ``y``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a (complete) ``.npz``, object arrays (they would need pickle),
            other layouts, mismatched lengths, non-numeric or non-finite features.
    """
    p = Path(path).expanduser()
    source = repr(str(p))
    if not p.is_file():
        raise FileNotFoundError(f"{source} does not exist")
    with open(p, "rb") as f:
        if f.read(2) != b"PK":
            raise ValueError(f"{source} is not a readable .npz file (no zip signature)")
    # bounded: members' declared sizes are checked before anything is decompressed
    arrays = _safe_io.read_npz(p, str(p))
    X_test = y_test = None
    if "X" in arrays and "y" in arrays:
        X, y = arrays["X"], arrays["y"]
        X_test, y_test = arrays.get("X_test"), arrays.get("y_test")
    elif label_column is None and (set(arrays) == {"X"} or len(arrays) == 1):
        X = arrays["X"] if "X" in arrays else next(iter(arrays.values()))
        if X.ndim != 2:
            raise ValueError(f"{source}: features must be a 2-D array, got shape {X.shape}")
        if X.dtype.kind not in "biuf":
            raise ValueError(f"{source}: features must be numeric, got dtype {X.dtype}")
        return Dataset(f"npz:{p}", X, None)
    elif len(arrays) == 1:
        (data,) = arrays.values()
        if data.ndim != 2 or data.shape[1] < 2:
            raise ValueError(f"{source}: a single array must be 2-D with >= 2 columns, got shape {data.shape}")
        col = _column_index(label_column, data.shape[1], None, source)
        X, y = np.delete(data, col, axis=1), data[:, col]
    else:
        raise ValueError(f"{source}: expected arrays 'X' and 'y' (or one 2-D array with a label column), "
                         f"found {sorted(arrays)}")

    def check(X, y, what):
        if X.ndim != 2 or y.ndim != 1 or X.shape[0] != y.shape[0]:
            raise ValueError(f"{source}: {what} must be X (n, d) and y (n,), got {X.shape} and {y.shape}")
        if X.dtype.kind not in "biuf":
            raise ValueError(f"{source}: {what} features must be numeric, got dtype {X.dtype}")
        if X.dtype.kind == "f" and not np.isfinite(X).all():
            raise ValueError(f"{source}: {what} features contain NaN or infinity")
        return X, _labels(y, source)

    X, y = check(X, y, "X/y")
    if (X_test is None) != (y_test is None):
        raise ValueError(f"{source}: X_test and y_test must come together")
    if X_test is not None:
        X_test, y_test = check(X_test, y_test, "X_test/y_test")
        if X_test.shape[1] != X.shape[1]:
            raise ValueError(f"{source}: X_test has {X_test.shape[1]} features, X has {X.shape[1]}")
    return Dataset(f"npz:{p}", X, y, X_test=X_test, y_test=y_test)


def load(spec: str, *, seed: int | None = 0, labels: bool = True,
         label_column: int | str | None = None) -> Dataset:
    """The data set named by a command-line ``spec``.

    ``digits``; ``spiral`` or ``spiral:K`` (``K`` arms, 100 points each, seeded);
    ``cifar10:PATH``; ``mnist:PATH``; ``fashion-mnist:PATH``; ``csv:PATH``;
    ``npz:PATH``; or a bare path ending in ``.csv``/``.csv.gz``/``.npz``.
    ``labels=False`` reads CSV/NPZ files without a label column. ``label_column``
    names the label column of a CSV (an index, a header name, or a string of digits
    such as ``"0"`` as the command line passes it) or of a single-array NPZ (an index);
    ``None`` keeps each loader's default (CSV: ``"auto"``; NPZ: the last column).

    Raises:
        ValueError: an unknown spec (the message lists the forms), or any loader error.
        FileNotFoundError: a missing path.

    Examples:
        >>> load("spiral:5").X.shape
        (500, 2)
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"data spec must be a non-empty string, got {spec!r}")
    kind, _, arg = spec.partition(":")
    kind = kind.lower()
    if kind in ("digits", "spiral", "cifar10", "mnist", "fashion-mnist") and label_column is not None:
        raise ValueError(f"label_column applies to CSV and NPZ data, not to {kind}")
    if kind == "digits" and not arg:
        return digits()
    if kind == "spiral":
        try:
            K = int(arg) if arg else 3
        except ValueError:
            raise ValueError(f"spiral:K needs an integer number of arms, got {arg!r}") from None
        return spiral(100, K, seed=seed)
    if label_column is not None and not labels:
        raise ValueError("label_column names a label column, but labels=False says the data has none")
    if isinstance(label_column, str) and label_column.lstrip("-").isdigit():
        label_column = int(label_column)
    csv_column = ("auto" if label_column is None else label_column) if labels else None
    npz_column = (-1 if label_column is None else label_column) if labels else None
    if isinstance(npz_column, str) and (kind == "npz" or spec.lower().endswith(".npz")):
        raise ValueError(f"label_column of an NPZ file is a column index, got {label_column!r}")
    loaders = {"cifar10": load_cifar10, "mnist": load_mnist,
               "fashion-mnist": lambda a: load_mnist(a, fashion=True),
               "csv": lambda a: load_csv(a, label_column=csv_column),
               "npz": lambda a: load_npz(a, label_column=npz_column)}
    if kind in loaders and arg:
        return loaders[kind](arg)
    lower = spec.lower()
    if lower.endswith((".csv", ".csv.gz")):
        return load_csv(spec, label_column=csv_column)
    if lower.endswith(".npz"):
        return load_npz(spec, label_column=npz_column)
    raise ValueError(f"unknown data spec {spec!r}; expected digits, spiral[:K], cifar10:PATH, mnist:PATH, "
                     "fashion-mnist:PATH, csv:PATH, npz:PATH, or a .csv/.npz path")


# ------------------------------------------------------- split, standardise
def split(X, y, *, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int | None = 0,
          stratify: bool = True):
    """Seeded, stratified split into train / validation / test parts.

    Each class is shuffled and cut by the fractions (rounded, so every part of every
    class with enough samples is represented); without ``stratify`` the rows are cut
    as one shuffled list.

    Args:
        X: ``(N, ...)`` array; y: ``(N,)`` labels.
        val_fraction, test_fraction: fractions in ``[0, 1)`` with sum ``< 1``.
        seed: seed of ``numpy.random.default_rng``.
        stratify: keep the class proportions in each part.

    Returns:
        ``(X_train, y_train, X_val, y_val, X_test, y_test)``; a part with fraction 0 is empty.

    Raises:
        ValueError: bad fractions, mismatched lengths, or an empty training part.

    Examples:
        >>> parts = split(np.arange(20)[:, None], np.arange(20) % 2, seed=0)
        >>> [len(p) for p in parts[::2]]
        [12, 4, 4]
    """
    X, y = np.asarray(X), np.asarray(y)
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"X has {X.shape[0]} rows but y has {y.shape[0]}")
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= f < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {f}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction + test_fraction}")
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(y == c) for c in np.unique(y)] if stratify else [np.arange(y.shape[0])]
    parts = ([], [], [])
    for idx in groups:
        idx = rng.permutation(idx)
        n_test = int(round(test_fraction * idx.shape[0]))
        n_val = int(round(val_fraction * idx.shape[0]))
        parts[2].append(idx[:n_test])
        parts[1].append(idx[n_test:n_test + n_val])
        parts[0].append(idx[n_test + n_val:])
    out = []
    for p in parts:
        sel = np.sort(np.concatenate(p)) if p else np.empty(0, dtype=np.int64)
        out += [X[sel], y[sel]]
    if out[0].shape[0] == 0:
        raise ValueError("the training part is empty; lower val_fraction/test_fraction or use more data")
    return tuple(out)


@dataclass
class Standardizer:
    """Per-feature ``(x - mean) / scale`` with statistics of the training rows.

    Constant features get ``scale = 1`` (they are only centred). Because the classifier's
    intercept is free, a standardised linear model folds back into one on raw features:
    ``W_raw = W / scale[:, None]``, ``b_raw = b - (mean / scale) @ W`` (:meth:`fold`).

    Examples:
        >>> s = Standardizer().fit(np.array([[0.0, 5.0], [2.0, 5.0]]))
        >>> s.mean_, s.scale_
        (array([1., 5.]), array([1., 1.]))
    """

    mean_: np.ndarray | None = field(default=None)
    scale_: np.ndarray | None = field(default=None)

    def fit(self, X) -> "Standardizer":
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[0] == 0:
            raise ValueError(f"X must be a non-empty 2-D array, got shape {X.shape}")
        self.mean_ = X.mean(axis=0)
        std = X.std(axis=0)
        self.scale_ = np.where(std > 1e-12 * np.maximum(1.0, np.abs(self.mean_)), std, 1.0)
        return self

    def transform(self, X) -> np.ndarray:
        if self.mean_ is None:
            raise ValueError("Standardizer is not fitted; call fit(X_train) first")
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.mean_.shape[0]:
            raise ValueError(f"X must have {self.mean_.shape[0]} columns, got shape {X.shape}")
        return (X - self.mean_) / self.scale_

    def fold(self, coef: np.ndarray, intercept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(coef (C, D), intercept (C,))`` of a model on standardised features -> raw features."""
        coef_raw = coef / self.scale_[None, :]
        return coef_raw, intercept - coef_raw @ self.mean_


@dataclass
class Split:
    """The parts :func:`prepare` returns: standardised float64 features, labels, the scaler."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    scaler: Standardizer | None


def prepare(data: Dataset, *, val_fraction: float = 0.15, test_fraction: float = 0.15,
            seed: int | None = 0, standardize: bool = True) -> Split:
    """Split ``data`` (keeping its predefined test part, if any) and standardise it.

    With a predefined test part only the rest is split, into train and validation
    (``val_fraction`` of it); otherwise into all three parts. The scaler is fitted on
    the training part only.

    Examples:
        >>> s = prepare(spiral(40, 3), seed=0)
        >>> s.X_train.shape[0] + s.X_val.shape[0] + s.X_test.shape[0]
        120
        >>> bool(abs(s.X_train.mean()) < 1e-12)
        True
    """
    if data.X_test is not None:
        X_tr, y_tr, X_va, y_va, _, _ = split(data.X, data.y, val_fraction=val_fraction,
                                             test_fraction=0.0, seed=seed)
        X_te, y_te = data.X_test, data.y_test
    else:
        X_tr, y_tr, X_va, y_va, X_te, y_te = split(data.X, data.y, val_fraction=val_fraction,
                                                   test_fraction=test_fraction, seed=seed)
    scaler = None
    if standardize:
        scaler = Standardizer().fit(X_tr)
        X_tr, X_va, X_te = (scaler.transform(a) for a in (X_tr, X_va, X_te))
    else:
        X_tr, X_va, X_te = (np.asarray(a, dtype=np.float64) for a in (X_tr, X_va, X_te))
    return Split(X_tr, y_tr, X_va, y_va, X_te, y_te, scaler)
