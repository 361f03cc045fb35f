"""The ``moelab`` command line (typer + rich).

Every user error is printed as one line ``error: <problem and fix>`` on stderr with exit status 1;
there is no traceback for problems the user can fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .allocator import keep_freed_memory
from .errors import MoelabError

app = typer.Typer(
    name="moelab",
    help="How sparse should my MoE be? Design, train, evaluate and analyse Mixture-of-Experts LMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


_SUBCOMMANDS = {
    # module -> (name of a sub-app, help) or None when the module registers its own commands
    "moelab.data.cli": ("data", "Synthetic corpus, tokenizers and token shards."),
    "moelab.train.cli": None,
    "moelab.eval.cli": None,
    "moelab.bench": None,
}
_mounted = False


def _mount_subcommands() -> None:
    """Sub-applications live next to the code they drive; each is mounted once."""
    global _mounted
    if _mounted:
        return
    _mounted = True
    import importlib

    for module, sub in _SUBCOMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:  # that part of moelab is not present in this install
            if e.name and module.startswith(e.name):
                continue
            raise
        if sub is None:
            mod.register(app)
        else:
            app.add_typer(mod.app, name=sub[0], help=sub[1])


# ---------------------------------------------------------------------------------------------
# count
# ---------------------------------------------------------------------------------------------
@app.command()
def count(
    config: Optional[Path] = typer.Argument(None, help="YAML/JSON model config (a top-level 'model:' section is accepted)."),
    vocab_size: Optional[int] = typer.Option(None, help="Vocabulary size V."),
    d_model: Optional[int] = typer.Option(None, help="Model width D."),
    n_layers: Optional[int] = typer.Option(None, help="Number of layers L."),
    n_heads: Optional[int] = typer.Option(None, help="Query heads."),
    n_kv_heads: Optional[int] = typer.Option(None, help="Key/value heads (GQA); default n_heads."),
    head_dim: Optional[int] = typer.Option(None, help="Head dimension; default d_model / n_heads."),
    d_expert: Optional[int] = typer.Option(None, help="Hidden width of one SwiGLU expert."),
    n_experts: Optional[int] = typer.Option(None, help="Experts per layer E (1 = dense)."),
    top_k: Optional[int] = typer.Option(None, help="Active experts per token k."),
    tie_embeddings: Optional[bool] = typer.Option(None, "--tie-embeddings/--no-tie-embeddings", help="Share embedding and LM head."),
    qk_norm: Optional[str] = typer.Option(None, help="none | head | full."),
    max_seq_len: Optional[int] = typer.Option(None, help="Maximum context length."),
    seq_len: Optional[int] = typer.Option(None, help="Context length T for the attention FLOP term (default max_seq_len)."),
    tokens: Optional[float] = typer.Option(None, help="Training tokens: adds tpp, tokens/active param, training FLOPs."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Exact total/active parameters, FLOPs per token, sparsity and TPP of a model config."""
    from . import accounting
    from .config import ModelConfig, read_mapping

    fields: dict[str, Any] = {}
    if config is not None:
        data = read_mapping(config)
        fields.update(data["model"] if isinstance(data.get("model"), dict) else data)
    flags = dict(
        vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
        head_dim=head_dim, d_expert=d_expert, n_experts=n_experts, top_k=top_k, tie_embeddings=tie_embeddings,
        qk_norm=qk_norm, max_seq_len=max_seq_len,
    )
    fields.update({k: v for k, v in flags.items() if v is not None})
    cfg = ModelConfig.create(**fields)
    if tokens is not None and tokens <= 0:
        raise MoelabError(f"--tokens must be positive, got {tokens:g}")
    s = accounting.summarize(cfg, tokens=None if tokens is None else int(tokens), seq_len=seq_len)
    if as_json:
        print(json.dumps(s.to_dict()))
        return
    h = accounting.human
    table = Table(title=f"E={cfg.n_experts} k={cfg.top_k} d={cfg.d_model} L={cfg.n_layers}", show_header=True)
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_column("exact", justify="right")
    rows = [
        ("total params", s.total_params),
        ("active params", s.active_params),
        ("total params (no embed/head)", s.total_params_no_embed),
        ("active params (no embed/head)", s.active_params_no_embed),
        (f"train FLOPs/token (T={s.seq_len})", s.train_flops_per_token),
        (f"inference FLOPs/token (T={s.seq_len})", s.inference_flops_per_token),
    ]
    for name, v in rows:
        table.add_row(name, h(v), f"{v:,}")
    table.add_row("sparsity 1-k/E", f"{s.sparsity:.4f}", "")
    if s.tokens is not None:
        table.add_row("training tokens", h(s.tokens), f"{s.tokens:,}")
        table.add_row("TPP (tokens / total params)", f"{s.tpp:.3g}", "")
        table.add_row("tokens / active param", f"{s.tokens_per_active_param:.3g}", "")
        table.add_row("training FLOPs", f"{s.train_flops:.3e}", "")
    console.print(table)


