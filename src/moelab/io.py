"""Small I/O helpers used everywhere: atomic writes, checksums, safe paths.

All writes go to a temporary file in the destination directory, are fsync'ed and then renamed over
the destination, so a crash leaves either the old file or the new one, never half of either.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import DataError, MoelabError


_UMASK = os.umask(0)
os.umask(_UMASK)


def current_umask() -> int:
    """The process umask (read once at import; mkstemp/mkdtemp ignore it, so we apply it ourselves)."""
    return _UMASK


def fsync_path(path: Path) -> None:
    """fsync a file or directory, ignoring file systems that do not support it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on success fsync it and rename it to ``dest``.

    On an exception the temporary file is removed and ``dest`` is left untouched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file ordinary permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, dest)
        fsync_path(dest.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_bytes(dest: str | os.PathLike, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(dest: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(dest, text.encode("utf-8"))


def atomic_write_json(dest: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(dest, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_bytes)
            if not chunk:
                break
            h.update(chunk)
    return h.hexdigest()


def path_inside(root: str | os.PathLike, relative: str | os.PathLike) -> Path:
    """Join ``relative`` onto ``root`` and refuse anything that would land outside ``root``."""
    root_p = Path(root).resolve()
    p = (root_p / relative).resolve()
    if p != root_p and root_p not in p.parents:
        raise MoelabError(f"path {str(relative)!r} escapes the run directory {str(root_p)!r}; use a relative path inside it")
    return p


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line of a JSON Lines file.

    A line that is not valid JSON or not a JSON object is a :class:`DataError` naming ``path:line``.
    """
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        lineno = 0
        try:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno}); fix or remove the line") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}; write one object per line")
                yield lineno, obj
        except UnicodeDecodeError:
            raise DataError(f"{path}:{lineno + 1}: not valid UTF-8; re-encode the file as UTF-8") from None
