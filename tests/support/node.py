"""celery-node for the client tests: installed from npm on first use, cached under the repo."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.processes import ROOT

CELERY_NODE_VERSION = "0.5.9"
#: Ignored by git (.gitignore: .predictq/); a second run finds the package there.
NODE_DIR = ROOT / ".predictq" / "node"


def installed_version(node_modules: Path) -> str | None:
    """The celery-node version in ``node_modules``, or None."""
    try:
        manifest = json.loads((node_modules / "celery-node" / "package.json").read_text())
    except (OSError, ValueError):
        return None
    version = manifest.get("version")
    return version if isinstance(version, str) else None


def celery_node() -> Path:
    """The node_modules folder holding celery-node, installing it from npm if it is missing.

    Fails the test (never skips it) when Node.js or npm is missing or the
    registry cannot be reached: the test would otherwise prove nothing.
    """
    node_modules = NODE_DIR / "node_modules"
    if installed_version(node_modules) == CELERY_NODE_VERSION:
        return node_modules
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not on PATH: the celery-node tests need Node.js and npm")
    NODE_DIR.mkdir(parents=True, exist_ok=True)
    argv = [
        "npm",
        "install",
        "--prefix",
        str(NODE_DIR),
        "--no-audit",
        "--no-fund",
        "--fetch-retries=1",
        "--fetch-timeout=60000",
        f"celery-node@{CELERY_NODE_VERSION}",
    ]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=240, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`{' '.join(argv)}` did not finish in 240s: is the npm registry reachable?")
    if out.returncode != 0 or installed_version(node_modules) != CELERY_NODE_VERSION:
        pytest.fail(
            f"could not install celery-node {CELERY_NODE_VERSION} from npm into {NODE_DIR} "
            f"(is the npm registry reachable?); `{' '.join(argv)}` exited with "
            f"{out.returncode}:\n{out.stderr[-2000:]}"
        )
    return node_modules
