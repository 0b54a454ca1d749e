"""A Redis master, a replica and three sentinels on loopback ports, for the failover tests.

All five are the same ``redis-server`` binary (``--sentinel`` for the
sentinels). Sentinel timings are short so a failover takes seconds:
``down-after-milliseconds`` is how long a silent master stays "up", and
failovers are not retried before ``failover-timeout``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from predictq_ops.redis_server import RedisServer, TlsFiles, find_binary, free_port
from tests.support.processes import wait_for

MASTER_NAME = "pqmaster"
DOWN_AFTER_MS = 600
FAILOVER_TIMEOUT_MS = 3000


class SentinelProcess:
    """One ``redis-server --sentinel`` on 127.0.0.1 monitoring ``MASTER_NAME``."""

    def __init__(
        self,
        binary: str,
        master_port: int,
        data_dir: str,
        *,
        quorum: int = 2,
        tls: TlsFiles | None = None,
    ) -> None:
        self.port = free_port()
        self.tls = tls
        self.dir = os.path.join(data_dir, f"sentinel-{self.port}")
        os.makedirs(self.dir)
        self.conf = os.path.join(self.dir, "sentinel.conf")
        listen = [f"port {self.port}"]
        if tls is not None:
            # TLS only, to clients and (tls-replication) to the master it monitors.
            listen = [
                "port 0",
                f"tls-port {self.port}",
                f"tls-cert-file {tls.cert}",
                f"tls-key-file {tls.key}",
                f"tls-ca-cert-file {tls.ca_cert}",
                "tls-auth-clients no",
                "tls-replication yes",
            ]
        # Sentinel rewrites its config file as it learns; it must be writable.
        Path(self.conf).write_text(
            "\n".join(
                [
                    *listen,
                    "bind 127.0.0.1",
                    f"dir {self.dir}",
                    f"logfile {os.path.join(self.dir, 'sentinel.log')}",
                    f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} {quorum}",
                    f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}",
                    f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}",
                    f"sentinel parallel-syncs {MASTER_NAME} 1",
                    "",
                ]
            )
        )
        self.process = subprocess.Popen(
            [binary, self.conf, "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def client(self) -> redis.Redis:
        if self.tls is not None:
            return redis.Redis(
                host="127.0.0.1",
                port=self.port,
                socket_timeout=5,
                ssl=True,
                ssl_ca_certs=self.tls.ca_cert,
            )
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def master_address(self) -> tuple[str, int] | None:
        """The master this sentinel reports, or None while it cannot answer."""
        try:
            with self.client() as c:
                host, port = c.sentinel_get_master_addr_by_name(MASTER_NAME)
                return str(host), int(port)
        except (redis.RedisError, TypeError, ValueError):
            return None

    def master_state(self) -> dict[str, Any]:
        """SENTINEL MASTER for ``MASTER_NAME``, or {} while this sentinel cannot answer."""
        try:
            with self.client() as c:
                return dict(c.sentinel_master(MASTER_NAME))
        except redis.RedisError:
            return {}

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = Path(self.dir, "sentinel.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return " | ".join(text.strip().splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class SentinelCluster:
    """Master + replica + three sentinels; ``url(db)`` is the Sentinel URL clients use."""

    def __init__(self) -> None:
        self.binary = find_binary()
        self.data_dir = tempfile.mkdtemp(prefix="predictq-sentinel-")
        first = RedisServer(binary=self.binary, data_dir=self._node_dir("a")).start()
        second = RedisServer(
            binary=self.binary,
            data_dir=self._node_dir("b"),
            extra_args=("--replicaof", "127.0.0.1", str(first.port)),
        ).start()
        #: Data nodes by port; which one is the master changes with failovers.
        self.nodes = {first.port: first, second.port: second}
        self.sentinels = [SentinelProcess(self.binary, first.port, self.data_dir) for _ in range(3)]
        self.wait_synced_replica()
        # Every sentinel knows the others and the replica: a failover can be authorised.
        wait_for(self._sentinels_see_each_other, 30, "the sentinels to discover each other")

    def _node_dir(self, name: str) -> str:
        path = os.path.join(self.data_dir, name)
        os.makedirs(path)
        return path

    def url(self, db: int) -> str:
        """``sentinel://127.0.0.1:p1/db;sentinel://127.0.0.1:p2/db;...``"""
        return ";".join(f"sentinel://127.0.0.1:{s.port}/{db}" for s in self.sentinels)

    def master_port(self) -> int | None:
        """The master's port as a majority of sentinels report it."""
        ports = [a[1] for s in self.sentinels if (a := s.master_address()) is not None]
        for port in set(ports):
            if ports.count(port) >= 2:
                return port
        return None

    def master(self) -> RedisServer:
        port = self.master_port()
        assert port is not None, "no master agreed on by the sentinels"
        return self.nodes[port]

    def replica(self) -> RedisServer:
        port = self.master_port()
        return next(n for p, n in self.nodes.items() if p != port)

    def _sentinels_see_each_other(self) -> bool:
        for s in self.sentinels:
            try:
                with s.client() as c:
                    state = c.sentinel_master(MASTER_NAME)
            except redis.RedisError:
                return False
            if int(state["num-other-sentinels"]) < 2 or int(state["num-slaves"]) < 1:
                return False
        return True

    def wait_synced_replica(self, timeout_s: float = 60) -> None:
        """Block until the replica has finished its sync with the current master."""

        def synced() -> bool:
            try:
                with self.replica().client() as c:
                    info = c.info("replication")
            except (redis.RedisError, AssertionError):
                return False
            return info.get("role") == "slave" and info.get("master_link_status") == "up"

        wait_for(synced, timeout_s, "a replica in sync with the master", self.logs)

    def wait_new_master(self, old_port: int, timeout_s: float = 60) -> float:
        """Block until a majority of sentinels names a master other than ``old_port``."""
        started = time.monotonic()
        wait_for(
            lambda: self.master_port() not in (None, old_port),
            timeout_s,
            "the sentinels to promote the replica",
            self.logs,
        )
        return time.monotonic() - started

    def rejoin_as_replica(self, node: RedisServer) -> None:
        """Start a stopped data node again as a replica of the current master; wait for its sync."""
        master = self.master()
        self.nodes[node.port] = RedisServer(
            port=node.port,
            binary=self.binary,
            data_dir=node.data_dir,
            extra_args=("--replicaof", master.host, str(master.port)),
        ).start()
        self.wait_synced_replica()

    def logs(self) -> str:
        return " || ".join(s.log_tail() for s in self.sentinels)

    def close(self) -> None:
        for s in self.sentinels:
            s.stop()
        for node in self.nodes.values():
            node.close()
        shutil.rmtree(self.data_dir, ignore_errors=True)
