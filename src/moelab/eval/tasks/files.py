"""Locating and reading evaluation data files (JSON Lines), with one-line errors.

Conventions: the data folder is ``data_dir`` when given, else ``$MOELAB_DATA``, else ``./data``
(relative to the working directory). Files are JSON Lines: one JSON object per line, blank lines
ignored, UTF-8. Nothing is downloaded: every task reads local files only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

from ...errors import ConfigError, DataError
from ...io import iter_jsonl

#: Environment variable naming the folder that holds the evaluation data sets.
DATA_ENV = "MOELAB_DATA"

#: Optional per-record check: returns an error description (without location) or ``None`` if valid.
RecordCheck = Callable[[dict[str, Any]], "str | None"]


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data folder: ``data_dir`` if given, else ``$MOELAB_DATA``, else ``./data``."""
    if data_dir is not None:
        return Path(data_dir)
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else Path("data")


def read_jsonl(
    path: str | os.PathLike,
    required_fields: Sequence[str] = (),
    check: RecordCheck | None = None,
) -> list[dict[str, Any]]:
    """All records of a JSON Lines file, in file order.

    Raises :class:`DataError` when the file is missing (naming the full path and how to fix it), when a
    line is not a JSON object, lacks one of ``required_fields`` or fails ``check`` (``path:line: ...``),
    and when the file holds no records.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"data file not found: {path.resolve()}; put it there, or set {DATA_ENV} / pass data_dir "
            "pointing at the folder that holds it"
        )
    records: list[dict[str, Any]] = []
    for lineno, record in iter_jsonl(path):
        missing = [name for name in required_fields if name not in record]
        if missing:
            raise DataError(
                f"{path}:{lineno}: missing field(s) {', '.join(missing)}; every record needs "
                f"{', '.join(required_fields)}"
            )
        problem = check(record) if check is not None else None
        if problem:
            raise DataError(f"{path}:{lineno}: {problem}")
        records.append(record)
    if not records:
        raise DataError(f"{path} holds no records; it must contain one JSON object per line")
    return records


def first(docs: list[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    """A new list of the first ``limit`` docs (all when ``limit`` is ``None``), as lm-eval's ``--limit``."""
    if limit is None:
        return list(docs)
    if limit < 1:
        raise ConfigError(f"limit must be a positive number of documents, got {limit}; pass limit >= 1 or None")
    return docs[:limit]
