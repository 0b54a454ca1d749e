"""A Flower subprocess for tests, and how to stop test subprocesses."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from tests.support.ops import http_get
from tests.support.processes import ROOT, wait_for

FLOWER_USER, FLOWER_PASSWORD = "admin", "s3cret"


def answers(url: str) -> bool:
    """Whether something answers HTTP at ``url`` (any status)."""
    try:
        http_get(url, timeout_s=2)
    except OSError:
        return False
    return True


def stop_process(process: subprocess.Popen[Any], timeout_s: float = 30) -> None:
    """Terminate, wait, kill."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout_s)


class Flower:
    """A Flower subprocess on a free port, its log in a file."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.port = int(env["PREDICTQ_FLOWER_PORT"])
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def wait_answering(self, timeout_s: float = 90) -> None:
        def up() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"flower exited with {self.process.returncode}:\n{self.log()}")
            return answers(self.url + "/healthcheck")

        wait_for(up, timeout_s, "Flower to answer", self.log)

    def get(self, path: str, auth: str | None = f"{FLOWER_USER}:{FLOWER_PASSWORD}") -> Any:
        """The JSON of an authenticated API call (asserting 200)."""
        status, body = http_get(self.url + path, auth)
        assert status == 200, (path, status, body)
        return json.loads(body)
