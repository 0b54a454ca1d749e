"""``predictq up``: Redis (embedded if needed), a threads-pool worker and Flower, supervised.

The supervisor starts each child, the embedded Redis included, in its own
session, so a terminal's Ctrl-C (SIGINT to the foreground process group)
reaches only the supervisor, which then stops the children in order (worker
first, so in-flight jobs finish while Redis is still there, then Flower, then
Redis) and waits for them. Children also get SIGTERM if the supervisor itself
dies (Linux PDEATHSIG), so no process outlives it. The supervisor never imports
TensorFlow.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import redis

from predictq.errors import ConfigError, PredictqError
from predictq.readiness import read_records
from predictq.redis_client import client_for
from predictq.sentinel import is_sentinel_url
from predictq.settings import Settings, mask_url
from predictq_ops.demo import HOLDOUT_FILE, MODEL_FILE
from predictq_ops.redis_server import RedisServer, free_port, is_reachable

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn_supervised(
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    output: IO[bytes] | int = subprocess.DEVNULL,
) -> subprocess.Popen[bytes]:
    """Start one child of the supervisor: its own session, SIGTERM when the supervisor dies.

    Every child of `predictq up` (Redis, the demo's training, the worker,
    Flower) starts here. The
    supervisor starts them from its main thread before it starts any thread of
    its own, which makes preexec_fn safe, and PDEATHSIG fires when the thread
    that forked the child ends: the main thread ends only with the process.
    """
    return subprocess.Popen(
        argv,
        env=env,
        stdout=output,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_die_with_parent,  # noqa: PLW1509
    )


class StartupInterrupted(PredictqError):
    """SIGINT or SIGTERM arrived before `predictq up` finished starting."""


@dataclass
class UpOptions:
    """What `predictq up` was asked to do."""

    demo: bool = False
    once: bool = False
    flower: bool = True
    model_path: str | None = None
    ready_timeout_s: float = 180.0
    echo: Callable[[str], None] = print
    extra_env: dict[str, str] = field(default_factory=dict)


class Supervisor:
    """Owns the processes of one `predictq up` run."""

    def __init__(self, settings: Settings, options: UpOptions) -> None:
        self.settings = settings
        self.options = options
        self.redis: RedisServer | None = None
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.stop_requested = threading.Event()
        #: The signal that asked for the stop (set before ``stop_requested``).
        self.stop_signal = signal.SIGINT
        self.workdir = tempfile.mkdtemp(prefix="predictq-up-")

    # --- start -----------------------------------------------------------------

    def _reachable(self, url: str) -> bool:
        # Through the sentinels for a sentinel:// URL (is_reachable takes plain ones only).
        if not is_sentinel_url(url):
            return is_reachable(url)
        try:
            with client_for(self.settings, url, socket_timeout_s=1.0) as client:
                return bool(client.ping())
        except (redis.RedisError, OSError):
            return False

    def _redis_urls(self) -> tuple[str, str]:
        configured = "PREDICTQ_BROKER_URL" in os.environ
        if configured and self._reachable(self.settings.broker_url):
            self.options.echo(f"redis:  using {mask_url(self.settings.broker_url)}")
            return self.settings.broker_url, self.settings.result_backend
        if configured:
            self.options.echo(
                f"redis:  {mask_url(self.settings.broker_url)} is not reachable; "
                "starting an embedded one"
            )
        self.redis = RedisServer(
            port=free_port(),
            appendonly=True,
            data_dir=os.path.join(self.workdir, "redis"),
            spawn=spawn_supervised,
        )
        os.makedirs(self.redis.data_dir, exist_ok=True)
        self.redis.start()
        self.options.echo(
            f"redis:  embedded {self.redis.binary} on {self.redis.url(0)} (pid {self.redis.pid})"
        )
        return self.redis.url(0), self.redis.url(1)

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        with open(os.path.join(self.workdir, f"{name}.log"), "wb") as logfile:
            self.children[name] = spawn_supervised(argv, env=env, output=logfile)

    def raise_if_interrupted(self) -> None:
        """Raise StartupInterrupted once a stop was asked for."""
        if self.stop_requested.is_set():
            raise StartupInterrupted(f"interrupted by {self.stop_signal.name} during start-up")

    def _train_demo(self) -> tuple[str, str]:
        self.options.echo("demo:   training a small MLP on scikit-learn's digits dataset ...")
        out_dir = os.path.join(self.workdir, "demo")
        log_path = os.path.join(self.workdir, "demo.log")
        with open(log_path, "wb") as logfile:
            trainer = spawn_supervised(
                [sys.executable, "-m", "predictq_ops.demo", out_dir],
                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
                output=logfile,
            )
        # Polled, not waited on, so that a stop request ends the training at once.
        while trainer.poll() is None and not self.stop_requested.wait(0.25):
            pass
        if trainer.poll() is None:
            trainer.terminate()
            trainer.wait()
        self.raise_if_interrupted()
        if trainer.returncode != 0:
            tail = Path(log_path).read_text(errors="replace").strip()[-2000:]
            raise PredictqError(f"demo training failed with code {trainer.returncode}: {tail}")
        return os.path.join(out_dir, MODEL_FILE), os.path.join(out_dir, HOLDOUT_FILE)

    def start(self) -> dict[str, str]:
        """Start everything and wait until the worker's model is ready.

        Raises StartupInterrupted if a stop is asked for before that.
        """
        broker_url, backend_url = self._redis_urls()
        self.raise_if_interrupted()
        holdout = ""
        model_path = self.options.model_path or self.settings.model_path
        if self.options.demo:
            model_path, holdout = self._train_demo()
        if not model_path:
            raise ConfigError("PREDICTQ_MODEL_PATH must name a model (or use `predictq up --demo`)")
        env = {
            **os.environ,
            **self.options.extra_env,
            "PREDICTQ_BROKER_URL": broker_url,
            "PREDICTQ_RESULT_BACKEND": backend_url,
            "PREDICTQ_MODEL_PATH": model_path,
            "TF_CPP_MIN_LOG_LEVEL": "2",
        }
        env.setdefault("PREDICTQ_METRICS_PORT", str(free_port()))
        self._spawn("worker", [sys.executable, "-m", "predictq_ops.cli", "worker"], env)
        flower_url = ""
        if self.options.flower:
            env.setdefault("PREDICTQ_FLOWER_PORT", str(self.settings.flower_port))
            # Local only: the embedded system has no password of its own.
            self._spawn(
                "flower",
                [sys.executable, "-m", "predictq_ops.cli", "flower", "--address=127.0.0.1"],
                env,
            )
            flower_url = f"http://127.0.0.1:{env['PREDICTQ_FLOWER_PORT']}"
        record = self._wait_ready(backend_url)
        self.options.echo(
            f"worker: pid {self.children['worker'].pid}, model {model_path} "
            f"loaded and warm (metrics on port {record.get('metrics_port')})"
        )
        if flower_url:
            self._wait_http(flower_url + "/healthcheck")
            self.options.echo(f"flower: {flower_url}")
        self.options.echo(f"logs:   {self.workdir}")
        return {
            "broker_url": broker_url,
            "result_backend": backend_url,
            "flower_url": flower_url,
            "holdout": holdout,
            "model_path": model_path,
        }

    def _check_children(self) -> None:
        for name, child in self.children.items():
            code = child.poll()
            if code is not None:
                tail = Path(self.workdir, f"{name}.log").read_text(errors="replace")[-3000:]
                raise PredictqError(f"{name} exited with code {code} during start-up:\n{tail}")

    def _wait_ready(self, backend_url: str) -> dict[str, Any]:
        client = client_for(self.settings, backend_url)
        pid = self.children["worker"].pid
        give_up = time.monotonic() + self.options.ready_timeout_s
        while time.monotonic() < give_up and not self.stop_requested.is_set():
            self._check_children()
            for record in read_records(client):
                if record.get("pid") == pid and record.get("warm"):
                    return record
            self.stop_requested.wait(0.25)
        self.raise_if_interrupted()
        raise PredictqError(
            "the worker did not become ready within "
            f"{self.options.ready_timeout_s:.0f}s (see {self.workdir}/worker.log)"
        )

    def _wait_http(self, url: str) -> None:
        give_up = time.monotonic() + 60
        while time.monotonic() < give_up and not self.stop_requested.is_set():
            self._check_children()
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2):
                return
            self.stop_requested.wait(0.25)
        self.raise_if_interrupted()
        raise PredictqError(f"Flower did not answer at {url} (see {self.workdir}/flower.log)")

    # --- run and stop ----------------------------------------------------------

    def wait(self) -> int:
        """Block until asked to stop (signal) or a child dies; returns the exit code."""
        while not self.stop_requested.wait(0.5):
            for name, child in self.children.items():
                if child.poll() is not None:
                    self.options.echo(f"{name} exited with code {child.returncode}; stopping")
                    return 1
        return 0

    def stop(self) -> None:
        """Stop the worker, then Flower, then Redis; SIGKILL what does not stop in time."""
        timeout_s = self.settings.shutdown_timeout_s + 10
        for name in ("worker", "flower"):
            child = self.children.get(name)
            if child is None or child.poll() is not None:
                continue
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0fs; killing it", name, timeout_s)
                child.kill()
                child.wait()
        if self.redis is not None:
            self.redis.stop()

    def install_signal_handlers(self) -> None:
        """SIGINT/SIGTERM ask the supervisor to stop (handled in the main thread)."""

        def handler(signum: int, _frame: object) -> None:
            self.stop_signal = signal.Signals(signum)
            self.stop_requested.set()

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
