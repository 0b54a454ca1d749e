"""Redis Sentinel failovers lose no job: real master, replica, three sentinels, worker and client.

One cluster and one threads-pool worker serve the whole module, every
connection going through the Sentinel URL. The master dies (SIGKILL) in the
middle of a run, then the sentinels hand mastership back in a planned
failover (SENTINEL FAILOVER); each time every job whose submit returned
completes with the in-process model's output for its own input.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from predictq.deadletters import DeadLetters
from predictq.kombu_layout import list_key
from predictq.redis_client import client_from_url
from predictq.settings import Settings
from predictq_ops.redis_server import RedisServer, free_port
from predictq_ops.up import Supervisor, UpOptions
from producer import Job, PredictionClient
from producer.collector import RESULT_KEY_PREFIX
from tests.support.cluster import assert_all_correct, inputs
from tests.support.flower import FLOWER_PASSWORD, FLOWER_USER, Flower, stop_process
from tests.support.ops import clean_env, run_cli
from tests.support.processes import WorkerProcess, wait_for
from tests.support.sentinel import MASTER_NAME, SentinelCluster, SentinelProcess
from tests.support.tls import make_tls_files

QUEUE = "ha"
#: Short, so jobs lost in the replication gap come back within seconds.
VISIBILITY_TIMEOUT_S = 4
JOBS = 600
#: Jobs pushed while the master fails (see ``run_through``).
GAP_JOBS = 60


@pytest.fixture(scope="module")
def cluster() -> Iterator[SentinelCluster]:
    ha = SentinelCluster()
    try:
        yield ha
    finally:
        ha.close()


@pytest.fixture(scope="module")
def ha_worker(cluster: SentinelCluster, mlp_path: str) -> Iterator[WorkerProcess]:
    worker = WorkerProcess(
        broker_url=cluster.url(0),
        result_backend=cluster.url(1),
        model_path=mlp_path,
        concurrency=8,
        queue=QUEUE,
        name="ha",
        env={
            "PREDICTQ_SENTINEL_MASTER": MASTER_NAME,
            "PREDICTQ_VISIBILITY_TIMEOUT_S": str(VISIBILITY_TIMEOUT_S),
            "PREDICTQ_MAX_BATCH_SIZE": "64",
        },
    ).start()
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.stop()


@pytest.fixture(scope="module")
def ha_flower(
    cluster: SentinelCluster, ha_worker: WorkerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Flower]:
    """`predictq flower` through the sentinels, started before any failover."""
    env = flower_env_for(cluster)
    log_path = tmp_path_factory.mktemp("flower-ha") / "flower.log"
    flower = Flower([sys.executable, "-m", "predictq_ops.cli", "flower"], env, log_path)
    try:
        flower.wait_answering()
        yield flower
    finally:
        stop_process(flower.process)


def flower_env_for(cluster: SentinelCluster) -> dict[str, str]:
    return clean_env(
        PREDICTQ_BROKER_URL=cluster.url(0),
        PREDICTQ_RESULT_BACKEND=cluster.url(1),
        PREDICTQ_SENTINEL_MASTER=MASTER_NAME,
        PREDICTQ_FLOWER_PORT=str(free_port()),
        PREDICTQ_FLOWER_BASIC_AUTH=f"{FLOWER_USER}:{FLOWER_PASSWORD}",
    )


def ha_client(cluster: SentinelCluster) -> PredictionClient:
    return PredictionClient(
        broker_url=cluster.url(0),
        result_backend=cluster.url(1),
        sentinel_master=MASTER_NAME,
        queue=QUEUE,
        visibility_timeout_s=VISIBILITY_TIMEOUT_S,
        submit_timeout_s=60,
        result_timeout_s=180,
    )


def run_through(
    cluster: SentinelCluster,
    mlp_path: str,
    fail: Callable[[Callable[[], None]], None],
    seed: int,
) -> dict[str, float]:
    """Submit JOBS jobs from a thread, ``fail`` the master a quarter of the way, check them all.

    The submitter stops a quarter of the way until ``fail`` calls the function it
    is given, which lets GAP_JOBS more jobs be pushed and returns once they are:
    ``fail`` decides what the replica sees of them. Returns what the test
    measured (printed with ``pytest -s``).
    """
    x = inputs(JOBS, seed=seed)
    jobs: list[Job] = []
    quarter, resume, gap_pushed = threading.Event(), threading.Event(), threading.Event()
    started = time.monotonic()
    with ha_client(cluster) as client:

        def submitter() -> None:
            for i in range(len(x)):
                jobs.append(client.submit(x[i]))
                if i == JOBS // 4:
                    quarter.set()
                    assert resume.wait(120)
                elif i == JOBS // 4 + GAP_JOBS:
                    gap_pushed.set()

        def push_gap() -> None:
            resume.set()
            assert gap_pushed.wait(60)

        with ThreadPoolExecutor(1) as pool:
            submitting = pool.submit(submitter)
            assert quarter.wait(60)
            for job in list(jobs)[:50]:
                job.get(timeout=120)  # jobs are done, in flight and queued when it fails
            old_master = cluster.master_port()
            assert old_master is not None
            fail(push_gap)
            unfinished = sum(not j.done() for j in list(jobs))
            failover_s = cluster.wait_new_master(old_master)
            submitting.result(timeout=120)  # every submit returned (retried through the failover)
        assert len(jobs) == JOBS
        assert_all_correct(jobs, x, mlp_path)  # 0 lost, 0 wrong
        # The result collector subscribed again, on the new master: a message on a
        # channel of its pattern reaches one subscriber (it ignores what it awaits not).
        probe = RESULT_KEY_PREFIX + client._id_prefix + "probe"
        with cluster.master().client() as master:
            wait_for(
                lambda: master.publish(probe, b"") == 1,
                30,
                "the result collector's pattern subscription on the new master",
            )
        stats = {
            "failover_s": failover_s,
            "unfinished_at_failure": unfinished,
            "republished": client._recovery.republished,
            "total_s": time.monotonic() - started,
        }
    print(f"\nfailover stats: {stats}")
    assert unfinished > 0, "the master failed after every job had finished: nothing was tested"
    return stats


def test_master_sigkill_mid_run_every_submitted_job_completes_once_correctly(
    cluster: SentinelCluster, ha_worker: WorkerProcess, ha_flower: Flower, mlp_path: str
) -> None:
    killed: list[RedisServer] = []

    def kill_master(push_gap: Callable[[], None]) -> None:
        killed.append(cluster.master())
        # A replication gap, made certain: the replica stops following the
        # master (to an address where nothing listens, keeping its data), the
        # next GAP_JOBS jobs, their reservations, results and acknowledgements
        # reach the master only, and then the master dies (SIGKILL).
        with cluster.replica().client() as replica:
            replica.replicaof("127.0.0.1", str(free_port()))
        push_gap()
        killed[0].kill()

    stats = run_through(cluster, mlp_path, kill_master, seed=11)
    # Jobs that only the dead master had were found missing and sent again.
    assert stats["republished"] >= 1
    assert ha_worker.process is not None and ha_worker.process.poll() is None
    # The old master comes back as a replica of the new one, as an operator would
    # bring it back, so the planned failover below has a replica to promote.
    cluster.rejoin_as_replica(killed[0])


def test_planned_failover_mid_run_every_submitted_job_completes_once_correctly(
    cluster: SentinelCluster, ha_worker: WorkerProcess, mlp_path: str
) -> None:
    cluster.wait_synced_replica()

    def planned_failover(push_gap: Callable[[], None]) -> None:
        with cluster.sentinels[0].client() as s:
            s.execute_command("SENTINEL", "FAILOVER", MASTER_NAME)
        push_gap()  # while the sentinels switch: some may reach the old master only

    run_through(cluster, mlp_path, planned_failover, seed=12)
    assert ha_worker.process is not None and ha_worker.process.poll() is None


def test_flower_started_before_both_failovers_still_sees_jobs_and_the_queue(
    cluster: SentinelCluster, ha_worker: WorkerProcess, ha_flower: Flower
) -> None:
    # Task events are pub/sub messages: those sent before Flower's event receiver
    # has subscribed again are gone, so jobs are sent until Flower shows one.
    x = inputs(1, seed=13)[0]
    sent: list[str] = []
    with ha_client(cluster) as client:

        def a_job_shows_in_flower() -> bool:
            job = client.submit(x)
            job.get(timeout=60)
            sent.append(job.id)
            tasks: dict[str, Any] = ha_flower.get("/api/tasks")
            return any(tasks.get(i, {}).get("state") == "SUCCESS" for i in sent)

        wait_for(a_job_shows_in_flower, 60, "Flower to show a job as SUCCESS", ha_flower.log)
    # Remote control (a broadcast through the broker) reaches the worker...
    wait_for(
        lambda: any(n.startswith("ha@") for n in ha_flower.get("/api/workers?refresh=1")),
        60,
        "Flower to list the worker",
        ha_flower.log,
    )
    # ...and queue lengths come from Flower's own Sentinel client (its broker page).
    queues = ha_flower.get("/api/queues/length")
    assert QUEUE in {q["name"] for q in queues["active_queues"]}


def test_health_and_the_message_guard_work_through_sentinel(
    cluster: SentinelCluster, ha_worker: WorkerProcess
) -> None:
    env = clean_env(
        PREDICTQ_BROKER_URL=cluster.url(0),
        PREDICTQ_RESULT_BACKEND=cluster.url(1),
        PREDICTQ_SENTINEL_MASTER=MASTER_NAME,
    )
    out = run_cli("health", "--any", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1].startswith("healthy: ")
    # A malformed item popped through the Sentinel transport is dead-lettered,
    # not lost: the worker's Sentinel channel is the guarded one (issue #13).
    broker = client_from_url(cluster.url(0), sentinel_master=MASTER_NAME)
    with broker:
        letters = DeadLetters(broker, max_entries=100, max_chars=1024)
        before = len(letters.entries())
        broker.lpush(list_key(QUEUE), b"not a kombu message")
        wait_for(lambda: len(letters.entries()) > before, 60, "the item to be dead-lettered")
        assert "JSON" in letters.entries(1)[0].detail
    wrong = run_cli("health", "--any", env={**env, "PREDICTQ_SENTINEL_MASTER": "nosuchmaster"})
    assert wrong.returncode != 0


def test_tls_sentinel_urls_reach_a_tls_master_for_predictq_kombu_and_celery(
    tmp_path: Path,
) -> None:
    files = make_tls_files(tmp_path)
    # Both listen on TLS ports only (no plain port): anything that connects speaks TLS.
    with RedisServer(tls=files) as master:
        sentinel = SentinelProcess(master.binary, master.port, str(tmp_path), quorum=1, tls=files)
        try:
            wait_for(
                lambda: sentinel.master_state().get("role-reported") == "master",
                30,
                "the TLS sentinel to read the master's INFO over TLS",
                sentinel.log_tail,
            )
            tls = f"?ssl_cert_reqs=required&ssl_ca_certs={files.ca_cert}"
            url = f"sentinel://127.0.0.1:{sentinel.port}/0{tls}"
            with PredictionClient(
                broker_url=url,
                result_backend=url.replace("/0?", "/1?"),
                sentinel_master=MASTER_NAME,
                queue="tls",
            ) as client:
                assert client.queue_length() == 0  # predictq's own client, through TLS
                # Celery's Sentinel result backend and kombu's Sentinel transport, too.
                client._app.backend.set("predictq-tls-probe", b"1")
                assert client._app.backend.get("predictq-tls-probe") == b"1"
                with client._app.connection_for_write() as connection:
                    connection.ensure_connection(max_retries=3)
                    assert connection.default_channel.client.ping()
        finally:
            sentinel.stop()


def test_predictq_up_uses_a_reachable_sentinel_url_instead_of_an_embedded_redis(
    cluster: SentinelCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PREDICTQ_BROKER_URL", cluster.url(0))
    settings = Settings(
        broker_url=cluster.url(0), result_backend=cluster.url(1), sentinel_master=MASTER_NAME
    )
    for master, embedded in ((MASTER_NAME, False), ("nosuchmaster", True)):
        supervisor = Supervisor(
            settings.replace(sentinel_master=master), UpOptions(echo=lambda _line: None)
        )
        try:
            urls = supervisor._redis_urls()
            assert (supervisor.redis is not None) is embedded
            assert (urls == (cluster.url(0), cluster.url(1))) is not embedded
        finally:
            if supervisor.redis is not None:
                supervisor.redis.close()
            shutil.rmtree(supervisor.workdir, ignore_errors=True)
