"""The benchmarks' timing statistics: round-robin samples and per-round (paired) ratios."""

from __future__ import annotations

import statistics

import pytest
import torch

from benchmarks.common import interleaved_times, paired_ratios, ratio_text, summarise


def test_interleaved_times_runs_every_function_each_round_in_varying_order():
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abcd"}
    times = interleaved_times(fns, rounds=12, warmup=1, number=2)
    assert {n: len(ts) for n, ts in times.items()} == {n: 12 for n in "abcd"}
    assert all(t >= 0 for ts in times.values() for t in ts)
    timed = calls[4:]  # after one warm-up call each, rounds of 2 calls per function
    rounds = [[timed[i] for i in range(r * 8, r * 8 + 8, 2)] for r in range(12)]
    assert all(sorted(order) == list("abcd") for order in rounds)
    # no function always follows the same one (a rotated fixed order would keep every predecessor)
    sequence = [name for order in rounds for name in order]
    predecessors = {n: {p for p, q in zip(sequence, sequence[1:]) if q == n} for n in "abcd"}
    assert all(len(p) >= 2 for p in predecessors.values()), predecessors
    calls.clear()
    interleaved_times(fns, rounds=12, warmup=1, number=2)
    assert calls[4:] == timed  # the same orders again: repeatable


def test_paired_ratios_cancel_drift_between_rounds():
    # the machine slows down 3x over the run; B always takes 1.2x A within a round
    a = [1.0, 2.0, 3.0, 1.5, 2.5]
    times = {"a": a, "b": [1.2 * t for t in a]}
    r = paired_ratios(times, "a")
    assert r["a"] == {"median": 1.0, "q1": 1.0, "q3": 1.0}
    assert r["b"]["median"] == pytest.approx(1.2) and r["b"]["q1"] == pytest.approx(1.2) and r["b"]["q3"] == pytest.approx(1.2)
    # the ratio of the medians would be the same here, but not when rounds drift unevenly:
    times = {"a": [1.0, 1.0, 3.0, 3.0], "b": [1.1, 1.1, 3.3, 2.7]}
    medians = {n: statistics.median(ts) for n, ts in times.items()}
    assert medians["b"] / medians["a"] == pytest.approx(0.95)  # B looks faster than A, which it never was
    r = paired_ratios(times, "a")["b"]
    assert r["median"] == pytest.approx(1.1)
    assert r["q1"] == pytest.approx(1.05) and r["q3"] == pytest.approx(1.1)  # ratios 1.1, 1.1, 1.1, 0.9


def test_paired_ratios_of_a_single_round():
    assert paired_ratios({"a": [2.0], "b": [3.0]}, "a")["b"] == {"median": 1.5, "q1": 1.5, "q3": 1.5}


def test_summarise_and_ratio_text():
    s = summarise({"ref": [1.0, 2.0, 4.0], "b": [1.5, 2.0, 8.0]}, "ref")
    assert s["seconds"] == {"ref": 2.0, "b": 2.0}
    assert s["ratio"] == {"ref": 1.0, "b": 1.5} and s["ratio_iqr"]["b"] == (1.25, 1.75)
    assert ratio_text(1.5, (1.25, 1.75)) == "1.50 (1.25-1.75)" and ratio_text(0.987) == "0.99"


def test_summary_layer_targets_follow_the_issue_for_uniform_and_skewed_routing():
    """<= 1.15x dense for the core shapes and <= 1.3x for E 256, k 1/4/16, under either routing;
    >= 1.7x transformers' best for E >= 32."""
    from benchmarks.__main__ import _moe_rows

    def result(shape, ours, hf=None):
        ratio = {"grouped_mm": ours} | ({"hf_grouped_mm": hf} if hf else {})
        return {"shape": shape, "max_over_mean_load": 2.0, "ratio_to_dense": ratio, "ratio_iqr": {"grouped_mm": (ours, ours)}}

    payload = {"results": [
        result((256, 512, 8, 2), 1.26),  # skewed E 8 at 1.26x: over the core target
        result((256, 512, 8, 2), 1.10),
        result((256, 64, 256, 4), 1.25, hf=2.5),  # sparse shape: 1.3x target, 2x faster than HF
        result((256, 64, 256, 8), 1.25, hf=2.5),  # a core shape: 1.15x
        result((256, 128, 64, 8), 1.10, hf=1.8),  # meets the dense target, only 1.64x faster than HF
    ]}
    met = [row[-1] for row in _moe_rows(payload, "skewed")]
    assert met == ["NO", "yes", "yes", "NO", "NO"]


