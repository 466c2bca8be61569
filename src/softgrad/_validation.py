"""Boundary checks shared by every public function.

Each public function converts its array-like arguments here, once, and then hands
C-contiguous ``(N, C)`` float32/float64 arrays to the kernels (see the kernel contract
in ``docs/ARCHITECTURE.md``). Every check raises :class:`TypeError` (wrong kind of
value) or :class:`ValueError` (right kind, bad value) whose message starts with the
name of the offending argument; nothing here uses ``assert``.

Conventions:
    * Logits must be real floating point. Integer, bool, complex and object arrays
      raise ``TypeError``: silently promoting integer logits hides a caller's bug.
    * NaN and ``+inf`` raise ``ValueError``; ``-inf`` is allowed in logits (the class
      gets probability 0) unless a whole slice along the class axis is ``-inf``.
    * float16 is computed in float32 and returned as float16; float32 and float64
      are computed in their own dtype; any wider float is computed in float64.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from softgrad._cross_entropy_rule import REDUCTIONS as _REDUCTIONS

# numpy.exceptions arrived in NumPy 1.25; the floor is 1.24.
_TOO_HARD = getattr(getattr(np, "exceptions", np), "TooHardError", Exception)


def as_float_array(x: Any, name: str, *, allow_neg_inf: bool = False,
                   check_values: bool = True) -> np.ndarray:
    """Convert ``x`` to a real floating ndarray without copying when possible.

    With ``check_values=False`` only the dtype is checked; the caller then checks the
    values itself (:func:`logits_rows` does it with one row-maximum pass).

    Raises:
        TypeError: ``x`` is not numeric, or is bool, integer or complex.
        ValueError: ``x`` contains NaN or ``+inf`` (or ``-inf`` unless allowed).

    >>> as_float_array([1.0, -np.inf], "logits", allow_neg_inf=True).dtype
    dtype('float64')
    """
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be an array of real floats, got {type(x).__name__}") from exc
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(
            f"{name} must have a real floating dtype (float16/32/64), got dtype {arr.dtype}; "
            f"convert it explicitly, e.g. {name}.astype(np.float64)"
        )
    if check_values and arr.size:
        _check_values(arr, name, allow_neg_inf)
    return arr


def _check_values(arr: np.ndarray, name: str, allow_neg_inf: bool) -> None:
    """Raise ``ValueError`` for NaN, ``+inf`` and (unless allowed) ``-inf`` entries.

    Fast path: one pass that sums the array (no temporaries). A finite sum proves every
    entry finite, since a NaN or an infinity makes the sum NaN or infinite. Only when the
    sum is not finite (a bad entry, an allowed ``-inf``, or an overflow of large finite
    entries) do the exact element-wise scans run.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(np.add.reduce(arr, axis=None)):
            return
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN")
    if np.isposinf(arr).any():
        raise ValueError(f"{name} contains +inf")
    if not allow_neg_inf and np.isneginf(arr).any():
        raise ValueError(f"{name} contains -inf")


#: The largest result (in bytes) a function that builds a dense derivative may allocate:
#: :func:`softgrad.softmax_jacobian` (``N * C * C`` entries) and
#: :func:`softgrad.numerical_gradient` (``f(x).size * x.size`` entries). Checked before any work.
MAX_RESULT_BYTES = 2 ** 32


def format_bytes(n: int) -> str:
    """``n`` bytes in the largest binary unit that keeps the number >= 1.

    >>> format_bytes(3 * 2 ** 40)
    '3.0 TiB'
    """
    if n < 1024:
        return f"{int(n)} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} PiB"


