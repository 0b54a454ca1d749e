"""Several model versions in one process: routing, leases, release, and one device call at a time.

Pure unit tests of workers/registry.py and of the batcher serving several
versions (fake models; tests/test_model_repository.py runs real workers).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from predictq.errors import UnknownModel
from predictq.modelref import ModelRef
from workers.batcher import Batcher, BatchStats
from workers.registry import ModelRegistry, ServedVersion

Array = np.ndarray[Any, Any]


class Scaling:
    """Multiplies by ``factor``; records its batches; counts calls in progress on any model."""

    in_progress = 0
    most_in_progress = 0
    lock = threading.Lock()

    def __init__(self, factor: float) -> None:
        self.factor = factor
        self.batches: list[int] = []

    def __call__(self, inputs: list[Array]) -> list[Array]:
        with Scaling.lock:
            Scaling.in_progress += 1
            Scaling.most_in_progress = max(Scaling.most_in_progress, Scaling.in_progress)
        try:
            threading.Event().wait(0.001)  # long enough for an overlap to show
            self.batches.append(inputs[0].shape[0])
            return [inputs[0] * self.factor]
        finally:
            with Scaling.lock:
                Scaling.in_progress -= 1


def served(name: str, version: int, factor: float = 1.0) -> ServedVersion:
    return ServedVersion(name, version, Scaling(factor), stamp=(version, 0))  # type: ignore[arg-type]


@pytest.fixture()
def batcher() -> Iterator[Batcher]:
    stats: list[BatchStats] = []
    b = Batcher(max_batch_size=64, batch_wait_ms=20, on_batch=stats.append)
    b.stats = stats  # type: ignore[attr-defined]
    b.start()
    yield b
    b.close(5)


def test_new_jobs_get_the_newest_version_and_a_pinned_one_gets_its_own() -> None:
    registry = ModelRegistry()
    v1, v2 = served("a", 1), served("a", 2)
    registry.add(v1)
    with registry.lease(ModelRef("a")) as got:
        assert got is v1
    registry.add(v2)
    with registry.lease(ModelRef("a")) as got, registry.lease(ModelRef("a", 1)) as pinned:
        assert got is v2 and pinned is v1
    with registry.lease(ModelRef()) as default:  # the only model is the default
        assert default is v2


def test_unknown_names_versions_and_an_ambiguous_default_are_refused() -> None:
    registry = ModelRegistry()
    registry.add(served("a", 1))
    registry.add(served("b", 4))
    with pytest.raises(
        UnknownModel, match=r"expected one of the models \['a', 'b'\], received 'c'"
    ):
        registry.lease(ModelRef("c")).__enter__()
    with pytest.raises(UnknownModel, match=r"versions \[4\] loaded, received version 3"):
        registry.lease(ModelRef("b", 3)).__enter__()
    with pytest.raises(UnknownModel, match="none named 'default'"):
        registry.lease(ModelRef()).__enter__()
    registry.add(served("default", 1))
    with registry.lease(ModelRef()) as got:
        assert got.name == "default"


def test_a_retired_version_is_released_once_its_last_job_is_done_and_only_once() -> None:
    released: list[ServedVersion] = []
    registry = ModelRegistry(on_release=released.append)
    v1, v2 = served("a", 1), served("a", 2)
    registry.add(v1)
    with registry.lease(ModelRef("a")) as first, registry.lease(ModelRef("a")):
        assert first is v1
        registry.add(v2)
        registry.retire(v1)
        registry.retire(v1)  # a second retire changes nothing
        with registry.lease(ModelRef("a")) as new:
            assert new is v2  # new jobs never get a retired version
        with pytest.raises(UnknownModel):
            registry.lease(ModelRef("a", 1)).__enter__()
        assert released == [] and registry.retiring() == [v1]
    assert released == [v1] and registry.retiring() == []
    registry.retire(v1)
    assert released == [v1]
    registry.retire(v2)  # no job holds it: released at once
    assert released == [v1, v2] and registry.served() == {}


def test_replacing_a_version_number_retires_the_old_directory() -> None:
    released: list[ServedVersion] = []
    registry = ModelRegistry(on_release=released.append)
    old, new = served("a", 1), served("a", 1)
    registry.add(old)
    assert registry.add(new) is old
    assert released == [old] and registry.served() == {"a": [new]}


def test_batches_never_mix_versions_and_device_calls_stay_one_at_a_time(
    batcher: Batcher,
) -> None:
    versions = [served("a", 1, 1.0), served("a", 2, 10.0), served("b", 1, 100.0)]
    Scaling.most_in_progress = 0

    def job(i: int) -> tuple[int, Array]:
        version = versions[i % 3]
        x = np.full((1, 2), float(i), np.float32)
        out = batcher.submit([x], run=version, labels=version.labels).result(10)[0]
        return i, out

    with ThreadPoolExecutor(24) as pool:
        # Warm-ups arrive between batches, as a hot load does.
        warmed = [batcher.on_device(lambda: versions[0]([np.zeros((4, 2), np.float32)]))]
        results = list(pool.map(job, range(300)))
        warmed.append(batcher.on_device(lambda: versions[1]([np.zeros((4, 2), np.float32)])))
    for i, out in results:
        factor = versions[i % 3].model.factor  # type: ignore[attr-defined]
        assert np.array_equal(out, np.full((1, 2), i * factor, np.float32)), i
    assert [f.result(10)[0].shape for f in warmed] == [(4, 2), (4, 2)]
    # One call at a time across every model of the batcher, warm-ups included.
    assert Scaling.most_in_progress == 1
    stats: list[BatchStats] = batcher.stats  # type: ignore[attr-defined]
    assert {s.labels for s in stats} == {("a", "1"), ("a", "2"), ("b", "1")}
    assert any(s.requests > 1 for s in stats)  # jobs of one version did share batches
    assert sum(s.samples for s in stats) == 300


def test_a_device_task_that_fails_fails_alone(batcher: Batcher) -> None:
    def broken() -> None:
        raise ValueError("corrupt weights")

    failed = batcher.on_device(broken)
    with pytest.raises(ValueError, match="corrupt weights"):
        failed.result(5)
    version = served("a", 1, 3.0)
    out = batcher.submit([np.ones((2, 2), np.float32)], run=version).result(5)
    assert np.array_equal(out[0], np.full((2, 2), 3.0, np.float32))


# --- the producer's view: readiness records -> UnknownModel ---------------------------


def record(models: dict[str, list[int]], default: str | None) -> dict[str, Any]:
    return {
        "models": {n: {"versions": v, "spec": {}} for n, v in models.items()},
        "default_model": default,
    }


def test_the_producer_refuses_only_what_no_serving_worker_has() -> None:
    from producer.serving import problem

    records = [record({"a": [1, 2]}, "a"), record({"a": [2, 3], "b": [1]}, None)]
    assert problem(records, ModelRef("a", 3)) is None  # one worker has it
    assert problem(records, ModelRef()) is None  # a default exists
    assert problem(records, ModelRef(None, 1)) is None  # the default model's version 1
    assert "received 'c'" in str(problem(records, ModelRef("c")))
    assert "received version 4" in str(problem(records, ModelRef("a", 4)))
    assert "none of them is a default" in str(problem(records[1:], ModelRef()))
    # Nothing to tell: no worker up, or one that predates model repositories.
    assert problem([], ModelRef("c")) is None
    assert problem([*records, {"model": {}}], ModelRef("c")) is None
