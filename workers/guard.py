"""The message guard: everything Celery and predictq read from a message, checked first.

Celery's consumer reads a protocol-2 message's headers, decodes its body and
unpacks ``[args, kwargs, embed]`` on the worker's single consumer thread, and
assumes every field has the type Celery's own producer writes. A header of
another type, a body that is not a 3-item list, an unknown task name, an
``eta`` (held in memory until due) or a compressed body (unpacked before any
size check) stopped, wedged or starved the worker. ``check`` runs before
Celery's handler sees the message and raises ``Refusal`` for anything that is
not a predictq job Celery can run; the consumer (``workers.consumer``) answers,
dead-letters and acknowledges refused messages.

The checks follow Celery 5.7's ``celery.worker.request.Request`` and
``celery.app.trace``: the headers they read, with the types they assume.
"""

from __future__ import annotations

import codecs
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from celery.utils.time import maybe_iso8601, maybe_make_aware
from kombu.exceptions import DecodeError

from predictq.carrier import JOBS_HEADER, MAX_JOBS
from predictq.celeryconf import PREDICT_JOBS_TASK
from predictq.codec import CONTENT_TYPE, JSON_CONTENT_TYPE, describe
from predictq.errors import (
    DeadlineExceeded,
    InvalidInput,
    InvalidMessage,
    PayloadTooLarge,
    PredictqError,
)
from workers.transport import REFUSAL_PROPERTY

#: Longest task id accepted (Celery's own are 36-character UUIDs).
MAX_TASK_ID_CHARS: Final = 255
#: The keys Celery's protocol 2 puts in a message body's third item.
EMBED_KEYS: Final = frozenset({"callbacks", "errbacks", "chain", "chord"})


class Refusal(Exception):
    """A message that will not be run, why, and what its caller gets."""

    def __init__(
        self,
        reason: str,
        error: PredictqError,
        *,
        task_id: str | None,
        dead_letter: bool = True,
    ) -> None:
        super().__init__(str(error))
        #: Metric label: envelope, headers, unknown_task, eta, expired, content_type,
        #: compressed, too_large, body or input.
        self.reason = reason
        self.error = error
        self.task_id = task_id
        #: Malformed messages are kept for an operator; an expired job or a bad
        #: input is an ordinary outcome, answered like any failed job.
        self.dead_letter = dead_letter


@dataclass(frozen=True, kw_only=True)
class Policy:
    """What this worker accepts."""

    tasks: frozenset[str]
    max_payload_bytes: int
    max_json_bytes: int


def _optional(kind: type | tuple[type, ...]) -> Callable[[object], bool]:
    def ok(value: object) -> bool:
        if isinstance(value, bool) and kind is not bool:
            return False
        return value is None or isinstance(value, kind)

    return ok


def _str_list(value: object) -> bool:
    return value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value))


def _time_limits(value: object) -> bool:
    if value is None:
        return True
    return (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(
            v is None
            or (
                isinstance(v, int | float)
                and not isinstance(v, bool)
                and math.isfinite(v)
                and v >= 0
            )
            for v in value
        )
    )


#: Header -> (accepts the value?, what is expected). Missing headers are fine.
_HEADERS: Final[Mapping[str, tuple[Callable[[object], bool], str]]] = {
    "lang": (_optional(str), "a string"),
    "root_id": (_optional(str), "a string or null"),
    "parent_id": (_optional(str), "a string or null"),
    "group": (_optional(str), "a string or null"),
    "shadow": (_optional(str), "a string or null"),
    "meth": (_optional(str), "a string or null"),
    "origin": (_optional(str), "a string or null"),
    "argsrepr": (_optional(str), "a string or null"),
    "kwargsrepr": (_optional(str), "a string or null"),
    "retries": (_optional(int), "an integer"),
    "group_index": (_optional(int), "an integer or null"),
    "replaced_task_nesting": (_optional(int), "an integer"),
    "ignore_result": (_optional(bool), "a boolean"),
    "redelivered": (_optional(bool), "a boolean"),
    "timelimit": (_time_limits, "[hard, soft] seconds, each a number >= 0 or null"),
    "stamped_headers": (_str_list, "a list of strings or null"),
    "stamps": (_optional(dict), "an object or null"),
    "expires": (_optional(str), "an ISO 8601 time or null"),
    JOBS_HEADER: (_str_list, "a list of job id strings or null"),
}


def usable_task_id(headers: object) -> str | None:
    """The message's task id if a caller could be waiting on it, else None."""
    task_id = headers.get("id") if isinstance(headers, dict) else None
    if isinstance(task_id, str) and 0 < len(task_id) <= MAX_TASK_ID_CHARS and task_id.isprintable():
        return task_id
    return None


