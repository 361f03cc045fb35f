"""Run configuration: ``RunConfig = {model: ModelConfig, data: DataConfig, train: TrainConfig}``.

A run is described by one YAML file with three sections. ``--set key.path=value`` overrides any
leaf (the value is parsed with ``yaml.safe_load``, so ``--set train.lr=1e-3`` is a float and
``--set data.synthetic.attributes=[birth_year]`` a list). Unknown keys at any level are errors
with a "did you mean" suggestion.

Optimizer defaults follow the published study (``shared/docs/study.md``): AdamW β = (0.9, 0.95),
eps 1e-8, weight decay 0.1, gradient clipping 1.0, peak LR 4e-4, 2 000 linear warmup steps, cosine
decay to 10 % of peak (4e-5). Presets override the warmup for short runs.

Training length is exactly one of ``steps`` (optimizer steps), ``tokens`` (training tokens),
``tpp`` (tokens per *total* parameter) or ``flops`` (training FLOPs, ``accounting.train_flops_per_token``
at ``data.seq_len``); :func:`total_steps` converts them, rounding down to whole steps.
"""

from __future__ import annotations

import copy
import difflib
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .. import accounting
from ..config import ModelConfig, format_validation_error, read_mapping
from ..data.config import DataConfig
from ..errors import ConfigError


class TrainConfig(BaseModel):
    """Optimisation, length, evaluation, checkpointing and hardware settings of one run.

    Units: ``lr`` per step; ``warmup_steps``, ``eval_every``, ``checkpoint_every``, ``log_every`` in
    optimizer steps; ``micro_batch_size`` in sequences per rank per micro step; ``peak_flops`` in
    FLOP/s per device (None = measure the fp32 matmul rate once per process).
    One optimizer step consumes ``micro_batch_size * grad_accum_steps * world_size * data.seq_len``
    tokens (the *global batch*).
    """

    model_config = ConfigDict(extra="forbid")

    # optimizer (AdamW) and schedule
    lr: float = Field(4e-4, gt=0, description="peak learning rate")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final LR as a fraction of peak (cosine floor)")
    warmup_steps: int = Field(2000, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0, description="decoupled decay of 2-D+ matrices except embeddings")
    grad_clip: float = Field(1.0, ge=0, description="max global grad L2 norm; 0 disables clipping")
    # batch
    micro_batch_size: int = Field(8, ge=1)
    grad_accum_steps: int = Field(1, ge=1)
    # length: exactly one
    steps: int | None = Field(None, ge=1)
    tokens: int | None = Field(None, ge=1)
    tpp: float | None = Field(None, gt=0)
    flops: float | None = Field(None, gt=0)
    # evaluation, logging, checkpoints
    eval_every: int = Field(100, ge=1, description="steps between validation losses (also at the last step)")
    eval_batches: int = Field(8, ge=1, description="validation batches of micro_batch_size windows")
    log_every: int = Field(1, ge=1)
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    tensorboard: bool = False
    # hardware
    seed: int = Field(0, ge=0, description="model initialisation seed")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False
    peak_flops: float | None = Field(None, gt=0)
    distributed: Literal["ddp", "fsdp"] = "ddp"

    @model_validator(mode="after")
    def _one_length(self) -> "TrainConfig":
        given = [k for k in LENGTH_KEYS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one training length of {', '.join(LENGTH_KEYS)} (got {', '.join(given) or 'none'}); "
                "e.g. train.steps: 1000"
            )
        return self


LENGTH_KEYS = ("steps", "tokens", "tpp", "flops")
#: train keys that may change between a run and its resumption (they do not change the math of the steps
#: already taken). Changing the length changes the cosine schedule of the remaining steps. The split of
#: the global batch into micro batches, accumulation and ranks may change (e.g. resume a torchrun job on
#: one process), but the global batch itself may not: the loader refuses a different one.
RESUME_SAFE_KEYS = frozenset(
    {f"train.{k}" for k in (*LENGTH_KEYS, "eval_every", "eval_batches", "log_every", "checkpoint_every",
                            "keep_checkpoints", "tensorboard", "compile", "peak_flops", "device",
                            "micro_batch_size", "grad_accum_steps", "distributed")}
)


class RunConfig(BaseModel):
    """Everything a training run needs; stored resolved in ``RUN_DIR/config.yaml``."""

    model_config = ConfigDict(extra="forbid")

    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig

    @model_validator(mode="after")
    def _consistent(self) -> "RunConfig":
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"data.seq_len ({self.data.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len}); "
                "raise model.max_seq_len or lower data.seq_len"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "data": self.data.model_dump(), "train": self.train.model_dump()}


