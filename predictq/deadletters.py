"""The dead-letter list: refused broker messages, kept for an operator to inspect.

A worker that refuses a malformed message (``workers.guard``) pushes an entry
here *before* acknowledging the message, so a message is either still in the
broker or in this list, never nowhere. The list lives in the broker's Redis
under ``predictq:dead-letters``, newest first, and is trimmed to
``PREDICTQ_DEAD_LETTER_MAX`` entries; each entry keeps at most
``PREDICTQ_DEAD_LETTER_MAX_BYTES`` of the message (``truncated`` says when
less than the whole message was kept; such an entry cannot be requeued).

An entry is JSON::

    {"entry_id": "...", "at": "2026-12-03T10:00:00+00:00", "reason": "headers",
     "detail": "message refused: ...", "task_id": "..." | null, "queue": "predictq",
     "worker": "w1@host", "pid": 123, "size_chars": 512, "truncated": false,
     "message": "<the kombu envelope as it was in the queue, JSON text>"}
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import redis

from predictq.errors import PredictqError
from predictq.kombu_layout import list_key
from predictq.redis_client import KEY_PREFIX

DEAD_LETTER_KEY: Final = KEY_PREFIX + "dead-letters"


class DeadLetterError(PredictqError):
    """A dead-letter entry does not exist or cannot be requeued."""


@dataclass(frozen=True)
class DeadLetter:
    """One refused message as stored in the list."""

    entry_id: str
    at: str
    reason: str
    detail: str
    task_id: str | None
    queue: str
    worker: str
    pid: int
    size_chars: int
    truncated: bool
    message: str

    @classmethod
    def from_json(cls, raw: bytes | str) -> DeadLetter:
        """Parse a stored entry."""
        return cls(**json.loads(raw))

    def to_json(self) -> str:
        """The stored form of the entry."""
        return json.dumps(self.__dict__, separators=(",", ":"))


class DeadLetters:
    """The bounded dead-letter list in the broker's Redis."""

    def __init__(self, client: redis.Redis, *, max_entries: int, max_chars: int) -> None:
        self._client = client
        self._max_entries = max_entries
        self._max_chars = max_chars

    def add(
        self,
        *,
        message: str,
        reason: str,
        detail: str,
        task_id: str | None,
        queue: str,
        worker: str,
        truncated: bool = False,
        size_chars: int | None = None,
    ) -> DeadLetter:
        """Keep a refused message (raises redis errors: the caller must not ack then)."""
        size = len(message) if size_chars is None else size_chars
        entry = DeadLetter(
            entry_id=uuid.uuid4().hex,
            at=datetime.now(UTC).isoformat(),
            reason=reason,
            detail=detail,
            task_id=task_id,
            queue=queue,
            worker=worker,
            pid=os.getpid(),
            size_chars=size,
            truncated=truncated or len(message) > self._max_chars or size > len(message),
            message=message[: self._max_chars],
        )
        pipe = self._client.pipeline()
        pipe.lpush(DEAD_LETTER_KEY, entry.to_json())
        pipe.ltrim(DEAD_LETTER_KEY, 0, self._max_entries - 1)
        pipe.execute()
        return entry

    def entries(self, limit: int | None = None) -> list[DeadLetter]:
        """The newest ``limit`` entries (all when None), newest first."""
        end = -1 if limit is None else limit - 1
        return [DeadLetter.from_json(raw) for raw in self._client.lrange(DEAD_LETTER_KEY, 0, end)]

    def get(self, entry_id: str) -> DeadLetter:
        """The entry with ``entry_id`` (a unique prefix is enough)."""
        matches = [e for e in self.entries() if e.entry_id.startswith(entry_id)]
        if len(matches) != 1:
            found = "no" if not matches else f"{len(matches)}"
            raise DeadLetterError(f"dead letter {entry_id!r}: expected one match, found {found}")
        return matches[0]

    def requeue(self, entry_id: str) -> DeadLetter:
        """Push the entry's message back onto its queue and remove the entry.

        Useful once the cause is fixed (a worker that now serves the task);
        a message that is still malformed is refused and dead-lettered again.
        """
        entry = self.get(entry_id)
        if entry.truncated:
            raise DeadLetterError(
                f"dead letter {entry.entry_id}: only {len(entry.message)} of "
                f"{entry.size_chars} characters were kept; it cannot be requeued"
            )
        stored = self._stored_form(entry.entry_id)
        pipe = self._client.pipeline()
        # The worker side BRPOPs: LPUSH puts it at the back of the line, as kombu does.
        pipe.lpush(list_key(entry.queue), entry.message)
        pipe.lrem(DEAD_LETTER_KEY, 1, stored)
        pipe.execute()
        return entry

    def purge(self) -> int:
        """Delete every entry; returns how many there were."""
        pipe = self._client.pipeline()
        pipe.llen(DEAD_LETTER_KEY)
        pipe.delete(DEAD_LETTER_KEY)
        count, _ = pipe.execute()
        return int(count)

    def _stored_form(self, entry_id: str) -> str:
        for raw in self._client.lrange(DEAD_LETTER_KEY, 0, -1):
            if DeadLetter.from_json(raw).entry_id == entry_id:
                return raw.decode() if isinstance(raw, bytes) else str(raw)
        raise DeadLetterError(f"dead letter {entry_id!r} disappeared while being requeued")

    def summary(self) -> dict[str, Any]:
        """How many entries, by reason (for `predictq health -v` and the CLI)."""
        by_reason: dict[str, int] = {}
        for entry in self.entries():
            by_reason[entry.reason] = by_reason.get(entry.reason, 0) + 1
        return {"entries": sum(by_reason.values()), "by_reason": by_reason}
