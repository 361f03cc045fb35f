"""``moelab bench``: run the benchmark suite of a source checkout (``python -m benchmarks``).

The benchmarks live next to the package in the repository (``benchmarks/``), not in the installed
wheel; this command finds them from the current directory upwards.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from .errors import MoelabError


def find_benchmarks(start: Path | None = None) -> Path:
    """The repository root whose ``benchmarks/__main__.py`` belongs to moelab."""
    here = (start or Path.cwd()).resolve()
    for root in (here, *here.parents):
        if (root / "benchmarks" / "__main__.py").is_file() and (root / "src" / "moelab").is_dir():
            return root
    pkg_root = Path(__file__).resolve().parents[2]  # editable install: src/moelab -> repo
    if (pkg_root / "benchmarks" / "__main__.py").is_file():
        return pkg_root
    raise MoelabError("no moelab benchmarks/ folder found; run `moelab bench` inside a source checkout of moelab")


def register(app: typer.Typer) -> None:
    @app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def bench(
        ctx: typer.Context,
        only: Optional[str] = typer.Option(None, help="Comma-separated subset: moe_layer,train_step,generate."),
        quick: bool = typer.Option(False, help="Fewer rounds and shapes (noisier)."),
        out: Optional[Path] = typer.Option(None, help="JSON output file."),
    ) -> None:
        """Run the benchmarks and print one table of ratios measured in one run (see benchmarks/)."""
        root = find_benchmarks()
        sys.path.insert(0, str(root))
        from benchmarks.__main__ import main as bench_main  # type: ignore[import-not-found]

        argv: List[str] = []
        if only:
            argv += ["--only", only]
        if quick:
            argv.append("--quick")
        if out:
            argv += ["--out", str(out)]
        bench_main(argv + list(ctx.args))
