"""The Keras backends a test can run workers on: those installed here."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tests.support.processes import WorkerProcess

#: Compiled batch sizes of a JAX worker with PREDICTQ_MAX_BATCH_SIZE=64: 1, 2, 4, ..., 64.
JAX_BUCKETS_64 = 7


def params(*names: str) -> list[object]:
    """``names`` as pytest parameters. A backend that is not installed fails its
    tests with the install hint (the test extra installs all three); never a skip."""
    return [pytest.param(name, id=name) for name in names]


#: Every backend predictq serves on.
ALL = params("tensorflow", "jax", "torch")
#: The backends other than TensorFlow (which the pytest process itself runs).
OTHERS = params("jax", "torch")


@dataclass(frozen=True)
class Served:
    """A worker serving the MLP on one Keras backend, and the queue it reads."""

    backend: str
    queue: str
    worker: WorkerProcess