def check_result_size(n_elements: int, itemsize: int, what: str, *, limit: int | None = None) -> None:
    """Raise ``ValueError`` naming ``what`` if ``n_elements * itemsize`` bytes exceed ``limit``.

    The product is taken in Python ints (no overflow). ``limit`` defaults to
    :data:`MAX_RESULT_BYTES`.
    """
    limit = MAX_RESULT_BYTES if limit is None else limit
    nbytes = int(n_elements) * int(itemsize)
    if nbytes > limit:
        raise ValueError(f"{what} would need {format_bytes(nbytes)} ({int(n_elements)} entries), "
                         f"more than the limit of {format_bytes(limit)}")


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype the kernels run in for inputs of ``dtype``.

    >>> compute_dtype(np.dtype(np.float16))
    dtype('float32')
    """
    if dtype == np.float32 or dtype == np.float16:
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def normalize_axis(axis: Any, ndim: int, name: str = "axis") -> int:
    """Return ``axis`` as a non-negative int in ``[0, ndim)``.

    Raises:
        TypeError: ``axis`` is not an integer.
        ValueError: ``axis`` is out of range for an array of ``ndim`` dimensions.

    >>> normalize_axis(-1, 3)
    2
    """
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(axis).__name__}")
    if ndim == 0:
        raise ValueError(f"{name}={axis} needs an array with at least 1 dimension, got a scalar")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}={axis} is out of range for an array with {ndim} dimensions")
    return int(axis) % ndim


@dataclass(frozen=True)
class RowLayout:
    """How an array of ``shape`` maps to ``(N, C)`` rows along ``axis`` and back.

    ``to_rows`` moves ``axis`` last and flattens the other axes into ``N`` (C order);
    ``from_rows`` undoes it and casts to the caller's dtype.
    """

    shape: tuple[int, ...]
    axis: int
    dtype: np.dtype

    @property
    def num_classes(self) -> int:
        return self.shape[self.axis]

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """The shape without the class axis (the shape of an index target)."""
        return self.shape[: self.axis] + self.shape[self.axis + 1 :]

    @property
    def compute_dtype(self) -> np.dtype:
        return compute_dtype(self.dtype)

    def to_rows(self, x: np.ndarray, dtype: np.dtype | None = None) -> np.ndarray:
        """``x`` (of ``shape``) as a C-contiguous ``(N, C)`` array of ``dtype``."""
        dtype = self.compute_dtype if dtype is None else dtype
        moved = np.moveaxis(x, self.axis, -1)
        return np.ascontiguousarray(moved.reshape(-1, self.num_classes), dtype=dtype)

    def from_rows(self, rows: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_rows`, cast to the caller's dtype."""
        moved_shape = self.batch_shape + (self.num_classes,)
        out = np.moveaxis(rows.reshape(moved_shape), -1, self.axis)
        return np.ascontiguousarray(out, dtype=self.dtype)

    def from_batch(self, values: np.ndarray) -> np.ndarray:
        """An ``(N,)`` per-row array reshaped to ``batch_shape`` in the caller's dtype."""
        return values.reshape(self.batch_shape).astype(self.dtype)

    @property
    def axes(self) -> tuple[int, ...]:
        """The reduced axes, as :class:`AxesLayout` has them."""
        return (self.axis,)

    def rows_view(self, out: np.ndarray) -> np.ndarray | None:
        """``out`` (of ``shape``) as ``(N, C)`` rows the kernels can write, or None if that needs a copy.

        A view exists when the class axis is already last and ``out`` is C-contiguous in the
        compute dtype; otherwise the result goes through a temporary.
        """
        if (self.axis != len(self.shape) - 1 or out.dtype != self.compute_dtype
                or not out.flags.c_contiguous):
            return None
        return out.reshape(-1, self.num_classes)