# ---------------------------------------------------------------------------------------------
# Hugging Face interop
# ---------------------------------------------------------------------------------------------
@app.command("export-hf")
def export_hf_cmd(
    src: Path = typer.Argument(..., help="moelab checkpoint (or run directory)."),
    out: Path = typer.Argument(..., help="Output directory for the Mixtral checkpoint."),
    max_shard_mb: Optional[int] = typer.Option(None, help="Shard the weights above this many MiB."),
) -> None:
    """Export a moelab model as a Hugging Face Mixtral directory (transformers, vLLM, lm-eval)."""
    import moelab

    if not (src / "config.json").is_file():  # a run directory: its newest good checkpoint, chosen once
        src = Path(moelab._latest_run_checkpoint(src) or src)
    model = moelab.load(src)
    moelab.export_hf(model, out, max_shard_bytes=None if max_shard_mb is None else max_shard_mb * 2**20)
    _copy_tokenizer(src, out)
    console.print(f"wrote Mixtral checkpoint to {out}")


@app.command("import-hf")
def import_hf_cmd(
    src: Path = typer.Argument(..., help="Hugging Face Mixtral directory (config.json + *.safetensors)."),
    out: Path = typer.Argument(..., help="Output moelab checkpoint directory."),
) -> None:
    """Convert a Hugging Face Mixtral directory into a moelab checkpoint."""
    import moelab
    from .hf import is_mixtral_dir

    if not is_mixtral_dir(src):
        raise MoelabError(f"{src} is not a Hugging Face Mixtral directory (config.json with model_type 'mixtral'); check the path")
    model = moelab.load(src)
    moelab.save(model, out)
    _copy_tokenizer(src, out)
    console.print(f"wrote moelab checkpoint to {out}")


def _copy_tokenizer(src: Path, out: Path) -> None:
    """Carry tokenizer files of the checkpoint directory ``src`` along so the converted one stays usable."""
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "moelab_tokenizer.json"):
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)


# ---------------------------------------------------------------------------------------------
def _click_exceptions(name: str) -> tuple[type[BaseException], ...]:
    """``click.exceptions.<name>`` and, for typer versions that vendor click, typer's own copy."""
    found = [getattr(click.exceptions, name)]
    try:
        from typer._click import exceptions as vendored  # typer >= 0.2x parses with a vendored click
    except ImportError:
        vendored = None
    if vendored is not None and hasattr(vendored, name):
        found.append(getattr(vendored, name))
    return tuple(found)


_EXIT = (*_click_exceptions("Exit"), typer.Exit)
_USAGE_ERRORS = _click_exceptions("ClickException")
_ABORT = (*_click_exceptions("Abort"), typer.Abort)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turn user errors into one line and a non-zero exit status.
    Keeps freed CPU memory for reuse (:func:`moelab.allocator.keep_freed_memory`; opt out with
    ``MOELAB_SYSTEM_MALLOC=1``)."""
    _mount_subcommands()
    try:
        keep_freed_memory()
        rc = app(args=argv, prog_name="moelab", standalone_mode=False)
    except MoelabError as e:
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return 1
    except _EXIT as e:
        return e.exit_code
    except _USAGE_ERRORS as e:  # unknown option, missing argument, bad value: click's one-line message
        e.show()
        return e.exit_code
    except _ABORT:
        err_console.print("aborted")
        return 130
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    return rc if isinstance(rc, int) else 0
