"""Test-only fault injection, imported by a worker through PREDICTQ_MODEL_IMPORTS.

Makes the worker's device thread die when a batch holds a sample whose first
feature is CRASH, the way a bug in the batch loop or a native library would:
with an exception that escapes the batcher's per-request error handling.

Two environment variables stage the crash for a test: ``TESTS_CRASH_MARK``, a
file touched when the crashing call begins, and ``TESTS_CRASH_BEHIND``, how
many job pieces must be queued behind that call before it crashes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from workers.batcher import Batcher

CRASH = 777.0


class DeviceThreadBug(BaseException):
    """Not an Exception: nothing on the device thread's way up handles it."""


_call = Batcher._call


def _queued(batcher: Batcher) -> int:
    with batcher._cond:
        return len(batcher._queue)


def _call_or_crash(self: Batcher, pieces: Any) -> Any:
    if any(np.any(piece.inputs[0][:, 0] == CRASH) for piece in pieces):
        mark = os.environ.get("TESTS_CRASH_MARK")
        if mark:
            Path(mark).touch()
        behind = int(os.environ.get("TESTS_CRASH_BEHIND", "0"))
        give_up = time.monotonic() + 60
        while _queued(self) < behind and time.monotonic() < give_up:
            time.sleep(0.01)  # the state of another thread: no event to wait on
        raise DeviceThreadBug("injected: the device thread dies")
    return _call(self, pieces)


Batcher._call = _call_or_crash  # type: ignore[method-assign]
