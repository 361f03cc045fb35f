"""All benchmarks in one run, one summary table of ratios against their targets, one JSON file.

    python -m benchmarks [--quick] [--only moe_layer,train_step,generate] [--out benchmarks/results/latest.json]
    moelab bench [same options]        (from a source checkout)

Each part is a module of this package with ``main(argv) -> dict`` that prints its own detailed
table; this runner collects the payloads, prints the headline ratios next to the targets of the
performance issue and writes everything to ``--out`` (JSON). Every ratio is measured within one
process in interleaved rounds (``benchmarks.common``); absolute times depend on the machine.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import time

import torch

from moelab.train.flops import measure_matmul_flops

from .common import machine_info, print_table, ratio_text, setup, write_json

PARTS = ("moe_layer", "train_step", "generate")
SKEW = 0.4  # router bias of the skewed runs: max/mean expert load ~1.2 (E=8) to ~10 (E=256); printed per shape


# the performance issue's layer targets: <= 1.15x the dense floor for the core shapes, <= 1.3x for the very
# sparse E 256, k in {1, 4, 16}, under uniform and skewed routing alike; >= 1.7x transformers' best for E >= 32
LAYER_TARGET_CORE, LAYER_TARGET_SPARSE, HF_TARGET = 1.15, 1.3, 1.7


def _layer_target(shape) -> float:
    from .moe_layer import SPARSE_SHAPES

    return LAYER_TARGET_SPARSE if tuple(shape) in SPARSE_SHAPES else LAYER_TARGET_CORE


def _moe_rows(payload: dict, label: str, hf_target: float = HF_TARGET) -> list[list[str]]:
    """One summary row per layer shape. Where the dense target is missed, the verdict says whether it is
    out of reach by the shape's own bounds (``matmul_flop_ratio``: the router's FLOPs on top of the
    experts'; ``matmuls``: the layer's per-expert matmuls alone, timed), which no dispatch work can lower;
    where the transformers target is missed, whether meeting it would take less time than those matmuls.
    The result also shows the row-copying estimate (``+ dense non-matmul``,
    :func:`benchmarks.moe_layer.copy_dispatch_estimate`), never a verdict: it is not a bound."""
    from .moe_layer import copy_dispatch_estimate

    rows = []
    for r in payload["results"]:
        d, f, E, k = r["shape"]
        target_dense = _layer_target(r["shape"])
        ratio = r["ratio_to_dense"]
        hf = [v for n, v in ratio.items() if n.startswith("hf_")]
        speedup = min(hf) / ratio["grouped_mm"] if hf else None
        dense_ok = ratio["grouped_mm"] <= target_dense
        ok = dense_ok and (speedup is None or E < 32 or speedup >= hf_target)
        bounds = {"FLOPs": r.get("flop_ratio"), "matmuls alone": ratio.get("matmuls")}
        over = [f"{name} {v:.2f}x" for name, v in bounds.items() if v is not None and v > target_dense]
        notes = [f"dense target out of reach: {', '.join(over)}"] if over and not dense_ok else []
        if speedup is not None and E >= 32 and speedup < hf_target and "matmuls" in ratio:
            needed = min(hf) / hf_target  # our time over the dense floor that the transformers target asks for
            if needed < ratio["matmuls"]:
                notes.append(f"HF target out of reach: needs {needed:.2f}x dense, matmuls alone {ratio['matmuls']:.2f}x")
        verdict = "yes" if ok else "NO" + (f" ({'; '.join(notes)})" if notes else "")
        has_copies = "row_copies" in ratio and "matmuls" in ratio
        rows.append([
            f"MoE layer {label} (d={d},F={f},E={E},k={k}) load {r['max_over_mean_load']:.1f}",
            f"{ratio_text(ratio['grouped_mm'], r['ratio_iqr']['grouped_mm'])} x dense" + (f", {speedup:.2f}x faster than HF best" if speedup else "")
            + (f"; matmuls alone {ratio['matmuls']:.2f}x" if "matmuls" in ratio else "")
            + (f", + row copies {ratio['matmuls'] + ratio['row_copies']:.2f}x" if has_copies else "")
            + (f", + dense non-matmul {copy_dispatch_estimate(ratio):.2f}x" if has_copies and "dense_matmuls" in ratio else ""),
            f"<= {target_dense}x dense" + (f", >= {hf_target}x HF" if E >= 32 else ""),
            verdict,
        ])
    return rows


def main(argv: list[str] | None = None) -> dict:
    setup()  # keep freed memory: no page faults timed (benchmarks.common.setup)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    p.add_argument("--quick", action="store_true", help="fewer rounds and shapes (a smoke run, noisier)")
    p.add_argument("--out", default=None, help="JSON output (default benchmarks/results/<timestamp>.json)")
    a = p.parse_args(argv)
    parts = [x.strip() for x in a.only.split(",") if x.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        p.error(f"unknown part(s) {unknown}; choose from {PARTS}")
    rounds = "3" if a.quick else "5"
    start = time.time()
    payload: dict = {"machine": machine_info(), "fp32_matmul_flops_per_s": measure_matmul_flops(), "parts": {}}
    summary: list[list[str]] = []
    if "moe_layer" in parts:
        from . import moe_layer

        core = moe_layer.main(["--rounds", rounds, "--decode"])
        skew = moe_layer.main(["--rounds", rounds, "--skew", str(SKEW), "--shapes", "all" if not a.quick else "default"])
        sparse = moe_layer.main(["--rounds", rounds, "--shapes", "sparse"]) if not a.quick else {"results": []}
        payload["parts"]["moe_layer"] = {"uniform": core, "skewed": skew, "sparse": sparse}
        summary += _moe_rows(core, "uniform") + _moe_rows(sparse, "uniform") + _moe_rows(skew, "skewed")
        for r in core.get("decode", []):
            ratio = r["ratio_to_one_by_one"]["grouped_mm"]
            summary.append([f"MoE decode {tuple(r['shape'])} {r['tokens']} tokens", f"{ratio_text(ratio, r['ratio_iqr']['grouped_mm'])} x one-by-one", "<= 1x", "yes" if ratio <= 1 else "NO"])
    if "train_step" in parts:
        from . import train_step

        ts = train_step.main([] if not a.quick else ["--quick"])
        payload["parts"]["train_step"] = ts
        for row in (ts or {}).get("results", []):
            if "MoE" in row["name"]:
                r = row["ratio_to_dense"]
                summary.append([f"train step {row['name']}", f"{ratio_text(r, row['ratio_iqr'])} x dense step, MFU {row.get('mfu', float('nan')):.2f}", "<= 1.4x", "yes" if r <= 1.4 else "NO"])
    if "generate" in parts:
        from . import generate

        gen = generate.main(["--rounds", "2" if a.quick else "3"])
        payload["parts"]["generate"] = gen
        for row in gen["results"]:
            target = row["batch_size"] >= 16
            best = max(row["ratio"], row["compiled_ratio"])
            summary.append([f"generate {row['model']} batch {row['batch_size']}",
                            f"{ratio_text(row['ratio'], row['ratio_iqr'])} x transformers eager, {ratio_text(row['compiled_ratio'], row['compiled_ratio_iqr'])} x compiled",
                            ">= 2x" if target else "-", ("yes" if best >= 2 else "NO") if target else "-"])
    payload["summary"] = summary
    payload["seconds"] = time.time() - start
    print_table(f"moelab benchmarks ({torch.get_num_threads()} threads, {payload['seconds']:.0f} s; interquartile range of each ratio in brackets)", ["measurement", "result", "target", "met"], summary)
    print(f"memory allocator: {payload['machine']['allocator']}")
    out = a.out or f"benchmarks/results/{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    write_json(out, payload)
    print(f"wrote {out}")
    return payload


if __name__ == "__main__":
    main()
