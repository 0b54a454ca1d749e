"""One thread and one pub/sub connection deliver the results of all of a producer's jobs.

Celery's own ``AsyncResult.get`` gives every waiting thread its own result
consumer (a pub/sub connection polled by that thread), which is what caps a
multi-threaded producer at a few hundred jobs per second. Here threads only
wait on ``concurrent.futures.Future`` objects; a single collector thread
subscribes to the result channels, decodes results and resolves the futures.

The Redis result backend stores a result with SET and PUBLISHes it on a channel
named after the same key, so:

* jobs whose task id starts with this client's own prefix need no subscription
  of their own: one PSUBSCRIBE to ``celery-task-meta-<prefix>*``, made when the
  collector connects, covers them all, so a job costs Redis no SUBSCRIBE and
  UNSUBSCRIBE pair and other producers' results never reach this one;
* for any other task id (``client.job(id)``), ``watch`` queues a SUBSCRIBE;
* once Redis confirms a subscription, a GET of the key catches a result that was
  stored before the subscription existed (the race every pub/sub client has);
* after a reconnect (Redis restart), every pending key is subscribed again and
  read again, so results stored during the outage are not missed;
* a slow sweep re-reads keys pending for longer than ``sweep_after_s``, a
  safety net that bounds the damage of any missed message to a second or so.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import redis

log = logging.getLogger(__name__)

RESULT_KEY_PREFIX = "celery-task-meta-"
#: Result states after which nothing changes any more (celery.states.READY_STATES).
FINAL_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED"})

Decoder = Callable[[bytes], dict[str, Any]]


class ResultCollector:
    """Resolves a future per task id when its result lands in the Redis backend."""

    def __init__(
        self,
        client: redis.Redis,
        decode: Decoder,
        *,
        own_prefix: str,
        poll_s: float = 0.005,
        sweep_after_s: float = 1.0,
    ) -> None:
        self._client = client
        self._own = RESULT_KEY_PREFIX + own_prefix
        self._decode = decode
        self._poll_s = poll_s
        self._sweep_after_s = sweep_after_s
        # _lock guards the three collections below. Invariant: a key is in
        # _pending from watch() until its future is resolved or forgotten, and
        # is then queued for UNSUBSCRIBE exactly once.
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[Future[dict[str, Any]], float]] = {}
        self._subscribe: list[str] = []
        self._unsubscribe: list[str] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="predictq-results", daemon=True)
        self._thread.start()

    def watch(self, task_id: str) -> Future[dict[str, Any]]:
        """A future for the decoded result meta of ``task_id``; call before publishing."""
        future: Future[dict[str, Any]] = Future()
        key = RESULT_KEY_PREFIX + task_id
        with self._lock:
            self._pending[key] = (future, time.monotonic())
            if not key.startswith(self._own):
                self._subscribe.append(key)
        return future

    def forget(self, task_id: str) -> None:
        """Stop waiting for ``task_id`` (its future is cancelled if unresolved)."""
        future = self._take(task_id)
        if future is not None:
            future.cancel()

    def fail(self, task_id: str, error: BaseException) -> None:
        """Stop waiting for ``task_id``, whose future gets ``error`` (its publish failed).

        Like ``forget``, a no-op if its result already arrived.
        """
        future = self._take(task_id)
        if future is not None and not future.done():
            future.set_exception(error)

    def _take(self, task_id: str) -> Future[dict[str, Any]] | None:
        """Take ``task_id`` out of ``_pending``: the caller now completes its future, and
        nobody else does (the collector resolves only what it takes out itself)."""
        key = RESULT_KEY_PREFIX + task_id
        with self._lock:
            entry = self._pending.pop(key, None)
            if entry is not None and not key.startswith(self._own):
                self._unsubscribe.append(key)
        return None if entry is None else entry[0]

    def pending(self) -> int:
        """How many results are awaited."""
        with self._lock:
            return len(self._pending)

    def close(self) -> None:
        """Stop the collector; unresolved futures are cancelled."""
        self._closed.set()
        self._thread.join(5)
        with self._lock:
            entries, self._pending = list(self._pending.values()), {}
        for future, _ in entries:
            future.cancel()

    # --- collector thread ------------------------------------------------------

    def _run(self) -> None:
        backoff_s = 0.05
        while not self._closed.is_set():
            # redis-py types pubsub() from 8.2 on; before, an untyped call.
            pubsub = self._client.pubsub(ignore_subscribe_messages=False)  # type: ignore[no-untyped-call,unused-ignore]
            try:
                with self._lock:
                    # (Re)subscribe everything pending: after a reconnect the new
                    # connection has no subscriptions.
                    self._subscribe = [k for k in self._pending if not k.startswith(self._own)]
                    self._unsubscribe = []
                pubsub.psubscribe(self._own + "*")
                self._serve(pubsub)
            except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
                log.warning("result channel lost (%s); reconnecting in %.2fs", e, backoff_s)
                self._closed.wait(backoff_s)
                backoff_s = min(backoff_s * 2, 1.0)
            except Exception:
                log.exception("result collector error; restarting it")
                self._closed.wait(backoff_s)
            else:
                backoff_s = 0.05
            finally:
                try:
                    pubsub.close()
                except Exception:
                    log.debug("closing the old pub/sub connection failed", exc_info=True)

    def _serve(self, pubsub: Any) -> None:
        last_sweep = time.monotonic()
        while not self._closed.is_set():
            with self._lock:
                subscribe, self._subscribe = self._subscribe, []
                unsubscribe, self._unsubscribe = self._unsubscribe, []
            if subscribe:
                pubsub.subscribe(*subscribe)
            if unsubscribe:
                pubsub.unsubscribe(*unsubscribe)
            confirmed: list[str] = []
            # Block longer while nothing is awaited: a new job of this client
            # needs nothing from this loop, and a foreign watch waits at most
            # 50 ms for its SUBSCRIBE.
            idle = not self._pending
            message = pubsub.get_message(timeout=0.05 if idle else self._poll_s)
            while message is not None:
                self._handle(message, confirmed)
                message = pubsub.get_message(timeout=0)
            if confirmed:
                self._fetch(confirmed)
            now = time.monotonic()
            if now - last_sweep >= self._sweep_after_s:
                last_sweep = now
                self._sweep(now)

    def _handle(self, message: dict[str, Any], confirmed: list[str]) -> None:
        kind = message["type"]
        channel = message["channel"]
        key = channel.decode() if isinstance(channel, bytes) else str(channel)
        if kind == "subscribe":
            confirmed.append(key)
        elif kind == "psubscribe":
            # Results stored while this connection did not exist yet.
            with self._lock:
                confirmed.extend(k for k in self._pending if k.startswith(self._own))
        elif kind in ("message", "pmessage"):
            self._resolve(key, message["data"])

    def _fetch(self, keys: list[str]) -> None:
        """GET keys whose result may predate the subscription."""
        with self._lock:
            keys = [k for k in keys if k in self._pending]
        for start in range(0, len(keys), 256):
            part = keys[start : start + 256]
            for key, value in zip(part, self._client.mget(part), strict=True):
                if value is not None:
                    self._resolve(key, value)

    def _sweep(self, now: float) -> None:
        with self._lock:
            stale = [k for k, (_, t) in self._pending.items() if now - t > self._sweep_after_s]
        if stale:
            self._fetch(stale)

    def _resolve(self, key: str, data: bytes | str) -> None:
        try:
            meta = self._decode(data if isinstance(data, bytes) else data.encode())
        except Exception as e:
            meta = {"status": "FAILURE", "result": e}
        if meta.get("status") not in FINAL_STATES:
            return  # STARTED/RETRY: the final result is still to come
        with self._lock:
            entry = self._pending.pop(key, None)
            if entry is None:
                return  # a duplicate (redelivered job) or a forgotten job
            if not key.startswith(self._own):
                self._unsubscribe.append(key)
        future = entry[0]
        if not future.cancelled():
            future.set_result(meta)
