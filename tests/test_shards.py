"""Large CPU batches run as row parts at once (workers/shards.py).

Units of the pure splitter with a fake compiled call, then a real worker that
splits a real model's batches, checked against the in-process model.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from predictq_ops.redis_server import RedisServer
from producer import PredictionClient
from tests.support import models
from tests.support.processes import WorkerProcess
from workers.backends import CompiledCall
from workers.backends.tf_backend import quota_cores, usable_cores
from workers.shards import Sharder


def compiled(fn: Any) -> CompiledCall:
    return CompiledCall(fn, lambda: 1, (1,))


def rowwise(a: np.ndarray, b: np.ndarray) -> list[np.ndarray]:
    """Two inputs, two outputs, each row's outputs from that row alone."""
    return [a * 2 + b.sum(axis=1, keepdims=True), a[:, :1] - 1]


@pytest.fixture()
def sharder() -> Iterator[Sharder]:
    s = Sharder(3, 4)
    yield s
    s.close()


def test_a_large_batch_is_split_into_parts_of_at_least_min_rows_and_joined_in_order(
    sharder: Sharder,
) -> None:
    seen: list[int] = []
    lock = threading.Lock()

    def fn(a: np.ndarray, b: np.ndarray) -> list[np.ndarray]:
        with lock:
            seen.append(len(a))
        return rowwise(a, b)

    call = sharder.wrap(compiled(fn)).fn
    rng = np.random.default_rng(0)
    for rows, parts in ((50, [16, 17, 17]), (9, [4, 5]), (7, [7]), (1, [1])):
        a, b = rng.random((rows, 3)), rng.random((rows, 2))
        seen.clear()
        out = call(a, b)
        assert sorted(seen) == parts, rows
        for got, want in zip(out, rowwise(a, b), strict=True):
            assert isinstance(got, np.ndarray) and np.array_equal(got, want)


def test_the_parts_run_at_the_same_time() -> None:
    # Three parts meet at a barrier: run one after another, the first would wait alone.
    barrier = threading.Barrier(3, timeout=30)

    def fn(a: np.ndarray) -> list[np.ndarray]:
        barrier.wait()
        return [a + 1]

    s = Sharder(3, 2)
    try:
        (out,) = s.wrap(compiled(fn)).fn(np.arange(6.0).reshape(6, 1))
    finally:
        s.close()
    assert np.array_equal(out, np.arange(1.0, 7.0).reshape(6, 1))


def test_a_failing_part_fails_the_call_only_once_every_part_has_ended(sharder: Sharder) -> None:
    go = threading.Event()
    ended: list[int] = []

    def fn(a: np.ndarray) -> list[np.ndarray]:
        if a[0, 0] == 0:  # the part holding row 0: the device thread's own
            raise ValueError("part 0 failed")
        go.wait(30)
        ended.append(int(a[0, 0]))
        return [a]

    call = sharder.wrap(compiled(fn)).fn
    errors: list[BaseException] = []
    ended_when_raised: list[list[int]] = []

    def run() -> None:
        try:
            call(np.arange(12.0).reshape(12, 1))
        except ValueError as e:
            errors.append(e)
            ended_when_raised.append(list(ended))

    caller = threading.Thread(target=run)
    caller.start()
    caller.join(1.0)
    # The device call is still running while the other parts are: a batcher
    # could otherwise start the next call on cores still computing this one.
    assert caller.is_alive() and not errors
    go.set()
    caller.join(30)
    assert [str(e) for e in errors] == ["part 0 failed"]
    assert sorted(ended_when_raised[0]) == [4, 8]


def test_one_part_leaves_the_call_as_it_is() -> None:
    s = Sharder(1, 4)
    c = compiled(rowwise)
    assert s.wrap(c) is c
    s.close()
    with pytest.raises(ValueError, match="parts and min_rows must be >= 1"):
        Sharder(0, 4)


def test_a_cgroup_cpu_quota_caps_the_parts(tmp_path: Path) -> None:
    # docker run --cpus 1.5: a quota of 150000 per 100000; the affinity still shows every core.
    assert quota_cores("150000 100000\n") == 2
    assert quota_cores("100000 100000") == 1
    assert quota_cores("max 100000") is None
    assert quota_cores("garbage") is None
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("100000 100000\n")
    assert usable_cores(str(cpu_max)) == 1
    cpu_max.write_text("max 100000\n")
    assert usable_cores(str(cpu_max)) == len(os.sched_getaffinity(0))
    assert usable_cores(str(tmp_path / "absent")) == len(os.sched_getaffinity(0))


def test_a_worker_splits_a_real_models_batches_and_every_row_is_its_own(
    redis_server: RedisServer, model_dir: Path, mlp_path: str
) -> None:
    multi = models.build_multi_io(str(model_dir / "multi-shards.keras"))
    for path, name in ((mlp_path, "mlp"), (multi, "multi")):
        worker = WorkerProcess(
            broker_url=redis_server.url(0),
            result_backend=redis_server.url(1),
            model_path=path,
            queue=f"shards-{name}",
            name=f"shards-{name}",
            env={
                "PREDICTQ_MAX_BATCH_SIZE": "64",
                "PREDICTQ_CPU_SHARDS": "3",
                "PREDICTQ_CPU_SHARD_MIN_ROWS": "5",
            },
        ).start()
        try:
            (record,) = worker.wait_ready()
            assert record["cpu_shards"] == 3 and record["device"] == "cpu"
            rng = np.random.default_rng(7)
            if name == "mlp":
                x: Any = rng.random((1000, models.FEATURES), dtype=np.float32)
            else:
                x = {
                    "a": rng.random((300, 6), dtype=np.float32),
                    "b": rng.random((300, 3, 2), dtype=np.float32),
                }
            with PredictionClient(
                broker_url=redis_server.url(0),
                result_backend=redis_server.url(1),
                queue=f"shards-{name}",
                result_timeout_s=60,
            ) as client:
                # Batches of 64 in 3 parts; the MLP's last batch of 40 (1000 = 15 x 64 + 40) too.
                out = client.predict(x, timeout=60)
        finally:
            worker.stop()
        expected = models.reference(path, x)
        if name == "mlp":
            assert np.allclose(out, expected, atol=1e-5)
        else:
            for key in ("score", "klass"):
                assert out[key].shape == expected[key].shape
                assert np.allclose(out[key], expected[key], atol=1e-5)
