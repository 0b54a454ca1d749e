"""The benchmark's models: the issue's tiny MLP and a small conv net (no downloads)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class BenchModel:
    """A saved model and how to make inputs for it."""

    name: str
    path: str
    sample_shape: tuple[int, ...]
    bulk_rows: int

    def inputs(self, n: int, seed: int = 0) -> np.ndarray[Any, Any]:
        rng = np.random.default_rng(seed)
        return rng.random((n, *self.sample_shape), dtype=np.float32)


def build(out_dir: str, *, quick: bool) -> list[BenchModel]:
    """Build and save both models; returns their descriptions."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((64,), name="x")
    hidden = keras.layers.Dense(512, activation="relu")(inputs)
    hidden = keras.layers.Dense(512, activation="relu")(hidden)
    outputs = keras.layers.Dense(10, activation="softmax")(hidden)
    mlp_path = os.path.join(out_dir, "mlp.keras")
    keras.Model(inputs, outputs).save(mlp_path)

    # A real architecture with weights=None (random init, nothing downloaded).
    conv = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), weights=None, classes=10, alpha=0.35
    )
    _calibrate_batch_norm(conv, np.random.default_rng(3).random((256, 32, 32, 3), np.float32))
    conv_path = os.path.join(out_dir, "mobilenetv2.keras")
    conv.save(conv_path)
    return [
        BenchModel("mlp", mlp_path, (64,), 100_000 if quick else 1_000_000),
        BenchModel("mobilenetv2", conv_path, (32, 32, 3), 2_000 if quick else 20_000),
    ]


def _calibrate_batch_norm(model: Any, x: np.ndarray[Any, Any]) -> None:
    """Set every BatchNormalization's moving statistics to those of one batch of ``x``.

    Freshly initialised (mean 0, variance 1), they let MobileNetV2's activations
    vanish layer by layer: its softmax is then exactly 0.1 for every input, and
    a check that each job got its own row back cannot fail. Statistics taken
    from data, as training would leave them, keep the outputs input-dependent;
    the ops, and so the cost of a call, stay the same.
    """
    import keras

    layers = [la for la in model.layers if isinstance(la, keras.layers.BatchNormalization)]
    momenta = [la.momentum for la in layers]
    for layer in layers:
        layer.momentum = 0.0  # the next training-mode call sets the statistics outright
    model(x, training=True)
    for layer, momentum in zip(layers, momenta, strict=True):
        layer.momentum = momentum
