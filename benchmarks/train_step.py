"""Training-step throughput: a dense model vs MoE models with the same active parameters, in one run.

    python -m benchmarks.train_step [--d-model 256] [--layers 2] [--seq-len 256] [--batch 8] [--seconds 30]

Models share d_model, layers, attention and vocabulary; the FFN is a dense SwiGLU of width F = 4 d
(``n_experts = top_k = 1``), or E = 8 / k = 2 experts of width F / 2, or E = 64 / k = 8 experts of width
F / 8, so ``k * d_expert = F`` and active parameters are equal (up to the router). MoE layers use
``moe_backend = "grouped_mm"``. A step is what ``moelab train`` does per batch: forward + backward,
gradient clipping and the trainer's (fused) AdamW update.

Columns: tokens/s; achieved FLOP/s = ``accounting.train_flops_per_token`` (6 * N_active + LM head +
attention term, see :mod:`moelab.accounting`) * tokens/s; that as a fraction of the machine's fp32
matmul rate, measured in this run on a large square matmul timed in the same interleaved rounds as the
models (so load from other processes affects both alike); and each model's step time over the dense
step time (median of the per-round ratios, with its interquartile range). Numbers are only comparable within one run (the machine may be shared).
"""

from __future__ import annotations

import argparse
import statistics

import torch

import moelab
from moelab import accounting
from moelab.train.config import TrainConfig
from moelab.train.flops import measure_matmul_flops
from moelab.train.optim import build_optimizer

from .common import interleaved_times, machine_info, paired_ratios, ratio_text, setup


def make_step(cfg: moelab.ModelConfig, batch: int, seq_len: int):
    """A closure running one training step of a fresh model on a fixed batch, as ``moelab train`` runs
    it: forward + backward, global gradient-norm clipping, and the trainer's AdamW
    (:func:`moelab.train.optim.build_optimizer`: weight-decay groups, fused kernel)."""
    model = moelab.build(cfg, seed=0)
    t = TrainConfig(steps=1)  # the study's optimiser defaults
    opt = build_optimizer(model, t.lr, (t.beta1, t.beta2), t.eps, t.weight_decay)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=g)
    inputs, targets = x[:, :-1], x[:, 1:]

    def step() -> None:
        out = model(inputs, targets)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _preset_pairs(names: list[str], seq_len: int | None) -> list[tuple[str, moelab.ModelConfig]]:
    """For each preset in configs/: its MoE model and the dense model of equal active FLOPs
    (one expert of width k * d_expert)."""
    from pathlib import Path

    from moelab.config import read_mapping

    root = Path(__file__).resolve().parents[1] / "configs"
    out = []
    for name in names:
        fields = dict(read_mapping(root / f"{name}.yaml")["model"], moe_backend="grouped_mm")
        if seq_len:
            fields["max_seq_len"] = max(fields.get("max_seq_len", seq_len), seq_len)
        moe = moelab.ModelConfig(**fields)
        dense = moe.model_copy(update={"n_experts": 1, "top_k": 1, "d_expert": moe.top_k * moe.d_expert, "norm_topk_prob": False})
        out += [(f"{name}: dense (E=1,k=1)", dense), (f"{name}: MoE E={moe.n_experts},k={moe.top_k}", moe)]
    return out


def main(argv: list[str] | None = None) -> dict:
    setup()  # keep freed memory: no page faults timed (benchmarks.common.setup)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--presets", default="tiny,small", help="also compare these configs/ presets with their dense equivalents ('' = none)")
    ap.add_argument("--seconds", type=float, default=30.0, help="timing budget for all models together")
    ap.add_argument("--quick", action="store_true", help="a 10-second timing budget")
    ap.add_argument("--matmul-n", type=int, default=2048, help="size of the square matmul for the FLOP/s yardstick")
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds = 10.0

    D, F = args.d_model, 4 * args.d_model
    common = dict(vocab_size=args.vocab, d_model=D, n_layers=args.layers, n_heads=max(1, D // 64),
                  max_seq_len=args.seq_len, moe_backend="grouped_mm")
    models = [
        ("dense (E=1,k=1)", moelab.ModelConfig(**common, n_experts=1, top_k=1, d_expert=F)),
        ("MoE E=8,k=2", moelab.ModelConfig(**common, n_experts=8, top_k=2, d_expert=F // 2)),
        ("MoE E=64,k=8", moelab.ModelConfig(**common, n_experts=64, top_k=8, d_expert=F // 8)),
    ]
    models += _preset_pairs([x for x in args.presets.split(",") if x], args.seq_len)
    n = args.matmul_n
    a, b = torch.randn(n, n), torch.randn(n, n)
    measure_matmul_flops(n=n, min_seconds=0.2)  # warm up the BLAS threads
    steps = {str(i): make_step(cfg, args.batch, args.seq_len) for i, (_, cfg) in enumerate(models)}
    steps["matmul"] = lambda: a @ b  # the matmul rate is timed in the same rounds
    samples = interleaved_times(steps, rounds=3, min_seconds=args.seconds)
    times = {key: statistics.median(ts) for key, ts in samples.items()}
    step_times, matmul_time = [times[str(i)] for i in range(len(models))], times["matmul"]
    matmul = 2 * n**3 / matmul_time
    tokens = args.batch * args.seq_len
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch} x {args.seq_len} tokens; "
          f"d_model {D}, layers {args.layers}, dense FFN width {F}")
    print(f"fp32 matmul rate ({n}x{n}, median of the same rounds): {matmul / 1e9:.1f} GFLOP/s\n")
    header = f"{'model':<28}{'total':>9}{'active':>9}{'step ms':>10}{'tokens/s':>11}{'GFLOP/s':>9}{'of matmul':>11}{'vs dense (IQR)':>20}"
    print(header)
    print("-" * len(header))
    results = []
    dense = None
    for i, ((name, cfg), dt) in enumerate(zip(models, step_times)):
        if cfg.n_experts == 1:
            dense = str(i)  # each group starts with its dense reference
        vs_dense = paired_ratios({str(i): samples[str(i)], dense: samples[dense]}, dense)[str(i)]
        counts = accounting.param_counts(cfg)
        flops = accounting.train_flops_per_token(cfg, args.seq_len) * tokens / dt
        print(f"{name:<28}{accounting.human(counts.total):>9}{accounting.human(counts.active):>9}{dt * 1e3:>10.1f}"
              f"{tokens / dt:>11,.0f}{flops / 1e9:>9.2f}{flops / matmul:>11.1%}"
              f"{ratio_text(vs_dense['median'], (vs_dense['q1'], vs_dense['q3'])):>20}")
        results.append({"name": name, "total_params": counts.total, "active_params": counts.active, "step_ms": dt * 1e3,
                        "tokens_per_s": tokens / dt, "flops_per_s": flops, "mfu": flops / matmul,
                        "ratio_to_dense": vs_dense["median"], "ratio_iqr": (vs_dense["q1"], vs_dense["q3"])})
    print("\nFLOPs/token = 6*(active non-embedding params + LM head) + 6*L*T*d_attn (moelab.accounting).")
    return {"benchmark": "train_step", "machine": machine_info(), "matmul_flops_per_s": matmul, "args": vars(args), "results": results}


if __name__ == "__main__":
    main()
