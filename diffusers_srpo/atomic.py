"""Outputs that a kill cannot leave half written: written under a temporary name, then renamed into place.

A rename within one filesystem is atomic, so whoever reads a final name sees the old file or the new one (or none),
never a truncated one, whenever the writing process dies.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator

#: The staging folder inside an output folder; a leftover from a killed run is cleared by the next write.
STAGING_NAME = ".partial-outputs"


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def move_into_place(source: str, target: str) -> None:
    """Rename ``source`` (a file or a folder) to ``target``, replacing what is there.

    A file replaces a file in one rename. A folder cannot be renamed onto a non-empty folder, so the old one is
    renamed aside first and removed after: a kill in between leaves no ``target`` (the old one lies beside it under
    a hidden name), never a mix of old and new files.
    """
    if os.path.isdir(target) and not os.path.islink(target):
        directory, name = os.path.split(target)
        old = os.path.join(directory, f".{name}.replaced")
        _remove(old)
        os.replace(target, old)
        os.replace(source, target)
        shutil.rmtree(old)
    else:
        os.replace(source, target)


@contextlib.contextmanager
def staged_outputs(directory: str) -> Iterator[str]:
    """A fresh staging folder inside ``directory``: what the block writes there moves into ``directory`` (entry by
    entry, each one rename) once the block completes.

    If the block fails, or the process dies, before the moves, ``directory`` holds what it held before (plus the
    hidden staging folder); during the moves, each entry is the old one or the new one, never half written.
    """
    os.makedirs(directory, exist_ok=True)
    staging = os.path.join(directory, STAGING_NAME)
    _remove(staging)
    os.makedirs(staging)
    try:
        yield staging
    except BaseException:
        _remove(staging)
        raise
    for name in sorted(os.listdir(staging)):
        move_into_place(os.path.join(staging, name), os.path.join(directory, name))
    os.rmdir(staging)
