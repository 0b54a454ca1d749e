"""What every Keras backend provides to the worker, and what they share.

A backend module (``tf_backend``, ``jax_backend``, ``torch_backend``) knows
three things the rest of the worker must not: how to set up its devices before
Keras is imported, how to turn a loaded Keras model into the fastest correct
compiled call for inference, and which of its errors mean "the device is out of
memory".
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from predictq.errors import ModelLoadError, PredictionError, PredictqError
from predictq.settings import Settings
from workers.spec import ModelSpec

Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class DeviceInfo:
    """What the process computes on."""

    kind: str  # "gpu" or "cpu"
    gpus: tuple[str, ...]
    #: Row parts a large CPU batch runs as, at once (workers/shards.py); 1 = whole.
    cpu_shards: int = 1


@dataclass(frozen=True)
class CompiledCall:
    """A model's inference call: one array per input in, one result per output out.

    ``fn`` is what the device thread calls, as is (no wrapper on the hot path);
    ``compiles`` counts the programs compiled so far (traces, for TensorFlow and
    JAX); ``warm_sizes`` are the batch sizes to run once before serving, so that
    no job pays for a compilation.
    """

    fn: Callable[..., Sequence[Any]]
    compiles: Callable[[], int]
    warm_sizes: tuple[int, ...]


class Backend(ABC):
    """One Keras backend's device set-up, compiled call and error recognition."""

    name: ClassVar[str]

    @abstractmethod
    def configure_devices(self, settings: Settings) -> DeviceInfo:
        """Apply the device settings; runs before Keras (and so the framework) is imported."""

    @abstractmethod
    def compile(
        self, model: Any, spec: ModelSpec, out_names: Sequence[str], *, max_batch_size: int | None
    ) -> CompiledCall:
        """The inference call of a loaded Keras model (``training=False``)."""

    @abstractmethod
    def model_error(self, error: Exception) -> PredictqError | None:
        """``DeviceOutOfMemory`` or ``PredictionError`` for an error the call raised; None
        for an error this backend does not know (it propagates as it is)."""

    def load_savedmodel(
        self, path: str, *, max_batch_size: int | None
    ) -> tuple[ModelSpec, CompiledCall]:
        """A TensorFlow SavedModel directory: TensorFlow only."""
        raise ModelLoadError(
            f"PREDICTQ_MODEL_PATH: {path!r} is a TensorFlow SavedModel directory, which loads "
            f"only with PREDICTQ_KERAS_BACKEND=tensorflow (this worker runs {self.name}); "
            f"save the model as .keras instead"
        )


def warm_sizes(max_batch_size: int | None) -> tuple[int, ...]:
    """Single jobs and full batches: the two shapes the device thread sees most."""
    return tuple(sorted({1, max_batch_size or 1}))


def failed(error: BaseException, text: str) -> PredictionError:
    """The model raised: its error's type and (cleaned) text, for the job's caller."""
    return PredictionError(f"the model failed: {type(error).__name__}: {text}")


def short_text(text: str, *, skip: Callable[[str], bool], max_chars: int = 1000) -> str:
    """``text`` on one line without the lines ``skip`` names (tracebacks), cut at ``max_chars``."""
    kept = [line for line in text.splitlines() if not skip(line)]
    flat = " ".join(" ".join(kept).split())
    return flat if len(flat) <= max_chars else flat[: max_chars - 3] + "..."
