"""How reliably a preset learns its synthetic reasoning: train it for several seeds and record the step
at which each run starts solving the easiest problems.

    python -m benchmarks.reasoning_seeds [--config configs/tiny.yaml] [--seeds 0-7] [--jobs 2] [--threads 1]
        [--every 250] [--threshold 0.9] [--set key.path=value ...] [--keep DIR] [--out FILE.json]

Small models learn the lookup in the synthetic reasoning problems (copy a variable's value from the
question, ``q = 5``) in one late phase change, and the step at which it comes varies widely between
seeds: in the ``tiny`` preset from ~1 500 to ~3 250 of its 4 000 steps, beyond them for some other
recipes. A change that only moves rounding
(a fused kernel, another CPU or BLAS) gives a different trajectory and can move a run across that
edge, so a preset's "it learns the sums" is a probability, and this script measures it.

Each seed (``train.seed``; the data are the same for all) is trained from scratch with a checkpoint
every ``--every`` steps, ``--threads`` intra-op threads per run (1) and ``--jobs`` runs at a time.
Eager CPU training takes the same trajectory, bit for bit, at any thread count (weight gradients are
summed over tokens in a fixed order, :mod:`moelab.model.weight_grad`), so ``--jobs 2 --threads 1``
measures what a default two-core run does (and keeps both cores busier).
Every checkpoint is evaluated on the test problems of the lowest difficulty (greedy exact match); the
last one also on the whole reasoning set and on memorisation. Columns: seed; *jump step* = the first checkpoint whose
easiest-problem exact match is at least ``--threshold`` ("-" if none); exact match on the easiest
problems and on all of them at the end; memorisation exact match; minutes for the run. The summary
line counts the runs that learned and gives the median and largest jump step. Runs go to a temporary
folder unless ``--keep DIR`` (which must not exist yet) is given.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path

from moelab.errors import MoelabError

from .common import machine_info, print_table, write_json


def parse_seeds(text: str) -> list[int]:
    """``"0-3,7"`` -> ``[0, 1, 2, 3, 7]`` (sorted, without repeats)."""
    seeds: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise SystemExit(f"--seeds: {part!r} is not a seed or a range like 0-7") from None
        if first < 0 or last < first:
            raise SystemExit(f"--seeds: {part!r} must be non-negative, low-high")
        seeds.update(range(first, last + 1))
    if not seeds:
        raise SystemExit("--seeds: give at least one seed, e.g. 0-7")
    return sorted(seeds)


def jump_step(curve: list[tuple[int, float]], threshold: float) -> int | None:
    """First step of ``curve`` (``(step, exact_match)`` in step order) at or above ``threshold``."""
    return next((step for step, em in curve if em >= threshold), None)


def run_overrides(overrides: list[str], seed: int, every: int) -> list[str]:
    """The user's overrides plus this script's: the seed, and a kept checkpoint every ``every`` steps."""
    return [*overrides, f"train.seed={seed}", f"train.checkpoint_every={every}", "train.keep_checkpoints=100000"]


def check_config(config: str, overrides: list[str], every: int) -> None:
    """Load the preset with the overrides once, before any run starts: a bad path, key or value, or a
    non-synthetic preset, is a one-line ``SystemExit``."""
    from moelab.train import load_run_config

    try:
        cfg = load_run_config(config, run_overrides(overrides, 0, every))
    except MoelabError as exc:
        raise SystemExit(f"{config}: {exc}") from None
    if cfg.data.source != "synthetic" or cfg.data.synthetic is None:
        raise SystemExit(f"{config}: reasoning_seeds needs a preset with data.source: synthetic")


def run_seed(config: str, overrides: list[str], seed: int, every: int, run_dir: str, threads: int = 1) -> dict:
    """Train one seed with checkpoints every ``every`` steps and evaluate every checkpoint."""
    import torch

    torch.set_num_threads(threads)
    from moelab.eval import evaluate
    from moelab.train import load_run_config, train

    cfg = load_run_config(config, run_overrides(overrides, seed, every))
    syn = cfg.data.synthetic
    easiest = f"exact_match/difficulty={syn.min_ops}"
    start = time.perf_counter()
    train(cfg, run_dir, quiet=True)
    curve = []
    for ckpt in sorted(p for p in (Path(run_dir) / "checkpoints").glob("step_*") if p.is_dir()):
        # the test set lists the problems by difficulty: the first n_test_reasoning are the easiest
        report = evaluate(ckpt, tasks=["synthetic-reasoning"], limit=syn.n_test_reasoning, max_new_tokens=64,
                          task_loss=False)
        curve.append((int(ckpt.name.split("_")[1]), report["tasks"]["synthetic-reasoning"]["metrics"][easiest]))
    tasks = ["synthetic-reasoning"] + (["synthetic-memorization"] if syn.memorization_weight > 0 else [])
    final = evaluate(run_dir, tasks=tasks, task_loss=False)["tasks"]
    return {
        "seed": seed,
        "curve": curve,
        "easiest": final["synthetic-reasoning"]["metrics"][easiest],
        "reasoning": final["synthetic-reasoning"]["metrics"]["exact_match"],
        "memorization": final["synthetic-memorization"]["metrics"]["exact_match"] if len(tasks) > 1 else None,
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--seeds", default="0-3", help="train.seed values: list and ranges, e.g. 0-7 or 1,3,5")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per run")
    ap.add_argument("--every", type=int, default=250, help="steps between evaluated checkpoints")
    ap.add_argument("--threshold", type=float, default=0.9, help="easiest-problem exact match that counts as learned")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every run, as for `moelab train --set` (repeatable)")
    ap.add_argument("--keep", default=None, help="keep the runs in this new folder (default: a temporary one)")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    seeds = parse_seeds(args.seeds)
    if min(args.jobs, args.threads, args.every) < 1 or not 0 < args.threshold <= 1:
        raise SystemExit("--jobs, --threads and --every must be >= 1 and --threshold in (0, 1]")
    if args.keep is not None and Path(args.keep).exists():
        raise SystemExit(f"--keep {args.keep}: folder exists; give a new one (runs would resume, not restart)")
    if args.out is not None and Path(args.out).is_dir():  # found now, not after hours of training
        raise SystemExit(f"--out {args.out}: is a folder; give a file name, e.g. {Path(args.out) / 'seeds.json'}")
    check_config(args.config, args.overrides, args.every)

    with tempfile.TemporaryDirectory(prefix="moelab-seeds-") as tmp:
        root = Path(args.keep) if args.keep is not None else Path(tmp)
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter per run: threads set before any work
        with concurrent.futures.ProcessPoolExecutor(max_workers=min(args.jobs, len(seeds)), mp_context=ctx) as pool:
            futures = {pool.submit(run_seed, args.config, args.overrides, s, args.every, str(root / f"seed{s}"), args.threads): s
                       for s in seeds}
            results = []
            for fut in concurrent.futures.as_completed(futures):
                try:
                    r = fut.result()
                except MoelabError as exc:  # a bad config or override: one line, not a worker's traceback
                    raise SystemExit(f"seed {futures[fut]}: {exc}") from None
                r["jump_step"] = jump_step(r["curve"], args.threshold)
                print(f"seed {r['seed']}: jump step {r['jump_step'] or '-'}, easiest {r['easiest']:.3f}, "
                      f"all {r['reasoning']:.3f} ({r['seconds'] / 60:.1f} min)", flush=True)
                results.append(r)
    results.sort(key=lambda r: r["seed"])

    rows = [[str(r["seed"]), str(r["jump_step"] or "-"), f"{r['easiest']:.3f}", f"{r['reasoning']:.3f}",
             "-" if r["memorization"] is None else f"{r['memorization']:.3f}", f"{r['seconds'] / 60:.1f}"]
            for r in results]
    threads = f"{args.threads} thread{'s' if args.threads > 1 else ''} per run"  # timing; trajectories (eager) do not depend on it
    print_table(f"{args.config} {' '.join(args.overrides)} ({threads}): step at which the easiest problems are solved",
                ["seed", "jump step", "easiest", "all", "memorisation", "minutes"], rows)
    jumps = [r["jump_step"] for r in results if r["jump_step"] is not None]
    summary = {"learned": len(jumps), "runs": len(results),
               "median_jump_step": statistics.median(jumps) if jumps else None,
               "max_jump_step": max(jumps) if jumps else None}
    print(f"learned in {summary['learned']} of {summary['runs']} runs ({threads}); jump step median "
          f"{summary['median_jump_step']}, largest {summary['max_jump_step']}")
    payload = {"machine": machine_info(), "config": args.config, "overrides": args.overrides,
               "threads": args.threads, "every": args.every, "threshold": args.threshold, "runs": results, "summary": summary}
    if args.out:
        write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
