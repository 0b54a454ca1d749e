"""Test-only Keras layers, imported by workers through PREDICTQ_MODEL_IMPORTS."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

#: A sample whose first feature equals this kills the worker process.
POISON = 666.0
#: A sample whose first feature is at least this never fits in "device memory".
HUGE = 1000.0


def _out_of_memory(n: Any) -> Any:
    # tf.py_function reports a Python MemoryError as ResourceExhaustedError,
    # the error TensorFlow raises when a device allocation fails.
    raise MemoryError(f"test device: a batch of {int(n)} rows does not fit")


@keras.saving.register_keras_serializable(package="predictq_tests")
class OomAbove(keras.layers.Layer):  # type: ignore[misc]
    """Identity, except that batches above ``max_rows`` rows, or holding a sample whose
    first feature is >= HUGE (one that never fits), raise ResourceExhaustedError."""

    def __init__(self, max_rows: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_rows = max_rows

    def call(self, x: Any) -> Any:
        n = tf.shape(x)[0]

        def explode() -> Any:
            out = tf.py_function(_out_of_memory, [n], tf.float32)
            out.set_shape(())
            return out

        too_big = tf.logical_or(n > self.max_rows, tf.reduce_any(x[:, 0] >= HUGE))
        scale = tf.cond(too_big, explode, lambda: tf.constant(1.0))
        return x * scale

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "max_rows": self.max_rows}


def _exit_if_poisoned(x: Any) -> Any:
    if bool(tf.reduce_any(tf.equal(x[:, 0], POISON))):
        os._exit(17)  # what a segfaulting native op looks like to Celery
    return x


@keras.saving.register_keras_serializable(package="predictq_tests")
class ExitOnPoison(keras.layers.Layer):  # type: ignore[misc]
    """Identity, except that the process dies when a sample starts with POISON."""

    def call(self, x: Any) -> Any:
        out = tf.py_function(_exit_if_poisoned, [x], tf.float32)
        out.set_shape(x.shape)
        return out


#: A sample whose first feature equals this blocks the device while the gate file exists.
HANG = 555.0


def _hang_while_gated(x: Any, gate: Any) -> Any:
    if bool(tf.reduce_any(tf.equal(x[:, 0], HANG))):
        path = gate.numpy().decode()
        Path(path + ".started").touch()
        while os.path.exists(path):  # a device call that never returns, until released
            time.sleep(0.05)
    return x


@keras.saving.register_keras_serializable(package="predictq_tests")
class HangOnMarker(keras.layers.Layer):  # type: ignore[misc]
    """Identity, except that a sample starting with HANG blocks while ``gate`` exists.

    It touches ``gate + ".started"`` first, so a test knows the call is under way.
    """

    def __init__(self, gate: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gate = gate

    def call(self, x: Any) -> Any:
        out = tf.py_function(_hang_while_gated, [x, tf.constant(self.gate)], tf.float32)
        out.set_shape(x.shape)
        return out

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "gate": self.gate}


#: A sample whose first feature equals this makes the device call raise.
FAIL = 444.0
#: A sample whose first feature equals this makes the call return one row too few.
SHORT = 333.0


@keras.saving.register_keras_serializable(package="predictq_tests")
class MisbehaveOnMarker(keras.layers.Layer):  # type: ignore[misc]
    """Identity, except for batches holding a FAIL sample (the call raises) or a
    SHORT sample (the output loses its last row)."""

    def call(self, x: Any) -> Any:
        checked = tf.debugging.assert_none_equal(
            x[:, 0], tf.constant(FAIL, x.dtype), message="a FAIL sample"
        )
        with tf.control_dependencies([checked]):
            short = tf.reduce_any(tf.equal(x[:, 0], SHORT))
            return tf.cond(short, lambda: x[:-1], lambda: tf.identity(x))
