"""Operations against real processes: `predictq up`, the supervisor and its demo."""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import numpy as np
import psutil
import pytest

from predictq_ops.demo import HOLDOUT_FILE
from predictq_ops.redis_server import RedisServer, free_port
from producer import PredictionClient
from tests.support.ops import clean_env, http_get
from tests.support.processes import ROOT, wait_for

# --- helpers -------------------------------------------------------------------------------


def is_dead(process: psutil.Process) -> bool:
    """Gone, or a zombie waiting for its parent."""
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# --- predictq up ---------------------------------------------------------------------------


class UpRun:
    """`predictq up ...` in its own session, its stdout read line by line on a thread."""

    def __init__(self, args: list[str], stderr_path: Path, **extra_env: str) -> None:
        self.flower_port = free_port()
        env = clean_env(PREDICTQ_FLOWER_PORT=str(self.flower_port), **extra_env)
        # Unless a test configures one, `up` starts an embedded Redis.
        assert "PREDICTQ_BROKER_URL" not in env or "PREDICTQ_BROKER_URL" in extra_env
        self.stderr_path = stderr_path
        with open(stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "predictq_ops.cli", "up", *args],
                env=env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                start_new_session=True,
            )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        assert self.process.stdout is not None
        threading.Thread(target=self._read, args=(self.process.stdout,), daemon=True).start()
        self.descendants: list[psutil.Process] = []

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def output(self) -> str:
        return "\n".join(self.lines) + "\n--- stderr:\n" + self.stderr_path.read_text()[-3000:]

    def read_until(self, marker: str, timeout_s: float) -> str:
        """Collect stdout lines up to (and including) the first containing ``marker``."""
        give_up = time.monotonic() + timeout_s
        while True:
            remaining = give_up - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {marker!r} within {timeout_s:.0f}s:\n{self.output()}")
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"`up` ended before printing {marker!r}:\n{self.output()}")
            self.lines.append(line)
            if marker in line:
                return line

    def read_rest(self) -> None:
        """Stdout up to its end (call once the process exited)."""
        while (line := self._queue.get(timeout=30)) is not None:
            self.lines.append(line)

    def collect_descendants(self) -> dict[str, psutil.Process]:
        """The supervised processes, by role: redis, worker, flower."""
        self.descendants = psutil.Process(self.process.pid).children(recursive=True)
        roles: dict[str, psutil.Process] = {}
        for p in self.descendants:
            try:
                argv, name = p.cmdline(), p.name()
            except psutil.NoSuchProcess:  # exited since (zombies included): not running
                continue
            if name == "redis-server":  # it rewrites its argv to "ADDR:PORT"
                roles["redis"] = p
            elif "celery" in argv and "worker" in argv:
                roles["worker"] = p
            elif "celery" in argv and "flower" in argv:
                roles["flower"] = p
        return roles

    def printed(self, pattern: str) -> str:
        """The first group of ``pattern`` in the first stdout line it matches."""
        for line in self.lines:
            if match := re.search(pattern, line):
                return match.group(1)
        raise AssertionError(f"no line matches {pattern!r}:\n{self.output()}")

    def cleanup(self) -> None:
        """Whatever the test's outcome: nothing it started survives it."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)
        for p in self.descendants:
            if not is_dead(p):
                p.kill()
        if self.process.stdout is not None:
            self.process.stdout.close()
        # `up` keeps its work directory (logs, demo model, Redis data) for the user.
        for line in self.lines:
            if line.startswith("logs:") and "predictq-up-" in line:
                shutil.rmtree(line.split(":", 1)[1].strip(), ignore_errors=True)


def accuracy_of(run: UpRun) -> float:
    line = next(line for line in run.lines if "accuracy" in line)
    match = re.search(r"accuracy .*?(\d+(?:\.\d+)?)%", line)
    assert match, line
    return float(match.group(1))


def assert_serves_a_job_of_our_own(run: UpRun) -> None:
    """Predict held-out digits through the broker and result backend `up` printed."""
    broker_url = run.printed(r"^redis: +embedded .* on (redis://\S+/0) ")
    workdir = run.printed(r"^logs: +(\S+)$")
    with np.load(Path(workdir, "demo", HOLDOUT_FILE)) as data:
        x, y = data["x"][:50], data["y"][:50]
    with PredictionClient(
        broker_url=broker_url, result_backend=broker_url[: -len("/0")] + "/1"
    ) as client:
        probs = client.predict(x, timeout=60)
    assert probs.shape == (50, 10)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    assert (probs.argmax(axis=1) == y).mean() >= 0.8


@pytest.mark.timeout(480)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_up_demo_serves_until_its_process_group_is_signalled_then_stops_every_process(
    signum: signal.Signals, tmp_path: Path
) -> None:
    run = UpRun(["--demo"], tmp_path / "up.stderr")
    try:
        run.read_until("predictq is up", timeout_s=240)
        assert accuracy_of(run) >= 90.0, run.output()
        flower_lines = [line for line in run.lines if line.startswith("flower: ")]
        assert flower_lines == [f"flower: http://127.0.0.1:{run.flower_port}"], run.output()
        status, body = http_get(f"http://127.0.0.1:{run.flower_port}/healthcheck")
        assert (status, body) == (200, "OK")
        assert_serves_a_job_of_our_own(run)

        roles = run.collect_descendants()
        assert set(roles) == {"redis", "worker", "flower"}, [p.cmdline() for p in run.descendants]
        assert all(not is_dead(p) for p in run.descendants)
        # Each child leads a session of its own, so a signal to the terminal's
        # process group reaches only the supervisor, which stops them in order.
        assert {name: os.getsid(p.pid) for name, p in roles.items()} == {
            name: p.pid for name, p in roles.items()
        }

        # Ctrl-C in a terminal: SIGINT to the whole foreground process group.
        os.killpg(run.process.pid, signum)
        assert run.process.wait(90) == 0
        run.read_rest()
        assert run.lines[-1] == "stopped.", run.output()
        alive = [(p.pid, p.name()) for p in run.descendants if not is_dead(p)]
        assert alive == []
    finally:
        run.cleanup()


@pytest.mark.timeout(300)
def test_up_leaves_no_process_behind_when_its_supervisor_is_killed(
    mlp_path: str, tmp_path: Path
) -> None:
    run = UpRun(["--model", mlp_path], tmp_path / "up.stderr")
    try:
        run.read_until("predictq is up", timeout_s=240)
        roles = run.collect_descendants()
        assert set(roles) == {"redis", "worker", "flower"}, [p.cmdline() for p in run.descendants]
        run.process.kill()  # SIGKILL: the supervisor stops nothing itself
        run.process.wait(30)

        def all_exited() -> bool:
            return all(is_dead(p) for p in run.descendants)

        # PDEATHSIG sends each child SIGTERM; the worker's warm shutdown takes a moment.
        wait_for(all_exited, 120, "every child of the killed supervisor to exit", run.output)
    finally:
        run.cleanup()


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"]
)
def test_a_signal_during_start_up_says_interrupted_exits_128_plus_it_and_stops_every_process(
    signum: signal.Signals, status: int, tmp_path: Path
) -> None:
    # A model import that never finishes: the worker can never become ready.
    (tmp_path / "never_ready.py").write_text("import threading\n\nthreading.Event().wait()\n")
    run = UpRun(
        ["--model", str(tmp_path / "never-loaded.keras"), "--no-flower"],
        tmp_path / "up.stderr",
        PREDICTQ_MODEL_IMPORTS="never_ready",
        PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}",
        PREDICTQ_SHUTDOWN_TIMEOUT_S="5",
    )
    try:
        run.read_until("redis:", timeout_s=60)

        def worker_started() -> bool:
            return "worker" in run.collect_descendants()

        wait_for(worker_started, 60, "`up` to start its worker", run.output)
        os.killpg(run.process.pid, signum)
        assert run.process.wait(90) == status, run.output()
        run.read_rest()
        assert run.lines[-1] == "stopped.", run.output()
        stderr = run.stderr_path.read_text()
        interrupted = f"predictq: interrupted by {signum.name} during start-up"
        assert stderr.strip().splitlines() == [interrupted], stderr
        alive = [(p.pid, p.name()) for p in run.descendants if not is_dead(p)]
        assert alive == []
    finally:
        run.cleanup()


@pytest.mark.timeout(480)
def test_up_demo_once_exits_by_itself_after_the_demo_leaving_nothing_behind(
    tmp_path: Path,
) -> None:
    run = UpRun(["--demo", "--once"], tmp_path / "up.stderr")
    try:
        # The worker line comes once every child runs (the demo follows it).
        run.read_until("loaded and warm", timeout_s=240)
        roles = run.collect_descendants()
        assert {"redis", "worker", "flower"} <= set(roles), [p.cmdline() for p in run.descendants]
        assert run.process.wait(240) == 0, run.output()
        run.read_rest()
        assert accuracy_of(run) >= 90.0, run.output()
        assert not any("predictq is up" in line for line in run.lines)
        assert run.lines[-1] == "stopped.", run.output()
        alive = [(p.pid, p.name()) for p in run.descendants if not is_dead(p)]
        assert alive == []
    finally:
        run.cleanup()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("answers", [True, False], ids=["reachable", "unreachable"])
def test_up_uses_a_configured_redis_that_answers_and_starts_its_own_otherwise(
    tmp_path: Path, mlp_path: str, answers: bool
) -> None:
    with RedisServer() as configured:
        url = configured.url(0) if answers else f"redis://127.0.0.1:{free_port()}/0"
        run = UpRun(
            ["--model", mlp_path, "--once", "--no-flower"],
            tmp_path / "up.stderr",
            PREDICTQ_BROKER_URL=url,
            PREDICTQ_RESULT_BACKEND=url[: -len("/0")] + "/1",
        )
        try:
            # With --once and no demo, `up` stops right after start-up: what ran
            # is read from what it printed, not from a process tree that is
            # already going away.
            run.read_until("loaded and warm", timeout_s=240)
            assert run.process.wait(120) == 0, run.output()
            run.read_rest()
            started = [int(run.printed(r"^worker: +pid (\d+),"))]
            if answers:
                assert run.printed(r"^redis: +using (\S+)$") == url
                assert not any(line.startswith("redis:  embedded") for line in run.lines)
            else:
                refused = run.printed(r"^redis: +(\S+) is not reachable; starting an embedded one")
                assert refused == url
                assert run.printed(r"^redis: +embedded .* on (redis://\S+/0) ") != url
                started.append(int(run.printed(r"^redis: +embedded .* \(pid (\d+)\)$")))
            assert [pid for pid in started if psutil.pid_exists(pid)] == []
        finally:
            run.cleanup()