# ------------------------------------------------------------------------------------------ parsing
def _model_class(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``annotation`` (``X``, ``X | None``, ``list[X]``), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_class(arg)
        if found is not None:
            return found
    return None


#: common names from other trainers, suggested when difflib finds nothing close
ALIASES = {"learning_rate": "lr", "max_lr": "lr", "peak_lr": "lr", "warmup": "warmup_steps", "max_steps": "steps",
           "batch_size": "micro_batch_size", "gradient_accumulation_steps": "grad_accum_steps",
           "clip_grad": "grad_clip", "max_grad_norm": "grad_clip", "wd": "weight_decay", "precision": "dtype"}


def check_unknown_keys(data: Any, cls: type[BaseModel], prefix: str = "") -> None:
    """Raise ConfigError naming the first unknown key under ``data`` (recursively), with a suggestion."""
    if not isinstance(data, dict):
        return
    fields = cls.model_fields
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            guess = close[0] if close else ALIASES.get(str(key))
            hint = f"did you mean '{prefix}{guess}'?" if guess in fields else f"known keys: {', '.join(fields)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'; {hint}")
        sub = _model_class(fields[key].annotation)
        if sub is None:
            continue
        if isinstance(value, list):
            for i, item in enumerate(value):
                check_unknown_keys(item, sub, f"{prefix}{key}[{i}].")
        else:
            check_unknown_keys(value, sub, f"{prefix}{key}.")


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``a.b.c=value`` applied (value parsed by ``yaml.safe_load``)."""
    out = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r} is not key.path=value; e.g. --set train.lr=1e-3")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML; quote it or fix the syntax") from None
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {key}: {part!r} is a value, not a section; check the key path")
            node = nxt
        node[parts[-1]] = value
    return out


def run_config_from_dict(data: dict[str, Any], source: str = "run config") -> RunConfig:
    """Validate a mapping into a :class:`RunConfig`; every problem is a one-line ConfigError."""
    check_unknown_keys(data, RunConfig)
    for section in ("model", "train"):
        if section not in data:
            raise ConfigError(f"{source}: missing section {section!r}; add '{section}:' with its settings")
    for section, value in data.items():
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping of key: value, got {type(value).__name__}")
    model = ModelConfig.create(**(data["model"] or {}))
    data_cfg = DataConfig.model_validate(data.get("data") or {})
    try:
        train = TrainConfig(**(data["train"] or {}))
        return RunConfig(model=model, data=data_cfg, train=train)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, f"{source} (train)")) from None


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a run YAML, apply ``--set`` overrides and validate."""
    data = read_mapping(path)
    return run_config_from_dict(apply_overrides(data, overrides or []), str(path))


# ------------------------------------------------------------------------------------------ budget
def tokens_per_step(run: RunConfig, world_size: int = 1) -> int:
    """Tokens consumed by one optimizer step (the global batch)."""
    t = run.train
    return t.micro_batch_size * t.grad_accum_steps * world_size * run.data.seq_len


def total_steps(run: RunConfig, world_size: int = 1) -> int:
    """Optimizer steps of the run: ``steps`` as given, else the token budget // tokens per step.

    ``tpp`` uses total parameters (:func:`accounting.tokens_for_tpp`); ``flops`` uses training FLOPs
    per token at ``data.seq_len`` (:func:`accounting.tokens_for_flops`). A budget below one step is an error.
    """
    t = run.train
    per_step = tokens_per_step(run, world_size)
    if t.steps is not None:
        steps, what = t.steps, f"train.steps={t.steps}"
    else:
        if t.tokens is not None:
            tokens, what = t.tokens, f"train.tokens={t.tokens}"
        elif t.tpp is not None:
            tokens, what = accounting.tokens_for_tpp(run.model, t.tpp), f"train.tpp={t.tpp:g} ({accounting.tokens_for_tpp(run.model, t.tpp)} tokens)"
        else:
            assert t.flops is not None
            tokens = accounting.tokens_for_flops(run.model, t.flops, run.data.seq_len)
            what = f"train.flops={t.flops:g} ({tokens} tokens)"
        steps = tokens // per_step
    if steps < 1:
        raise ConfigError(f"{what} is less than one optimizer step of {per_step} tokens; raise the budget or lower the batch size")
    if t.warmup_steps >= steps:
        raise ConfigError(
            f"train.warmup_steps={t.warmup_steps} is not shorter than the run ({steps} steps from {what}); "
            "lower train.warmup_steps or train longer"
        )
    return steps


def diff_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested mappings."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out
