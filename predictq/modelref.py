"""Which model, and which version of it, a job asks for: its wire form and its one check.

A job names its model in two optional keyword arguments of ``predictq.predict``
(and in the same two keys of each entry of a coalesced carrier): ``model``, a
model name, and ``version``, a positive integer. Without ``model`` the worker's
default model serves the job; without ``version`` the newest version loaded.
``job_model`` reads and checks both from any mapping, so every path a job can
take (task kwargs, carrier entries, the producer's own arguments) reads them the
same way.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from predictq.errors import InvalidInput

#: Key of the model name in a job's kwargs (or a carrier entry).
MODEL_KEY: Final = "model"
#: Key of the pinned version in a job's kwargs (or a carrier entry).
VERSION_KEY: Final = "version"
#: Top-level field of a stored result (beside Celery's status/result/...): the version that ran it.
MODEL_VERSION_FIELD: Final = "model_version"
#: The keys ``job_model`` reads.
KEYS: Final = frozenset({MODEL_KEY, VERSION_KEY})
#: The name PREDICTQ_MODEL_PATH serves its model under, and the default model of a worker.
DEFAULT_MODEL: Final = "default"
#: A model name: a directory of a model repository, and the ``model`` of a job.
MODEL_NAME: Final = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")
#: Largest version number accepted (versions are directory names; this keeps them sane).
MAX_VERSION: Final = 2**53


@dataclass(frozen=True)
class ModelRef:
    """A job's model name (None: the default model) and pinned version (None: the newest)."""

    name: str | None = None
    version: int | None = None

    def as_kwargs(self) -> dict[str, object]:
        """The task keyword arguments that carry this reference (none for the default)."""
        fields: dict[str, object] = {}
        if self.name is not None:
            fields[MODEL_KEY] = self.name
        if self.version is not None:
            fields[VERSION_KEY] = self.version
        return fields

    def describe(self) -> str:
        """``'a' version 2``, ``the default model``, for messages."""
        what = "the default model" if self.name is None else f"model {self.name!r}"
        return what if self.version is None else f"{what} version {self.version}"


def job_model(fields: Mapping[str, object], *, where: str = "job") -> ModelRef:
    """The ``model`` and ``version`` of ``fields`` (absent or None: default), checked.

    Raises ``InvalidInput`` saying what was expected and what arrived.
    """
    name = fields.get(MODEL_KEY)
    version = fields.get(VERSION_KEY)
    if name is not None and not (isinstance(name, str) and MODEL_NAME.fullmatch(name)):
        raise InvalidInput(
            f"{where}: expected '{MODEL_KEY}' as a model name (letters, digits, '_', '-', '.', "
            f"at most 128, not starting with '.'), received {name!r:.80}"
        )
    if version is not None and not (
        isinstance(version, int) and not isinstance(version, bool) and 1 <= version <= MAX_VERSION
    ):
        raise InvalidInput(
            f"{where}: expected '{VERSION_KEY}' as a positive integer, received {version!r:.80}"
        )
    return ModelRef(name, version)


#: The default model, newest version: what a job without ``model`` and ``version`` gets.
DEFAULT_REF: Final = ModelRef()