@dataclass(frozen=True)
class AxesLayout:
    """:class:`RowLayout` for several reduced axes (``axis`` a tuple, or None for all of them).

    ``to_rows`` moves ``axes`` (in the caller's order, sorted) to the end and flattens them
    into the row of ``C = prod(shape[a] for a in axes)`` entries, the other axes into ``N``.
    With ``axes == ()`` every element is its own slice (``C = 1``).
    """

    shape: tuple[int, ...]
    axes: tuple[int, ...]
    dtype: np.dtype

    @property
    def _order(self) -> tuple[int, ...]:
        return tuple(a for a in range(len(self.shape)) if a not in self.axes) + self.axes

    @property
    def num_classes(self) -> int:
        return int(np.prod([self.shape[a] for a in self.axes], dtype=np.int64))

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(n for a, n in enumerate(self.shape) if a not in self.axes)

    @property
    def compute_dtype(self) -> np.dtype:
        return compute_dtype(self.dtype)

    def to_rows(self, x: np.ndarray, dtype: np.dtype | None = None) -> np.ndarray:
        dtype = self.compute_dtype if dtype is None else dtype
        moved = np.transpose(x, self._order)
        return np.ascontiguousarray(moved.reshape(-1, self.num_classes), dtype=dtype)

    def from_rows(self, rows: np.ndarray) -> np.ndarray:
        moved_shape = tuple(self.shape[a] for a in self._order)
        out = np.transpose(rows.reshape(moved_shape), np.argsort(self._order))
        return np.ascontiguousarray(out, dtype=self.dtype)

    def from_batch(self, values: np.ndarray) -> np.ndarray:
        return values.reshape(self.batch_shape).astype(self.dtype)

    def rows_view(self, out: np.ndarray) -> np.ndarray | None:
        if (self._order != tuple(range(len(self.shape))) or out.dtype != self.compute_dtype
                or not out.flags.c_contiguous):
            return None
        return out.reshape(-1, self.num_classes)


def normalize_axes(axis: Any, ndim: int, name: str = "axis") -> int | tuple[int, ...]:
    """An int ``axis`` as :func:`normalize_axis` returns it; None or a tuple as sorted non-negative ints.

    Raises:
        TypeError: ``axis`` is neither None, an int nor a tuple of ints.
        ValueError: an axis out of range, or one given twice.

    >>> normalize_axes((-1, 0), 3), normalize_axes(None, 2)
    ((0, 2), (0, 1))
    """
    if axis is None:
        return tuple(range(ndim))
    if not isinstance(axis, tuple):
        return normalize_axis(axis, ndim, name)
    for a in axis:
        if isinstance(a, bool) or not isinstance(a, numbers.Integral):
            raise TypeError(f"{name} must be an int, a tuple of ints or None, got {axis!r}")
        if not -ndim <= a < ndim:
            raise ValueError(f"{name}={axis} is out of range for an array with {ndim} dimensions")
    axes = tuple(sorted(int(a) % ndim for a in axis))
    if len(set(axes)) != len(axes):
        raise ValueError(f"{name}={axis} names an axis more than once")
    return axes


def layout_for(arr: np.ndarray, axis: Any, name: str = "axis") -> RowLayout | AxesLayout:
    """The layout of ``arr`` reduced along ``axis`` (an int, a tuple of ints, or None for every axis)."""
    ax = normalize_axes(axis, arr.ndim, name)
    if isinstance(ax, tuple):
        return AxesLayout(arr.shape, ax, arr.dtype)
    return RowLayout(arr.shape, ax, arr.dtype)


def logits_rows(logits: Any, axis: Any, name: str = "logits", *, check_values: bool = True,
                axes_ok: bool = False) -> tuple[np.ndarray, RowLayout | AxesLayout]:
    """Validate logits and return them as kernel-ready ``(N, C)`` rows plus the layout.

    ``axis`` is an int (a :class:`RowLayout`), or, with ``axes_ok``, also a tuple of ints
    or None (an :class:`AxesLayout`: the slices span those axes). With ``check_values=False`` the values
    are left to the kernel, which counts the invalid rows in its own pass over them; the
    caller then passes that count to :func:`check_invalid_rows`.

    Raises:
        TypeError: non-floating logits or a bad ``axis`` type.
        ValueError: NaN/+inf, scalar input with an int ``axis``, bad ``axis``, an empty
            array (no rows or no classes), or a slice along ``axis`` that is entirely ``-inf``.

    >>> rows, layout = logits_rows(np.zeros((2, 3, 4)), axis=1)
    >>> rows.shape, layout.batch_shape
    ((8, 3), (2, 4))
    """
    arr = as_float_array(logits, name, check_values=False)
    layout = layout_for(arr, axis) if axes_ok else RowLayout(arr.shape, normalize_axis(axis, arr.ndim), arr.dtype)
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}); need at least one row and one class")
    rows = layout.to_rows(arr)
    if check_values:
        check_logit_rows(rows, name)
    return rows, layout


