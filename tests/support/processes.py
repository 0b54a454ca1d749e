"""Real worker processes for integration tests, started and stopped by fixtures."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import psutil

from predictq.readiness import serving_records
from predictq.redis_client import client_from_url
from predictq_ops.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]


def base_env(**extra: str) -> dict[str, str]:
    """The environment of a test subprocess: quiet TensorFlow, repo importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREDICTQ_")}
    env.update(
        {
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "PYTHONUNBUFFERED": "1",
            # Tests run many TensorFlow processes on 2 cores: keep each one small.
            "PREDICTQ_INTRA_OP_THREADS": "2",
            "PREDICTQ_INTER_OP_THREADS": "1",
        }
    )
    env.update(extra)
    return env


def free_ports(count: int) -> int:
    """A port such that it and the ``count - 1`` after it are free right now."""
    for _ in range(100):
        base = free_port()
        with contextlib.ExitStack() as held:
            try:
                for port in range(base, base + count):
                    sock = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    sock.bind(("0.0.0.0", port))
            except OSError:
                continue
        return base
    raise AssertionError(f"no run of {count} free ports found")


def wait_for(
    predicate: Callable[[], Any],
    timeout_s: float,
    what: str,
    on_timeout: Callable[[], str] | None = None,
) -> Any:
    """Poll ``predicate`` until it returns something truthy (the value), or fail.

    Used only for state that has no event to wait on (a process's readiness
    record in Redis, a port opening); results are always awaited directly.
    """
    give_up = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > give_up:
            detail = on_timeout() if on_timeout else ""
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}. {detail}")
        time.sleep(0.05)


def is_dead(process: psutil.Process) -> bool:
    """Gone, or a zombie waiting for its parent."""
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class WorkerProcess:
    """`predictq worker` as a subprocess, with its log captured to a file."""

    def __init__(
        self,
        *,
        broker_url: str,
        result_backend: str,
        model_path: str,
        pool: str = "threads",
        concurrency: int = 8,
        queue: str = "predictq",
        env: Mapping[str, str] | None = None,
        name: str | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.name = name or f"w{free_port()}"
        self.pool = pool
        self.result_backend = result_backend
        # Prefork children serve metrics on port + child index: all must be free.
        self.metrics_port = free_ports(concurrency if pool == "prefork" else 1)
        self.env = base_env(
            PREDICTQ_BROKER_URL=broker_url,
            PREDICTQ_RESULT_BACKEND=result_backend,
            PREDICTQ_MODEL_PATH=model_path,
            PREDICTQ_QUEUE=queue,
            PREDICTQ_METRICS_PORT=str(self.metrics_port),
            **dict(env or {}),
        )
        self.argv = [
            sys.executable,
            "-m",
            "predictq_ops.cli",
            "worker",
            "--pool",
            pool,
            "-c",
            str(concurrency),
            "-n",
            f"{self.name}@%h",
            *extra_args,
        ]
        fd, self.log_path = tempfile.mkstemp(prefix=f"predictq-{self.name}-", suffix=".log")
        os.close(fd)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        """Start the process (returns at once; see ``wait_ready``)."""
        with open(self.log_path, "ab") as log:
            # In a session (and process group) of its own, so that kill() reaches
            # prefork children too.
            self.process = subprocess.Popen(
                self.argv,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log(self) -> str:
        """Everything the worker printed so far."""
        return Path(self.log_path).read_text(errors="replace")

    def pids(self) -> set[int]:
        """This worker's process and its pool children (prefork)."""
        assert self.process is not None
        try:
            return {self.pid} | {c.pid for c in psutil.Process(self.pid).children()}
        except psutil.NoSuchProcess:
            return set()

    def group(self) -> list[psutil.Process]:
        """The live processes in this worker's process group: it and its pool children."""
        assert self.process is not None
        members = []
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):  # gone since it was listed
                if os.getpgid(p.pid) == self.process.pid:
                    members.append(p)
        return members

    def records(self) -> list[dict[str, Any]]:
        """Readiness records of this worker's live processes, while it consumes jobs.

        A killed worker's record outlives it until its TTL expires; filtering on
        the live pids keeps a restarted worker from looking ready too early.
        """
        client = client_from_url(
            self.result_backend, sentinel_master=self.env.get("PREDICTQ_SENTINEL_MASTER")
        )
        pids = self.pids()
        try:
            return [
                r
                for r in serving_records(client)
                if r.get("nodename", "").startswith(self.name + "@") and r.get("pid") in pids
            ]
        finally:
            client.close()

    def wait_ready(self, processes: int = 1, timeout_s: float = 120.0) -> list[dict[str, Any]]:
        """Block until ``processes`` readiness records exist (model loaded, warm)."""

        def ready() -> list[dict[str, Any]] | None:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(
                    f"worker {self.name} exited with {self.process.returncode}"
                    f":\n{self.log()[-4000:]}"
                )
            records = self.records()
            return records if len(records) >= processes else None

        return wait_for(
            ready, timeout_s, f"worker {self.name} to be ready", lambda: self.log()[-3000:]
        )  # type: ignore[no-any-return]

    def terminate(self, timeout_s: float = 60.0) -> int:
        """SIGTERM (warm shutdown) and wait; returns the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout_s)

    def kill(self) -> None:
        """SIGKILL the worker's whole process group (prefork children too); wait until dead."""
        assert self.process is not None
        if self.process.returncode is not None:
            return  # already reaped: its pid, and so the group id, may belong to another now
        members = self.group()
        with contextlib.suppress(ProcessLookupError):  # the group is already empty
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)
        wait_for(
            lambda: all(is_dead(p) for p in members), 30, f"worker {self.name}'s processes to die"
        )

    def stop(self) -> None:
        """Best-effort cleanup for fixtures."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            self.terminate(30)
        except subprocess.TimeoutExpired:
            self.kill()
