"""Load what an evaluation needs from a path: model, tokenizer, and the checkpoint's data config.

A MODEL path is a moelab checkpoint directory, a training run directory (its newest good checkpoint
is used, as :func:`moelab.load` does) or a Hugging Face Mixtral directory.

Tokenizer resolution, first match wins: the ``tokenizer`` argument (``"byte"``, a tokenizer.json, or
a directory holding one); ``tokenizer.json`` / ``moelab_tokenizer.json`` in the checkpoint directory;
the same in the run directory; ``"byte"`` when the checkpoint's ``config.json`` says its data used the
byte tokenizer. Otherwise a one-line error asks for ``--tokenizer``.

The synthetic test sets are a function of the ``data.synthetic`` section the trainer writes into the
checkpoint's ``config.json`` (see :func:`synthetic_config`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ConfigError
from ..data.tokenizer import BYTE_TOKENIZER_FILE, HF_TOKENIZER_FILE, load_tokenizer


@dataclass
class EvalModel:
    """A model ready to evaluate and where it came from."""

    model: Any
    tokenizer: Any
    path: Path  # the path the user gave
    checkpoint: Path  # the directory actually loaded (differs from ``path`` for a run directory)
    meta: dict[str, Any] = field(default_factory=dict)  # the checkpoint's config.json


def checkpoint_dir(path: Path) -> Path:
    """The directory holding ``config.json`` that :func:`moelab.load` reads for ``path``."""
    import moelab

    if (path / "config.json").is_file():
        return path
    found = moelab._latest_run_checkpoint(path)
    if found is None:
        raise CheckpointError(
            f"{path} is neither a checkpoint nor a run directory with a complete checkpoint; "
            "pass the directory that holds config.json"
        )
    return Path(found)


def _read_meta(ckpt: Path) -> dict[str, Any]:
    try:
        meta = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def resolve_tokenizer(spec, ckpt: Path, run_dir: Path, meta: dict[str, Any]):
    """The tokenizer for a checkpoint (see the module docstring for the order); ``spec`` may also be
    a tokenizer object, used as given."""
    if spec is not None:
        return load_tokenizer(spec) if isinstance(spec, (str, Path)) else spec
    for folder in dict.fromkeys((ckpt, run_dir)):
        if (folder / BYTE_TOKENIZER_FILE).is_file() or (folder / HF_TOKENIZER_FILE).is_file():
            return load_tokenizer(folder)
    data = meta.get("data")
    if isinstance(data, dict) and str(data.get("tokenizer", "")).strip().lower() == "byte":
        return load_tokenizer("byte")
    raise ConfigError(
        f"no tokenizer found for {ckpt} (looked for {HF_TOKENIZER_FILE} and {BYTE_TOKENIZER_FILE}); "
        "pass --tokenizer byte, a tokenizer.json, or a directory holding one"
    )


def load_for_eval(path: str | Path, tokenizer=None, device: str = "cpu") -> EvalModel:
    """Load model + tokenizer from ``path`` (``tokenizer``: a spec, an object, or None to find it);
    check the tokenizer fits the model's vocabulary. The checkpoint is chosen (and verified) once."""
    import moelab

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"model path {p} does not exist; pass a moelab checkpoint, run directory or Mixtral directory")
    ckpt = checkpoint_dir(p)
    model = moelab.load(ckpt)
    meta = _read_meta(ckpt)
    tok = resolve_tokenizer(tokenizer, ckpt, p, meta)
    if tok.vocab_size > model.config.vocab_size:
        raise ConfigError(
            f"tokenizer has {tok.vocab_size} tokens but the model's vocabulary is {model.config.vocab_size}; "
            "pass the tokenizer the model was trained with (--tokenizer)"
        )
    model.to(device).eval()
    return EvalModel(model=model, tokenizer=tok, path=p, checkpoint=ckpt, meta=meta)


def synthetic_config(meta: dict[str, Any], where: Path | str):
    """The :class:`~moelab.data.config.SyntheticConfig` stored in a checkpoint's ``config.json``
    (``data.synthetic``); a one-line error when absent."""
    from ..data.config import SyntheticConfig

    data = meta.get("data")
    section = data.get("synthetic") if isinstance(data, dict) else None
    if not isinstance(section, dict):
        raise ConfigError(
            f"{where}: config.json has no 'data.synthetic' section, so the synthetic test sets are unknown; "
            "evaluate a checkpoint trained on synthetic data (or pass synthetic= to evaluate())"
        )
    return SyntheticConfig.model_validate(section)
