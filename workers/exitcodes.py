"""The exit statuses of a worker that cannot serve (sysexits.h), for supervisors and tests."""

from __future__ import annotations

from typing import Final

from predictq.errors import ConfigError, ModelLoadError

#: A setting or the model file must be fixed (sysexits.h EX_CONFIG).
EX_CONFIG: Final = 78
#: Anything else that makes a worker unable to serve (sysexits.h EX_SOFTWARE).
EX_SOFTWARE: Final = 70


def code_for(error: BaseException) -> int:
    """EX_CONFIG for what an operator must fix in the configuration, else EX_SOFTWARE."""
    return EX_CONFIG if isinstance(error, ConfigError | ModelLoadError) else EX_SOFTWARE


__all__ = ["EX_CONFIG", "EX_SOFTWARE", "code_for"]
