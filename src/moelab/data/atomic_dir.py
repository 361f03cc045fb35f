"""Atomic directory creation: build a directory under a temporary name, rename it into place on success.

A crash or exception leaves no partial output: the temporary sibling ``.<name>.<random>.tmp`` is
removed and ``dest`` is untouched.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import DataError
from ..io import current_umask, fsync_path


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")) + [root]:
        fsync_path(p)


def _is_empty_dir(p: Path) -> bool:
    return p.is_dir() and not any(p.iterdir())


@contextmanager
def atomic_dir(dest: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces ``dest``.

    ``dest`` may be absent or an empty directory; a non-empty ``dest`` is an error unless
    ``overwrite`` is true, in which case it is replaced only after the new directory is complete.
    """
    dest = Path(dest)
    if dest.exists() and not _is_empty_dir(dest) and not overwrite:
        raise DataError(f"output directory {dest} already exists and is not empty; choose another --out or delete it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        mask = current_umask()  # mkdtemp/mkstemp use 0700/0600; give the result normal permissions
        for p in [tmp, *tmp.rglob("*")]:
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
        _fsync_tree(tmp)
        if dest.exists() or dest.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
            os.replace(dest, old / "x")
            os.rename(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
