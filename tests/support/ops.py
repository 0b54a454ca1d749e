"""Helpers shared by the operations tests: subprocess environments, the CLI, HTTP."""

from __future__ import annotations

import base64
import subprocess
import sys
import urllib.error
import urllib.request

from tests.support.processes import ROOT, base_env


def clean_env(**extra: str) -> dict[str, str]:
    """``base_env`` without any FLOWER_* variable the test runner may have."""
    return {k: v for k, v in base_env(**extra).items() if not k.startswith("FLOWER_")}


def http_get(url: str, auth: str | None = None, timeout_s: float = 10.0) -> tuple[int, str]:
    """(status, body) of a GET; HTTP errors are returned, not raised."""
    request = urllib.request.Request(url)
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def run_cli(
    *args: str, env: dict[str, str], timeout_s: float = 120
) -> subprocess.CompletedProcess[str]:
    """`python -m predictq_ops.cli ARGS` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "predictq_ops.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
