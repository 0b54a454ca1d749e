"""What a model accepts and returns, independent of the Keras backend.

Read once when the model loads; every job is validated against it, and results
are put back into the structure (single array, list or dict) the model returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from predictq.errors import ModelLoadError
from predictq.structure import Layout, Structure, unflatten


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: its name, shape (batch dimension first, None) and dtype."""

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype[Any]

    @property
    def feature_shape(self) -> tuple[int | None, ...]:
        """The shape of one sample (without the batch dimension)."""
        return self.shape[1:]

    def describe(self) -> str:
        """``name: dtype [None, 64]`` for messages and `predictq info`."""
        dims = ", ".join("None" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype.name} [{dims}]"


@dataclass(frozen=True)
class ModelSpec:
    """Inputs, outputs and how they are structured, for one loaded model."""

    path: str
    format: Literal["keras", "h5", "savedmodel"]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    input_structure: Structure
    output_structure: Structure

    @property
    def input_names(self) -> list[str]:
        """Names of the inputs, in call order."""
        return [s.name for s in self.inputs]

    @property
    def input_layout(self) -> Layout:
        """How the model takes its inputs: one tensor, a list, or a dict by name."""
        return Layout.of(self.input_structure, self.input_names)

    @property
    def output_layout(self) -> Layout:
        """How the model returns its outputs: one tensor, a list, or a dict by name."""
        return Layout.of(self.output_structure, [s.name for s in self.outputs])

    def structure_outputs(self, flat: Sequence[np.ndarray[Any, Any]]) -> object:
        """Outputs in the model's own structure: one array, a list, or a dict by name."""
        return unflatten(self.output_layout, flat)

    def as_dict(self) -> dict[str, object]:
        """A JSON-friendly description (readiness record, `predictq info`)."""
        return {
            "path": self.path,
            "format": self.format,
            "input_structure": self.input_structure,
            "output_structure": self.output_structure,
            "inputs": [s.describe() for s in self.inputs],
            "outputs": [s.describe() for s in self.outputs],
        }


def tensor_spec(name: str, shape: Sequence[int | None], dtype: Any) -> TensorSpec:
    """A TensorSpec from a framework's shape and dtype (numpy, TensorFlow, Keras strings)."""
    np_dtype = np.dtype(getattr(dtype, "as_numpy_dtype", dtype))
    return TensorSpec(name=name, shape=tuple(shape), dtype=np_dtype)


def check_inputs(path: str, inputs: Sequence[TensorSpec]) -> None:
    """Refuse a model whose inputs cannot be batched (or are not numbers)."""
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
