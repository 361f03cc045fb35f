"""``moelab eval MODEL --tasks a,b ...``: evaluate a checkpoint, write results.json (atomically).

MODEL is a moelab checkpoint, a training run directory (newest good checkpoint) or a Hugging Face
Mixtral directory. Synthetic tasks take their test documents from the checkpoint's ``config.json``
(``data.synthetic``). With ``--samples N > 1`` a test-time-compute curve (pass@k, maj@k) is added per
generation task and also written as ``<out>.test_time.csv``; ``--log-samples`` writes one JSON line per
sample to ``<out>.samples.jsonl``. User errors exit with status 1 and one ``error:`` line (root CLI).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from ..errors import ConfigError
from ..io import atomic_write_json, atomic_write_text

_console = Console()


def _int_list(text: str | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated integers like 1,2,4, got {text!r}") from None


def sibling(out: Path, suffix: str) -> Path:
    """``results.json`` -> ``results<suffix>`` next to it."""
    return out.with_name(out.stem + suffix)


def eval_cmd(
    model: Path = typer.Argument(..., help="moelab checkpoint, training run directory, or Hugging Face Mixtral directory."),
    tasks: str = typer.Option(..., "--tasks", help="Comma-separated task names (gsm8k, gsm_plus, triviaqa, hellaswag, synthetic-memorization, synthetic-reasoning)."),
    shots: Optional[int] = typer.Option(None, "--shots", help="Few-shot examples per prompt (default: each task's own)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate only the first N documents of each task."),
    samples: int = typer.Option(1, "--samples", help="Generations per problem; N > 1 adds pass@k / maj@k curves (needs --temperature > 0)."),
    ks: Optional[str] = typer.Option(None, "--ks", help="k values for pass@k / maj@k, e.g. 1,4,16 (default 1,2,4,...,N)."),
    temperature: float = typer.Option(0.0, "--temperature", help="Sampling temperature; 0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass in (0, 1]."),
    batch_size: int = typer.Option(16, "--batch-size", help="Sequences per forward pass."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Generation length cap (default: each task's own)."),
    out: Path = typer.Option(Path("results.json"), "--out", help="Where to write the results JSON."),
    log_samples: bool = typer.Option(False, "--log-samples", help="Also write <out>.samples.jsonl: prompt, output, extracted answer, correct."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Folder holding gsm8k/, gsm_plus/, ... (default $MOELAB_DATA or ./data)."),
    source: str = typer.Option("local", "--source", help="Data for gsm8k, gsm_plus, triviaqa, hellaswag: 'local' JSON Lines files (--data-dir) or 'hf' = the Hugging Face datasets lm-eval uses (pip install 'moelab\\[datasets]'; online or cached)."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="'byte', a tokenizer.json or a directory with one (default: from the checkpoint)."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar with ETA."),
    compile_decode: bool = typer.Option(False, "--compile", help="Generate through a torch.compile'd decode step: several times faster per token once compiled (one-off compilation of seconds; needs a C++ compiler on CPU)."),
) -> None:
    """Evaluate a model on tasks: metrics, answer-only task loss, test-time-compute curves."""
    from .loading import load_for_eval, synthetic_config
    from .runner import EvalSettings, evaluate, parse_task_list, test_time_csv, SYNTHETIC_TASKS
    from .tasks.files import check_source

    names = parse_task_list(tasks)
    k_values = _int_list(ks, "--ks")
    # check every setting before loading anything heavy
    EvalSettings(shots=shots, limit=limit, samples=samples, ks=k_values, temperature=temperature, top_p=top_p,
                 batch_size=batch_size, max_new_tokens=max_new_tokens, seed=seed, source=source, compile_decode=compile_decode)
    check_source(source, data_dir=data_dir)
    loaded = load_for_eval(model, tokenizer=tokenizer)
    synthetic = None
    if any(n in SYNTHETIC_TASKS for n in names):
        synthetic = synthetic_config(loaded.meta, loaded.checkpoint / "config.json")
    report = evaluate(
        loaded.model, loaded.tokenizer, names, shots=shots, limit=limit, samples=samples, ks=k_values,
        temperature=temperature, top_p=top_p, batch_size=batch_size, max_new_tokens=max_new_tokens, seed=seed,
        data_dir=data_dir, source=source, synthetic=synthetic, log_samples=sibling(out, ".samples.jsonl") if log_samples else None,
        progress=progress, model_info={"model": str(loaded.path), "checkpoint": str(loaded.checkpoint)},
        compile_decode=compile_decode,
    )
    atomic_write_json(out, report)
    if samples > 1:
        atomic_write_text(sibling(out, ".test_time.csv"), test_time_csv(report, str(loaded.path)))
    _print_summary(report)
    _console.print(f"wrote {out}")


def _print_summary(report: dict) -> None:
    table = Table(title=f"moelab eval: {report['config'].get('model', '')}")
    for col in ("task", "metric", "value"):
        table.add_column(col, justify="right" if col == "value" else "left")
    for name, res in report["tasks"].items():
        for key, value in res["metrics"].items():
            if "/" in key or key.startswith("n_samples"):
                continue
            table.add_row(name, key, f"{value:.4f}")
        if "task_loss" in res:
            table.add_row(name, "task loss (bits/byte)", f"{res['task_loss']['bits_per_byte']:.4f}")
        for row in res.get("test_time", []):
            table.add_row(name, f"pass@{row['k']} / maj@{row['k']}", f"{row['pass_at_k']:.3f} / {row['maj_at_k']:.3f}")
    _console.print(table)


def register(app: typer.Typer) -> None:
    """Mount ``moelab eval`` on the root app."""
    app.command("eval")(eval_cmd)
