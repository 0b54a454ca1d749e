"""Readiness records: each worker process says, in Redis, that its model is loaded and warm.

A record is a JSON value under ``predictq:ready:<nodename>:<pid>`` with a TTL
that the worker refreshes on a heartbeat, so a killed worker's record expires by
itself. ``predictq health`` (the docker healthcheck) reads these records; tests
read the ``loads`` counter to prove a process loaded its model exactly once.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from typing import Any

import redis

from predictq.redis_client import KEY_PREFIX

log = logging.getLogger(__name__)

READY_PREFIX = KEY_PREFIX + "ready:"


def ready_key(nodename: str, pid: int) -> str:
    """The record key of one worker process."""
    return f"{READY_PREFIX}{nodename}:{pid}"


def read_records(client: redis.Redis, *, hostname: str | None = None) -> list[dict[str, Any]]:
    """All live readiness records, optionally only those of workers on ``hostname``."""
    records = []
    for key in client.scan_iter(match=READY_PREFIX + "*", count=500):
        raw = client.get(key)
        if raw is None:
            continue  # expired between SCAN and GET
        record: dict[str, Any] = json.loads(raw)
        if hostname is None or record.get("hostname") == hostname:
            records.append(record)
    return records


class ReadinessRecord:
    """Publishes and refreshes one process's record until ``close``."""

    def __init__(
        self, client: redis.Redis, nodename: str, pid: int, ttl_s: float, fields: dict[str, Any]
    ) -> None:
        self._client = client
        self._key = ready_key(nodename, pid)
        self._ttl_ms = int(ttl_s * 1000)
        self._fields = {
            "nodename": nodename,
            "hostname": socket.gethostname(),
            "pid": pid,
            **fields,
        }
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="predictq-readiness", daemon=True)

    def publish(self) -> None:
        """Write the record now and keep it alive on a heartbeat."""
        self._write()
        self._thread.start()

    def close(self) -> None:
        """Stop the heartbeat and delete the record (the worker is going away)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        try:
            self._client.delete(self._key)
        except redis.RedisError:
            log.warning("could not delete readiness record %s; it expires by itself", self._key)

    def _write(self) -> None:
        self._client.set(self._key, json.dumps(self._fields), px=self._ttl_ms)

    def _beat(self) -> None:
        interval_s = self._ttl_ms / 3000
        while not self._stop.wait(interval_s):
            try:
                self._write()
            except redis.RedisError as e:
                # Redis may be restarting; the record reappears on the next beat.
                log.warning("readiness heartbeat failed: %s", e)
