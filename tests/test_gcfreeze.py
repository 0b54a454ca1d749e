"""The worker's GC freeze (workers/gcfreeze.py): the mechanism in this process, the
setting in a real worker."""

from __future__ import annotations

import gc
import weakref

from predictq_ops.redis_server import RedisServer
from tests.support.cluster import worker_on
from tests.support.processes import WorkerProcess
from tests.test_metrics_health import metric_samples, sample_values
from workers import gcfreeze, metrics


class Node:
    """An object in a reference cycle: only a collection frees it."""

    def __init__(self) -> None:
        self.me = self


def gauge() -> float:
    return float(metrics.GC_FROZEN._value.get())


def test_frozen_objects_are_skipped_by_collections_until_the_freeze_ends() -> None:
    kept = Node()
    with gcfreeze.frozen() as count:
        # Frozen objects freed by their reference count leave it: it only shrinks.
        assert 0 < gc.get_freeze_count() <= count == gauge()
        assert not any(o is kept for o in gc.get_objects())  # no collection scans it
    assert gc.get_freeze_count() == 0 and gauge() == 0
    assert any(o is kept for o in gc.get_objects())


def test_a_refreeze_returns_a_cycle_released_after_the_freeze() -> None:
    # What a released model version is: objects frozen while it served, in cycles.
    node = Node()
    gone = weakref.ref(node)
    with gcfreeze.frozen():
        del node
        gc.collect()
        assert gone() is not None, "a frozen cycle is never collected: hence the refreeze"
        thread = gcfreeze.refreeze_soon()
        assert thread is not None
        thread.join(60)
        assert gone() is None
        assert gc.get_freeze_count() > 0  # and the rest is frozen again


def test_nothing_is_refrozen_outside_a_freeze() -> None:
    assert gcfreeze.refreeze_soon() is None
    assert gc.get_freeze_count() == 0


def test_a_worker_freezes_its_loaded_objects_unless_the_setting_is_off(
    redis_server: RedisServer, mlp_worker: WorkerProcess, mlp_path: str
) -> None:
    # TensorFlow, Keras, Celery and the model: hundreds of thousands of objects.
    [frozen] = sample_values(metric_samples(mlp_worker.metrics_port), "predictq_gc_frozen_objects")
    assert frozen > 50_000
    worker = worker_on(
        redis_server, mlp_path, queue="gc-off", concurrency=2, env={"PREDICTQ_GC_FREEZE": "false"}
    ).start()
    try:
        worker.wait_ready()
        assert sample_values(metric_samples(worker.metrics_port), "predictq_gc_frozen_objects") == [
            0.0
        ]
    finally:
        worker.stop()
