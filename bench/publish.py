"""`python -m bench.publish`: publish cost of one-sample jobs, predictq's path vs Celery's.

No worker runs: every path publishes the same one-sample job (the bench MLP's
64 float32 features) from ``--threads`` threads into a private redis-server,
and the queue is emptied between runs. Paths:

* ``publisher``: ``PredictionClient._publish`` (producer/publisher.py: the
  kombu envelope built here, one LPUSH per job);
* ``send_task pool``: ``app.send_task`` through Celery's shared producer pool;
* ``send_task per-thread``: ``app.send_task(producer=...)`` with a kombu
  producer (and connection) of each thread's own, so no pool lock is taken.

Runs are interleaved ``--rounds`` times; the median of each path is reported
with its CPU time per job, and the ratio to ``publisher``.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

from predictq.celeryconf import PREDICT_TASK, SENT_AT_HEADER
from predictq_ops.redis_server import RedisServer
from producer import PredictionClient, wire
from producer.wire import JobInput

#: Publishes one job: (thread index, task id).
Publish = Callable[[int, str], None]


def _run(publish: Publish, *, threads: int, jobs_per_thread: int) -> tuple[float, float]:
    """(jobs/s, CPU ms per job) of ``threads`` threads each publishing ``jobs_per_thread``."""
    start = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        ids = [f"bench.{uuid.uuid4()}" for _ in range(jobs_per_thread)]
        start.wait()
        try:
            for job_id in ids:
                publish(index, job_id)
        except BaseException as e:
            errors.append(e)

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    start.wait()
    wall, cpu = time.perf_counter(), time.process_time()
    for t in pool:
        t.join()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if errors:
        raise errors[0]
    jobs = threads * jobs_per_thread
    return jobs / wall, cpu * 1000 / jobs


def paths(client: PredictionClient, x: JobInput) -> dict[str, Publish]:
    """The publish paths measured."""
    app = client._app
    producers: dict[int, Any] = {}  # thread index -> its own kombu producer

    def publisher(_index: int, job_id: str) -> None:
        client._publish(job_id, x, None)

    def send_task(_index: int, job_id: str, producer: Any = None) -> None:
        app.send_task(
            PREDICT_TASK,
            args=(x.value,),
            task_id=job_id,
            headers={SENT_AT_HEADER: time.time()},
            argsrepr=x.summary,
            producer=producer,
        )

    def send_task_per_thread(index: int, job_id: str) -> None:
        producer = producers.get(index)
        if producer is None:  # made during the warm-up run
            producer = producers[index] = app.amqp.Producer(app.connection_for_write())
        send_task(index, job_id, producer)

    return {
        "publisher": publisher,
        "send_task pool": send_task,
        "send_task per-thread": send_task_per_thread,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.publish", description=__doc__)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--jobs-per-thread", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    x = wire.normalize(np.random.default_rng(0).random((1, 64), dtype=np.float32))
    queue = "bench-publish"
    with (
        RedisServer() as server,
        PredictionClient(broker_url=server.url(0), result_backend=server.url(1), queue=queue) as c,
    ):
        broker = server.client()
        measured: dict[str, list[tuple[float, float]]] = {}
        publishers = paths(c, x)
        for publish in publishers.values():  # warm-up: connections, declarations
            _run(publish, threads=args.threads, jobs_per_thread=5)
        for _ in range(args.rounds):
            for name, publish in publishers.items():
                broker.delete(queue)
                measured.setdefault(name, []).append(
                    _run(publish, threads=args.threads, jobs_per_thread=args.jobs_per_thread)
                )
                assert broker.llen(queue) == args.threads * args.jobs_per_thread, name
        broker.delete(queue)
    base = statistics.median(r for r, _ in measured["publisher"])
    print(
        f"{args.threads} threads x {args.jobs_per_thread} one-sample jobs, "
        f"median of {args.rounds} interleaved rounds"
    )
    for name, runs in measured.items():
        rate = statistics.median(r for r, _ in runs)
        cpu_ms = statistics.median(c for _, c in runs)
        print(
            f"  {name:<22} {rate:>8,.0f} jobs/s  {cpu_ms:5.2f} ms CPU/job  "
            f"ratio to publisher {rate / base:5.2f}  (runs: "
            + ", ".join(f"{r:,.0f}" for r, _ in runs)
            + ")"
        )


if __name__ == "__main__":
    main()