def carried_job_ids(headers: object) -> list[str]:
    """The usable job ids a coalesced message says it carries (its ``predictq_jobs`` header)."""
    if not isinstance(headers, dict) or headers.get("task") != PREDICT_JOBS_TASK:
        return []
    ids = headers.get(JOBS_HEADER)
    if not isinstance(ids, list):
        return []
    return [i for i in ids[:MAX_JOBS] if usable_task_id({"id": i}) is not None]


def check(message: Any, policy: Policy) -> None:
    """Raise ``Refusal`` unless ``message`` is a predictq job Celery can run.

    Decodes the body (kombu caches it on the message, so Celery does not decode
    it again on this thread) only after its size and content type passed.
    """
    refused = (message.properties or {}).get(REFUSAL_PROPERTY)
    if refused is not None:
        _refuse_quarantined(refused)
    headers = message.headers
    task_id = usable_task_id(headers)
    if not isinstance(headers, dict) or task_id is None:
        raise Refusal(
            "headers",
            InvalidMessage(
                "message refused: expected protocol-2 headers with 'id' as a non-empty string "
                f"of at most {MAX_TASK_ID_CHARS} printable characters, received "
                + (
                    f"id {headers.get('id')!r:.60}"
                    if isinstance(headers, dict)
                    else describe(headers)
                )
            ),
            task_id=None,
        )
    _check_headers(headers, policy, task_id)
    _check_content(message, policy, task_id)
    body = _decode(message, task_id)
    _check_body(body, task_id)
    if headers.get("task") == PREDICT_JOBS_TASK:
        _check_carrier(body, task_id)


def _refuse_quarantined(refused: object) -> None:
    fields = refused if isinstance(refused, dict) else {}
    detail = str(fields.get("reason") or "unreadable envelope")
    task_id = fields.get("task_id")
    reason = str(fields.get("kind") or "envelope")
    error: PredictqError
    if reason == "too_large":
        error = PayloadTooLarge(detail)
    else:
        error = InvalidMessage(f"message refused: {detail}")
    raise Refusal(reason, error, task_id=usable_task_id({"id": task_id}))


def _check_headers(headers: dict[str, Any], policy: Policy, task_id: str) -> None:
    task = headers.get("task")
    if not isinstance(task, str) or task not in policy.tasks:
        raise Refusal(
            "unknown_task",
            InvalidMessage(
                f"message refused: expected task {' or '.join(sorted(policy.tasks))}, "
                f"received {task!r:.80}; this worker runs no other task"
            ),
            task_id=task_id,
        )
    for name, (ok, expected) in _HEADERS.items():
        if name in headers and not ok(headers[name]):
            raise Refusal(
                "headers",
                InvalidMessage(
                    f"message refused: expected header {name!r} as {expected}, "
                    f"received {headers[name]!r:.80}"
                ),
                task_id=task_id,
            )
    if headers.get("eta") is not None:
        raise Refusal(
            "eta",
            InvalidMessage(
                f"message refused: expected no 'eta' (countdown), received {headers['eta']!r:.60}; "
                "predictq runs a job as soon as a worker is free and never holds jobs for later"
            ),
            task_id=task_id,
        )
    if headers.get("expires") is not None:
        _check_expiry(headers["expires"], task_id)


def _check_expiry(raw: str, task_id: str) -> None:
    try:
        expires = maybe_make_aware(maybe_iso8601(raw))
    except (AttributeError, ValueError, TypeError, OverflowError) as e:
        raise Refusal(
            "headers",
            InvalidMessage(
                f"message refused: expected header 'expires' as an ISO 8601 time, "
                f"received {raw!r:.60}"
            ),
            task_id=task_id,
        ) from e
    late_s = time.time() - expires.timestamp()
    if late_s > 0:
        raise Refusal(
            "expired",
            DeadlineExceeded(
                f"job {task_id}: its deadline passed {late_s:.3f}s before a worker received it "
                f"(expires {raw}); it was not run"
            ),
            task_id=task_id,
            dead_letter=False,
        )


