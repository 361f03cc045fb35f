"""Reading local text inputs: JSONL files (one JSON object per line, text in a named field) and .txt files.

Conventions:

* ``.jsonl`` — every non-blank line must be a JSON object whose ``field`` is a string; each such
  line is one document. Blank lines are skipped.
* ``.txt`` / ``.md`` — the whole file is one document (read into memory; split big corpora into
  several files or convert them to JSONL).

Any problem raises :class:`~moelab.errors.DataError` naming ``file:line`` and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

from ..errors import DataError
from ..io import iter_jsonl

JSONL_SUFFIXES = (".jsonl",)
TEXT_SUFFIXES = (".txt", ".md")


def check_inputs(paths: Iterable[str | Path]) -> list[Path]:
    """Return the inputs as paths, failing early if one is missing or of an unsupported type."""
    out = []
    for p in map(Path, paths):
        if not p.is_file():
            raise DataError(f"input file not found: {p}; check the path")
        if p.suffix.lower() not in JSONL_SUFFIXES + TEXT_SUFFIXES:
            raise DataError(f"{p}: unsupported input type {p.suffix!r}; use .jsonl (one JSON object a line) or .txt")
        out.append(p)
    if not out:
        raise DataError("no input files given; pass at least one .jsonl or .txt file")
    return out


def iter_jsonl_texts(path: str | Path, field: str) -> Iterator[str]:
    """Yield ``obj[field]`` for every non-blank line of a JSONL file."""
    path = Path(path)
    for lineno, obj in iter_jsonl(path):
        if field not in obj:
            have = ", ".join(sorted(obj)) or "none"
            raise DataError(f"{path}:{lineno}: missing field {field!r} (fields: {have}); pass --field NAME or fix the line")
        value = obj[field]
        if not isinstance(value, str):
            raise DataError(f"{path}:{lineno}: field {field!r} is {type(value).__name__}, not a string; fix the line")
        yield value


def iter_texts(path: str | Path, field: str = "text") -> Iterator[str]:
    """Yield the documents of one input file (see the module docstring for the conventions)."""
    path = Path(path)
    if path.suffix.lower() in JSONL_SUFFIXES:
        yield from iter_jsonl_texts(path, field)
    else:
        try:
            yield path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not valid UTF-8 (byte {e.start}); re-encode the file as UTF-8") from None
