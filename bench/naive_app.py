"""The typical Celery + Keras template the benchmark compares against.

What most tutorials ship: JSON lists on the wire, the prefork pool, the model
loaded once per child, and ``model.predict()`` called for every job.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery, signals

app = Celery("naive", set_as_current=False)
app.conf.update(
    broker_url=os.environ.get("NAIVE_BROKER_URL", "redis://localhost:6379/0"),
    result_backend=os.environ.get("NAIVE_RESULT_BACKEND", "redis://localhost:6379/1"),
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_default_queue="naive",
)

_model: Any = None


@signals.worker_process_init.connect
def _load(**_: Any) -> None:
    global _model  # noqa: PLW0603 - the template being measured does this
    import keras

    _model = keras.models.load_model(os.environ["NAIVE_MODEL_PATH"], compile=False)


@app.task(name="naive.predict")
def predict(rows: list[Any]) -> list[Any]:
    import numpy as np

    return _model.predict(np.asarray(rows, dtype="float32"), verbose=0).tolist()  # type: ignore[no-any-return]
