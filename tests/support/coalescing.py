"""Coalescing on demand: jobs submitted on threads of their own, made to share one message."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from producer import Job, PredictionClient
from producer.coalescer import Coalescer
from tests.support import models
from tests.support.processes import wait_for


def queued(coalescer: Coalescer[Any]) -> int:
    """How many jobs wait in the coalescer's queue (held or behind a publish)."""
    with coalescer._lock:
        return len(coalescer._queue)


class HeldPublish:
    """Holds a client's next publish until ``release()``: what is submitted meanwhile coalesces."""

    def __init__(self, client: PredictionClient) -> None:
        self._client = client
        self._send = client._coalescer._send
        self.holding = threading.Event()
        self._released = threading.Event()
        client._coalescer._send = self._held

    def _held(self, items: list[Any]) -> None:
        self._client._coalescer._send = self._send  # hold this one call only
        self.holding.set()
        assert self._released.wait(30)
        self._send(items)

    def release_when_queued(self, n: int, *, linger_s: float = 0.0) -> None:
        wait_for(lambda: queued(self._client._coalescer) >= n, 30, f"{n} jobs to queue")
        time.sleep(linger_s)  # lets a queued job's deadline pass: time itself, not an event
        self._released.set()


def submit_together(
    client: PredictionClient,
    calls: list[Callable[[], Job]],
    *,
    linger_s: float = 0.0,
    opener: Callable[[], Job] | None = None,
) -> tuple[Job, list[Job | BaseException]]:
    """An opener job (default: one sample for the default model), held in its publish;
    then ``calls`` on threads of their own, queued behind it, so that they travel in one
    message. Their jobs (or submit errors), in order."""
    held = HeldPublish(client)
    if opener is None:
        opener = functools.partial(client.submit, np.ones((1, models.FEATURES), np.float32))
    with ThreadPoolExecutor(len(calls) + 1) as pool:
        opened = pool.submit(opener)
        assert held.holding.wait(30)
        futures = [pool.submit(call) for call in calls]
        held.release_when_queued(len(calls), linger_s=linger_s)
        outcomes: list[Job | BaseException] = []
        for f in futures:
            error = f.exception(60)
            outcomes.append(error if error is not None else f.result())
        return opened.result(60), outcomes
