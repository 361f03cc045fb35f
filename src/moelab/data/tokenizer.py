"""Tokenizers: a dependency-free byte tokenizer and a thin wrapper over a local HF ``tokenizer.json``.

Both expose the same small interface::

    encode(text) -> list[int]      # no special tokens are added
    decode(ids) -> str             # special tokens are dropped
    eos_id: int                    # document separator in token shards
    eos_token: str | None          # its text (e.g. "</s>"), None when it has none (the byte tokenizer)
    vocab_size: int                # number of ids the model's embedding must cover
    descriptor() -> dict           # JSON identity written into shard manifests
    save(directory) -> Path        # makes ``load_tokenizer(directory)`` return an equal tokenizer

``ByteTokenizer``: ids 0..255 are the UTF-8 bytes, id 256 is eos, ``vocab_size == 257``. There is no
separate pad or bos token; use ``eos_id`` for padding if you need one.

``HFTokenizer`` loads a local file only (no hub downloads); the optional ``tokenizers`` package is
imported lazily. Its eos is the first of ``EOS_CANDIDATES`` present in the vocabulary.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import ConfigError, DataError
from ..io import atomic_path, atomic_write_json, atomic_write_text
from .sources import check_inputs, iter_texts

BYTE_TOKENIZER_FILE = "moelab_tokenizer.json"
HF_TOKENIZER_FILE = "tokenizer.json"
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "[SEP]")


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are bytes, 256 is eos."""

    eos_id = 256
    eos_token = None  # eos has no text form: it decodes to nothing
    vocab_size = 257
    spec = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def descriptor(self) -> dict:
        return {"type": "byte", "vocab_size": self.vocab_size, "eos_id": self.eos_id}

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / BYTE_TOKENIZER_FILE
        atomic_write_json(path, {"type": "byte"})
        return path

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteTokenizer)

    def __hash__(self) -> int:
        return hash("byte")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ConfigError("the 'tokenizers' package is not installed; run `pip install moelab[hf]` or use --tokenizer byte") from None
    return tokenizers


class HFTokenizer:
    """A local Hugging Face ``tokenizers`` tokenizer (``tokenizer.json``)."""

    def __init__(self, path: str | Path):
        tokenizers = _import_tokenizers()
        self.path = Path(path)
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as e:  # the Rust side raises a bare Exception with a long message
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"{self.path}: cannot load tokenizer ({first}); pass a valid tokenizer.json") from None
        self.eos_id = self._find_eos()
        self.eos_token = self._tok.id_to_token(self.eos_id) or None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.spec = str(self.path)

    def _find_eos(self) -> int:
        for tok in EOS_CANDIDATES:
            i = self._tok.token_to_id(tok)
            if i is not None:
                return i
        raise DataError(f"{self.path}: tokenizer has none of the eos tokens {list(EOS_CANDIDATES)}; add one as a special token")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def to_str(self) -> str:
        """The tokenizer's canonical JSON text."""
        return self._tok.to_str()

    def descriptor(self) -> dict:
        digest = hashlib.sha256(self.to_str().encode("utf-8")).hexdigest()
        return {"type": "hf", "vocab_size": self.vocab_size, "eos_id": self.eos_id, "sha256": digest}

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / HF_TOKENIZER_FILE
        atomic_write_text(path, self.to_str())
        return path

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HFTokenizer) and other.descriptor() == self.descriptor()

    def __hash__(self) -> int:
        return hash(self.descriptor()["sha256"])

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r})"


Tokenizer = ByteTokenizer | HFTokenizer


def _load_json_file(path: Path) -> Tokenizer:
    try:
        head = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a JSON tokenizer file ({e}); pass 'byte' or a valid tokenizer.json") from None
    if isinstance(head, dict) and head.get("type") == "byte":
        return ByteTokenizer()
    return HFTokenizer(path)


def load_tokenizer(spec: str | Path | Tokenizer) -> Tokenizer:
    """Load a tokenizer from ``"byte"``, a ``tokenizer.json`` / ``moelab_tokenizer.json`` file, or a directory holding one.

    A tokenizer object is returned unchanged, so callers may pass either a spec or an instance.
    """
    if isinstance(spec, (ByteTokenizer, HFTokenizer)):
        return spec
    if isinstance(spec, str) and spec.strip().lower() == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if path.is_dir():
        for name in (BYTE_TOKENIZER_FILE, HF_TOKENIZER_FILE):
            if (path / name).is_file():
                return _load_json_file(path / name)
        raise ConfigError(f"directory {path} holds neither {BYTE_TOKENIZER_FILE} nor {HF_TOKENIZER_FILE}; pass 'byte' or a tokenizer.json")
    if path.is_file() and path.suffix == ".json":
        return _load_json_file(path)
    raise ConfigError(f"unknown tokenizer spec {str(spec)!r}; use 'byte', a tokenizer.json file or a directory containing one")


def train_bpe(files: Iterable[str | Path], vocab_size: int, out_path: str | Path, field: str | None = None) -> Path:
    """Train a byte-level BPE tokenizer on local .txt/.jsonl files and write it atomically.

    ``field`` names the JSONL text field (default ``"text"``); .txt files are read whole.
    ``out_path`` ending in ``.json`` is the file to write; anything else is a directory that receives
    ``tokenizer.json``. The vocabulary holds the 256 byte symbols, ``<|endoftext|>`` (the eos, id 0)
    and learned merges up to ``vocab_size``. Returns the written path.
    """
    if not isinstance(vocab_size, int) or not 258 <= vocab_size <= 1_000_000:
        raise ConfigError(f"vocab_size={vocab_size!r} is out of range; choose an integer in [258, 1000000]")
    paths = check_inputs(files)
    tokenizers = _import_tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def texts():
        for p in paths:
            yield from iter_texts(p, field or "text")

    tok.train_from_iterator(texts(), trainer=trainer)
    out = Path(out_path)
    if out.suffix != ".json":
        out = out / HF_TOKENIZER_FILE
    with atomic_path(out) as tmp:
        tok.save(str(tmp))
    return out
