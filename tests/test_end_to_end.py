"""Producer -> Redis -> threads-pool worker -> Redis -> producer, with a real model."""

from __future__ import annotations

import base64
import json
import os
import pickle
import subprocess
import sys
import threading
import tracemalloc
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from celery import Celery

from predictq.errors import InvalidInput, InvalidMessage
from predictq_ops.redis_server import RedisServer
from producer import PredictionClient
from tests.support import models
from tests.support.backends import JAX_BUCKETS_64, Served
from tests.support.processes import WorkerProcess, base_env, wait_for

F = models.FEATURES


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def metric_line(worker: WorkerProcess, prefix: str) -> str:
    """The first line of the worker's real Prometheus endpoint that starts with ``prefix``."""
    url = f"http://127.0.0.1:{worker.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith(prefix):
            return line
    raise AssertionError(f"{prefix} not in /metrics")


def metric(worker: WorkerProcess, name: str) -> float:
    """One sample value from the worker's real Prometheus endpoint."""
    try:
        line = metric_line(worker, name + " ")
    except AssertionError:
        line = metric_line(worker, name + "{")
    return float(line.rsplit(" ", 1)[1])


def test_predictions_through_redis_equal_the_in_process_model(
    served_client: PredictionClient, served: Served, mlp_path: str, redis_server: RedisServer
) -> None:
    # On every backend, compared with the model in this process (TensorFlow).
    x = rng(0).random((8, F), dtype=np.float32)
    job = served_client.submit(x)
    out = job.get(timeout=60)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (8, 4)
    assert np.allclose(out, models.reference(mlp_path, x), atol=1e-5)
    out[0, 0] = 5.0  # callers own their result
    expected = models.reference(mlp_path, x)
    assert np.allclose(served_client.predict(x, timeout=60), expected, atol=1e-5)
    # Results expire after PREDICTQ_RESULT_TTL_S (default one hour).
    results = redis.Redis.from_url(redis_server.url(1))
    assert 3500 < results.ttl(f"celery-task-meta-{job.id}") <= 3600
    # The worker says which backend serves, in its readiness record and its metrics.
    (record,) = served.worker.records()
    assert record["backend"] == served.backend
    info = metric_line(served.worker, "predictq_model_info{")
    assert f'backend="{served.backend}"' in info and 'device="cpu"' in info


def test_32_threads_x_50_jobs_every_output_correct_and_matched_to_its_job(
    served_client: PredictionClient, served: Served, mlp_path: str
) -> None:
    worker = served.worker
    threads, per_thread = 32, 50
    inputs = rng(1).random((threads, per_thread, 1 + 2, F), dtype=np.float32)
    expected = models.reference(mlp_path, inputs.reshape(-1, F)).reshape(threads, per_thread, 3, 4)
    batches_before = metric(worker, "predictq_batch_size_samples_count")
    compiles_before = metric(worker, "predictq_model_compiles")
    start = threading.Barrier(threads)

    def producer(t: int) -> list[np.ndarray]:
        start.wait()
        jobs = [served_client.submit(inputs[t, j]) for j in range(per_thread)]
        return [job.get(timeout=120) for job in jobs]

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(producer, range(threads)))  # re-raises any exception
    for t in range(threads):
        for j in range(per_thread):
            assert np.allclose(results[t][j], expected[t, j], atol=1e-5), (t, j)
    # Concurrent jobs shared device calls: fewer batches than jobs.
    batches = metric(worker, "predictq_batch_size_samples_count") - batches_before
    assert batches < threads * per_thread
    # Batches of every size, and not one compilation after warm-up: JAX compiled
    # its 7 batch-size buckets (1..64) before serving, TensorFlow its one trace.
    assert metric(worker, "predictq_model_compiles") == compiles_before
    assert compiles_before == {"tensorflow": 1, "jax": JAX_BUCKETS_64, "torch": 0}[served.backend]
    # ... and the threads-pool worker process loaded its model exactly once.
    records = worker.records()
    assert [(r["pid"], r["loads"], r["pool"]) for r in records] == [(worker.pid, 1, "threads")]
    assert metric(worker, "predictq_model_loads_total") == 1


