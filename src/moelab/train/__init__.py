"""Pre-training: run config, the training loop, exact-resume checkpoints and data-parallel launch.

Public API::

    from moelab.train import load_run_config, train
    run = load_run_config("configs/tiny.yaml", ["train.steps=100"])   # RunConfig {model, data, train}
    summary = train(run, "runs/tiny")           # resumes from runs/tiny/checkpoints if present
    moelab.load("runs/tiny")                    # the newest good checkpoint's model

CLI: ``moelab train CONFIG.yaml --out RUN_DIR [--set key.path=value ...] [--resume/--no-resume]``,
also under ``torchrun`` (:mod:`moelab.train.distributed`). Modules: ``config`` (TrainConfig,
RunConfig, budgets), ``schedule`` (warmup + cosine), ``optim`` (AdamW and weight-decay groups),
``loop`` (train), ``checkpoint`` (atomic checkpoints, ``latest_good_checkpoint``), ``metrics``
(metrics.jsonl, TensorBoard), ``distributed`` (DDP / FSDP2), ``flops`` (matmul rate for MFU).
"""

from .config import RunConfig, TrainConfig, load_run_config, run_config_from_dict, total_steps
from .loop import TrainingDiverged, train

__all__ = ["RunConfig", "TrainConfig", "load_run_config", "run_config_from_dict", "total_steps", "train", "TrainingDiverged"]
