"""Worker processes for the benchmark, and their peak memory."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import redis
from prometheus_client.parser import text_string_to_metric_families

from predictq.readiness import read_records
from predictq_ops.redis_server import free_port

ROOT = Path(__file__).resolve().parents[1]


class Worker:
    """A worker subprocess (predictq or the naive template) with an RSS sampler."""

    def __init__(self, argv: list[str], env: dict[str, str], name: str) -> None:
        self.name = name
        port = env.get("PREDICTQ_METRICS_PORT")
        self.metrics_url = f"http://127.0.0.1:{port}/metrics" if port else None
        fd, self.log_path = tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".log")
        os.close(fd)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
            )
        self.peak_rss_mb = 0.0
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        # This thread runs in the benchmark's client process: finding children
        # reads every /proc/<pid>/stat in Python (a few ms holding the GIL the
        # measured producer threads need; ~4% of the client's samples in a
        # py-spy of the conv storm), so the process tree is re-read every 2 s
        # and only the known processes' RSS every 0.1 s.
        try:
            proc = psutil.Process(self.process.pid)
        except psutil.Error:
            return
        procs: list[psutil.Process] = []
        ticks = 0
        while not self._stop.wait(0.1):
            try:
                if ticks % 20 == 0:
                    procs = [proc, *proc.children(recursive=True)]
                ticks += 1
                rss = 0
                for p in procs:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        rss += p.memory_info().rss
            except psutil.Error:
                return
            self.peak_rss_mb = max(self.peak_rss_mb, rss / 2**20)

    def reset_peak(self) -> None:
        """Start a new peak measurement (e.g. per scenario)."""
        self.peak_rss_mb = 0.0

    def metrics(self) -> dict[str, float]:
        """The worker's own Prometheus samples by name, summed over their labels
        (per-model labels included)."""
        assert self.metrics_url is not None
        with urllib.request.urlopen(self.metrics_url, timeout=5) as r:
            text = r.read().decode()
        totals: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                totals[s.name] = totals.get(s.name, 0.0) + s.value
        return totals

    def log_tail(self) -> str:
        return Path(self.log_path).read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        self._stop.set()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def cpu_counters(pids: dict[str, int | None]) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each labelled process itself
    (``cpu_<label>_s``; not its children: the benchmark's client process is the
    parent of the worker and of Redis), and by the whole machine: ``cpu_idle_s``
    and ``cpu_all_s`` (idle included), summed over its CPUs.

    Differences of two readings give a scenario's CPU per job in each process,
    which moves much less with the machine's speed than jobs per second do.
    A process's threads that have ended stay counted (the kernel adds them to
    it), so a round's producer threads are included.
    """
    totals: dict[str, float] = {}
    for label, pid in pids.items():
        used = 0.0
        if pid is not None:
            with contextlib.suppress(psutil.Error):
                t = psutil.Process(pid).cpu_times()
                used = t.user + t.system
        totals[f"cpu_{label}_s"] = used
    machine = psutil.cpu_times()
    totals["cpu_idle_s"] = machine.idle
    # Linux counts a guest's time in user (and nice) too: not twice here.
    guests = getattr(machine, "guest", 0.0) + getattr(machine, "guest_nice", 0.0)
    totals["cpu_all_s"] = sum(machine) - guests
    return totals


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREDICTQ_")}
    env.update(
        {
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        }
    )
    env.update(extra)
    return env


def predictq_worker(
    broker: str,
    backend: str,
    model_path: str | None,
    *,
    concurrency: int,
    extra_env: dict[str, str],
    start_timeout_s: float = 180.0,
) -> Worker:
    """`predictq worker` (threads pool) with the given settings; waits until ready.

    ``model_path`` None: the model(s) come from ``extra_env`` (a model repository).
    ``start_timeout_s``: how long it may take to load and warm up.
    """
    env = base_env(
        PREDICTQ_BROKER_URL=broker,
        PREDICTQ_RESULT_BACKEND=backend,
        PREDICTQ_METRICS_PORT=str(free_port()),
        **{"PREDICTQ_LOG_LEVEL": "WARNING", **extra_env},
    )
    if model_path is not None:
        env["PREDICTQ_MODEL_PATH"] = model_path
    worker = Worker(
        [
            sys.executable,
            "-m",
            "predictq_ops.cli",
            "worker",
            "-c",
            str(concurrency),
            "-n",
            f"bench{free_port()}@%h",
        ],
        env,
        "predictq",
    )
    client = redis.Redis.from_url(backend)
    give_up = time.monotonic() + start_timeout_s
    while not any(r.get("pid") == worker.process.pid for r in read_records(client)):
        if worker.process.poll() is not None or time.monotonic() > give_up:
            raise RuntimeError(f"predictq worker did not start:\n{worker.log_tail()}")
        time.sleep(0.1)
    return worker


def naive_worker(broker: str, backend: str, model_path: str, *, concurrency: int) -> Worker:
    """The typical template: prefork pool, JSON, model.predict per job."""
    env = base_env(
        NAIVE_BROKER_URL=broker, NAIVE_RESULT_BACKEND=backend, NAIVE_MODEL_PATH=model_path
    )
    worker = Worker(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "bench.naive_app",
            "worker",
            "--pool",
            "prefork",
            "-c",
            str(concurrency),
            "--loglevel",
            "WARNING",
            "--without-mingle",
            "--without-gossip",
            "-Q",
            "naive",
        ],
        env,
        "naive",
    )
    return worker
