"""Reading files that may be hostile: bounded decompression and bounded ``.npz`` members.

Every reader of data or model files goes through here, so one mechanism bounds the
memory a file can make softgrad allocate:

* :func:`read_bytes` streams a gzip file through the decompressor and stops with a
  ``ValueError`` naming the file once the output passes ``max_bytes`` (a 175 KB
  ``.csv.gz`` can expand to gigabytes: a "gzip bomb").
* :func:`read_npz` opens an ``.npz`` (a zip of ``.npy`` members) without pickle and,
  before reading a member, checks its declared uncompressed size against the budget
  and its ``.npy`` header (shape times item size) against that declared size. zipfile
  never returns more than a member's declared size, so nothing beyond the budget is
  read or allocated.

The budget is :data:`MAX_DECOMPRESSED_BYTES` unless a caller passes another.
"""

from __future__ import annotations

import gzip
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from softgrad._validation import format_bytes

#: The most bytes one file may decompress to (gzip output, or all ``.npz`` members together).
#: Raise it (``softgrad._safe_io.MAX_DECOMPRESSED_BYTES = ...``) for larger trusted files.
MAX_DECOMPRESSED_BYTES = 2 ** 31

_CHUNK = 1 << 20


def _budget(max_bytes: int | None) -> int:
    return MAX_DECOMPRESSED_BYTES if max_bytes is None else int(max_bytes)


def _too_big(source: str, what: str, limit: int) -> ValueError:
    return ValueError(f"{source!r}: {what} exceeds the limit of {format_bytes(limit)} "
                      f"(softgrad._safe_io.MAX_DECOMPRESSED_BYTES); refusing to read it "
                      f"(a decompression bomb, or raise the limit for a trusted file)")


def read_bytes(path: Path, *, max_bytes: int | None = None) -> bytes:
    """The file's bytes, gunzipped (streamed, at most ``max_bytes`` of output) if it starts with gzip's magic.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: a damaged or truncated gzip stream, or output beyond ``max_bytes``.
    """
    limit = _budget(max_bytes)
    source = str(path)
    if not path.is_file():
        raise FileNotFoundError(f"{source!r} does not exist or is not a file")
    with open(path, "rb") as f:
        magic = f.read(2)
        f.seek(0)
        if magic != b"\x1f\x8b":
            return f.read()
        out = bytearray()
        try:
            with gzip.GzipFile(fileobj=f, mode="rb") as gz:
                while chunk := gz.read(_CHUNK):
                    out += chunk
                    if len(out) > limit:
                        raise _too_big(source, "the decompressed gzip data", limit)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise ValueError(f"{source!r} is a damaged or truncated gzip file: {exc}") from exc
    return bytes(out)


def read_npz(path: Path, source: str | None = None, *, max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` file as ``name -> ndarray``, read without pickle and within ``max_bytes``.

    Raises:
        ValueError: not a zip archive (an empty one included), a member that is not a
            ``.npy`` array, an object array (it would need pickle), a header that does
            not match the member's size, or members whose sizes exceed ``max_bytes``.
            The message starts with ``source`` (default: the path).
    """
    limit = _budget(max_bytes)
    source = str(path) if source is None else source
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise ValueError(f"{source!r} is not a readable .npz (zip) archive: {exc}") from exc
    with archive:
        members = archive.infolist()
        if not members:
            raise ValueError(f"{source!r} is an empty zip archive (no arrays)")
        total = sum(m.file_size for m in members)
        if total > limit:
            raise _too_big(source, f"the arrays' declared size {format_bytes(total)}", limit)
        arrays = {}
        for m in members:
            name = m.filename.removesuffix(".npy")
            arrays[name] = _read_member(archive, m, source, name)
    return arrays


def _read_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo, source: str, name: str) -> np.ndarray:
    fmt = np.lib.format
    try:
        with archive.open(member) as f:
            version = fmt.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = fmt.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = fmt.read_array_header_2_0(f)
            if dtype.hasobject:
                raise ValueError(f"{source!r}: array {name!r} holds Python objects; it cannot be read "
                                 f"without pickle (store numeric or string arrays)")
            count = 1
            for n in shape:
                count *= int(n)
            need = count * dtype.itemsize
            if need > member.file_size:
                raise ValueError(f"{source!r}: array {name!r} declares shape {shape} of {dtype} "
                                 f"({format_bytes(need)}) but its member holds {format_bytes(member.file_size)}; "
                                 f"the file is corrupt or crafted")
            data = f.read(need)
            if len(data) != need:
                raise ValueError(f"{source!r}: array {name!r} is truncated")
    except ValueError as exc:
        if str(exc).startswith(repr(source)):
            raise
        raise ValueError(f"{source!r}: array {name!r} is not a valid .npy member: {exc}") from exc
    except (zipfile.BadZipFile, OSError, EOFError, KeyError) as exc:
        raise ValueError(f"{source!r}: cannot read array {name!r}: {exc}") from exc
    if dtype.itemsize == 0:
        return np.empty(shape, dtype=dtype, order="F" if fortran else "C")
    arr = np.frombuffer(data, dtype=dtype, count=count)
    order: Any = "F" if fortran else "C"
    return arr.reshape(shape, order=order).copy()
