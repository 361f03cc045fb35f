"""MoE layer forward+backward time vs the dense floor and vs transformers' Mixtral block.

For each shape (d, d_expert, E, k) at T tokens (fp32), this measures in one run:

* moelab's ``MoE`` with each dispatch backend (``grouped_mm``, ``loop``; ``naive`` only where it is
  affordable),
* a dense SwiGLU FFN of hidden width ``k * d_expert`` -- the same active FLOPs, no routing: the floor,
* the layer's matmuls alone (:func:`matmuls_only`: router and per-expert products, forward and backward,
  with the measured routing's group sizes, one BLAS call each, nothing else) -- a floor for any dropless
  implementation that calls the BLAS once per expert and product,
* the four row copies of a dispatch that moves rows to expert order and back (:func:`row_copies_only`:
  gather and combine forward, gather and scatter-add backward); ``+ row copies`` is the matmuls' ratio
  plus theirs -- the floor of such an implementation when it does nothing else (no routing, activation,
  allocation or Python),
* the dense FFN's own matmuls alone (:func:`dense_matmuls_only`); one minus their ratio is the dense
  FFN's non-matmul share -- its SwiGLU activation and gradient, on as many elements as the layer's
  (``T * k * d_expert`` gate and up values) -- and ``+ dense non-matmul`` adds that share to ``+ row
  copies``: an estimate (not a bound: fused kernels could do that work faster) of a row-copying layer
  that does the dense FFN's elementwise work and nothing else (no routing, no Python),
* transformers' ``MixtralSparseMoeBlock`` with each of its experts implementations (same weights;
  its ``eager`` Python loop over experts only up to :data:`HF_EAGER_MAX_EXPERTS` experts: above, it
  measured 17-540x the floor against 5-9x for its ``grouped_mm`` and would take most of the run),

and prints times as ratios to the dense FFN: the median of the per-round ratios, with the
interquartile range of ours in brackets (:func:`benchmarks.common.paired_ratios`). ``--skew S`` biases the router so that expert loads are
uneven; the achieved max/mean load is printed. ``FLOPs /dense`` (:func:`matmul_flop_ratio`) is the
ratio of matmul FLOPs, router included: the layer's time ratio if every FLOP ran at the dense FFN's rate.

    python -m benchmarks.moe_layer [--tokens 4096] [--skew 0] [--shapes default|sparse|all] [--json out.json]
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from moelab.accounting import param_counts
from moelab.config import ModelConfig
from moelab.model.moe import DispatchPlan, MoE, route

from .common import interleaved_times, machine_info, print_table, ratio_text, setup, summarise, write_json

CORE_SHAPES = [(256, 512, 8, 2), (256, 128, 64, 8), (512, 256, 32, 4), (256, 64, 256, 8)]
BATCHED_MM_MAX_BYTES = 2 * 2**30  # skip transformers' batched_mm above this much gathered weight memory
HF_EAGER_MAX_EXPERTS = 64  # skip transformers' eager (a Python loop over experts) above this many experts
SPARSE_SHAPES = [(256, 64, 256, 1), (256, 64, 256, 4), (256, 64, 256, 16)]


class DenseSwiGLU(torch.nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.w_gate_up = torch.nn.Parameter(torch.randn(d, 2 * hidden) * 0.02)
        self.w_down = torch.nn.Parameter(torch.randn(hidden, d) * 0.02)

    def forward(self, x):
        gate, up = (x @ self.w_gate_up).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ self.w_down


def make_inputs(d: int, E: int, tokens: int, skew: float, seed: int = 0):
    """Tokens and a router; ``skew > 0`` adds a shared direction whose router projection grows with
    the expert index, so low-index experts get more tokens (Zipf-like loads)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d, generator=g)
    router = torch.randn(E, d, generator=g) * 0.1  # logit noise std ~1.6 per token
    if skew > 0:
        u = torch.randn(d, generator=g)
        u = u / u.norm()
        x = x + 4.0 * u
        offsets = -skew * torch.log1p(torch.arange(E, dtype=torch.float32))
        router = router + offsets[:, None] * u[None, :] / 4.0
    return x, router


