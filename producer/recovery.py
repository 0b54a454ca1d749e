"""Republish jobs the broker lost: neither queued, nor reserved, nor finished.

kombu's Redis transport pops a message with BRPOP and only then records it as
unacknowledged; a worker killed between the two (SIGKILL, OOM killer, a native
crash) loses that message for good, and late acknowledgement cannot help. The
producer still holds every unfinished job's input, so it can repair that:

* jobs older than ``lost_after_s`` (the visibility timeout: by then kombu has
  redelivered whatever it knew about) are looked up with one Lua script that
  scans the queue lists and the unacknowledged hash atomically, matching the
  task id near the end of each message (kombu's ``correlation_id`` property);
* a job found nowhere in two consecutive sweeps, and with no stored result, is
  published again under the same task id.

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

log = logging.getLogger(__name__)

# KEYS: the queue lists, then kombu's unacked hash. ARGV: task ids.
# Returns the ids found in none of them. Scans in small chunks so that large
# messages are never all copied into Lua memory at once.
_FIND_MISSING = """
local wanted, left = {}, #ARGV
for _, id in ipairs(ARGV) do wanted[id] = true end
local function check(item)
  local tail = string.sub(item, math.max(1, #item - 2048))
  local id = string.match(tail, '"correlation_id": "([^"]+)"')
  if id and wanted[id] then wanted[id] = nil; left = left - 1 end
end
for _, key in ipairs(KEYS) do
  if left == 0 then break end
  local kind = redis.call('TYPE', key)['ok']
  if kind == 'list' then
    local n, i = redis.call('LLEN', key), 0
    while i < n and left > 0 do
      for _, item in ipairs(redis.call('LRANGE', key, i, i + 7)) do check(item) end
      i = i + 8
    end
  elseif kind == 'hash' then
    local cursor = '0'
    repeat
      local res = redis.call('HSCAN', key, cursor, 'COUNT', 8)
      cursor = res[1]
      for j = 2, #res[2], 2 do check(res[2][j]) end
    until cursor == '0' or left == 0
  end
end
local missing = {}
for id, _ in pairs(wanted) do table.insert(missing, id) end
return missing
"""

#: kombu's Redis transport keeps reserved messages in this hash (``unacked_key``).
UNACKED_KEY = "unacked"


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
        self._broker = broker
        self._keys = [*queue_keys, UNACKED_KEY]
        self._lost_after_s = lost_after_s
        self._interval_s = max(0.5, min(60.0, lost_after_s / 4))
        self._results_exist = results_exist
        self._republish = republish
        self._script = broker.register_script(_FIND_MISSING)
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
        missing: set[str] = set()
        for start in range(0, len(old), 500):
            found = self._script(keys=self._keys, args=old[start : start + 500])
            missing.update(m.decode() if isinstance(m, bytes) else str(m) for m in found)
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
