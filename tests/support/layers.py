"""Test-only Keras layers, imported by workers through PREDICTQ_MODEL_IMPORTS.

Each misbehaves the way a real model can, on every Keras backend that the layer
supports: the framework is imported inside ``call``, so importing this module
in a JAX or PyTorch worker never loads TensorFlow.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np

#: A sample whose first feature equals this kills the worker process.
POISON = 666.0


def _backend() -> str:
    return str(keras.backend.backend())


def _out_of_memory(n: Any) -> Any:
    # tf.py_function reports a Python MemoryError as ResourceExhaustedError,
    # the error TensorFlow raises when a device allocation fails.
    raise MemoryError(f"test device: a batch of {int(n)} numbers does not fit")


@keras.saving.register_keras_serializable(package="predictq_tests")
class OomAbove(keras.layers.Layer):  # type: ignore[misc]
    """Identity, except that a batch holding more than ``max_values`` numbers (rows x
    features) raises the backend's own out-of-memory error.

    TensorFlow: ResourceExhaustedError (a MemoryError in a py_function). JAX: a
    real allocation failure, XLA's RESOURCE_EXHAUSTED (the compiled program of
    such a batch needs 256 TiB). PyTorch: torch.OutOfMemoryError.
    """

    def __init__(self, max_values: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_values = max_values

    def call(self, x: Any) -> Any:
        backend = _backend()
        if backend == "jax":
            import jax.numpy as jnp

            if x.shape[0] * x.shape[1] <= self.max_values:  # static: one program per shape
                return x
            return x * jnp.cumsum(jnp.ones((2**45,), x.dtype))[-1]
        if backend == "torch":
            import torch

            if x.shape[0] * x.shape[1] > self.max_values:
                raise torch.OutOfMemoryError(f"test device: {x.shape} does not fit")
            return x
        import tensorflow as tf

        n = tf.size(x)

        def explode() -> Any:
            out = tf.py_function(_out_of_memory, [n], tf.float32)
            out.set_shape(())
            return out

        return x * tf.cond(n > self.max_values, explode, lambda: tf.constant(1.0))

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "max_values": self.max_values}


@keras.saving.register_keras_serializable(package="predictq_tests")
class FirstFeatures(keras.layers.Layer):  # type: ignore[misc]
    """The first ``count`` features of samples of any width (zeros where there are fewer)."""

    def __init__(self, count: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.count = count

    def call(self, x: Any) -> Any:
        zeros = keras.ops.repeat(keras.ops.zeros_like(x[:, :1]), self.count, axis=1)
        return keras.ops.concatenate([x, zeros], axis=1)[:, : self.count]

    def compute_output_shape(self, input_shape: Any) -> Any:
        return (input_shape[0], self.count)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "count": self.count}


def _exit_if_poisoned(x: Any) -> Any:
    import tensorflow as tf

    if bool(tf.reduce_any(tf.equal(x[:, 0], POISON))):
        os._exit(17)  # what a segfaulting native op looks like to Celery
    return x


@keras.saving.register_keras_serializable(package="predictq_tests")
class ExitOnPoison(keras.layers.Layer):  # type: ignore[misc]
    """Identity, except that the process dies when a sample starts with POISON (TensorFlow)."""

    def call(self, x: Any) -> Any:
        import tensorflow as tf

        out = tf.py_function(_exit_if_poisoned, [x], tf.float32)
        out.set_shape(x.shape)
        return out


#: A sample whose first feature equals this blocks the device while the gate file exists.
HANG = 555.0


def _hang_while_gated(x: Any, gate: Any) -> Any:
    import tensorflow as tf

    if bool(tf.reduce_any(tf.equal(x[:, 0], HANG))):
        path = gate.numpy().decode()
        Path(path + ".started").touch()
        while os.path.exists(path):  # a device call that never returns, until released
            time.sleep(0.05)
    return x


@keras.saving.register_keras_serializable(package="predictq_tests")
class HangOnMarker(keras.layers.Layer):  # type: ignore[misc]
    """Identity, except that a sample starting with HANG blocks while ``gate`` exists.

    It touches ``gate + ".started"`` first, so a test knows the call is under way
    (TensorFlow).
    """

    def __init__(self, gate: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gate = gate

    def call(self, x: Any) -> Any:
        import tensorflow as tf

        out = tf.py_function(_hang_while_gated, [x, tf.constant(self.gate)], tf.float32)
        out.set_shape(x.shape)
        return out

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "gate": self.gate}


#: A sample whose first feature equals this makes the device call raise.
FAIL = 444.0
#: A sample whose first feature equals this makes the call return one row too few
#: (not on JAX, whose compiled programs have output shapes fixed by the input's).
SHORT = 333.0


def _fail_on_marker(x: Any) -> Any:
    if np.any(np.asarray(x)[:, 0] == FAIL):
        raise ValueError("a FAIL sample")
    return x


@keras.saving.register_keras_serializable(package="predictq_tests")
class MisbehaveOnMarker(keras.layers.Layer):  # type: ignore[misc]
    """Identity, except for batches holding a FAIL sample (the call raises) or a
    SHORT sample (the output loses its last row)."""

    def call(self, x: Any) -> Any:
        backend = _backend()
        if backend == "jax":
            import jax

            # A host callback: the one way a compiled JAX program raises on data.
            return jax.pure_callback(_fail_on_marker, jax.ShapeDtypeStruct(x.shape, x.dtype), x)
        if backend == "torch":
            _fail_on_marker(x.cpu())
            return x[:-1] if bool((x[:, 0] == SHORT).any()) else x
        import tensorflow as tf

        checked = tf.debugging.assert_none_equal(
            x[:, 0], tf.constant(FAIL, x.dtype), message="a FAIL sample"
        )
        with tf.control_dependencies([checked]):
            short = tf.reduce_any(tf.equal(x[:, 0], SHORT))
            return tf.cond(short, lambda: x[:-1], lambda: tf.identity(x))

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape
