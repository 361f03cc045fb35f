"""The moelab model checkpoint: a directory with ``config.json`` and ``model.safetensors``.

``config.json`` = ``{"format": "moelab", "format_version": 1, "model": {ModelConfig fields}}`` plus
optional extra keys (the trainer adds its own). Tensors are stored in fp32 (or the model's dtype)
under the module's own parameter names; a tied LM head is stored once (as ``embed.weight``).
Both files are written atomically; loading never unpickles anything (safetensors only).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .errors import CheckpointError, ConfigError
from .io import atomic_path, atomic_write_json

FORMAT = "moelab"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters by name, each stored once (tied weights appear under the first name)."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        out[name] = p.detach().contiguous().cpu()
    return out


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def save_model(model, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` to ``out_dir`` (created if needed) in the moelab format. Returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(model_tensors(model), out / WEIGHTS, metadata={"format": FORMAT})
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model.config.to_dict()}
    if extra:
        config.update(extra)
    atomic_write_json(out / CONFIG, config)
    return out


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable JSON ({e}); the checkpoint is corrupt, re-export or re-save it") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object; the checkpoint is corrupt")
    return data


def read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """Read every tensor of the given safetensors files; a truncated or corrupt file is a clear error."""
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"missing weight file {f}; the checkpoint is incomplete")
        try:
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():
                    tensors[key] = sf.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(
                f"{f}: not a valid safetensors file ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                "it is truncated or corrupt, re-save or re-download it"
            ) from None
    return tensors


def load_state_into(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``tensors`` into ``model``; missing, unexpected or mis-shaped tensors are errors."""
    expected = model_tensors(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s) {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}; the checkpoint is incomplete or from another architecture")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor(s) {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}; the checkpoint does not match its config")
    params = dict(model.named_parameters())
    for name, value in tensors.items():
        if tuple(value.shape) != tuple(params[name].shape):
            raise CheckpointError(
                f"{source}: tensor {name} has shape {tuple(value.shape)}, expected {tuple(params[name].shape)} from the config; "
                "config.json and the weights disagree"
            )
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].dtype))


def load_moelab_dir(path: Path, **overrides: Any):
    """Load a moelab checkpoint directory. ``overrides`` replace config fields (e.g. ``moe_backend``)."""
    from .model import MoELM

    meta = read_json(path / CONFIG)
    if meta.get("format") != FORMAT or "model" not in meta:
        raise CheckpointError(f"{path / CONFIG}: not a moelab config (no 'format: moelab' and 'model'); use moelab.load for Mixtral directories")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {meta['format_version']} is newer than this moelab ({FORMAT_VERSION}); upgrade moelab")
    try:
        cfg = ModelConfig.create(**{**meta["model"], **overrides})
    except ConfigError as e:
        raise CheckpointError(f"{path / CONFIG}: {e}") from None
    model = MoELM(cfg)
    load_state_into(model, read_safetensors([path / WEIGHTS]), str(path / WEIGHTS))
    return model