def _check_content(message: Any, policy: Policy, task_id: str) -> None:
    content_type = message.content_type
    encoding = message.content_encoding
    if content_type == CONTENT_TYPE:
        wanted, limit, limit_name = "binary", policy.max_payload_bytes, "PREDICTQ_MAX_PAYLOAD_BYTES"
        encoding_ok = encoding == "binary"
    elif content_type == JSON_CONTENT_TYPE:
        wanted, limit, limit_name = "utf-8", policy.max_json_bytes, "PREDICTQ_MAX_JSON_BYTES"
        encoding_ok = isinstance(encoding, str) and _is_utf8(encoding)
    else:
        raise Refusal(
            "content_type",
            InvalidMessage(
                f"message refused: expected content type {CONTENT_TYPE} or {JSON_CONTENT_TYPE}, "
                f"received {content_type!r:.60} (pickle is never accepted); the job was not run"
            ),
            task_id=task_id,
        )
    if not encoding_ok:
        raise Refusal(
            "content_type",
            InvalidMessage(
                f"message refused: expected content encoding {wanted!r} for {content_type}, "
                f"received {encoding!r:.60}"
            ),
            task_id=task_id,
        )
    size = len(message.body or b"")
    if size > limit:
        raise Refusal(
            "too_large",
            PayloadTooLarge(
                f"message body: expected at most {limit} bytes of {content_type} ({limit_name}), "
                f"received {size} bytes"
            ),
            task_id=task_id,
        )


def _is_utf8(encoding: str) -> bool:
    try:
        return codecs.lookup(encoding).name == "utf-8"
    except LookupError:
        return False


def _decode(message: Any, task_id: str) -> object:
    try:
        return message.decode()
    except Exception as e:
        inner = _underlying(e)
        if isinstance(inner, InvalidInput) and not isinstance(inner, InvalidMessage):
            # A readable message whose input is bad (an ndarray map that does
            # not add up): an ordinary failed job, not a malformed message.
            raise Refusal("input", inner, task_id=task_id, dead_letter=False) from e
        raise Refusal(
            "body",
            InvalidMessage(
                f"message refused: expected a valid {message.content_type} body, received one "
                f"that fails with {type(inner).__name__}: {str(inner)[:200]}"
            ),
            task_id=task_id,
        ) from e


def _underlying(exc: BaseException) -> BaseException:
    """kombu wraps decoder errors in DecodeError(original); unwrap ours."""
    if isinstance(exc, DecodeError):
        inner = exc.args[0] if exc.args else None
        if isinstance(inner, BaseException):
            return inner
        if exc.__context__ is not None:
            return exc.__context__
    return exc


def _check_body(body: object, task_id: str) -> None:
    def refuse(expected: str, received: object) -> Refusal:
        return Refusal(
            "body",
            InvalidMessage(
                f"message refused: expected {expected}, received {describe(received)}"
                + (f" {received!r:.60}" if isinstance(received, int | float | str) else "")
            ),
            task_id=task_id,
        )

    if not isinstance(body, list | tuple) or len(body) != 3:
        raise refuse("a protocol-2 body [args, kwargs, embed]", body)
    args, kwargs, embed = body
    if not isinstance(args, list | tuple):
        raise refuse("args (the body's first item) as a list", args)
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise refuse("kwargs (the body's second item) as an object with string keys", kwargs)
    if embed is None:
        return
    if not isinstance(embed, dict) or not set(embed) <= EMBED_KEYS:
        raise refuse(
            f"embed (the body's 3rd item) as an object with keys {sorted(EMBED_KEYS)}", embed
        )
    for key in ("callbacks", "errbacks", "chain"):
        value = embed.get(key)
        if value is not None and not (
            isinstance(value, list) and all(_is_signature(s) for s in value)
        ):
            raise refuse(f"embed {key!r} as a list of task signatures or null", value)
    chord = embed.get("chord")
    if chord is not None and not _is_signature(chord):
        raise refuse("embed 'chord' as a task signature or null", chord)


def _is_signature(value: object) -> bool:
    return (
        isinstance(value, dict)
        and isinstance(value.get("task"), str)
        and isinstance(value.get("args", []), list | tuple)
        and isinstance(value.get("kwargs", {}), dict)
        and isinstance(value.get("options", {}), dict)
    )


def _check_carrier(body: Any, task_id: str) -> None:
    """A coalesced message's argument: one non-empty list of maps (predictq/carrier.py).

    Each map's keys and values are checked per job by the task, so that one
    bad entry fails alone; what is checked here would fail every job.
    """
    args, kwargs, _embed = body
    entries = args[0] if len(args) == 1 else None
    problem = None
    if kwargs or not isinstance(entries, list | tuple):
        problem = "exactly one argument, a list of job entries"
    elif not 1 <= len(entries) <= MAX_JOBS:
        problem = f"between 1 and {MAX_JOBS} job entries, received {len(entries)}"
    elif not all(isinstance(e, dict) for e in entries):
        kinds = sorted({describe(e) for e in entries if not isinstance(e, dict)})
        problem = f"every job entry as a map, received {', '.join(kinds)[:80]}"
    if problem is not None:
        raise Refusal(
            "body",
            InvalidMessage(f"message refused: {PREDICT_JOBS_TASK} expects {problem}"),
            task_id=task_id,
        )
