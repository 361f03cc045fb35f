"""Training checkpoints: atomic, checksummed, pickle-free, and enough to resume bit for bit.

Layout of ``RUN_DIR/checkpoints/step_{N:08d}/`` (``N`` = optimizer steps taken)::

    config.json              moelab model config + {"data", "train", "step", "tokens"} (moelab.load works)
    model.safetensors        weights (moelab.checkpoint.save_model)
    moelab_tokenizer.json    the run's tokenizer (or tokenizer.json for a Hugging Face tokenizer)
    optimizer.safetensors    AdamW tensors, keys "state/<param name>/<exp_avg|exp_avg_sq|step>"
    rng.safetensors          torch CPU RNG state (uint8) and, when present, "cuda/<i>" states
    trainer_state.json       step, tokens, optimizer param groups, loader state_dict, numpy/python RNG
    checksums.json           {"files": {name: sha256}} -- written LAST

The directory is built under a hidden temporary name and renamed into place, so a crash leaves either
no checkpoint or a complete one; ``checksums.json`` additionally catches later corruption.
:func:`latest_good_checkpoint` returns the newest directory whose checksums verify, warning about
(and skipping) any that do not. Nothing is ever pickled: tensors are safetensors, the rest JSON.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import CONFIG, WEIGHTS, read_json, read_safetensors, save_model, save_safetensors
from ..data.atomic_dir import atomic_dir
from ..errors import CheckpointError
from ..io import atomic_write_json, sha256_file

CHECKPOINTS = "checkpoints"
OPTIMIZER = "optimizer.safetensors"
RNG = "rng.safetensors"
STATE = "trainer_state.json"
CHECKSUMS = "checksums.json"
REQUIRED = (CONFIG, WEIGHTS, OPTIMIZER, RNG, STATE)
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


class CorruptCheckpointWarning(UserWarning):
    """A checkpoint directory failed verification and was skipped."""


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, dir)`` of every ``step_*`` directory under ``run_dir/checkpoints`` (or ``run_dir`` itself), oldest first."""
    run_dir = Path(run_dir)
    root = run_dir / CHECKPOINTS if (run_dir / CHECKPOINTS).is_dir() else run_dir
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def verify(ckpt: Path) -> str | None:
    """None if ``ckpt`` is complete and every checksum matches, else what is wrong (one phrase)."""
    sums_path = ckpt / CHECKSUMS
    if not sums_path.is_file():
        return f"no {CHECKSUMS} (the save did not finish)"
    try:
        sums = json.loads(sums_path.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"unreadable {CHECKSUMS}"
    for name in REQUIRED:
        if name not in sums:
            return f"{name} is not listed in {CHECKSUMS}"
    for name, digest in sums.items():
        f = ckpt / name
        if not f.is_file():
            return f"{name} is missing"
        if sha256_file(f) != digest:
            return f"{name} does not match its sha256"
    return None


def latest_good_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint directory of a run whose checksums verify; corrupt ones are skipped with a warning."""
    for step, path in reversed(list_checkpoints(run_dir)):
        problem = verify(path)
        if problem is None:
            return path
        warnings.warn(f"skipping corrupt checkpoint {path}: {problem}", CorruptCheckpointWarning, stacklevel=2)
    return None


# ------------------------------------------------------------------ RNG state (no pickle)
def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Torch CPU/CUDA RNG as uint8 tensors, numpy and python RNG as JSON-able lists."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda/{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, pystate, pygauss = random.getstate()
    meta = {
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(pystate), pygauss],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda/")), key=lambda k: int(k.split("/")[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    kind, keys, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, pystate, pygauss = meta["python"]
    random.setstate((version, tuple(pystate), pygauss))


# ------------------------------------------------------------------ save / load
def save_checkpoint(
    run_dir: Path,
    step: int,
    model,
    optimizer_tensors: dict[str, torch.Tensor],
    trainer_state: dict[str, Any],
    extra: dict[str, Any],
    tokenizer,
) -> Path:
    """Write ``checkpoints/step_{step:08d}`` atomically (replacing an existing one) and return it.

    ``model`` is an unwrapped :class:`MoELM`; ``optimizer_tensors`` / ``trainer_state`` come from
    :func:`moelab.train.optim.split_state` plus the loop's own fields.
    """
    dest = step_dir(run_dir, step)
    rng_tensors, rng_meta = rng_state()
    with atomic_dir(dest, overwrite=True) as tmp:
        save_model(model, tmp, extra=extra)
        tokenizer.save(tmp)
        save_safetensors(optimizer_tensors, tmp / OPTIMIZER)
        save_safetensors(rng_tensors, tmp / RNG)
        atomic_write_json(tmp / STATE, {**trainer_state, "rng": rng_meta})
        sums = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        atomic_write_json(tmp / CHECKSUMS, {"algorithm": "sha256", "files": sums})
    return dest


@dataclass
class Restored:
    """What :func:`load_checkpoint` reads back."""

    path: Path
    step: int
    model_tensors: dict[str, torch.Tensor]
    optimizer_tensors: dict[str, torch.Tensor]
    state: dict[str, Any]
    rng_tensors: dict[str, torch.Tensor]


def load_checkpoint(ckpt: Path) -> Restored:
    """Read a verified checkpoint directory (weights, optimizer, trainer state and RNG)."""
    problem = verify(ckpt)
    if problem is not None:
        raise CheckpointError(f"{ckpt}: {problem}; delete it to resume from the previous checkpoint")
    state = read_json(ckpt / STATE)
    return Restored(
        path=ckpt,
        step=int(state["step"]),
        model_tensors=read_safetensors([ckpt / WEIGHTS]),
        optimizer_tensors=read_safetensors([ckpt / OPTIMIZER]),
        state=state,
        rng_tensors=read_safetensors([ckpt / RNG]),
    )


def prune(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (and stale temporary directories); returns what was removed."""
    removed = []
    ckpts = list_checkpoints(run_dir)
    for _, path in ckpts[: max(0, len(ckpts) - keep)]:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def remove_stale_temporaries(run_dir: Path) -> None:
    """Remove half-written ``.step_*.tmp`` directories left by a killed save."""
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".step_") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
