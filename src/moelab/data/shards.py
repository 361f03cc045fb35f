"""Token shards: flat binary files of token ids plus a ``manifest.json`` that describes them.

On-disk layout of a shard directory::

    manifest.json              # written last; see MANIFEST_FORMAT / MANIFEST_VERSION
    shard_00000.bin, ...       # raw little-endian token ids, dtype uint16 (vocab <= 65536) else uint32
    moelab_tokenizer.json      # or tokenizer.json: the tokenizer, so load_tokenizer(dir) works

Every document is followed by one ``eos`` id, so the concatenation of all shards is the stream
``doc0 eos doc1 eos ...``. Shards hold at most ``shard_tokens`` ids; documents may straddle shards.
The whole directory is built under a temporary name and renamed into place, so a failure leaves
nothing behind.

:class:`ShardSet` opens such a directory, checks the manifest against the files (existence, size,
optionally sha256) and reads token ranges of the concatenated stream through ``numpy.memmap``.
:class:`~moelab.data.loader.TokenLoader` (re-exported here) samples training windows from shard sets.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from ..errors import DataError
from ..io import atomic_write_json, sha256_file
from .atomic_dir import atomic_dir
from .loader import TokenLoader, eval_batches  # noqa: F401  (re-export: the loader reads ShardSets)
from .sources import check_inputs, iter_texts
from .tokenizer import Tokenizer, load_tokenizer

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "moelab-shards"
MANIFEST_VERSION = 1
DEFAULT_SHARD_TOKENS = 1 << 24  # 16 Mi tokens = 32 MiB of uint16 per shard


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id of a vocabulary of ``vocab_size``."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class _ShardWriter:
    """Buffers token ids and writes fixed-size shard files into ``directory``."""

    def __init__(self, directory: Path, dtype: np.dtype, shard_tokens: int):
        self.directory, self.dtype, self.shard_tokens = directory, dtype, shard_tokens
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.shards: list[dict] = []

    def add(self, ids: np.ndarray) -> None:
        self.buffer.append(ids)
        self.buffered += len(ids)
        while self.buffered >= self.shard_tokens:
            flat = np.concatenate(self.buffer)
            self._write(flat[: self.shard_tokens])
            rest = flat[self.shard_tokens :]
            self.buffer, self.buffered = ([rest] if len(rest) else []), len(rest)

    def close(self) -> None:
        if self.buffered:
            self._write(np.concatenate(self.buffer))
        self.buffer, self.buffered = [], 0

    def _write(self, ids: np.ndarray) -> None:
        name = f"shard_{len(self.shards):05d}.bin"
        path = self.directory / name
        with open(path, "wb") as f:
            f.write(ids.astype(self.dtype.newbyteorder("<"), copy=False).tobytes())
            f.flush()
            os.fsync(f.fileno())
        self.shards.append({"file": name, "tokens": int(len(ids)), "sha256": sha256_file(path)})


def write_shards(
    docs: Iterable[str] | Iterable[Sequence[int]],
    tokenizer: Tokenizer | str,
    out_dir: str | Path,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    meta: dict | None = None,
    overwrite: bool = False,
    on_document: Callable[[int], None] | None = None,
) -> dict:
    """Tokenise ``docs`` (strings, or already-encoded id sequences without eos) into a shard directory.

    Appends ``eos`` after every document. ``meta`` is stored under ``"meta"`` in the manifest.
    ``on_document(n_tokens)`` is called after each document (for progress bars). Returns the manifest.
    Raises :class:`DataError` if there are no documents or an id does not fit the vocabulary.
    """
    if not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise DataError(f"shard_tokens={shard_tokens!r} must be a positive integer; pass e.g. --shard-tokens 16777216")
    tok = load_tokenizer(tokenizer)
    dtype = dtype_for_vocab(tok.vocab_size)
    eos = np.array([tok.eos_id], dtype=np.int64)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        writer = _ShardWriter(tmp, dtype, shard_tokens)
        n_docs = 0
        for doc in docs:
            ids = np.asarray(tok.encode(doc) if isinstance(doc, str) else doc, dtype=np.int64)
            if len(ids) and (ids.min() < 0 or ids.max() >= tok.vocab_size):
                raise DataError(f"document {n_docs} has token ids outside [0, {tok.vocab_size}); encode it with the same tokenizer")
            writer.add(np.concatenate([ids, eos]))
            n_docs += 1
            if on_document is not None:
                on_document(len(ids) + 1)
        writer.close()
        if n_docs == 0:
            raise DataError(f"no documents to write into {out_dir}; check that the inputs are not empty")
        tok.save(tmp)
        manifest = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "dtype": dtype.name,
            "tokenizer": {"spec": tok.spec, **tok.descriptor()},
            "total_tokens": sum(s["tokens"] for s in writer.shards),
            "n_documents": n_docs,
            "shards": writer.shards,
            "meta": meta or {},
        }
        atomic_write_json(tmp / MANIFEST, manifest)
    return manifest


def prepare(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    tokenizer: Tokenizer | str = "byte",
    field: str = "text",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    overwrite: bool = False,
    on_document: Callable[[int], None] | None = None,
) -> dict:
    """Tokenise local .jsonl (text in ``field``) and .txt files into a shard directory; return its manifest.

    All inputs are checked for existence first; a malformed line raises ``DataError("file:line: ...")``
    and leaves nothing in (or at) ``out_dir``.
    """
    paths = check_inputs(inputs)
    tok = load_tokenizer(tokenizer)

    def docs():
        for p in paths:
            yield from iter_texts(p, field)

    meta = {"inputs": [str(p) for p in paths], "field": field}
    return write_shards(docs(), tok, out_dir, shard_tokens=shard_tokens, meta=meta, overwrite=overwrite, on_document=on_document)


class ShardSet:
    """A validated, read-only shard directory; token offsets index the concatenation of its shards."""

    def __init__(self, directory: Path, manifest: dict):
        self.directory = directory
        self.manifest = manifest
        self.dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
        self.files = [directory / s["file"] for s in manifest["shards"]]
        self.shard_tokens = [int(s["tokens"]) for s in manifest["shards"]]
        self.offsets = np.concatenate([[0], np.cumsum(self.shard_tokens)]).astype(np.int64)
        self.total_tokens = int(self.offsets[-1])
        self._maps: list[np.memmap | None] = [None] * len(self.files)

    @classmethod
    def open(cls, directory: str | Path, verify: bool = False) -> "ShardSet":
        """Open ``directory``, checking the manifest, every file's presence and size (and sha256 if ``verify``)."""
        directory = Path(directory)
        mpath = directory / MANIFEST
        if not mpath.is_file():
            raise DataError(f"{mpath} not found; point at a directory made by `moelab data prepare` (or `synthetic`)")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{mpath}: unreadable manifest ({e}); re-run `moelab data prepare`") from None
        _check_manifest(mpath, manifest)
        itemsize = np.dtype(manifest["dtype"]).itemsize
        for s in manifest["shards"]:
            f = directory / s["file"]
            if not f.is_file():
                raise DataError(f"{mpath}: shard {s['file']} is missing; restore it or re-run `moelab data prepare`")
            want = int(s["tokens"]) * itemsize
            have = f.stat().st_size
            if have != want:
                raise DataError(f"{f}: size {have} bytes, manifest says {want}; the shard is truncated or corrupt, re-run `moelab data prepare`")
            if verify and sha256_file(f) != s["sha256"]:
                raise DataError(f"{f}: sha256 mismatch with {MANIFEST}; the shard is corrupt, re-run `moelab data prepare`")
        return cls(directory, manifest)

    @property
    def tokenizer_descriptor(self) -> dict:
        """The manifest's tokenizer identity without the (machine-specific) ``spec`` path."""
        return {k: v for k, v in self.manifest["tokenizer"].items() if k != "spec"}

    @property
    def eos_id(self) -> int:
        return int(self.manifest["tokenizer"]["eos_id"])

    def tokenizer(self) -> Tokenizer:
        """The tokenizer saved alongside the shards."""
        return load_tokenizer(self.directory)

    def _map(self, i: int) -> np.memmap:
        if self._maps[i] is None:
            self._maps[i] = np.memmap(self.files[i], dtype=self.dtype, mode="r", shape=(self.shard_tokens[i],))
        return self._maps[i]

    def read(self, start: int, length: int) -> np.ndarray:
        """Token ids ``[start, start + length)`` of the concatenated stream, as int64."""
        if start < 0 or length < 0 or start + length > self.total_tokens:
            raise IndexError(f"range [{start}, {start + length}) outside [0, {self.total_tokens})")
        out = np.empty(length, dtype=np.int64)
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pos, done = start, 0
        while done < length:
            local = pos - int(self.offsets[i])
            take = min(length - done, self.shard_tokens[i] - local)
            out[done : done + take] = self._map(i)[local : local + take]
            done, pos, i = done + take, pos + take, i + 1
        return out

    def all_tokens(self) -> np.ndarray:
        """Every token id, concatenated (int64; loads everything into memory)."""
        return self.read(0, self.total_tokens)

    def __len__(self) -> int:
        return self.total_tokens

    def __repr__(self) -> str:
        return f"ShardSet({str(self.directory)!r}, tokens={self.total_tokens})"


