"""When waiting for more jobs is worth it: the batcher's arrival-rate policy.

On a CPU, one device call costs about the same for 1 or 8 samples, so under
load a short wait for the next job turns N calls into one. At idle the same
wait is pure latency. This module decides, from what the batcher saw, how long
the device thread should wait before running the batch it holds. It is not
thread-safe by itself: the batcher calls it under its own lock.
"""

from __future__ import annotations


def wait_for_more_s(
    incoming: int, gap_s: float | None, since_last_s: float, remaining_s: float
) -> float:
    """How long to wait for another job before running the batch (0: run now).

    Wait while a job is announced. Otherwise wait only for the next job of a
    steady stream: not when it is expected after the ``batch_wait_ms`` budget
    (``remaining_s``) runs out, and no longer once it is overdue by a whole
    average gap (the stream stopped).
    """
    if remaining_s <= 0:
        return 0.0
    if incoming > 0:
        return remaining_s
    if gap_s is None or gap_s - since_last_s > remaining_s:
        return 0.0
    return max(0.0, min(remaining_s, 2 * gap_s - since_last_s))


class ArrivalTracker:
    """Moving averages of inter-arrival gaps and of whether waiting paid off."""

    #: Weight of the newest observation in both moving averages.
    ALPHA = 0.2
    #: Below this share of successful waits, the arrival rate is not trusted...
    TRUST = 0.3
    #: ...except on every PROBE-th batch, to notice when waiting pays again.
    PROBE = 16

    def __init__(self) -> None:
        self._last: float | None = None
        self._gap_s: float | None = None
        self._payoff = 1.0
        self._batches = 0
        self._trusted = True

    def arrived(self, now: float) -> None:
        """A job was submitted at ``now`` (monotonic seconds)."""
        if self._last is not None:
            gap = now - self._last
            a = self.ALPHA
            self._gap_s = gap if self._gap_s is None else (1 - a) * self._gap_s + a * gap
        self._last = now

    def new_batch(self) -> None:
        """A batch is being filled: decide whether the arrival rate is trusted for it.

        A lone client that waits for each result makes a steady stream that never
        brings a second job while one is held: waiting on it only adds latency,
        so the rate is trusted only while waiting has been paying off.
        """
        self._batches += 1
        self._trusted = self._payoff >= self.TRUST or self._batches % self.PROBE == 0

    def wait_s(self, incoming: int, now: float, remaining_s: float) -> float:
        """How long to wait now (see ``wait_for_more_s``)."""
        since_last = now - (self._last if self._last is not None else now)
        gap = self._gap_s if self._trusted else None
        return wait_for_more_s(incoming, gap, since_last, remaining_s)

    def waited(self, brought_a_job: bool) -> None:
        """Record whether a wait on the arrival rate alone brought a job."""
        a = self.ALPHA
        self._payoff = (1 - a) * self._payoff + a * (1.0 if brought_a_job else 0.0)
