"""Tiny real Keras models the tests build themselves (no downloads)."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FEATURES = 16
CLASSES = 4


def build_mlp(path: str, *, features: int = FEATURES, classes: int = CLASSES, seed: int = 1) -> str:
    """A small MLP saved at ``path`` (.keras or .h5)."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((features,), name="x")
    hidden = keras.layers.Dense(32, activation="relu")(inputs)
    outputs = keras.layers.Dense(classes, activation="softmax", name="probs")(hidden)
    keras.Model(inputs, outputs).save(path)
    return path


def build_wide(path: str, *, features: int = 1024, width: int = 1024, seed: int = 4) -> str:
    """An MLP with about ``features * width * 4`` bytes of weights (4 MiB by default)."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((features,), name="x")
    hidden = keras.layers.Dense(width, activation="relu")(inputs)
    outputs = keras.layers.Dense(CLASSES, name="probs")(hidden)
    keras.Model(inputs, outputs).save(path)
    return path


def build_multi_io(path: str, *, dict_io: bool = True, seed: int = 2) -> str:
    """Two inputs (a: 6 float features, b: 3x2 image-like), two outputs."""
    import keras

    keras.utils.set_random_seed(seed)
    a = keras.Input((6,), name="a")
    b = keras.Input((3, 2), name="b")
    joined = keras.layers.Concatenate()([a, keras.layers.Flatten()(b)])
    score = keras.layers.Dense(1, name="score")(joined)
    klass = keras.layers.Dense(3, activation="softmax", name="klass")(joined)
    if dict_io:
        model = keras.Model({"a": a, "b": b}, {"score": score, "klass": klass})
    else:
        model = keras.Model([a, b], [score, klass])
    model.save(path)
    return path


def export_savedmodel(path: str, *, features: int = FEATURES, seed: int = 3) -> str:
    """A TensorFlow SavedModel directory with a serving_default signature."""
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input((features,), name="x"), keras.layers.Dense(5, activation="tanh")]
    )
    model.export(path, verbose=False)
    return path


def build_oom_model(path: str, *, max_rows: int, features: int = FEATURES) -> str:
    """An MLP whose device call runs out of memory on batches above ``max_rows`` samples.

    Its input takes samples of any width (it reads the first ``features``), and
    the limit counts numbers, ``max_rows * features``: a sample wider than that
    never fits, even alone. The error is each backend's own (tests/support/layers.py).
    """
    import keras

    from tests.support.layers import FirstFeatures, OomAbove

    inputs = keras.Input((None,), name="x")
    guarded = OomAbove(max_rows * features)(inputs)
    outputs = keras.layers.Dense(3, name="y")(FirstFeatures(features)(guarded))
    keras.Model(inputs, outputs).save(path)
    return path


def build_poison_model(path: str, *, features: int = FEATURES) -> str:
    """An MLP whose process exits when a sample's first feature is POISON."""
    import keras

    from tests.support.layers import ExitOnPoison

    inputs = keras.Input((features,), name="x")
    checked = ExitOnPoison()(inputs)
    outputs = keras.layers.Dense(2, name="y")(checked)
    keras.Model(inputs, outputs).save(path)
    return path


#: What a worker serving build_hang_model's model needs in its environment.
HANG_IMPORTS = {"PREDICTQ_MODEL_IMPORTS": "tests.support.layers"}


@dataclass(frozen=True)
class HangModel:
    """A model whose device call blocks on a HANG sample while ``gate`` exists."""

    gate: Path
    path: str

    def started(self) -> bool:
        return Path(f"{self.gate}.started").exists()


def build_hang_model(path: str, *, gate: str, features: int = FEATURES) -> str:
    """An MLP whose device call blocks on a HANG sample while the file ``gate`` exists."""
    import keras

    from tests.support.layers import HangOnMarker

    inputs = keras.Input((features,), name="x")
    gated = HangOnMarker(gate)(inputs)
    outputs = keras.layers.Dense(2, name="y")(gated)
    keras.Model(inputs, outputs).save(path)
    return path


def build_misbehaving_model(path: str, *, features: int = FEATURES) -> str:
    """An MLP whose device call fails on FAIL samples and drops a row on SHORT ones."""
    import keras

    from tests.support.layers import MisbehaveOnMarker

    inputs = keras.Input((features,), name="x")
    checked = MisbehaveOnMarker()(inputs)
    outputs = keras.layers.Dense(3, name="y")(checked)
    keras.Model(inputs, outputs).save(path)
    return path


@functools.cache
def _loaded(path: str) -> Any:
    import keras

    return keras.models.load_model(path, compile=False)


def reference(path: str, x: Any) -> Any:
    """The in-process model output for ``x`` (what the queue must return)."""
    out = _loaded(path)(x, training=False)
    if isinstance(out, dict):
        return {k: np.asarray(v) for k, v in out.items()}
    if isinstance(out, list | tuple):
        return [np.asarray(v) for v in out]
    return np.asarray(out)


def env_for_worker_imports() -> dict[str, str]:
    """Make ``tests.support.layers`` importable in worker subprocesses."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return {"PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