def test_a_job_larger_than_max_batch_size_is_split_and_reassembled_in_order(
    served_client: PredictionClient, mlp_path: str
) -> None:
    x = rng(2).random((1000, F), dtype=np.float32)  # the worker's max batch is 64
    out = served_client.predict(x, timeout=60)
    assert np.allclose(out, models.reference(mlp_path, x), atol=1e-5)


def test_a_large_job_travels_by_reference_and_its_stored_input_is_deleted_after(
    client: PredictionClient, redis_server: RedisServer, mlp_path: str
) -> None:
    x = rng(7).random((3000, F), dtype=np.float32)  # 192 KB > the 64 KB inline limit
    broker = redis_server.client()
    with PredictionClient(
        broker_url=redis_server.url(0),
        result_backend=redis_server.url(1),
        queue="unread-by-reference",  # no worker: the message stays there to be measured
    ) as held:
        job = held.submit(x)
        key = f"predictq:payload:{job.id}"
        (message,) = broker.lrange("unread-by-reference", 0, -1)
        assert len(message) < 4096  # the message itself stays small ...
        assert broker.strlen(key) >= x.nbytes  # ... and the input waits under its own key
        # Hand the message to the worker's queue, where the worker pops from the right.
        assert broker.lmove("unread-by-reference", "mlp", "RIGHT", "LEFT") == message
        assert np.allclose(job.get(timeout=60), models.reference(mlp_path, x), atol=1e-5)
    # Deleted right after its result is stored: the result may arrive first.
    wait_for(lambda: broker.exists(key) == 0, 10, "the stored input to be deleted")


def test_predict_many_keeps_order_and_never_exceeds_max_in_flight(
    redis_server: RedisServer, mlp_path: str, mlp_worker: WorkerProcess
) -> None:
    x = rng(3).random((3001, F), dtype=np.float32)
    with PredictionClient(
        broker_url=redis_server.url(0),
        result_backend=redis_server.url(1),
        queue="mlp",
        max_in_flight=4,
    ) as c:
        seen: list[int] = []
        submit = c._submit

        def spy(*args: Any, **kwargs: Any) -> Any:
            job = submit(*args, **kwargs)
            seen.append(c._collector.pending())
            return job

        c._submit = spy  # type: ignore[method-assign]
        out = c.predict_many(x, chunk_size=100, progress=True, timeout=60)
    assert np.allclose(out, models.reference(mlp_path, x), atol=1e-5)
    assert len(seen) == 31 and max(seen) <= 4


def test_predict_many_memory_stays_below_a_second_copy_of_the_input_and_shows_progress(
    redis_server: RedisServer,
    mlp_path: str,
    mlp_worker: WorkerProcess,
    capsys: pytest.CaptureFixture[str],
) -> None:
    x = rng(9).random((200_000, F), dtype=np.float32)  # 12.8 MB in, 3.2 MB out
    with PredictionClient(
        broker_url=redis_server.url(0),
        result_backend=redis_server.url(1),
        queue="mlp",
        max_in_flight=4,
    ) as c:
        tracemalloc.start()
        try:
            out = c.predict_many(x, chunk_size=4000, progress=True, timeout=60)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert np.allclose(out, models.reference(mlp_path, x), atol=1e-5)
    # The output + 4 encoded chunks in flight (~1 MB): ~4 MB, not every chunk at once.
    assert peak < x.nbytes / 2, f"peak {peak / 2**20:.1f} MiB, input {x.nbytes / 2**20:.1f} MiB"
    assert "200000/200000" in capsys.readouterr().err  # tqdm's bar reached the end


def test_submit_many_gives_one_handle_per_chunk(client: PredictionClient, mlp_path: str) -> None:
    x = rng(4).random((250, F), dtype=np.float32)
    jobs = list(client.submit_many(x, chunk_size=100))
    assert [(j.rows.start, j.rows.stop) for j in jobs] == [(0, 100), (100, 200), (200, 250)]
    out = np.concatenate([j.get(timeout=60) for j in jobs])
    assert np.allclose(out, models.reference(mlp_path, x), atol=1e-5)


