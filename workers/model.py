"""Load a model once, read its input spec, and call it through a compiled function.

Three formats: Keras 3 ``.keras`` files, legacy ``.h5`` files, and TensorFlow
SavedModel directories (their ``serving_default`` signature). Inference never
goes through ``model.predict()``, which builds a data pipeline per call (about
100 ms for a tiny MLP) and leaks memory when called in a loop; instead one
``tf.function`` with a batch-polymorphic input signature is traced once, so
batches of any size reuse the same graph.

``LoadedModel.__call__`` is not thread-safe by contract: only the batcher's
device thread calls it (see workers/batcher.py).
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np

from predictq.errors import DeviceOutOfMemory, ModelLoadError, PredictionError
from predictq.structure import Structure, flatten, unflatten
from workers.spec import ModelSpec, TensorSpec

log = logging.getLogger(__name__)

Array = np.ndarray[Any, Any]


def _op_error_text(error: BaseException, max_chars: int = 1000) -> str:
    """The error's own text, without the Python traceback of where the op was traced.

    TensorFlow prefixes graph errors with "Graph execution error: Detected at
    node ... defined at (most recent call last):" and a stack of the *tracing*
    call (here: the worker's start-up), which says nothing about the job and
    would fill the caller's error message with kilobytes of file paths.
    """
    paragraphs = str(getattr(error, "message", None) or error).split("\n\n")
    kept = [
        p
        for p in paragraphs
        if p.strip() != "Graph execution error:"
        and not p.startswith(("Detected at node", "  File "))
    ]
    text = " ".join(" ".join(kept).split())
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."


class LoadedModel:
    """A model ready for inference: its spec and a compiled, batch-polymorphic call."""

    def __init__(self, spec: ModelSpec, fn: Callable[..., Any], load_s: float) -> None:
        self.spec = spec
        self._fn = fn
        self.load_s = load_s

    def __call__(self, inputs: Sequence[Array]) -> list[Array]:
        """Run one batch; returns one array per output, in ``spec.outputs`` order."""
        import tensorflow as tf

        try:
            outputs = self._fn(*inputs)
        except tf.errors.ResourceExhaustedError as e:
            raise DeviceOutOfMemory(f"device out of memory: {_op_error_text(e)}") from e
        except (tf.errors.OpError, ValueError, TypeError) as e:
            text = _op_error_text(e)
            raise PredictionError(f"the model failed: {type(e).__name__}: {text}") from e
        return [np.asarray(o) for o in outputs]

    def warm_up(self, batch_sizes: Sequence[int]) -> None:
        """Run one inference per batch size so the first real job pays no tracing cost.

        A batch size that does not fit in device memory is logged, not fatal:
        the batcher splits such batches when they happen.
        """
        for n in batch_sizes:
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


def load_model(path: str) -> LoadedModel:
    """Load ``path`` (.keras, .h5 or SavedModel dir) and compile its inference call."""
    started = time.monotonic()
    if not os.path.exists(path):
        raise ModelLoadError(f"PREDICTQ_MODEL_PATH: no file or directory at {path!r}")
    try:
        if os.path.isdir(path):
            spec, fn = _load_savedmodel(path)
        elif path.endswith((".keras", ".h5", ".hdf5")):
            spec, fn = _load_keras(path)
        else:
            raise ModelLoadError(
                f"PREDICTQ_MODEL_PATH: expected a .keras or .h5 file or a SavedModel "
                f"directory, got {path!r}"
            )
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(f"cannot load model {path!r}: {type(e).__name__}: {e}") from e
    load_s = time.monotonic() - started
    log.info(
        "loaded %s model %s in %.2fs: inputs %s, outputs %s",
        spec.format,
        path,
        load_s,
        [s.describe() for s in spec.inputs],
        [s.describe() for s in spec.outputs],
    )
    return LoadedModel(spec, fn, load_s)


def _structure(model: Any, attr: str, tensors: Sequence[Any]) -> Structure:
    try:
        value = getattr(model, attr)
    except (AttributeError, ValueError):
        value = list(tensors)  # Sequential models that were never called
    layout, leaves = flatten(value)
    if layout.structure == "list" and len(leaves) < 2:
        return "single"  # a one-element list: the model is called with the tensor itself
    return layout.structure


def _tensor_spec(name: str, shape: Sequence[int | None], dtype: Any) -> TensorSpec:
    np_dtype = np.dtype(getattr(dtype, "as_numpy_dtype", dtype))
    return TensorSpec(name=name, shape=tuple(shape), dtype=np_dtype)


def _check_inputs(path: str, inputs: Sequence[TensorSpec]) -> None:
    if not inputs:
        raise ModelLoadError(f"model {path!r} has no defined inputs (build it with keras.Input)")
    for s in inputs:
        if len(s.shape) < 1 or s.shape[0] is not None:
            raise ModelLoadError(
                f"model {path!r}: input {s.describe()} needs a variable batch dimension "
                f"(None) first so jobs can be batched"
            )
        if s.dtype.kind not in "biuf":
            raise ModelLoadError(f"model {path!r}: input {s.describe()} is not numeric")


def _load_keras(path: str) -> tuple[ModelSpec, Callable[..., Any]]:
    import keras
    import tensorflow as tf

    model = keras.models.load_model(path, compile=False)
    in_structure = _structure(model, "input", model.inputs)
    out_structure = _structure(model, "output", model.outputs)
    if in_structure == "dict":
        names = list(model.input.keys())
        in_tensors = [model.input[k] for k in names]
    else:
        in_tensors = list(model.inputs)
        names = [t.name for t in in_tensors]
    inputs = tuple(
        _tensor_spec(n, t.shape, t.dtype) for n, t in zip(names, in_tensors, strict=True)
    )
    if out_structure == "dict":
        out_names = list(model.output.keys())
        out_tensors = [model.output[k] for k in out_names]
    else:
        out_tensors = list(model.outputs)
        out_names = list(getattr(model, "output_names", None) or [t.name for t in out_tensors])
    outputs = tuple(
        _tensor_spec(n, t.shape, t.dtype) for n, t in zip(out_names, out_tensors, strict=True)
    )
    _check_inputs(path, inputs)
    fmt: Literal["keras", "h5"] = "keras" if path.endswith(".keras") else "h5"
    spec = ModelSpec(path, fmt, inputs, outputs, in_structure, out_structure)
    signature = [tf.TensorSpec(s.shape, tf.as_dtype(s.dtype), name=s.name) for s in inputs]

    def call(*xs: Any) -> list[Any]:
        out = model(unflatten(spec.input_layout, xs), training=False)
        return flatten(out, order=out_names)[1]

    # Calling the concrete function skips tf.function's per-call signature
    # dispatch (about 0.3 ms per call, most of a small model's batch-1 time).
    fn = tf.function(call, input_signature=signature, autograph=False).get_concrete_function()
    return spec, fn


def _load_savedmodel(path: str) -> tuple[ModelSpec, Callable[..., Any]]:
    import tensorflow as tf

    loaded = tf.saved_model.load(path)
    try:
        signature = loaded.signatures["serving_default"]
    except KeyError as e:
        raise ModelLoadError(
            f"SavedModel {path!r} has no 'serving_default' signature "
            f"(signatures: {list(loaded.signatures)})"
        ) from e
    _, kw_specs = signature.structured_input_signature
    names = sorted(kw_specs)
    inputs = tuple(_tensor_spec(n, kw_specs[n].shape, kw_specs[n].dtype) for n in names)
    out_specs = signature.structured_outputs
    out_names = sorted(out_specs)
    outputs = tuple(_tensor_spec(n, out_specs[n].shape, out_specs[n].dtype) for n in out_names)
    _check_inputs(path, inputs)
    spec = ModelSpec(
        path,
        "savedmodel",
        inputs,
        outputs,
        "single" if len(inputs) == 1 else "dict",
        "single" if len(outputs) == 1 else "dict",
    )

    def call(*xs: Any) -> list[Any]:
        # The signature is already a concrete function with a None batch
        # dimension; keep `loaded` referenced so its variables stay alive.
        result = signature(**dict(zip(names, xs, strict=True)))
        return [result[k] for k in out_names]

    call.__dict__["_keepalive"] = loaded
    return spec, call
