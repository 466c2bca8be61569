"""Choice of the compute backend behind the public NumPy-facing functions.

Every public function validates its input, brings it to a C-contiguous ``(N, C)``
float32/float64 array reduced along the last axis, and then calls the kernel of the
same name in the module of the active backend (see ``docs/ARCHITECTURE.md`` for
the kernel contract):

- ``"numpy"``: :mod:`softgrad._kernels._numpy`, the readable reference;
- ``"numba"``: :mod:`softgrad._kernels._numba`, fused parallel CPU kernels.

The default is ``"numba"`` when its module loads and ``"numpy"`` otherwise, with one
``RuntimeWarning`` that says why (Numba not installed, or installed but failing to
load). The environment variable ``SOFTGRAD_BACKEND`` (read when the backend is first
needed) or :func:`set_backend` overrides it for the whole process; :func:`use_backend`
overrides it inside a ``with`` block for the current thread (or asyncio task) only: the
override lives in a :class:`contextvars.ContextVar`, so threads never see each other's.

Threads (numba backend): as many as Numba's own setting for the calling thread --
``NUMBA_NUM_THREADS`` (which joblib's process workers set to their share of the
cores), :func:`numba.set_num_threads`, or ``threadpoolctl.threadpool_limits``, for
which :mod:`softgrad._kernels._numba` registers a controller.
"""

from __future__ import annotations

import contextlib
import contextvars
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

_active: str | None = None  # the process-wide choice (set_backend, or the default)
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("softgrad_backend", default=None)
_loaded: dict[str, ModuleType] = {}
_failed: dict[str, Exception] = {}
_warned_fallback = False


def available_backends() -> list[str]:
    """Return the names of the backends that load on this machine.

    >>> "numpy" in available_backends()
    True
    """
    names = []
    for name in _MODULES:
        try:
            _load(name)
        except Exception:  # noqa: BLE001 - a backend that fails to load is not available
            continue
        names.append(name)
    return names


def _load(name: str) -> ModuleType:
    """Import the kernel module of backend ``name`` once; a failure is remembered and re-raised."""
    if name in _failed:
        raise _failed[name]
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(_MODULES[name])
        except Exception as exc:  # noqa: BLE001 - recorded, re-raised, explained by the caller
            _failed[name] = exc
            raise
    return _loaded[name]


def _fallback_reason(exc: BaseException) -> str:
    """Why the numba backend is unavailable, in words that match what happened."""
    if isinstance(exc, ModuleNotFoundError) and exc.name in ("numba", "llvmlite"):
        return f"{exc.name} is not installed (install softgrad[fast] for the fused CPU kernels)"
    return (f"the numba backend failed to load ({type(exc).__name__}: {exc}); "
            f"set {_ENV_VAR}=numpy to choose the NumPy kernels without this warning")


def _default_backend() -> str:
    global _warned_fallback
    requested = os.environ.get(_ENV_VAR, "").strip().lower()
    if requested:
        if requested not in _MODULES:
            raise ValueError(
                f"{_ENV_VAR}={requested!r} is not a backend; expected one of {sorted(_MODULES)}"
            )
        try:
            _load(requested)
        except Exception as exc:
            raise ImportError(f"{_ENV_VAR}={requested!r}: the backend failed to load "
                              f"({type(exc).__name__}: {exc})") from exc
        return requested
    try:
        _load("numba")
    except Exception as exc:  # noqa: BLE001 - any failure falls back to the reference, with a warning
        if not _warned_fallback:
            warnings.warn(
                f"softgrad: {_fallback_reason(exc)}; using the NumPy reference kernels (slower).",
                RuntimeWarning,
                stacklevel=5,  # the caller of the public function
            )
            _warned_fallback = True
        return "numpy"
    return "numba"


def _checked_name(name: str) -> str:
    """``name`` lower-cased once its backend loads; raises as :func:`set_backend` documents."""
    if not isinstance(name, str) or name.lower() not in _MODULES:
        raise ValueError(f"backend must be one of {sorted(_MODULES)}, got {name!r}")
    name = name.lower()
    try:
        _load(name)
    except ImportError:
        raise
    except Exception as exc:
        raise ImportError(f"backend {name!r} failed to load ({type(exc).__name__}: {exc})") from exc
    return name


def set_backend(name: str) -> None:
    """Select the process-wide backend for all later calls: ``"numpy"`` or ``"numba"``.

    A :func:`use_backend` block that is active in the calling thread still takes precedence
    inside that block.

    Raises:
        ValueError: ``name`` is not a known backend.
        ImportError: the backend's dependencies are not installed, or its module
            failed to load.
    """
    global _active
    _active = _checked_name(name)


def get_backend() -> str:
    """Return the name of the backend active in this thread: a :func:`use_backend` override, else the process's.

    >>> get_backend() in available_backends()
    True
    """
    global _active
    override = _override.get()
    if override is not None:
        return override
    if _active is None:
        _active = _default_backend()
    return _active


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager that selects ``name`` inside the ``with`` block, for the calling thread only.

    Other threads keep their own choice; blocks nest; the previous choice returns on exit,
    also when the block raises.

    Raises:
        ValueError, ImportError: as :func:`set_backend`.

    >>> with use_backend("numpy"):
    ...     get_backend()
    'numpy'
    """
    token = _override.set(_checked_name(name))
    try:
        yield
    finally:
        _override.reset(token)


def kernels() -> ModuleType:
    """Return the kernel module of the active backend."""
    return _load(get_backend())