def test_submit_many_keeps_a_window_of_chunks_submitted_ahead_and_checks_arguments_at_once(
    redis_server: RedisServer,
) -> None:
    x = rng(8).random((100, F), dtype=np.float32)
    with PredictionClient(
        broker_url=redis_server.url(0),
        result_backend=redis_server.url(1),
        queue="unread-submit-many",  # no worker: what was sent stays countable
    ) as unread:
        with pytest.raises(InvalidInput, match="chunk_size: expected"):
            unread.submit_many(x, chunk_size=0)  # no next() needed
        with pytest.raises(InvalidInput, match="window: expected"):
            unread.submit_many(x, window=0)
        chunks = unread.submit_many(x, chunk_size=10, window=3)
        first = next(chunks)
        assert first.rows == slice(0, 10)
        assert unread.queue_length() == 4  # the one yielded + 3 ahead
        rest = list(chunks)
        assert [j.rows.start for j in rest if j.rows] == list(range(10, 100, 10))
        assert unread.queue_length() == 10
        unread._broker.delete("unread-submit-many")


def test_any_celery_client_can_enqueue_by_task_name_with_json_lists(
    redis_server: RedisServer, client: PredictionClient, mlp_path: str
) -> None:
    x = rng(5).random((3, F)).round(6)
    plain = Celery(
        "other-language-like-client",
        broker=redis_server.url(0),
        backend=redis_server.url(1),
        set_as_current=False,
    )
    plain.conf.task_serializer = "json"
    result = plain.send_task("predictq.predict", args=[x.tolist()], queue="mlp")
    out = client.job(result.id).get(timeout=60)
    assert np.allclose(out, models.reference(mlp_path, x.astype(np.float32)), atol=1e-5)
    plain.close()


def test_a_pickle_message_is_refused_and_never_executed(
    redis_server: RedisServer, client: PredictionClient, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {marker}",))

    plain = Celery("attacker", broker=redis_server.url(0), set_as_current=False)
    plain.conf.task_serializer = "pickle"
    plain.conf.accept_content = ["pickle"]
    broker = redis_server.client()
    # Sent where no worker reads, so that the test keeps a copy of what the worker gets.
    result = plain.send_task("predictq.predict", args=[Exploit()], queue="unread-pickle")
    (message,) = broker.lrange("unread-pickle", 0, -1)
    envelope = json.loads(message)
    assert envelope["content-type"] == "application/x-python-serialize"
    assert broker.lmove("unread-pickle", "mlp", "RIGHT", "LEFT") == message
    with pytest.raises(InvalidMessage, match=r"application/x-python-serialize.*pickle is never"):
        client.job(result.id).get(timeout=60)
    assert not marker.exists()
    # The control: unpickling that very body runs the command, so the check above can fail.
    pickle.loads(base64.b64decode(envelope["body"]))
    assert marker.exists()
    # The worker keeps serving.
    assert client.predict(np.ones((1, F), np.float32), timeout=60).shape == (1, 4)
    plain.close()


def test_invalid_input_fails_alone_and_the_next_job_succeeds(client: PredictionClient) -> None:
    bad = client.submit(np.ones((2, F + 1), np.float32))
    good = client.submit(np.ones((2, F), np.float32))
    with pytest.raises(InvalidInput, match=rf"expected shape \[N, {F}\], received \[2, {F + 1}\]"):
        bad.get(timeout=60)
    assert good.get(timeout=60).shape == (2, 4)


def test_cli_predict_reads_npy_and_writes_predictions(
    redis_server: RedisServer, mlp_worker: WorkerProcess, mlp_path: str, tmp_path: Path
) -> None:
    x = rng(6).random((500, F), dtype=np.float32)
    np.save(tmp_path / "in.npy", x)
    env = base_env(
        PREDICTQ_BROKER_URL=redis_server.url(0),
        PREDICTQ_RESULT_BACKEND=redis_server.url(1),
        PREDICTQ_QUEUE="mlp",
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "predictq_ops.cli",
            "predict",
            str(tmp_path / "in.npy"),
            "-o",
            str(tmp_path / "out.npy"),
            "--chunk-size",
            "64",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "500/500" in out.stderr  # the progress bar
    assert np.allclose(np.load(tmp_path / "out.npy"), models.reference(mlp_path, x), atol=1e-5)
    np.savez(tmp_path / "in.npz", x=x[:10])
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "predictq_ops.cli",
            "predict",
            str(tmp_path / "in.npz"),
            "-o",
            str(tmp_path / "out.npz"),
            "--no-progress",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    with np.load(tmp_path / "out.npz") as data:
        assert np.allclose(data["output_0"], models.reference(mlp_path, x[:10]), atol=1e-5)
