"""``moelab data ...``: prepare token shards, train a BPE tokenizer, materialise the synthetic corpus.

Every user error (:class:`~moelab.errors.MoelabError`) is printed as ``error: <message>`` on stderr
and exits with status 1.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from ..errors import ConfigError, MoelabError
from .config import SyntheticConfig
from .shards import DEFAULT_SHARD_TOKENS, prepare
from .synthetic import materialize
from .tokenizer import train_bpe

app = typer.Typer(help="Data: token shards, tokenizers and the synthetic memorisation/reasoning corpus.", no_args_is_help=True)
_err = Console(stderr=True)


def _fail(e: MoelabError) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(1)


@contextmanager
def _token_progress(description: str, total: int | None = None) -> Iterator:
    """A rich progress bar on stderr counting tokens; yields ``advance(n_tokens)``."""
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:,} tokens"),
                  TimeElapsedColumn(), console=_err, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)


@app.command("prepare")
def prepare_cmd(
    inputs: list[Path] = typer.Argument(..., help="local .jsonl or .txt files"),
    out: Path = typer.Option(..., "--out", help="output shard directory (must not exist or be empty)"),
    tokenizer: str = typer.Option("byte", "--tokenizer", help="'byte', a tokenizer.json or a directory with one"),
    field: str = typer.Option("text", "--field", help="JSONL field holding the text"),
    shard_tokens: int = typer.Option(DEFAULT_SHARD_TOKENS, "--shard-tokens", help="tokens per shard file"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty --out"),
) -> None:
    """Tokenise local files into token shards + manifest.json."""
    try:
        with _token_progress("tokenising") as advance:
            m = prepare(inputs, out, tokenizer=tokenizer, field=field, shard_tokens=shard_tokens,
                        overwrite=overwrite, on_document=advance)
    except MoelabError as e:
        _fail(e)
    typer.echo(f"wrote {m['total_tokens']:,} tokens ({m['n_documents']:,} documents, {len(m['shards'])} shards, {m['dtype']}) to {out}")


@app.command("tokenizer-train")
def tokenizer_train_cmd(
    inputs: list[Path] = typer.Argument(..., help="local .jsonl or .txt files"),
    out: Path = typer.Option(..., "--out", help="tokenizer.json path, or a directory to write tokenizer.json into"),
    vocab_size: int = typer.Option(..., "--vocab-size", help="vocabulary size including the 256 byte symbols and eos"),
    field: str = typer.Option("text", "--field", help="JSONL field holding the text"),
) -> None:
    """Train a byte-level BPE tokenizer on local files."""
    try:
        path = train_bpe(inputs, vocab_size, out, field=field)
    except MoelabError as e:
        _fail(e)
    typer.echo(f"wrote tokenizer to {path}")


def _load_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}; check the path") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]}); fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of SyntheticConfig fields; fix the file")
    return data.get("synthetic", data) if isinstance(data.get("synthetic"), dict) else data


@app.command("synthetic")
def synthetic_cmd(
    out: Path = typer.Option(..., "--out", help="output directory (train/, val/, test_*.jsonl, synthetic.json)"),
    tokens: int = typer.Option(2_000_000, "--tokens", help="training tokens (eos included)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="world and test-set seed (default: config's, else 0)"),
    stream_seed: Optional[int] = typer.Option(None, "--stream-seed", help="training-order seed (default: --seed)"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML with SyntheticConfig fields (or a 'synthetic:' section)"),
    entities: Optional[int] = typer.Option(None, "--entities", help="people in the world"),
    memorization_weight: Optional[float] = typer.Option(None, "--memorization-weight", help="fraction of tokens from memorisation docs"),
    tokenizer: str = typer.Option("byte", "--tokenizer", help="'byte', a tokenizer.json or a directory with one"),
    val_fraction: float = typer.Option(0.05, "--val-fraction", help="validation size as a fraction of --tokens"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty --out"),
) -> None:
    """Materialise the synthetic memorisation/reasoning corpus as token shards plus test sets."""
    try:
        fields = _load_yaml(config) if config else {}
        if seed is not None:
            fields["seed"] = seed
        if entities is not None:
            fields["n_entities"] = entities
        if memorization_weight is not None:
            fields["memorization_weight"] = memorization_weight
        cfg = SyntheticConfig.model_validate(fields)
        with _token_progress("generating", total=tokens) as advance:
            s = materialize(cfg, tokenizer, out, n_tokens=tokens, seed=stream_seed, val_fraction=val_fraction,
                            overwrite=overwrite, on_document=advance)
    except MoelabError as e:
        _fail(e)
    typer.echo(f"wrote {s['train']['tokens']:,} train + {s['val']['tokens']:,} val tokens to {out}; "
               f"world: {s['world']['n_facts']} facts, {s['world']['information_bits']:.0f} bits; "
               f"tests: {s['test']['memorization']} memorization, {s['test']['reasoning']} reasoning")