def _check_manifest(mpath: Path, m: object) -> None:
    def bad(what: str) -> DataError:
        return DataError(f"{mpath}: {what}; re-run `moelab data prepare` to rebuild the shards")

    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise bad(f"not a {MANIFEST_FORMAT} manifest")
    if m.get("version") != MANIFEST_VERSION:
        raise bad(f"manifest version {m.get('version')!r} is not supported (expected {MANIFEST_VERSION})")
    if m.get("dtype") not in ("uint16", "uint32"):
        raise bad(f"dtype {m.get('dtype')!r} is not uint16 or uint32")
    shards = m.get("shards")
    if not isinstance(shards, list) or not shards:
        raise bad("manifest lists no shards")
    for s in shards:
        if not (isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("tokens"), int) and isinstance(s.get("sha256"), str)):
            raise bad(f"malformed shard entry {s!r}")
        if Path(s["file"]).name != s["file"]:
            raise bad(f"shard file name {s['file']!r} must be a plain file name")
    if sum(s["tokens"] for s in shards) != m.get("total_tokens"):
        raise bad("total_tokens does not equal the sum of shard token counts")
    tok = m.get("tokenizer")
    if not isinstance(tok, dict) or not isinstance(tok.get("eos_id"), int) or not isinstance(tok.get("vocab_size"), int):
        raise bad("tokenizer entry lacks eos_id/vocab_size")
