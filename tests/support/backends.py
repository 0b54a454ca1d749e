"""The Keras backends a test can run workers on: those installed here."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import pytest

from tests.support.processes import WorkerProcess

#: Compiled batch sizes of a JAX worker with PREDICTQ_MAX_BATCH_SIZE=64: 1, 2, 4, ..., 64.
JAX_BUCKETS_64 = 7


def installed(backend: str) -> bool:
    """Whether ``backend``'s framework can be imported in this environment."""
    return importlib.util.find_spec(backend) is not None


def params(*names: str) -> list[object]:
    """``names`` as pytest parameters, each skipped (with the install hint) where missing."""
    return [
        pytest.param(
            name,
            id=name,
            marks=pytest.mark.skipif(
                not installed(name),
                reason=f"{name} is not installed (pip install 'predictq[{name}]')",
            ),
        )
        for name in names
    ]


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
