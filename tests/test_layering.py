"""The packages stay layered: predictq_ops on top, workers and producer beside each other,
predictq below both.

Read from the source (every import statement, function-level and TYPE_CHECKING
ones included), so a lazy import cannot hide a climb up the layers.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("predictq", "workers", "producer", "predictq_ops")
#: What each package may import from the project, besides itself.
ALLOWED = {
    "predictq": set(),
    "workers": {"predictq"},
    "producer": {"predictq"},
    "predictq_ops": {"predictq", "workers", "producer"},
}


def module_name(path: Path) -> str:
    """``workers/model.py`` -> ``workers.model``; ``producer/__init__.py`` -> ``producer``."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {
    module_name(path): path
    for package in PACKAGES
    for path in sorted((ROOT / package).rglob("*.py"))
}


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement in ``path`` names (relative ones resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import submodule` names the submodule; `from pkg import name`, pkg.
            found.update(
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                for alias in node.names
            )
    return found


def project_imports() -> dict[str, set[str]]:
    """For each project module: the project modules it imports."""
    return {
        name: {m for m in imported_modules(path) if m in MODULES} for name, path in MODULES.items()
    }


IMPORTS = project_imports()


def test_the_walk_sees_every_package_and_its_imports() -> None:
    # Guards the tests below against passing on an empty walk.
    assert {name.split(".")[0] for name in IMPORTS} == set(PACKAGES)
    assert "predictq.errors" in IMPORTS["producer.client"]
    assert "predictq_ops.redis_server" in IMPORTS["predictq_ops.up"]


@pytest.mark.parametrize("package", PACKAGES)
def test_a_package_imports_only_the_layers_below_it(package: str) -> None:
    climbing = sorted(
        f"{module} imports {target}"
        for module, targets in IMPORTS.items()
        if module.split(".")[0] == package
        for target in targets
        if target.split(".")[0] not in {package, *ALLOWED[package]}
    )
    assert not climbing, climbing


def test_no_module_imports_one_that_imports_it_back() -> None:
    def reaches(start: str, goal: str) -> bool:
        seen: set[str] = set()
        todo = [start]
        while todo:
            current = todo.pop()
            if current == goal:
                return True
            if current not in seen:
                seen.add(current)
                todo.extend(IMPORTS[current])
        return False

    cycles = [
        f"{a} <-> {b}"
        for a, b in itertools.combinations(sorted(IMPORTS), 2)
        if reaches(a, b) and reaches(b, a)
    ]
    assert not cycles, cycles
