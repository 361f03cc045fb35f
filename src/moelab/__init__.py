"""moelab: how sparse should my Mixture-of-Experts be?

Public API::

    import moelab
    cfg = moelab.ModelConfig(d_model=128, n_layers=2, n_experts=8, top_k=2)
    model = moelab.build(cfg, seed=0)            # initialised MoELM
    moelab.save(model, "ckpt/")                  # config.json + model.safetensors
    model = moelab.load("ckpt/")                 # a moelab checkpoint or a Hugging Face Mixtral directory
    moelab.export_hf(model, "hf_out/")           # MixtralForCausalLM.from_pretrained("hf_out/") works
    moelab.accounting.summarize(cfg, tokens=10**9)
    moelab.keep_freed_memory()                   # CPU: reuse freed memory instead of page-faulting (glibc)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .blas import request_strict_reproducibility

request_strict_reproducibility()  # before any matmul: MKL products then do not depend on the thread count

from . import accounting
from .allocator import keep_freed_memory
from .config import ModelConfig
from .errors import CheckpointError, ConfigError, DataError, MoelabError

__version__ = "0.1.0"
__all__ = [
    "ModelConfig", "build", "load", "save", "export_hf", "accounting", "keep_freed_memory",
    "MoelabError", "ConfigError", "CheckpointError", "DataError",
]


def build(config: ModelConfig | dict[str, Any], seed: int | None = 0):
    """Build and initialise a :class:`moelab.model.MoELM` (``seed=None`` uses the global RNG)."""
    from .model import MoELM

    cfg = config if isinstance(config, ModelConfig) else ModelConfig.create(**config)
    model = MoELM(cfg)
    model.reset_parameters(seed)
    return model


def save(model, out_dir: str | Path) -> Path:
    """Write a moelab checkpoint directory (``config.json`` + ``model.safetensors``), atomically."""
    from .checkpoint import save_model

    return save_model(model, out_dir)


def load(path: str | Path, **overrides: Any):
    """Load a moelab checkpoint directory or a Hugging Face Mixtral directory.

    ``overrides`` replace model config fields, e.g. ``moe_backend="loop"``. A training run directory
    is accepted too: its newest complete checkpoint is loaded.
    """
    from .checkpoint import CONFIG, load_moelab_dir
    from .hf import is_mixtral_dir, load_mixtral_dir

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p} does not exist; pass a moelab checkpoint or a Mixtral directory")
    if not p.is_dir():
        raise CheckpointError(f"{p} is a file; pass the checkpoint directory that contains config.json")
    if (p / CONFIG).is_file():
        if is_mixtral_dir(p):
            return load_mixtral_dir(p, **overrides)
        return load_moelab_dir(p, **overrides)
    run_ckpt = _latest_run_checkpoint(p)
    if run_ckpt is not None:
        return load_moelab_dir(run_ckpt, **overrides)
    raise CheckpointError(
        f"{p} is neither a moelab checkpoint nor a Hugging Face Mixtral directory (no config.json); "
        "pass the directory that holds config.json and the .safetensors weights"
    )


def _latest_run_checkpoint(run_dir: Path) -> Path | None:
    """A training run directory keeps checkpoints under ``checkpoints/``; the trainer decides which is good."""
    try:
        from .train.checkpoint import latest_good_checkpoint  # type: ignore[attr-defined]
    except ImportError:
        return None
    return latest_good_checkpoint(run_dir)


def export_hf(model, out_dir: str | Path, max_shard_bytes: int | None = None) -> Path:
    """Write ``model`` as a Hugging Face Mixtral directory (see :mod:`moelab.hf` for what is refused)."""
    from .hf import export_mixtral

    return export_mixtral(model, out_dir, max_shard_bytes=max_shard_bytes)