def test_summary_names_bounds_that_put_the_dense_target_out_of_reach():
    """A missed dense target is marked out of reach when the router's FLOPs or the matmuls alone
    already exceed it; a missed target within reach is a plain NO."""
    from benchmarks.__main__ import _moe_rows
    from benchmarks.moe_layer import matmul_flop_ratio

    def result(shape, ours, matmuls, hf=None):
        ratio = {"grouped_mm": ours, "matmuls": matmuls} | ({"hf_grouped_mm": hf} if hf else {})
        return {"shape": shape, "max_over_mean_load": 1.5, "ratio_to_dense": ratio, "ratio_iqr": {"grouped_mm": (ours, ours)},
                "flop_ratio": matmul_flop_ratio(*shape)}

    rows = _moe_rows({"results": [
        result((256, 64, 256, 1), 6.0, 3.9, hf=7.0),  # router FLOPs alone: 2.33x
        result((256, 128, 64, 8), 1.4, 1.2, hf=3.0),  # matmuls alone 1.2x > 1.15x
        result((256, 512, 8, 2), 1.2, 0.9),  # within reach, missed
        result((256, 512, 8, 2), 1.1, 0.9),
    ]}, "uniform")
    assert rows[0][-1] == "NO (dense target out of reach: FLOPs 2.33x, matmuls alone 3.90x)"
    assert rows[1][-1] == "NO (dense target out of reach: matmuls alone 1.20x)"
    assert [r[-1] for r in rows[2:]] == ["NO", "yes"]
    assert "matmuls alone 0.90x" in rows[2][1]
    with_copies = result((256, 512, 8, 2), 1.2, 0.9)
    with_copies["ratio_to_dense"]["row_copies"] = 0.05  # shown next to the matmuls, never a reach verdict
    row = _moe_rows({"results": [with_copies]}, "uniform")[0]
    assert "matmuls alone 0.90x, + row copies 0.95x" in row[1] and row[-1] == "NO"
    with_copies["ratio_to_dense"]["dense_matmuls"] = 0.88  # the dense FFN's non-matmul share: 0.12
    row = _moe_rows({"results": [with_copies]}, "uniform")[0]
    assert "+ row copies 0.95x, + dense non-matmul 1.07x" in row[1] and row[-1] == "NO"


def test_summary_says_when_the_transformers_target_needs_less_than_the_matmuls():
    """>= 1.7x faster than transformers' best asks for at most its time / 1.7; when that is below the
    layer's matmuls alone the verdict says so, otherwise a miss is a plain NO."""
    from benchmarks.__main__ import _moe_rows

    def result(ours, matmuls, hf):
        return {"shape": (512, 256, 32, 4), "max_over_mean_load": 1.1, "flop_ratio": 1.01, "ratio_iqr": {"grouped_mm": (ours, ours)},
                "ratio_to_dense": {"grouped_mm": ours, "matmuls": matmuls, "hf_grouped_mm": hf, "hf_eager": 2 * hf}}

    rows = _moe_rows({"results": [result(1.10, 1.02, 1.50), result(1.10, 0.80, 1.50), result(0.85, 0.80, 1.50)]}, "uniform")
    assert rows[0][-1] == "NO (HF target out of reach: needs 0.88x dense, matmuls alone 1.02x)"  # 1.50 / 1.7
    assert rows[1][-1] == "NO"  # 0.88x would be possible: above the matmuls' 0.80x
    assert rows[2][-1] == "yes"  # 1.50 / 0.85 = 1.76x faster


