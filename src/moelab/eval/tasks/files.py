"""Reading evaluation records: local JSON Lines files (default) or, on request, the Hugging Face Hub.

Conventions: every file-backed task takes ``source``: ``"local"`` (the default) reads JSON Lines files
from the data folder and never imports ``datasets``; ``"hf"`` loads the split lm-eval uses with
``datasets.load_dataset(path, name, split=split)`` (the optional extra ``pip install
'moelab[datasets]'``; network access or a cached copy). Both go through the same record checks.

The data folder is ``data_dir`` when given, else ``$MOELAB_DATA``, else ``./data`` (relative to the
working directory). Files are JSON Lines: one JSON object per line, blank lines ignored, UTF-8. Errors
are one line naming the record: ``path:line: ...`` for files, ``hf:<dataset>[/<config>]/<split>:<row>``
(``row`` = 0-based dataset index) for the hub.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ...errors import ConfigError, DataError
from ...io import iter_jsonl

#: Environment variable naming the folder that holds the evaluation data sets.
DATA_ENV = "MOELAB_DATA"

#: Record sources: local JSON Lines files (the default) or the Hugging Face Hub via ``datasets``.
LOCAL, HF = "local", "hf"
SOURCES = (LOCAL, HF)

#: Optional per-record check: returns an error description (without location) or ``None`` if valid.
RecordCheck = Callable[[dict[str, Any]], "str | None"]


@dataclass(frozen=True)
class HubDataset:
    """A Hugging Face dataset as lm-eval names it: ``dataset_path`` and ``dataset_name`` (config)."""

    path: str
    name: str | None = None

    def location(self, split: str) -> str:
        """``hf:<path>[/<name>]/<split>``, the prefix of error messages about its records."""
        return "hf:" + "/".join(part for part in (self.path, self.name, split) if part)


def check_source(source: str, **local_options: Any) -> str:
    """``source`` after checking it is ``"local"`` or ``"hf"``.

    ``local_options`` are the caller's local-file arguments (e.g. ``data_dir=..., path=...``): with
    ``"hf"`` any that is not ``None`` is a :class:`ConfigError`, since it would be silently ignored.
    """
    if source not in SOURCES:
        raise ConfigError(
            f"unknown data source {source!r}; use 'local' (JSON Lines files) or 'hf' (Hugging Face datasets)"
        )
    given = [name for name, value in local_options.items() if value is not None]
    if source == HF and given:
        raise ConfigError(
            f"source 'hf' loads from the Hugging Face Hub, but local file option(s) {', '.join(given)} "
            "were given; drop them or use source 'local' (--source local)"
        )
    return source


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data folder: ``data_dir`` if given, else ``$MOELAB_DATA``, else ``./data``."""
    if data_dir is not None:
        return Path(data_dir)
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else Path("data")


def _validated(
    located: Iterable[tuple[str, Any]],
    required_fields: Sequence[str],
    check: RecordCheck | None,
    if_empty: str,
) -> list[dict[str, Any]]:
    """The records of ``(location, record)`` pairs as dicts, after the field and ``check`` tests;
    no records at all is the :class:`DataError` ``if_empty``."""
    records: list[dict[str, Any]] = []
    for where, record in located:
        if not isinstance(record, Mapping):
            raise DataError(f"{where}: expected a record with named fields, got {type(record).__name__}")
        record = dict(record)
        missing = [name for name in required_fields if name not in record]
        if missing:
            raise DataError(
                f"{where}: missing field(s) {', '.join(missing)}; every record needs {', '.join(required_fields)}"
            )
        problem = check(record) if check is not None else None
        if problem:
            raise DataError(f"{where}: {problem}")
        records.append(record)
    if not records:
        raise DataError(if_empty)
    return records


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
    located = ((f"{path}:{lineno}", record) for lineno, record in iter_jsonl(path))
    return _validated(located, required_fields, check, f"{path} holds no records; it must contain one JSON object per line")


def read_hub(
    dataset: HubDataset,
    split: str,
    required_fields: Sequence[str] = (),
    check: RecordCheck | None = None,
) -> list[dict[str, Any]]:
    """All rows of a Hugging Face dataset split, in dataset order, checked as :func:`read_jsonl` does.

    Calls ``datasets.load_dataset(dataset.path, dataset.name, split=split)`` and needs only an iterable
    of mapping rows back. Raises :class:`ConfigError` when ``datasets`` is not installed, and
    :class:`DataError` when loading fails (offline and not cached, unknown split, ...), for a bad row
    (``hf:<dataset>[/<config>]/<split>:<row>: ...``) or an empty split.
    """
    where = dataset.location(split)
    try:
        datasets = importlib.import_module("datasets")
    except ImportError as e:
        raise ConfigError(
            f"source 'hf' needs the Hugging Face datasets package ({e}); install it with "
            "`pip install 'moelab[datasets]'` or use local files (--source local)"
        ) from None
    try:
        rows = datasets.load_dataset(dataset.path, dataset.name, split=split)
    except Exception as e:  # offline, not cached, no such dataset/split, hub errors: all user-facing
        detail = (str(e).strip().splitlines() or [""])[0]
        raise DataError(
            f"cannot load {where} ({type(e).__name__}: {detail}); connect to the Hugging Face Hub "
            "(and unset HF_DATASETS_OFFLINE), or use local JSON Lines files: --source local --data-dir DIR"
        ) from None
    located = ((f"{where}:{row}", record) for row, record in enumerate(rows))
    return _validated(located, required_fields, check, f"{where} holds no records; check the dataset split or use local files (--source local)")


def read_split(
    source: str,
    path: str | os.PathLike,
    dataset: HubDataset,
    split: str,
    required_fields: Sequence[str] = (),
    check: RecordCheck | None = None,
) -> list[dict[str, Any]]:
    """One split of a task's data: the local file ``path`` or the hub ``dataset``'s ``split``.

    ``source`` is ``"local"`` (:func:`read_jsonl`, never imports ``datasets``) or ``"hf"``
    (:func:`read_hub`); the same ``required_fields`` and ``check`` apply to both.
    """
    if check_source(source) == HF:
        return read_hub(dataset, split, required_fields, check)
    return read_jsonl(path, required_fields, check)


def first(docs: list[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    """A new list of the first ``limit`` docs (all when ``limit`` is ``None``), as lm-eval's ``--limit``."""
    if limit is None:
        return list(docs)
    if limit < 1:
        raise ConfigError(f"limit must be a positive number of documents, got {limit}; pass limit >= 1 or None")
    return docs[:limit]
