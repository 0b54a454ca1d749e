"""The README stays true: its settings table, commands and metric names match the code."""

from __future__ import annotations

import re
from pathlib import Path

from predictq.settings import settings_help
from predictq_ops.cli import cli
from workers import metrics

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_the_settings_table_lists_every_setting_with_its_default_and_help() -> None:
    table = README.split("<!-- settings-table")[1].split("<!-- /settings-table -->")[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    expected = [
        f"| `{name}` | {default or '(unset)'} | {text} |" for name, default, text in settings_help()
    ]
    assert rows == expected


def test_the_two_newcomer_commands_exist_and_ci_runs_the_test_command() -> None:
    quick_start = README.split("## Quick start")[1].split("##")[0]
    assert "make demo" in quick_start and "make test" in quick_start
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "up --demo" in makefile
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("make test")


def test_every_cli_command_in_the_readme_exists() -> None:
    documented = set(re.findall(r"^predictq ([\w-]+)", README, re.M))
    assert documented == set(cli.commands)


def test_every_metric_in_the_readme_is_exported_by_workers() -> None:
    documented = set(re.findall(r"`(predictq_[a-z_]+)", README))
    exported = set()
    for value in vars(metrics).values():
        name = getattr(value, "_name", None)
        if isinstance(name, str):
            exported |= {name, f"{name}_total", f"{name}_info"}
    assert documented and documented <= exported, documented - exported
