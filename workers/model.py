"""Load a model once, read its input spec, and call it through a compiled function.

Three formats: Keras 3 ``.keras`` files and legacy ``.h5`` files on every Keras
backend, and TensorFlow SavedModel directories (their ``serving_default``
signature) on TensorFlow. Inference never goes through ``model.predict()``,
which builds a data pipeline per call (about 100 ms for a tiny MLP) and leaks
memory when called in a loop; instead the backend Keras runs in this process
(workers/backends/) compiles the fastest correct call it has: a concrete
``tf.function`` traced once, a ``jax.jit`` of the model's stateless call with
bucketed batch sizes, or an eager PyTorch call without autograd.

``LoadedModel.__call__`` is not thread-safe by contract: only the batcher's
device thread calls it (see workers/batcher.py).
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from predictq.errors import DeviceOutOfMemory, ModelLoadError, PredictqError
from predictq.structure import Structure, flatten
from workers import backends
from workers.backends import Backend, CompiledCall
from workers.shards import Sharder
from workers.spec import ModelSpec, check_inputs, tensor_spec

log = logging.getLogger(__name__)

Array = np.ndarray[Any, Any]


class LoadedModel:
    """A model ready for inference: its spec and a compiled, batch-polymorphic call."""

    def __init__(
        self, spec: ModelSpec, compiled: CompiledCall, load_s: float, backend: Backend
    ) -> None:
        self.spec = spec
        self._fn = compiled.fn
        self._compiled = compiled
        self._backend = backend
        self.load_s = load_s

    @property
    def backend(self) -> str:
        """The Keras backend that runs the model: tensorflow, jax or torch."""
        return self._backend.name

    @property
    def compiles(self) -> int:
        """Programs compiled so far (one per traced input shape; 0 for eager PyTorch)."""
        return self._compiled.compiles()

    @property
    def warm_sizes(self) -> tuple[int, ...]:
        """The batch sizes ``warm_up`` runs by default (the ones the backend compiles for)."""
        return self._compiled.warm_sizes

    def __call__(self, inputs: Sequence[Array]) -> list[Array]:
        """Run one batch; returns one array per output, in ``spec.outputs`` order."""
        try:
            outputs = self._fn(*inputs)
        except PredictqError:
            raise
        except Exception as e:
            error = self._backend.model_error(e)
            if error is None:
                raise
            raise error from e
        return [np.asarray(o) for o in outputs]

    def warm_up(self, batch_sizes: Sequence[int] | None = None) -> None:
        """Run one inference per batch size so the first real job pays no compilation.

        By default the sizes the backend compiles for: single jobs and full
        batches, or every bucket (JAX). A batch size that does not fit in device
        memory is logged, not fatal: the batcher splits such batches when they
        happen.
        """
        for n in batch_sizes or self.warm_sizes:
            zeros = [
                np.zeros((n, *(d or 1 for d in s.feature_shape)), dtype=s.dtype)
                for s in self.spec.inputs
            ]
            try:
                self(zeros)
            except DeviceOutOfMemory as e:
                log.warning(
                    "warm-up: a batch of %d samples does not fit in device memory (%s); "
                    "such batches will be split; consider a smaller "
                    "PREDICTQ_MAX_BATCH_SIZE",
                    n,
                    e,
                )


def import_model_modules(modules: Sequence[str]) -> None:
    """Import modules that register custom layers before the model is deserialized."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ModelLoadError(f"PREDICTQ_MODEL_IMPORTS: cannot import {name!r}: {e}") from e


def load_model(
    path: str, *, max_batch_size: int | None = None, sharder: Sharder | None = None
) -> LoadedModel:
    """Load ``path`` (.keras, .h5 or SavedModel dir) and compile its inference call.

    It runs on the backend Keras runs in this process (``workers.backends.select``
    chooses it before Keras is imported); ``max_batch_size`` bounds the batch
    sizes compiled ahead (JAX) and warmed up; ``sharder`` (the process's) splits
    large CPU batches into parts computed at once (workers/shards.py).
    """
    started = time.monotonic()
    if not os.path.exists(path):
        raise ModelLoadError(f"PREDICTQ_MODEL_PATH: no file or directory at {path!r}")
    backend = backends.current()
    try:
        if os.path.isdir(path):
            spec, compiled = backend.load_savedmodel(path, max_batch_size=max_batch_size)
        elif path.endswith((".keras", ".h5", ".hdf5")):
            spec, compiled = _load_keras(path, backend, max_batch_size)
        else:
            raise ModelLoadError(
                f"PREDICTQ_MODEL_PATH: expected a .keras or .h5 file or a SavedModel "
                f"directory, got {path!r}"
            )
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(f"cannot load model {path!r}: {type(e).__name__}: {e}") from e
    if sharder is not None:
        compiled = sharder.wrap(compiled)
    load_s = time.monotonic() - started
    log.info(
        "loaded %s model %s on %s in %.2fs: inputs %s, outputs %s",
        spec.format,
        path,
        backend.name,
        load_s,
        [s.describe() for s in spec.inputs],
        [s.describe() for s in spec.outputs],
    )
    return LoadedModel(spec, compiled, load_s, backend)


def _structure(model: Any, attr: str, tensors: Sequence[Any]) -> Structure:
    try:
        value = getattr(model, attr)
    except (AttributeError, ValueError):
        value = list(tensors)  # Sequential models that were never called
    layout, leaves = flatten(value)
    if layout.structure == "list" and len(leaves) < 2:
        return "single"  # a one-element list: the model is called with the tensor itself
    return layout.structure


def _load_keras(
    path: str, backend: Backend, max_batch_size: int | None
) -> tuple[ModelSpec, CompiledCall]:
    import keras

    model = keras.models.load_model(path, compile=False)
    in_structure = _structure(model, "input", model.inputs)
    out_structure = _structure(model, "output", model.outputs)
    if in_structure == "dict":
        names = list(model.input.keys())
        in_tensors = [model.input[k] for k in names]
    else:
        in_tensors = list(model.inputs)
        names = [t.name for t in in_tensors]
    inputs = tuple(tensor_spec(n, t.shape, t.dtype) for n, t in zip(names, in_tensors, strict=True))
    if out_structure == "dict":
        out_names = list(model.output.keys())
        out_tensors = [model.output[k] for k in out_names]
    else:
        out_tensors = list(model.outputs)
        out_names = list(getattr(model, "output_names", None) or [t.name for t in out_tensors])
    outputs = tuple(
        tensor_spec(n, t.shape, t.dtype) for n, t in zip(out_names, out_tensors, strict=True)
    )
    check_inputs(path, inputs)
    fmt: Literal["keras", "h5"] = "keras" if path.endswith(".keras") else "h5"
    spec = ModelSpec(path, fmt, inputs, outputs, in_structure, out_structure)
    return spec, backend.compile(model, spec, out_names, max_batch_size=max_batch_size)