def check_invalid_rows(n_bad: int, rows: np.ndarray, name: str = "logits") -> None:
    """Raise the :func:`check_logit_rows` error for rows a kernel counted as invalid.

    ``n_bad`` is a logits kernel's return value. Zero costs nothing; otherwise the exact
    checks run on ``rows`` (the kernel's input, unchanged) to name the problem, so the
    messages are those of a separate validation pass.
    """
    if n_bad:
        check_logit_rows(rows, name)
        raise RuntimeError(f"internal error: the kernel counted {n_bad} invalid row(s) of {name} "
                           f"that the exact checks do not find")


def check_out(out: Any, shape: tuple[int, ...], dtype: np.dtype, name: str, inputs: dict[str, Any]) -> np.ndarray:
    """Validate a caller's output buffer before anything is written to it.

    ``out`` must be a writeable, C-contiguous ndarray of exactly ``shape`` and ``dtype``
    (the result's: no casting) that shares no memory with any of ``inputs`` (``name ->
    array-like``): an overlap would let the pass overwrite an input it still reads, and an
    error found during the pass would leave that input changed.

    Raises:
        TypeError: ``out`` is not an ndarray, or has another dtype.
        ValueError: wrong shape, not C-contiguous, read-only, or overlapping an input.
    """
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a NumPy ndarray, got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"{name} must have dtype {np.dtype(dtype)} (the result's dtype), got {out.dtype}")
    if out.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {out.shape}")
    if not out.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only")
    for other, x in inputs.items():
        if isinstance(x, np.ndarray) and _overlaps(out, x):
            raise ValueError(f"{name} shares memory with {other}; pass a separate array "
                             f"(in-place results are not supported)")
    return out


def _overlaps(a: np.ndarray, b: np.ndarray) -> bool:
    if not np.may_share_memory(a, b):
        return False
    try:
        return bool(np.shares_memory(a, b, max_work=10_000))
    except _TOO_HARD:
        return True  # cannot tell cheaply: treat as overlapping


def check_logit_rows(rows: np.ndarray, name: str) -> None:
    """Raise ``ValueError`` if ``rows (N, C)`` has NaN, ``+inf``, or a row entirely ``-inf``.

    One pass: the row maximum is NaN if the row has a NaN (``np.max`` propagates it),
    ``+inf`` if it has a ``+inf``, and ``-inf`` exactly when every entry is ``-inf``.
    """
    row_max = rows.max(axis=1)
    if np.isnan(row_max).any():
        raise ValueError(f"{name} contains NaN")
    if np.isposinf(row_max).any():
        raise ValueError(f"{name} contains +inf")
    bad = np.isneginf(row_max)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{name} has {int(bad.sum())} slice(s) along the class axis that are entirely -inf "
            f"(first at flattened row {first}); softmax of such a slice is undefined"
        )


def same_shape_rows(x: Any, layout: RowLayout, name: str, *, dtype: np.dtype | None = None,
                    allow_neg_inf: bool = False) -> np.ndarray:
    """Validate a float array that must have ``layout.shape`` and return its rows."""
    arr = as_float_array(x, name, allow_neg_inf=allow_neg_inf)
    if arr.shape != layout.shape:
        raise ValueError(f"{name} must have shape {layout.shape}, got {arr.shape}")
    return layout.to_rows(arr, dtype)


