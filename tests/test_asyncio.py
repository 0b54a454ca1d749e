"""The asyncio API against a real worker: apredict, asubmit, awaiting a Job, and FastAPI."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from predictq.errors import InvalidInput, PredictqError, ResultTimeout, TooManyInFlight
from predictq_ops.redis_server import RedisServer
from producer import PredictionClient
from tests.support import models
from tests.support.processes import WorkerProcess

F = models.FEATURES
README = (Path(__file__).resolve().parents[1] / "README.md").read_text()

#: The worst event-loop lag allowed while 64 apredicts run. A client that waited
#: for results on the loop would stall it for 64 prediction round trips (~10 ms
#: each, 640 ms); one that keeps the loop free costs it only GIL hand-offs with
#: its submit and collector threads (1-6 ms measured on a quiet 2-core machine,
#: up to ~40 ms while other test processes load it). A submit on the loop is
#: caught directly instead, however fast it is: the test records the threads that
#: run the client's submit path and send Redis commands, and the loop's is not one.
MAX_LOOP_LAG_S = 0.25


def inputs(n: int, seed: int) -> list[np.ndarray]:
    """``n`` distinct inputs of 1 to 8 rows each, so that a mix-up changes shapes too."""
    rng = np.random.default_rng(seed)
    return [rng.random((i % 8 + 1, F), dtype=np.float32) for i in range(n)]


async def worst_loop_lag_s(stop: asyncio.Event) -> float:
    """Sleep 5 ms at a time until ``stop``; the longest any wake-up came late."""
    worst = 0.0
    while not stop.is_set():
        start = time.monotonic()
        await asyncio.sleep(0.005)
        worst = max(worst, time.monotonic() - start - 0.005)
    return worst


@pytest.fixture()
def unread(redis_server: RedisServer) -> Iterator[PredictionClient]:
    """A client whose queue no worker reads, with one in-flight slot; a full slot fails in 0.5 s."""
    with PredictionClient(
        broker_url=redis_server.url(0),
        result_backend=redis_server.url(1),
        queue="unread-asyncio",
        max_in_flight=1,
        submit_timeout_s=0.5,
    ) as c:
        yield c
    redis_server.client().delete("unread-asyncio")


def test_64_concurrent_apredicts_each_get_their_own_correct_output(
    client: PredictionClient, mlp_path: str
) -> None:
    xs = inputs(64, seed=10)

    async def main() -> list[Any]:
        return await asyncio.gather(*(client.apredict(x, timeout=60) for x in xs))

    outs = asyncio.run(main())
    for i, (x, out) in enumerate(zip(xs, outs, strict=True)):
        assert out.shape == (len(x), 4), i
        assert np.allclose(out, models.reference(mlp_path, x), atol=1e-5), i
    assert client._collector.pending() == 0


def test_the_event_loop_is_never_blocked_by_submits_or_waiting(
    client: PredictionClient, mlp_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    xs = inputs(64, seed=11)
    client.predict(xs[0], timeout=60)  # connections made before measuring
    redis_threads: set[int] = set()
    send = redis.connection.AbstractConnection.send_packed_command

    def recorded_send(self: Any, *args: Any, **kwargs: Any) -> Any:
        redis_threads.add(threading.get_ident())
        return send(self, *args, **kwargs)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", recorded_send)
    submit_threads: set[int] = set()
    enqueue = PredictionClient._enqueue

    def recorded_enqueue(self: PredictionClient, *args: Any, **kwargs: Any) -> Any:
        submit_threads.add(threading.get_ident())
        return enqueue(self, *args, **kwargs)

    monkeypatch.setattr(PredictionClient, "_enqueue", recorded_enqueue)

    async def main() -> tuple[list[Any], float]:
        stop = asyncio.Event()
        probe = asyncio.create_task(worst_loop_lag_s(stop))
        outs = await asyncio.gather(*(client.apredict(x, timeout=60) for x in xs))
        stop.set()
        return outs, await probe

    outs, lag = asyncio.run(main())  # the loop runs on this thread
    assert redis_threads and threading.get_ident() not in redis_threads
    assert submit_threads and threading.get_ident() not in submit_threads
    assert lag < MAX_LOOP_LAG_S, f"the loop stalled for {lag * 1e3:.1f} ms"
    assert all(
        np.allclose(o, models.reference(mlp_path, x), atol=1e-5)
        for x, o in zip(xs, outs, strict=True)
    )


def test_typed_errors_come_out_of_await_as_from_the_sync_api(client: PredictionClient) -> None:
    bad = np.ones((2, F + 1), np.float32)
    shape_error = rf"expected shape \[N, {F}\], received \[2, {F + 1}\]"

    async def main() -> None:
        with pytest.raises(InvalidInput, match=shape_error):
            await client.apredict(bad, timeout=60)
        job = await client.asubmit(bad)
        with pytest.raises(InvalidInput, match=shape_error):
            await job
        # Refused by the producer itself, before anything is sent.
        with pytest.raises(InvalidInput, match="numeric dtype"):
            await client.apredict(np.array([["x"]]))
        with pytest.raises(InvalidInput, match=r"timeout: expected seconds"):
            await client.apredict(np.ones((1, F), np.float32), timeout=-1)
        good = await client.asubmit(np.ones((2, F), np.float32))
        assert (await good.aget(timeout=60)).shape == (2, 4)

    asyncio.run(main())
    assert client._collector.pending() == 0


def test_a_result_timeout_is_typed_and_apredict_frees_the_slot(unread: PredictionClient) -> None:
    x = np.ones((1, F), np.float32)

    async def main() -> None:
        with pytest.raises(ResultTimeout, match=r"no result within 0\.2s"):
            await unread.apredict(x, timeout=0.2)
        assert unread._collector.pending() == 0
        job = await unread.asubmit(x)  # one slot: admitted only because it was freed
        # job.aget's timeout keeps watching the job, as job.get's does ...
        with pytest.raises(ResultTimeout):
            await job.aget(timeout=0.05)
        assert unread._collector.pending() == 1
        with pytest.raises(TooManyInFlight):
            await unread.asubmit(x)
        job.forget()  # ... until the caller lets it go
        (await unread.asubmit(x)).forget()

    asyncio.run(main())


def test_cancelling_an_awaiting_task_frees_its_slot_and_stops_watching(
    unread: PredictionClient,
) -> None:
    x = np.ones((1, F), np.float32)

    async def main() -> None:
        job = await unread.asubmit(x)
        waiting = asyncio.create_task(job.aget())
        await asyncio.sleep(0)  # one loop turn: the task now awaits the result
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert unread._collector.pending() == 0
        second = await unread.asubmit(x)  # one slot: admitted only because it was freed
        second.forget()
        # asyncio.wait_for cancels an apredict the same way.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(unread.apredict(x), 0.2)
        assert unread._collector.pending() == 0
        (await unread.asubmit(x)).forget()

    asyncio.run(main())
    assert unread.queue_length() == 4  # every job was sent; the last ones were admitted


def test_a_submit_cancelled_while_it_runs_forgets_the_job_it_sent(
    unread: PredictionClient,
) -> None:
    x = np.ones((1, F), np.float32)
    entered, go_on, sent = threading.Event(), threading.Event(), threading.Event()
    # What asubmit runs on a pool thread: checks, a slot, then the coalescer.
    enqueue = unread._enqueue_async

    def held_enqueue(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        go_on.wait(10)
        enqueued = enqueue(*args, **kwargs)
        sent.set()
        return enqueued

    async def main() -> None:
        unread._enqueue_async = held_enqueue  # type: ignore[method-assign]
        task = asyncio.create_task(unread.asubmit(x))
        await asyncio.to_thread(entered.wait, 10)  # the submit runs on a pool thread
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        unread._enqueue_async = enqueue  # type: ignore[method-assign]
        go_on.set()
        await asyncio.to_thread(sent.wait, 10)
        # The job went out, and nobody holds it: its slot is freed for the next one
        # (which would get TooManyInFlight after 0.5 s otherwise).
        (await unread.asubmit(x)).forget()

    asyncio.run(main())
    assert unread.queue_length() == 2


def test_a_closed_client_refuses_async_submits(redis_server: RedisServer) -> None:
    c = PredictionClient(broker_url=redis_server.url(0), result_backend=redis_server.url(1))
    asyncio.run(c.aclose())
    with pytest.raises(PredictqError, match="the client is closed"):
        asyncio.run(c.apredict(np.ones((1, F), np.float32)))


def test_the_readme_fastapi_example_serves_predictions_from_a_real_worker(
    redis_server: RedisServer,
    mlp_worker: WorkerProcess,
    mlp_path: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fastapi.testclient import TestClient  # the test extra installs FastAPI

    (code,) = [b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "FastAPI(" in b]
    monkeypatch.setenv("PREDICTQ_BROKER_URL", redis_server.url(0))
    monkeypatch.setenv("PREDICTQ_RESULT_BACKEND", redis_server.url(1))
    monkeypatch.setenv("PREDICTQ_QUEUE", "mlp")
    namespace: dict[str, Any] = {"__name__": "readme_fastapi_example"}
    exec(compile(code, "README.md (FastAPI example)", "exec"), namespace)
    x = np.random.default_rng(12).random((3, F), dtype=np.float32)
    with TestClient(namespace["app"]) as http:  # runs the lifespan: client made, then closed
        ok = http.post("/predict", json={"inputs": x.tolist()})
        assert ok.status_code == 200, ok.text
        assert np.allclose(ok.json()["outputs"], models.reference(mlp_path, x), atol=1e-5)
        bad = http.post("/predict", json={"inputs": [[1.0] * (F + 1)]})
        assert bad.status_code == 422 and f"expected shape [N, {F}]" in bad.json()["detail"]
        client = http.app.state.client  # type: ignore[attr-defined]
    assert client._closed


def test_a_sync_predict_that_times_out_frees_its_slot(unread: PredictionClient) -> None:
    x = np.ones((1, F), np.float32)
    with pytest.raises(ResultTimeout, match=r"no result within 0\.2s"):
        unread.predict(x, timeout=0.2)
    assert unread._collector.pending() == 0
    unread.submit(x).forget()  # one slot: admitted only because the timeout freed it
