"""Test-only fault injection, imported by a worker through PREDICTQ_MODEL_IMPORTS.

Makes the worker's device thread die when a batch holds a sample whose first
feature is CRASH, the way a bug in the batch loop or a native library would:
with an exception that escapes the batcher's per-request error handling.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from workers.batcher import Batcher

CRASH = 777.0


class DeviceThreadBug(BaseException):
    """Not an Exception: nothing on the device thread's way up handles it."""


_call = Batcher._call


def _call_or_crash(self: Batcher, pieces: Any) -> Any:
    if any(np.any(piece.inputs[0][:, 0] == CRASH) for piece in pieces):
        raise DeviceThreadBug("injected: the device thread dies")
    return _call(self, pieces)


Batcher._call = _call_or_crash  # type: ignore[method-assign]