def index_target(target: Any, layout: RowLayout, ignore_index: int | None = None,
                 name: str = "target") -> np.ndarray:
    """Validate integer class targets and return them flattened as ``(N,)`` int64.

    ``target`` must have ``layout.batch_shape`` and each entry must be in
    ``[0, C)`` or equal to ``ignore_index``.

    Raises:
        TypeError: ``target`` is not an integer array.
        ValueError: wrong shape, or a label out of range (negative included).

    >>> layout = RowLayout((2, 3), 1, np.dtype(np.float64))
    >>> index_target([2, -100], layout, ignore_index=-100)
    array([   2, -100])
    """
    arr = np.asarray(target)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be an integer array of class indices, got dtype {arr.dtype}")
    if arr.shape != layout.batch_shape:
        raise ValueError(
            f"{name} must have shape {layout.batch_shape} (the logits' shape without the class "
            f"axis {layout.axis}), got {arr.shape}"
        )
    flat = arr.reshape(-1)
    bad = _bad_labels(flat, layout.num_classes, ignore_index)
    if bad.any():
        value = int(flat[np.flatnonzero(bad)[0]])
        allowed = f"[0, {layout.num_classes})" + ("" if ignore_index is None else f" or ignore_index={ignore_index}")
        raise ValueError(f"{name} contains class index {value} outside {allowed}")
    return flat.astype(np.int64)


def _bad_labels(flat: np.ndarray, num_classes: int, ignore_index: int | None) -> np.ndarray:
    """Mask of labels outside ``[0, num_classes)`` and not ``ignore_index``, in ``flat``'s own dtype.

    The range test runs before any cast to int64, so uint64 labels >= 2**63 are out of
    range rather than wrapped to negative numbers (which could equal ``ignore_index``).
    """
    info = np.iinfo(flat.dtype)
    bad = flat >= flat.dtype.type(num_classes) if num_classes <= info.max else np.zeros(flat.shape, bool)
    if info.min < 0:
        bad |= flat < 0
    if ignore_index is not None and info.min <= ignore_index <= info.max:
        bad &= flat != flat.dtype.type(ignore_index)
    return bad


def probability_target(target: Any, layout: RowLayout, name: str = "target") -> np.ndarray:
    """Validate class-probability targets of the logits' shape; return ``(N, C)`` rows.

    Entries must be finite and non-negative; rows need not sum to 1 (PyTorch does not
    require it either).

    Raises:
        TypeError: ``target`` is not a floating array.
        ValueError: wrong shape, non-finite or negative entries.
    """
    rows = same_shape_rows(target, layout, name)
    if (rows < 0).any():
        raise ValueError(f"{name} contains negative class probabilities")
    return rows


def class_target(target: Any, layout: RowLayout, ignore_index: int | None = None,
                 name: str = "target") -> tuple[str, np.ndarray]:
    """Classify ``target`` as ``("index", (N,) int64)`` or ``("probs", (N, C) rows)``.

    Integer arrays are class indices; floating arrays are class probabilities.
    """
    arr = np.asarray(target)
    if np.issubdtype(arr.dtype, np.floating):
        if arr.shape != layout.shape and arr.shape == layout.batch_shape:
            raise ValueError(
                f"{name} has float dtype {arr.dtype} and the shape of class indices {arr.shape}: "
                f"float targets are read as probabilities and must have the logits' shape "
                f"{layout.shape}; for class ids pass an integer array, e.g. {name}.astype(np.int64)")
        return "probs", probability_target(arr, layout, name)
    return "index", index_target(arr, layout, ignore_index, name)


def class_weight(weight: Any, num_classes: int, dtype: np.dtype, name: str = "weight") -> np.ndarray | None:
    """Validate per-class weights ``(C,)``; ``None`` passes through.

    Raises:
        TypeError: not a floating array.
        ValueError: wrong shape, NaN or infinite entries.
    """
    if weight is None:
        return None
    arr = as_float_array(weight, name)
    if arr.shape != (num_classes,):
        raise ValueError(f"{name} must have shape ({num_classes},) (one entry per class), got {arr.shape}")
    return np.ascontiguousarray(arr, dtype=dtype)


def check_reduction(reduction: Any, name: str = "reduction") -> str:
    """Return ``reduction`` if it is ``"mean"``, ``"sum"`` or ``"none"``.

    >>> check_reduction("sum")
    'sum'
    """
    if not isinstance(reduction, str) or reduction not in _REDUCTIONS:
        raise ValueError(f"{name} must be one of {_REDUCTIONS}, got {reduction!r}")
    return reduction


def check_int(value: Any, name: str) -> int:
    """Return ``value`` as an int; bools and non-integers raise ``TypeError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)
