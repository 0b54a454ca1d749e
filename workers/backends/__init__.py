"""Keras 3 backends: TensorFlow, JAX or PyTorch, one per process, chosen before Keras loads.

Keras picks its backend once, when it is first imported, from ``KERAS_BACKEND``.
``select`` resolves ``PREDICTQ_KERAS_BACKEND`` (else ``KERAS_BACKEND``, else
tensorflow) and sets that variable, so it must run before anything imports
Keras; the worker does it first thing when it starts serving. ``current`` is
the backend Keras actually runs, which is what a model is loaded with.

Per backend (one module each): the device set-up, the compiled inference call
and which errors mean "out of memory"; see each module's docstring.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import get_args

from predictq.errors import ConfigError, ModelLoadError
from predictq.settings import KerasBackend, Settings
from workers.backends.base import Backend, CompiledCall, DeviceInfo
from workers.backends.jax_backend import JaxBackend
from workers.backends.tf_backend import TensorflowBackend
from workers.backends.torch_backend import TorchBackend

__all__ = ["Backend", "CompiledCall", "DeviceInfo", "current", "resolve", "select"]

_BACKENDS: dict[str, type[Backend]] = {
    "tensorflow": TensorflowBackend,
    "jax": JaxBackend,
    "torch": TorchBackend,
}


def resolve(settings: Settings, environ: Mapping[str, str] | None = None) -> KerasBackend:
    """The backend to run: ``PREDICTQ_KERAS_BACKEND``, else ``KERAS_BACKEND``, else tensorflow."""
    if settings.keras_backend is not None:
        return settings.keras_backend
    raw = (os.environ if environ is None else environ).get("KERAS_BACKEND", "").strip().lower()
    for name in get_args(KerasBackend):
        if raw == name:
            return name  # type: ignore[no-any-return]
    if raw:
        raise ConfigError(
            f"KERAS_BACKEND must be one of {', '.join(_BACKENDS)} for predictq, got {raw!r} "
            f"(PREDICTQ_KERAS_BACKEND overrides it)"
        )
    return "tensorflow"


def select(settings: Settings) -> Backend:
    """Make ``settings``' backend the one Keras will import; call before Keras is imported."""
    name = resolve(settings)
    keras = sys.modules.get("keras")
    if keras is not None and keras.backend.backend() != name:
        raise ConfigError(
            f"PREDICTQ_KERAS_BACKEND={name}, but Keras was already imported with "
            f"{keras.backend.backend()} in this process before the worker set its backend; "
            f"a process runs one backend"
        )
    os.environ["KERAS_BACKEND"] = name
    return _BACKENDS[name]()


def current() -> Backend:
    """The backend Keras runs in this process (importing Keras if needed)."""
    import keras

    name = keras.backend.backend()
    if name not in _BACKENDS:
        raise ModelLoadError(
            f"Keras runs the {name!r} backend, which predictq does not serve; use one of "
            f"{', '.join(_BACKENDS)} (PREDICTQ_KERAS_BACKEND)"
        )
    return _BACKENDS[name]()
