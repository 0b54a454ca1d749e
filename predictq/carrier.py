"""A coalesced message: several jobs in one ``predictq.predict_jobs`` task.

The wire contract, shared by the producer that builds carriers and the worker
that runs them (README "Coalesced messages"):

* task ``predictq.predict_jobs``, one positional argument: a non-empty list of
  job entries;
* an entry is a map ``{"id": <job id>, "inputs": <what predictq.predict takes,
  a payload reference included>, "expires": <optional ISO-8601 UTC deadline>,
  "model": <optional model name>, "version": <optional pinned version>}``
  (``model`` and ``version`` as the kwargs of ``predictq.predict``,
  predictq/modelref.py);
* the message header ``predictq_jobs`` lists the job ids it carries (lost-job
  recovery finds jobs by it; Flower and dead letters show it);
* every job's result is stored under its own id, as a single-job result is.

``ENTRY_KEYS`` and ``parse_entry`` are the one place an entry is read, so that
a key added to the contract is added here.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from predictq.errors import InvalidInput
from predictq.modelref import DEFAULT_REF, ModelRef, job_model
from predictq.modelref import KEYS as MODEL_KEYS

#: Message header: the ids of the jobs a carrier holds.
JOBS_HEADER: Final = "predictq_jobs"
#: Every key an entry may have; ``id`` and ``inputs`` are required.
ENTRY_KEYS: Final = frozenset({"id", "inputs", "expires"}) | MODEL_KEYS
REQUIRED_KEYS: Final = frozenset({"id", "inputs"})
#: Most jobs one message may carry (a worker refuses more).
MAX_JOBS: Final = 4096
#: Longest job id accepted (as for a message's own task id).
MAX_ID_CHARS: Final = 255
#: Distinct input summaries shown in a carrier's ``argsrepr`` (Flower).
ARGSREPR_KINDS: Final = 3


@dataclass(frozen=True)
class Entry:
    """One job of a carrier, checked."""

    job_id: str
    inputs: object
    #: The deadline as sent (ISO 8601), or None.
    expires: str | None
    #: The deadline as an aware datetime, or None.
    expires_at: datetime | None
    #: The model (and pinned version) the job asks for.
    ref: ModelRef = DEFAULT_REF


def entry_id(raw: object) -> str | None:
    """The entry's job id if one can answer to it (a usable string), else None."""
    job_id = raw.get("id") if isinstance(raw, dict) else None
    if isinstance(job_id, str) and 0 < len(job_id) <= MAX_ID_CHARS and job_id.isprintable():
        return job_id
    return None


def parse_entry(raw: object, index: int) -> Entry:
    """``raw`` as an ``Entry``; ``InvalidInput`` saying what is wrong otherwise."""
    where = f"job entry {index}"
    if not isinstance(raw, dict):
        raise InvalidInput(f"{where}: expected a map {sorted(ENTRY_KEYS)}, received {_kind(raw)}")
    unknown = sorted(str(k) for k in set(raw) - ENTRY_KEYS)
    missing = sorted(REQUIRED_KEYS - set(raw))
    if unknown or missing:
        raise InvalidInput(
            f"{where}: expected keys {sorted(REQUIRED_KEYS)} and optionally "
            f"{sorted(ENTRY_KEYS - REQUIRED_KEYS)}, received unknown {unknown} / missing {missing}"
        )
    job_id = entry_id(raw)
    if job_id is None:
        raise InvalidInput(
            f"{where}: expected 'id' as a non-empty printable string of at most "
            f"{MAX_ID_CHARS} characters, received {str(raw.get('id'))[:60]!r}"
        )
    expires = raw.get("expires")
    ref = job_model(raw, where=where)
    return Entry(job_id, raw["inputs"], expires, _deadline(expires, where), ref)


def _deadline(expires: object, where: str) -> datetime | None:
    if expires is None:
        return None
    if isinstance(expires, str):
        try:
            when = datetime.fromisoformat(expires)
        except ValueError:
            when = None
        if when is not None and when.tzinfo is not None:
            return when
    raise InvalidInput(
        f"{where}: expected 'expires' as an ISO 8601 time with a UTC offset or null, "
        f"received {str(expires)[:60]!r}"
    )


def entry(
    job_id: str, inputs: object, expires: datetime | None, ref: ModelRef = DEFAULT_REF
) -> dict[str, object]:
    """An entry as the producer writes it."""
    out: dict[str, object] = {"id": job_id, "inputs": inputs, **ref.as_kwargs()}
    if expires is not None:
        out["expires"] = expires.isoformat()
    return out


def argsrepr(summaries: list[str]) -> str:
    """A carrier's ``argsrepr`` for Flower: the job count and its inputs' summaries, counted.

    E.g. ``3 jobs: [2 x array of dtype float32 and shape (1, 16), 1 x ...]``; never the data.
    """
    counts = Counter(summaries)
    shown = [f"{n} x {summary}" for summary, n in list(counts.items())[:ARGSREPR_KINDS]]
    if len(counts) > ARGSREPR_KINDS:
        shown.append(f"{len(counts) - ARGSREPR_KINDS} more kinds")
    return f"{len(summaries)} jobs: [{', '.join(shown)}]"


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__