def build_transformers_block(moe: MoE, d: int, d_expert: int, E: int, k: int, impl: str):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=d, intermediate_size=d_expert, num_local_experts=E, num_experts_per_tok=k)
    cfg._experts_implementation = impl
    block = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        block.gate.weight.copy_(moe.router.weight)
        block.experts.gate_up_proj.copy_(moe.w_gate_up)  # both [E, 2F, D]
        block.experts.down_proj.copy_(moe.w_down)  # both [E, D, F]
    return block


def matmul_flop_ratio(d: int, d_expert: int, E: int, k: int) -> float:
    """Matmul FLOPs of the MoE layer over the dense floor's, per token: its router and ``k`` active
    experts' weights against the dense FFN's ``k * d_expert`` hidden units, which are as many weights as
    the active experts' (:func:`moelab.accounting.param_counts`; forward and backward scale alike). The
    layer cannot beat this time ratio unless its matmuls run faster per FLOP than the dense FFN's; for
    E 256, d_expert 64 the router alone makes it 2.33 (k 1), 1.33 (k 4) and 1.17 (k 8)."""
    c = param_counts(ModelConfig(d_model=d, d_expert=d_expert, n_experts=E, top_k=k, n_heads=1, head_dim=2))
    return (c.router + c.experts_active) / c.experts_active


