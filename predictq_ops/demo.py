"""The demo model: a small MLP trained on scikit-learn's bundled digits dataset.

The dataset ships inside scikit-learn (no download). Training runs in its own
process (``python -m predictq_ops.demo OUT_DIR``) so that the ``predictq up``
supervisor never imports TensorFlow.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

MODEL_FILE = "digits.keras"
HOLDOUT_FILE = "digits-holdout.npz"


def train(out_dir: str, *, epochs: int = 40, seed: int = 0) -> tuple[str, str]:
    """Train, save the model and the held-out set; returns their paths."""
    import keras
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int64")
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=seed, stratify=y
    )
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((64,), name="pixels")
    hidden = keras.layers.Dense(128, activation="relu")(inputs)
    outputs = keras.layers.Dense(10, activation="softmax", name="digit")(hidden)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=epochs, batch_size=64, verbose=0)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / MODEL_FILE
    model.save(model_path)
    holdout_path = out / HOLDOUT_FILE
    np.savez(holdout_path, x=x_test, y=y_test)
    return str(model_path), str(holdout_path)


def evaluate(predict: Any, holdout_path: str) -> tuple[float, np.ndarray[Any, Any]]:
    """Accuracy of ``predict(x) -> probabilities`` on the held-out set, and the predictions."""
    with np.load(holdout_path) as data:
        x, y = data["x"], data["y"]
    probs = predict(x)
    labels = np.asarray(probs).argmax(axis=1)
    return float((labels == y).mean()), labels


if __name__ == "__main__":
    model_path, holdout_path = train(sys.argv[1])
    print(model_path)
    print(holdout_path)
