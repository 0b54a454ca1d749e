"""What a model repository holds on disk: models, their numbered versions, and the file to load.

Layout: ``PREDICTQ_MODEL_REPOSITORY/<name>/<version>/``, the version a positive
integer written without leading zeros, the directory holding what
``PREDICTQ_MODEL_PATH`` accepts (a ``.keras`` or ``.h5`` file, or a SavedModel:
the version directory itself). Anything else is ignored, which is what makes
publishing atomic: a version is written beside (``a/.3.tmp/``) and renamed to
``a/3`` when complete, and a rename within one file system is atomic.

``PREDICTQ_MODEL_PATH`` is a repository of one model, named ``default``: a model
file or SavedModel is its version 1; a directory of numbered versions is used
as it is (and watched like a repository).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from predictq.errors import ModelLoadError
from predictq.modelref import DEFAULT_MODEL, MODEL_NAME
from predictq.settings import Settings

MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")
SAVEDMODEL_FILE = "saved_model.pb"


@dataclass(frozen=True, order=True)
class VersionDir:
    """One version on disk. ``stamp`` changes when the directory is replaced."""

    name: str
    version: int
    path: str  # the version directory (or PREDICTQ_MODEL_PATH's file)
    stamp: tuple[int, int]  # (inode, mtime ns): a directory renamed over it is a new one


def scan(settings: Settings) -> dict[str, list[VersionDir]]:
    """Every model and its versions (ascending) that this worker should consider.

    Raises ``ModelLoadError`` if the configured path or repository does not exist.
    """
    if settings.model_path:
        return {DEFAULT_MODEL: _model_path_versions(settings.model_path)}
    root = settings.model_repository
    if not root:
        raise ModelLoadError(
            "no model to serve: set PREDICTQ_MODEL_REPOSITORY (a directory of "
            "<name>/<version>/) or PREDICTQ_MODEL_PATH (one model)"
        )
    if not os.path.isdir(root):
        raise ModelLoadError(f"PREDICTQ_MODEL_REPOSITORY: no directory at {root!r}")
    wanted = set(settings.model_names)
    models: dict[str, list[VersionDir]] = {}
    for entry in _entries(root):
        if not entry.is_dir() or not MODEL_NAME.fullmatch(entry.name):
            continue
        if wanted and entry.name not in wanted:
            continue
        models[entry.name] = _versions(entry.name, entry.path)
    return models


def model_file(version_dir: str) -> str:
    """What to load from a version directory: itself (SavedModel) or its one model file."""
    if not os.path.isdir(version_dir):
        return version_dir  # PREDICTQ_MODEL_PATH's own file
    if os.path.exists(os.path.join(version_dir, SAVEDMODEL_FILE)):
        return version_dir
    files = sorted(
        e.path for e in _entries(version_dir) if e.is_file() and e.name.endswith(MODEL_SUFFIXES)
    )
    if len(files) != 1:
        raise ModelLoadError(
            f"{version_dir}: expected one model file ({', '.join(MODEL_SUFFIXES)}) or a "
            f"SavedModel ({SAVEDMODEL_FILE}), found {[os.path.basename(f) for f in files]}"
        )
    return files[0]


def version_number(entry_name: str) -> int | None:
    """The version a directory name stands for, or None (``3``, not ``03``, ``.3.tmp``, ``0``)."""
    if entry_name.isdigit() and entry_name.isascii() and entry_name == str(int(entry_name)):
        number = int(entry_name)
        return number if number >= 1 else None
    return None


def _model_path_versions(path: str) -> list[VersionDir]:
    if not os.path.exists(path):
        raise ModelLoadError(f"PREDICTQ_MODEL_PATH: no file or directory at {path!r}")
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, SAVEDMODEL_FILE)):
        numbered = _versions(DEFAULT_MODEL, path)
        if numbered:
            return numbered
    return [VersionDir(DEFAULT_MODEL, 1, path, _stamp(path))]


def _versions(name: str, model_dir: str) -> list[VersionDir]:
    found = []
    for entry in _entries(model_dir):
        number = version_number(entry.name)
        if number is not None and entry.is_dir():
            found.append(VersionDir(name, number, entry.path, _stamp(entry.path)))
    return sorted(found)


def _entries(path: str) -> Iterable[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except OSError:
        return []  # removed while scanning: it has no versions now


def _stamp(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (0, 0)
    return (st.st_ino, st.st_mtime_ns)
