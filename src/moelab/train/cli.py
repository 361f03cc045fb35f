"""``moelab train CONFIG.yaml --out RUN_DIR [--set key.path=value ...] [--resume/--no-resume] [--until-step N]``.

Re-running the same command resumes from the newest complete checkpoint (``--resume`` is the
default); ``--until-step N`` stops after step N with a checkpoint (the schedule stays that of
``train.steps``), so a run can be trained in slices; ``--no-resume`` refuses a run directory that already holds checkpoints. CONFIG may be
omitted when RUN_DIR already holds a run (its stored ``config.yaml`` is used).
Under ``torchrun`` the same command trains data-parallel (see :mod:`moelab.train.distributed`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import ConfigError


def train_cmd(
    config: Optional[Path] = typer.Argument(None, help="Run YAML with model:, data: and train: sections (see configs/)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory (created; re-running resumes it)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a config value: key.path=value (YAML-parsed). Repeatable."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from the newest good checkpoint in --out."),
    quiet: bool = typer.Option(False, "--quiet", "-q", "--no-progress", help="No progress bar or progress lines (--no-progress as in moelab eval)."),
    as_json: bool = typer.Option(False, "--json", help="Print the final summary as one JSON line."),
    until_step: Optional[int] = typer.Option(None, "--until-step", help="Stop after this step with a checkpoint (schedule unchanged); re-running continues."),
) -> None:
    """Pre-train a MoE LM (also under torchrun); writes checkpoints, metrics.jsonl and config.yaml to --out."""
    from .config import load_run_config
    from .loop import RUN_CONFIG, train

    if config is None:
        config = out / RUN_CONFIG
        if not config.is_file():
            raise ConfigError(f"no CONFIG given and {config} does not exist; pass the run YAML, e.g. moelab train configs/tiny.yaml --out {out}")
    run = load_run_config(config, list(set_ or []))
    summary = train(run, out, resume=resume, quiet=quiet, until_step=until_step)
    if summary["rank"] != 0:
        return  # ranks > 0 stay silent
    if as_json:
        print(json.dumps(summary))
    elif not quiet:
        val = summary["val_loss"]
        print(f"trained {summary['step']}/{summary['steps']} steps ({summary['tokens']:,} tokens); "
              f"loss {summary['loss'] if summary['loss'] is None else round(summary['loss'], 4)}"
              f"{'' if val is None else f', val_loss {val:.4f}'}; checkpoint {summary['checkpoint']}")


def register(app: typer.Typer) -> None:
    """Add the ``train`` command to the root ``moelab`` app."""
    app.command("train")(train_cmd)