def matmuls_only(moe: MoE, x_TD: torch.Tensor, counts: list[int]):
    """A callable running the layer's matmuls alone, forward and backward, as one ``torch.mm`` each into
    preallocated outputs (weights in their stored ``[out, in]`` layout, inputs contiguous):

    * router: ``[T, D] x [D, E]``, and its gradients ``[T, E] x [E, D]`` and ``[E, T] x [T, D]``;
    * each expert ``e`` with ``n = counts[e] > 0`` rows: gate/up ``[n, D] x [D, 2F]``, down
      ``[n, F] x [F, D]``; input gradients ``[n, D] x [D, F]`` and ``[n, 2F] x [2F, D]``; weight
      gradients ``[2F, n] x [n, D]`` and ``[D, n] x [n, F]``.

    No routing, sort, gather, activation, combine or allocation: a floor, on this machine, for any dropless
    implementation that calls the BLAS once per expert and product with the weights as stored (values
    are random; only the shapes matter)."""
    T, D = x_TD.shape
    E, F2, _ = moe.w_gate_up.shape
    S, Fh = sum(counts), F2 // 2
    g = torch.Generator().manual_seed(0)

    def buf(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    w_gu, w_d, w_r = moe.w_gate_up.detach(), moe.w_down.detach(), moe.router.weight.detach()
    x_SD, h_S2F, a_SF, y_SD = buf(S, D), buf(S, F2), buf(S, Fh), buf(S, D)
    dy_SD, da_SF, dh_S2F, dx_SD = buf(S, D), buf(S, Fh), buf(S, F2), buf(S, D)
    dw_gu, dw_d = torch.empty_like(w_gu), torch.empty_like(w_d)
    logits_TE, dlogits_TE, dx_TD, dw_r = buf(T, E), buf(T, E), buf(T, D), torch.empty_like(w_r)
    calls = [(x_TD, w_r.t(), logits_TE), (dlogits_TE, w_r, dx_TD), (dlogits_TE.t(), x_TD, dw_r)]
    parts = [t.split(counts) for t in (x_SD, h_S2F, a_SF, y_SD, dy_SD, da_SF, dh_S2F, dx_SD)]
    for e, (x, h, a, y, dy, da, dh, dx) in enumerate(zip(*parts)):
        if counts[e]:
            calls += [(x, w_gu[e].t(), h), (a, w_d[e].t(), y), (dy, w_d[e], da), (dh, w_gu[e], dx),
                      (dh.t(), x, dw_gu[e]), (dy.t(), a, dw_d[e])]

    def run():
        for a, b, out in calls:
            torch.mm(a, b, out=out)
    return run


def dense_matmuls_only(dense: DenseSwiGLU, x_TD: torch.Tensor):
    """A callable running the dense FFN's six matmuls alone (forward ``x @ w_gate_up`` and ``a @ w_down``;
    backward the two input gradients and the two weight gradients), one ``torch.mm`` each into
    preallocated outputs, as :func:`matmuls_only` does for the layer: the dense FFN's time minus this
    is its non-matmul (activation) work. Values are random; only the shapes matter."""
    T, D = x_TD.shape
    w_gu, w_d = dense.w_gate_up.detach(), dense.w_down.detach()  # [D, 2H], [H, D]
    H = w_d.shape[0]
    g = torch.Generator().manual_seed(2)
    h, a, y, dy, da, dh, dx = (torch.randn(*shape, generator=g) * 0.1 for shape in
                               ((T, 2 * H), (T, H), (T, D), (T, D), (T, H), (T, 2 * H), (T, D)))
    dw_gu, dw_d = torch.empty_like(w_gu), torch.empty_like(w_d)
    calls = [(x_TD, w_gu, h), (a, w_d, y), (dy, w_d.t(), da), (dh, w_gu.t(), dx), (x_TD.t(), dh, dw_gu), (a.t(), dy, dw_d)]

    def run():
        for left, right, out in calls:
            torch.mm(left, right, out=out)
    return run


def row_copies_only(x_TD: torch.Tensor, token_S: torch.Tensor):
    """A callable running the four row copies of a dispatch that moves rows to expert order and back,
    one kernel each into preallocated outputs: forward, the gather of the ``S`` routed rows of ``x``
    (``index_select``) and the combine of the ``S`` expert outputs into ``T`` rows (``index_add_``);
    backward, the gather of the output gradient's rows and the scatter-add of the input gradient.

    ``token_S`` is the measured routing's token of each expert-sorted slot. No routing, matmul or
    activation: with :func:`matmuls_only`, the floor of an implementation that copies rows (rather
    than fusing the gather into the matmuls, which the BLAS cannot do); values are random."""
    T, D = x_TD.shape
    g = torch.Generator().manual_seed(1)
    x_SD, y_SD, dy_SD, dx_SD = (torch.empty(token_S.numel(), D) for _ in range(4))
    y_SD.normal_(generator=g)
    dx_SD.normal_(generator=g)
    dout_TD, out_TD, dx_TD = torch.randn(T, D, generator=g), torch.empty(T, D), torch.empty(T, D)

    def run():
        torch.index_select(x_TD, 0, token_S, out=x_SD)
        out_TD.zero_().index_add_(0, token_S, y_SD)
        torch.index_select(dout_TD, 0, token_S, out=dy_SD)
        dx_TD.zero_().index_add_(0, token_S, dx_SD)
    return run


def fwd_bwd(module, x, grad, reduce_out=lambda out: out):
    def step():
        module.zero_grad(set_to_none=True)
        xi = x.detach().requires_grad_(True)
        out = reduce_out(module(xi))
        out.backward(grad)
    return step


def bench_shape(d, d_expert, E, k, tokens, skew, rounds, with_transformers=True, with_naive=None):
    x, router = make_inputs(d, E, tokens, skew)
    cfg = ModelConfig(d_model=d, d_expert=d_expert, n_experts=E, top_k=k, n_heads=1, head_dim=2, norm_topk_prob=True)
    torch.manual_seed(0)
    moe = MoE(cfg)
    moe.reset_parameters(0.02)
    with torch.no_grad():
        moe.router.weight.copy_(router)
    routing = route(x, moe.router.weight, k, True)
    counts_E = routing.tokens_per_expert_E
    load = (counts_E.max() / counts_E.float().mean()).item()
    grad = torch.randn(tokens, d)
    dense = DenseSwiGLU(d, k * d_expert)
    fns = {"dense": fwd_bwd(dense, x, grad), "dense_matmuls": dense_matmuls_only(dense, x),
           "matmuls": matmuls_only(moe, x, counts_E.tolist()),
           "row_copies": row_copies_only(x, DispatchPlan.from_routing(routing).token_S)}
    backends = ["grouped_mm", "loop"]
    if with_naive if with_naive is not None else E <= 8:
        backends.append("naive")
    for b in backends:
        m = MoE(cfg.model_copy(update={"moe_backend": b}))
        m.load_state_dict(moe.state_dict())
        fns[b] = fwd_bwd(m, x, grad, reduce_out=lambda out: out[0])
    hf_impls = []
    if with_transformers:
        try:
            for impl in ("eager", "batched_mm", "grouped_mm"):
                # batched_mm gathers a full copy of the expert weights for every routing slot
                if impl == "batched_mm" and tokens * k * 3 * d * d_expert * 4 > BATCHED_MM_MAX_BYTES:
                    continue
                if impl == "eager" and E > HF_EAGER_MAX_EXPERTS:
                    continue
                block = build_transformers_block(moe, d, d_expert, E, k, impl)
                fns[f"hf_{impl}"] = fwd_bwd(block, x[None], grad[None])
                hf_impls.append(impl)
        except ImportError:
            pass
    s = summarise(interleaved_times(fns, rounds=rounds), "dense")
    return {"shape": (d, d_expert, E, k), "tokens": tokens, "max_over_mean_load": load, "seconds": s["seconds"],
            "flop_ratio": matmul_flop_ratio(d, d_expert, E, k),
            "ratio_to_dense": s["ratio"], "ratio_iqr": s["ratio_iqr"]}


def run(shapes, tokens=4096, skew=0.0, rounds=5, with_transformers=True, verbose=True) -> list[dict]:
    torch.manual_seed(0)
    results = []
    for s in shapes:
        results.append(bench_shape(*s, tokens=tokens, skew=skew, rounds=rounds, with_transformers=with_transformers))
        if verbose:
            r = results[-1]
            print(f"  {r['shape']}: " + ", ".join(f"{n} {v:.2f}" for n, v in r["ratio_to_dense"].items()), flush=True)
    return results


def copy_dispatch_estimate(ratio: dict[str, float]) -> float:
    """The ``+ dense non-matmul`` estimate over the dense floor: the layer's matmuls alone, its four row
    copies and the dense FFN's own non-matmul share (``1 - dense_matmuls``)."""
    return ratio["matmuls"] + ratio["row_copies"] + 1.0 - ratio["dense_matmuls"]


def report(results: list[dict], title: str) -> None:
    names = ["grouped_mm", "loop", "naive", "hf_eager", "hf_batched_mm", "hf_grouped_mm"]
    cols = (["(d, F, E, k)", "load max/mean", "dense ms", "FLOPs /dense", "matmuls only /dense", "+ row copies", "+ dense non-matmul"]
            + [f"{n} /dense" for n in names] + ["hf best / ours"])
    rows = []
    for r in results:
        ratio = r["ratio_to_dense"]
        hf = [ratio[n] for n in names if n.startswith("hf_") and n in ratio]
        best_hf = min(hf) if hf else math.nan
        rows.append(
            [str(r["shape"]), f"{r['max_over_mean_load']:.2f}", f"{1e3 * r['seconds']['dense']:.1f}",
             f"{r['flop_ratio']:.2f}", ratio_text(ratio["matmuls"], r["ratio_iqr"]["matmuls"]),
             f"{ratio['matmuls'] + ratio['row_copies']:.2f}", f"{copy_dispatch_estimate(ratio):.2f}"]
            + [ratio_text(ratio["grouped_mm"], r["ratio_iqr"]["grouped_mm"])]  # ours, with its spread
            + [ratio_text(ratio[n]) if n in ratio else "-" for n in names[1:]]
            + [f"{best_hf / ratio['grouped_mm']:.2f}x" if hf else "-"]
        )
    print_table(title, cols, rows)


# ---------------------------------------------------------------------------------------------
# decode: few tokens, many experts (inference)
# ---------------------------------------------------------------------------------------------
DECODE_SHAPES = [(256, 512, 8, 2), (256, 128, 64, 8), (256, 64, 256, 8)]


def one_by_one(moe: MoE, x_TD: torch.Tensor) -> torch.Tensor:
    """The decode floor: for each token, run only its k selected experts, one matmul pair each."""
    r = route(x_TD, moe.router.weight, moe.top_k, moe.norm_topk_prob)
    F_ = moe.w_down.shape[-1]
    out = torch.zeros_like(x_TD)
    experts, weights = r.expert_TK.tolist(), r.weight_TK
    for t, row in enumerate(experts):
        x = x_TD[t : t + 1]
        for j, e in enumerate(row):
            h = x @ moe.w_gate_up[e].T
            out[t] += weights[t, j] * ((F.silu(h[:, :F_]) * h[:, F_:]) @ moe.w_down[e].T)[0]
    return out


def bench_decode(shapes=DECODE_SHAPES, token_counts=(1, 4, 16), rounds=20) -> list[dict]:
    results = []
    for d, d_expert, E, k in shapes:
        cfg = ModelConfig(d_model=d, d_expert=d_expert, n_experts=E, top_k=k, n_heads=1, head_dim=2)
        torch.manual_seed(0)
        moe = MoE(cfg)
        moe.reset_parameters(0.02)
        modules = {}
        for b in ("grouped_mm", "loop"):  # one module per backend, same weights: nothing but the call is timed
            modules[b] = MoE(cfg.model_copy(update={"moe_backend": b}))
            modules[b].load_state_dict(moe.state_dict())
        for T in token_counts:
            x = torch.randn(T, d)
            # the floor reads the very weights of the module it is compared with (another copy of the same
            # values sits elsewhere in memory, which alone moved one-token times by ~5 %)
            fns = {"one_by_one": lambda: one_by_one(modules["grouped_mm"], x)}
            for b, m in modules.items():
                fns[b] = (lambda m=m: m(x, with_losses=False))  # as when decoding
            with torch.inference_mode():
                s = summarise(interleaved_times(fns, rounds=rounds, number=10), "one_by_one")  # ~0.1 ms calls: 10 at once
            results.append({"shape": (d, d_expert, E, k), "tokens": T, "seconds": s["seconds"],
                            "ratio_to_one_by_one": s["ratio"], "ratio_iqr": s["ratio_iqr"]})
    return results


def report_decode(results: list[dict]) -> None:
    rows = [[str(r["shape"]), str(r["tokens"]), f"{1e6 * r['seconds']['one_by_one'] / r['tokens']:.0f}"]
            + [ratio_text(r["ratio_to_one_by_one"]["grouped_mm"], r["ratio_iqr"]["grouped_mm"]),
               ratio_text(r["ratio_to_one_by_one"]["loop"])] for r in results]
    print_table("MoE layer decode forward (inference), time / one-by-one selected experts",
                ["(d, F, E, k)", "tokens", "one-by-one us/token", "grouped_mm /1x1", "loop /1x1"], rows)


def main(argv=None) -> dict:
    setup()  # keep freed memory: no page faults timed (benchmarks.common.setup)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--skew", type=float, default=0.0, help="router bias strength (0 = uniform routing)")
    p.add_argument("--shapes", choices=["default", "sparse", "all"], default="default")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--decode", action="store_true", help="also time decode-sized batches (1-16 tokens)")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    shapes = {"default": CORE_SHAPES, "sparse": SPARSE_SHAPES, "all": CORE_SHAPES + SPARSE_SHAPES}[a.shapes]
    results = run(shapes, a.tokens, a.skew, a.rounds, not a.no_transformers)
    report(results, f"MoE layer fwd+bwd, {a.tokens} tokens, fp32, skew {a.skew} ({torch.get_num_threads()} threads)")
    payload = {"benchmark": "moe_layer", "machine": machine_info(), "results": results}
    if a.decode:
        payload["decode"] = bench_decode()
        report_decode(payload["decode"])
    if a.json:
        write_json(a.json, payload)
    return payload


if __name__ == "__main__":
    main()
