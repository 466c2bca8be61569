"""Choice of the compute backend behind the public NumPy-facing functions.

Every public function validates its input, brings it to a C-contiguous ``(N, C)``
float32/float64 array reduced along the last axis, and then calls the kernel of the
same name in the module of the active backend (see ``docs/ARCHITECTURE.md`` for
the kernel contract):

- ``"numpy"``: :mod:`softgrad._kernels._numpy`, the readable reference;
- ``"numba"``: :mod:`softgrad._kernels._numba`, fused parallel CPU kernels.

The default is ``"numba"`` when Numba imports and ``"numpy"`` otherwise (with one
warning). The environment variable ``SOFTGRAD_BACKEND`` or :func:`set_backend`
overrides it.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from types import ModuleType
from typing import Iterator

_MODULES = {
    "numpy": "softgrad._kernels._numpy",
    "numba": "softgrad._kernels._numba",
}
_ENV_VAR = "SOFTGRAD_BACKEND"

_active: str | None = None
_loaded: dict[str, ModuleType] = {}
_warned_fallback = False


def available_backends() -> list[str]:
    """Return the names of the backends that import on this machine.

    >>> "numpy" in available_backends()
    True
    """
    names = []
    for name in _MODULES:
        try:
            _load(name)
        except ImportError:
            continue
        names.append(name)
    return names


def _load(name: str) -> ModuleType:
    if name not in _loaded:
        _loaded[name] = importlib.import_module(_MODULES[name])
    return _loaded[name]


def _default_backend() -> str:
    global _warned_fallback
    requested = os.environ.get(_ENV_VAR, "").strip().lower()
    if requested:
        if requested not in _MODULES:
            raise ValueError(
                f"{_ENV_VAR}={requested!r} is not a backend; expected one of {sorted(_MODULES)}"
            )
        return requested
    try:
        _load("numba")
    except ImportError:
        if not _warned_fallback:
            warnings.warn(
                "softgrad: Numba is not installed; using the (slower) NumPy reference kernels. "
                "Install softgrad[fast] for the fused CPU kernels.",
                RuntimeWarning,
                stacklevel=3,
            )
            _warned_fallback = True
        return "numpy"
    return "numba"


def set_backend(name: str) -> None:
    """Select the backend for all later calls: ``"numpy"`` or ``"numba"``.

    Raises:
        ValueError: ``name`` is not a known backend.
        ImportError: the backend's dependencies are not installed.
    """
    global _active
    if not isinstance(name, str) or name.lower() not in _MODULES:
        raise ValueError(f"backend must be one of {sorted(_MODULES)}, got {name!r}")
    name = name.lower()
    _load(name)
    _active = name


def get_backend() -> str:
    """Return the name of the active backend.

    >>> get_backend() in available_backends()
    True
    """
    global _active
    if _active is None:
        _active = _default_backend()
    return _active


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager that selects ``name`` inside the ``with`` block only.

    >>> with use_backend("numpy"):
    ...     get_backend()
    'numpy'
    """
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def kernels() -> ModuleType:
    """Return the kernel module of the active backend."""
    return _load(get_backend())