def test_row_copies_floor_runs_the_four_dispatch_copies():
    """The row-copies floor is two gathers (index_select) and two scatter-adds (index_add_) of the
    routed rows, nothing else."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from benchmarks.moe_layer import row_copies_only

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    token_S = torch.tensor([0, 2, 2, 1, 0, 3])
    run = row_copies_only(torch.randn(4, 8), token_S)
    with Ops() as ops:
        run()
    copies = [n for n in ops.names if n not in ("zero_",)]
    assert sorted(copies) == ["index_add_", "index_add_", "index_select", "index_select"], ops.names


def test_dense_matmuls_floor_runs_the_dense_ffns_six_products():
    """The dense FFN's matmuls alone: six ``mm`` calls (two forward, two input and two weight gradients)
    with 3 x the forward's FLOPs, 18 T D H for hidden width H, and nothing else."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from benchmarks.moe_layer import DenseSwiGLU, dense_matmuls_only

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.flops, self.names = 0, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__.split(".")[0])
            if self.names[-1] == "mm":
                (m, k), n = args[0].shape, args[1].shape[1]
                self.flops += 2 * m * k * n
            return func(*args, **(kwargs or {}))

    T, D, H = 10, 8, 12
    run = dense_matmuls_only(DenseSwiGLU(D, H), torch.randn(T, D))
    with Ops() as ops:
        run()
    assert ops.names == ["mm"] * 6 and ops.flops == 18 * T * D * H


def test_matmul_flop_ratio_counts_router_and_active_experts():
    """The ratio of the layer's matmul FLOPs (router + k experts) to the dense floor's, checked against
    torch's FLOP counter on the real modules, and the matmuls-only floor runs 3x the forward's FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.moe_layer import DenseSwiGLU, matmul_flop_ratio, matmuls_only
    from moelab.config import ModelConfig
    from moelab.model.moe import MoE, route

    d, f, E, k, T = 16, 8, 6, 2, 40
    moe = MoE(ModelConfig(d_model=d, d_expert=f, n_experts=E, top_k=k, n_heads=2, moe_backend="loop"))
    moe.reset_parameters(0.1)
    x = torch.randn(T, d)

    def flops(fn):
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    moe_fwd = flops(lambda: moe(x, with_losses=False))
    dense_fwd = flops(lambda: DenseSwiGLU(d, k * f)(x))
    assert moe_fwd == 2 * T * d * E + 2 * T * k * 3 * d * f and dense_fwd == 2 * T * 3 * d * k * f
    assert matmul_flop_ratio(d, f, E, k) == pytest.approx(moe_fwd / dense_fwd)
    counts = route(x, moe.router.weight, k, True).tokens_per_expert_E.tolist()
    assert flops(matmuls_only(moe, x, counts)) == 3 * moe_fwd
    assert matmul_flop_ratio(256, 64, 256, 1) == pytest.approx(7 / 3)


def test_layer_benchmark_runs_end_to_end_on_a_tiny_shape(capsys):
    """One tiny shape through ``bench_shape`` and ``report``: every timed function present, the
    summary row built from it (a smoke test; the numbers are not checked)."""
    from benchmarks.__main__ import _moe_rows
    from benchmarks.moe_layer import bench_shape, copy_dispatch_estimate, report

    r = bench_shape(32, 16, 8, 2, tokens=64, skew=0.0, rounds=1, with_transformers=False)
    assert set(r["ratio_to_dense"]) == {"dense", "dense_matmuls", "matmuls", "row_copies", "grouped_mm", "loop", "naive"}
    report([r], "tiny")
    out = capsys.readouterr().out
    assert "non-matmul" in out and f"{copy_dispatch_estimate(r['ratio_to_dense']):.2f}" in out
    row = _moe_rows({"results": [r]}, "uniform")[0]
    assert "+ dense non-matmul" in row[1] and row[-1].split()[0] in ("yes", "NO")
