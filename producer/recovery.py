"""Republish jobs the broker lost: neither queued, nor reserved, nor finished.

kombu's Redis transport pops a message with BRPOP and only then records it as
unacknowledged; a worker killed between the two (SIGKILL, OOM killer, a native
crash) loses that message for good, and late acknowledgement cannot help. The
producer still holds every unfinished job's input, so it can repair that:

* jobs older than ``lost_after_s`` (the visibility timeout: by then kombu has
  redelivered whatever it knew about) are looked for in the unacknowledged
  hash, the queue lists, and the hash again, read in chunks of bounded size
  (predictq/kombu_layout.py ``TaskIdReader``) so that a deep queue never blocks
  Redis for long;
* a job found nowhere in two consecutive sweeps, and with no stored result, is
  published again under the same task id.

Sweeps look for job ids, not messages: a job that travels in a coalesced
message (predictq/carrier.py) is found by the ids the message lists in its
``predictq_jobs`` header, and a lost one is published again in a message of
its own (the client's ``republish``), so a job that finished in the meantime
is never run for its neighbours' sake.

Running a prediction twice is harmless (it is a pure function of its input, and
the result key is the task id), so the rare false alarm costs one duplicate
computation, never a wrong answer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

import redis

from predictq.kombu_layout import UNACKED_KEY, TaskIdReader

log = logging.getLogger(__name__)


class LostJobRecovery:
    """A background sweep that republishes lost jobs through ``republish``."""

    def __init__(
        self,
        broker: redis.Redis,
        queue_keys: Sequence[str],
        *,
        lost_after_s: float,
        results_exist: Callable[[list[str]], list[bool]],
        republish: Callable[[str], None],
    ) -> None:
        self._queue_keys = list(queue_keys)
        self._lost_after_s = lost_after_s
        self._interval_s = max(0.5, min(60.0, lost_after_s / 4))
        self._results_exist = results_exist
        self._republish = republish
        self._reader = TaskIdReader(broker)
        # _lock guards _jobs. Invariant: a task id is in _jobs from its first
        # publish until forget(); `suspect` holds ids missing in the last sweep.
        self._lock = threading.Lock()
        self._jobs: dict[str, float] = {}
        self._suspect: set[str] = set()
        self.republished = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="predictq-recovery", daemon=True)
        self._thread.start()

    def track(self, task_id: str) -> None:
        """A job was published (again): watch it from now."""
        with self._lock:
            self._jobs[task_id] = time.monotonic()

    def forget(self, task_id: str) -> None:
        """The job is finished (or abandoned): stop watching it."""
        with self._lock:
            self._jobs.pop(task_id, None)
            self._suspect.discard(task_id)

    def close(self) -> None:
        """Stop the sweep."""
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.sweep()
            except (redis.RedisError, OSError) as e:
                log.warning("lost-job sweep skipped: %s", e)

    def sweep(self) -> list[str]:
        """One pass; returns the task ids published again."""
        now = time.monotonic()
        with self._lock:
            old = [t for t, at in self._jobs.items() if now - at > self._lost_after_s]
        if not old:
            return []
        missing = self._missing(set(old))
        with self._lock:
            confirmed = [t for t in missing if t in self._suspect and t in self._jobs]
            self._suspect = missing
        if not confirmed:
            return []
        done = self._results_exist(confirmed)
        lost = [t for t, finished in zip(confirmed, done, strict=True) if not finished]
        for task_id in lost:
            log.warning(
                "job %s was lost by the broker (neither queued, reserved nor finished "
                "after %.0fs); publishing it again",
                task_id,
                self._lost_after_s,
            )
            self._republish(task_id)
            self.republished += 1
            self.track(task_id)
        return lost

    def _missing(self, wanted: set[str]) -> set[str]:
        """The ids in ``wanted`` found neither reserved nor queued.

        Why two sweeps: no read can see a message while a worker holds it
        between BRPOP and recording it as reserved (microseconds), so one
        sweep may report a job that is merely moving. A job that is really
        lost is missing in every sweep; a moving one is found again in the
        next sweep, ``interval_s`` later.

        Why chunked reads are safe with that: they are not atomic together,
        so a message may also move while the sweep reads. A message that stays
        in one place is always found (``TaskIdReader.ids``), and each single
        move is caught by the order of reads: a reservation (list -> hash)
        before the lists were read past it leaves it in the hash for the last
        read; a restore (hash -> list, either end) after the first hash read
        passed it leaves it in the list, read whole, or it was in the hash
        when that read passed it. So a chunked sweep misses only what an
        atomic one would (a message in a worker's hands) or a message moving
        twice within one sweep, and a job is declared lost only if that
        happens in two consecutive sweeps; even then it runs twice, never
        wrongly. Reading the (small) hash twice is what makes one move safe.
        """
        left = set(wanted)
        for key in [UNACKED_KEY, *self._queue_keys, UNACKED_KEY]:
            for ids in self._reader.ids(key):
                left.difference_update(ids)
                if not left:
                    return left
        return left
