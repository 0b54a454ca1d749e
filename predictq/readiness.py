"""Readiness records: each worker process says, in Redis, that its model is loaded and warm.

A record is a JSON value under ``predictq:ready:<nodename>:<pid>`` with a TTL
that the worker refreshes on a heartbeat, so a killed worker's record expires by
itself. ``predictq health`` (the docker healthcheck) reads these records; tests
read the ``loads`` counter to prove a process loaded its model exactly once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
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
        self._lock = threading.Lock()  # guards _fields: updated by the model watcher
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="predictq-readiness", daemon=True)

    def publish(self) -> None:
        """Write the record now and keep it alive on a heartbeat."""
        self._write()
        self._thread.start()

    def update(self, fields: dict[str, Any]) -> None:
        """Change some fields (the models a worker serves) and write the record now."""
        with self._lock:
            self._fields = {**self._fields, **fields}
        try:
            self._write()
        except redis.RedisError as e:
            log.warning("readiness update failed (the next heartbeat retries): %s", e)

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
        with self._lock:
            value = json.dumps(self._fields)
        self._client.set(self._key, value, px=self._ttl_ms)

    def _beat(self) -> None:
        interval_s = self._ttl_ms / 3000
        while not self._stop.wait(interval_s):
            try:
                self._write()
            except redis.RedisError as e:
                # Redis may be restarting; the record reappears on the next beat.
                log.warning("readiness heartbeat failed: %s", e)


CONSUMING_PREFIX = KEY_PREFIX + "consuming:"
#: Connection losses within a minute past which a consumer counts as flapping.
MAX_LOSSES_PER_MINUTE = 3


def consuming_key(nodename: str) -> str:
    """The key that says worker ``nodename``'s consumer is taking jobs."""
    return CONSUMING_PREFIX + nodename


def serving_records(client: redis.Redis, *, hostname: str | None = None) -> list[dict[str, Any]]:
    """Readiness records of processes whose worker is also consuming jobs right now.

    A warm model is not enough: a worker whose broker connection is down, or
    that reconnects in a loop, serves nothing.
    """
    records = read_records(client, hostname=hostname)
    nodes = {r["nodename"] for r in records}
    consuming = {n for n in nodes if client.exists(consuming_key(n))}
    return [r for r in records if r["nodename"] in consuming]


class ConsumingBeacon:
    """Keeps ``predictq:consuming:<nodename>`` alive while the consumer's event loop runs.

    The event loop calls ``tick`` from a timer (no I/O there); this object's own
    thread writes the key while ticks are recent and connection losses rare,
    and deletes it otherwise. A wedged loop stops ticking; a reconnect loop
    adds losses: either way the key goes, and ``predictq health`` says so.
    """

    def __init__(self, client: redis.Redis, nodename: str, ttl_s: float, tick_s: float) -> None:
        self._client = client
        self._key = consuming_key(nodename)
        self._ttl_ms = int(ttl_s * 1000)
        self._tick_s = tick_s
        self._last_tick: float | None = None
        self._losses: list[float] = []
        self._lock = threading.Lock()  # guards _last_tick and _losses
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="predictq-consuming", daemon=True)
        self._thread.start()

    def tick(self) -> None:
        """The event loop is running (called from the loop, cheap)."""
        with self._lock:
            first = self._last_tick is None
            self._last_tick = time.monotonic()
        if first:
            self._wake.set()

    def lost(self) -> None:
        """The broker connection was lost: not consuming until the next tick."""
        with self._lock:
            self._last_tick = None
            now = time.monotonic()
            self._losses = [t for t in self._losses if now - t < 60] + [now]
        self._wake.set()

    def consuming(self) -> bool:
        """Whether the consumer counts as serving now."""
        with self._lock:
            now = time.monotonic()
            recent = [t for t in self._losses if now - t < 60]
            return (
                self._last_tick is not None
                and now - self._last_tick < 3 * self._tick_s + 1
                and len(recent) < MAX_LOSSES_PER_MINUTE
            )

    def close(self) -> None:
        """Stop and delete the key (the worker is going away)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(5)
        with contextlib.suppress(redis.RedisError):
            self._client.delete(self._key)

    def _beat(self) -> None:
        interval_s = min(self._ttl_ms / 3000, 2 * self._tick_s)
        while not self._stop.is_set():
            try:
                if self.consuming():
                    self._client.set(self._key, "1", px=self._ttl_ms)
                else:
                    self._client.delete(self._key)
            except redis.RedisError as e:
                log.warning("consumer heartbeat failed: %s", e)
            self._wake.wait(interval_s)
            self._wake.clear()
