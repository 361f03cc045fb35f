"""Every dispatch backend equals the naive reference, forward and gradients; losses match formulas."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from moelab.config import ModelConfig
from moelab.model.losses import load_balancing_loss, router_z_loss
from moelab.model.moe import BACKENDS, MoE, route

FAST = [b for b in BACKENDS if b != "naive"]


def make_moe(E, k, D=16, Fh=12, backend="naive", norm=None, seed=0):
    cfg = ModelConfig(d_model=D, d_expert=Fh, n_experts=E, top_k=k, n_heads=2, norm_topk_prob=norm, moe_backend=backend)
    torch.manual_seed(seed)
    moe = MoE(cfg)
    moe.reset_parameters(0.5)
    return moe


def run(moe, x, backend):
    moe.set_backend(backend)
    moe.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y, aux = moe(x)
    # a loss touching every output element with distinct weights, plus the router losses
    w = torch.linspace(-1, 1, y.numel()).view_as(y)
    (torch.sum(y * w) + aux.aux_loss + aux.z_loss).backward()
    grads = {n: p.grad.clone() for n, p in moe.named_parameters()}
    return y.detach(), x.grad.clone(), grads, aux


CASES = sorted({(E, E if k == "E" else k) for E, k in itertools.product([1, 2, 8, 64], [1, 2, "E"]) if k == "E" or k <= E})


@pytest.fixture(params=["auto", "permute"])
def combine_strategy(request, monkeypatch):
    """CPU uses index_select/index_add_; "permute" is the GPU path (deterministic with atomics off)."""
    import moelab.model.moe as moe_module

    monkeypatch.setattr(moe_module, "COMBINE_STRATEGY", request.param)
    return request.param


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("E,k", CASES)
def test_backend_matches_naive(backend, E, k, combine_strategy):
    moe = make_moe(E, k)
    x = torch.randn(37, 16)
    y0, gx0, g0, aux0 = run(moe, x, "naive")
    y1, gx1, g1, aux1 = run(moe, x, backend)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-5)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-5, msg=f"grad of {name}")
    assert torch.equal(aux0.tokens_per_expert_E, aux1.tokens_per_expert_E)


@pytest.mark.parametrize("backend", FAST)
def test_skewed_routing_and_empty_experts(backend, combine_strategy):
    """One expert gets most tokens and several experts get none: still exact."""
    E, k = 8, 2
    moe = make_moe(E, k)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[3, 0] = 50.0  # expert 3 wins whenever x[:, 0] > 0
        moe.router.weight[5, 1] = 50.0
    x = torch.randn(64, 16)
    x[:, 0] = x[:, 0].abs() + 0.5
    y0, gx0, g0, aux0 = run(moe, x, "naive")
    counts = aux0.tokens_per_expert_E
    assert counts[3] == 64 and (counts == 0).sum() >= 4
    y1, gx1, g1, _ = run(moe, x, backend)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-5)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-5)
    # experts that got no token get exactly zero gradient
    empty = (counts == 0).nonzero().flatten()
    assert torch.all(g1["w_gate_up"][empty] == 0) and torch.all(g1["w_down"][empty] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tokens(backend, combine_strategy):
    moe = make_moe(8, 2, backend=backend)
    y, aux = moe(torch.randn(0, 16))
    assert y.shape == (0, 16) and aux.tokens_per_expert_E.sum() == 0


def test_dense_case_is_swiglu_ffn():
    """E = k = 1 equals a dense SwiGLU FFN with the same weights (and has no router)."""
    moe = make_moe(1, 1)
    assert moe.router is None
    x = torch.randn(20, 16)
    y, aux = moe(x)
    gate, up = moe.w_gate_up[0][:12].T, moe.w_gate_up[0][12:].T
    ref = (F.silu(x @ gate) * (x @ up)) @ moe.w_down[0].T
    torch.testing.assert_close(y, ref)
    assert aux.aux_loss.item() == 0 and aux.z_loss.item() == 0


def test_topk_equals_e_is_dense_mixture():
    """k = E with renormalisation: every expert weighted by its full softmax probability."""
    moe = make_moe(4, 4, norm=True)
    x = torch.randn(10, 16)
    y, _ = moe(x)
    probs = torch.softmax(x @ moe.router.weight.T, dim=-1)
    w1, w3, w2 = moe.w_gate_up[:, :12], moe.w_gate_up[:, 12:], moe.w_down
    ref = sum(probs[:, e : e + 1] * (F.silu(x @ w1[e].T) * (x @ w3[e].T)) @ w2[e].T for e in range(4))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)


def test_router_renormalisation_default():
    assert ModelConfig(n_experts=8, top_k=1).norm_topk_prob is False
    assert ModelConfig(n_experts=8, top_k=2).norm_topk_prob is True
    r = route(torch.randn(5, 16), torch.randn(8, 16), 3, True)
    torch.testing.assert_close(r.weight_TK.sum(-1), torch.ones(5))
    r = route(torch.randn(5, 16), torch.randn(8, 16), 3, False)
    assert torch.all(r.weight_TK.sum(-1) < 1)


def test_load_balancing_loss_uniform_and_skewed():
    E, k, T, alpha = 8, 2, 64, 0.01
    probs = torch.full((T, E), 1.0 / E)
    counts = torch.full((E,), T * k // E)
    assert load_balancing_loss(probs, counts, k, alpha).item() == pytest.approx(alpha)
    skew_probs = torch.zeros(T, E)
    skew_probs[:, :2] = 0.5
    skew_counts = torch.zeros(E, dtype=torch.long)
    skew_counts[:2] = T
    skewed = load_balancing_loss(skew_probs, skew_counts, k, alpha).item()
    assert skewed == pytest.approx(alpha * E / k) and skewed > alpha


def test_z_loss_formula():
    logits = torch.randn(9, 8)
    expected = 1e-3 * (torch.logsumexp(logits, -1) ** 2).mean()
    torch.testing.assert_close(router_z_loss(logits, 1e-3), expected)


def test_moe_layer_aux_losses_are_the_formulas():
    moe = make_moe(8, 2)
    x = torch.randn(50, 16)
    _, aux = moe(x)
    r = route(x, moe.router.weight, 2, True)
    torch.testing.assert_close(aux.aux_loss, load_balancing_loss(r.probs_TE, r.tokens_per_expert_E, 2, 1e-2))
    torch.testing.assert_close(aux.z_loss, router_z_loss(r.logits_TE, 1e-3))
    assert aux.tokens_per_expert_E.sum().item() == 100


def test_router_runs_in_fp32_under_bf16_input():
    moe = make_moe(8, 2).to(torch.bfloat16)
    r = route(torch.randn(4, 16, dtype=torch.bfloat16), moe.router.weight, 2, True)
    assert r.probs_TE.dtype == torch.float32 and r.weight_TK.dtype == torch.float32
    y, _ = moe(torch.randn(4, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_router_runs_in_fp32_under_autocast():
    """Autocast would run the router's product in bf16; routing stays fp32 and unchanged by it."""
    moe = make_moe(8, 2)
    x = torch.randn(64, 16)
    want = route(x, moe.router.weight, 2, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = route(x, moe.router.weight, 2, True)
    assert got.logits_TE.dtype == torch.float32
    assert torch.equal(got.logits_TE, want.logits_TE) and torch.equal(got.expert_TK, want.expert_TK)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", [True, False])
def test_float64_gradcheck(backend, norm):
    """In float64 every backend (``grouped_mm`` runs as ``loop``: grouped_mm takes no float64) has
    exact analytic gradients -- output and router losses, with respect to the input, the router and
    the experts (``torch.autograd.gradcheck``: no precision is dropped to fp32 on the way)."""
    moe = make_moe(4, 2, D=8, Fh=5, backend=backend, norm=norm).double()
    names = [n for n, _ in moe.named_parameters()]

    def f(x, *params):
        y, aux = torch.func.functional_call(moe, dict(zip(names, params)), (x,))
        return y, aux.aux_loss + aux.z_loss

    x = torch.randn(7, 8, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_(True) for p in moe.parameters()]
    assert torch.autograd.gradcheck(f, (x, *params))


@pytest.mark.parametrize("T", [1, 3, 16, 40])
def test_float64_inference_paths_match_naive(T):
    """Decode and batch inference paths (per slot, strided runs, all experts, grouped, static) keep
    float64 end to end: equal to the reference to float64 precision."""
    moe = make_moe(8, 2, backend="grouped_mm").double()
    x = torch.randn(T, 16, dtype=torch.float64)
    with torch.no_grad():
        y, _ = moe(x, with_losses=False)
        y_static, _ = moe(x, with_losses=False, static_shapes=True)
        moe.set_backend("naive")
        ref, _ = moe(x, with_losses=False)
    assert y.dtype == y_static.dtype == torch.float64
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y_static, ref, rtol=1e-12, atol=1e-12)


def test_grouped_mm_is_deterministic(combine_strategy):
    moe = make_moe(16, 4, backend="grouped_mm")
    x = torch.randn(200, 16)
    a = run(moe, x, "grouped_mm")
    b = run(moe, x, "grouped_mm")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert all(torch.equal(a[2][n], b[2][n]) for n in a[2])


@pytest.mark.parametrize("E,k,T", [(8, 2, 1), (8, 2, 3), (8, 2, 4), (64, 8, 1), (64, 8, 3), (256, 8, 16), (4, 4, 1)])
def test_decode_path_matches_naive(E, k, T):
    """Inference with at most E slots uses the gathered-weights path; it equals the reference."""
    from moelab.model.moe import _is_decode

    moe = make_moe(E, k, backend="grouped_mm")
    x = torch.randn(T, 16)
    with torch.no_grad():
        r = route(x, moe.router.weight, k, moe.norm_topk_prob)
        assert _is_decode(x, r)
        y, _ = moe(x)
        moe.set_backend("naive")
        ref, _ = moe(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)


def test_expert_blocks_partition_experts_and_rows():
    from moelab.model.moe import expert_blocks

    counts = [5, 0, 7, 1, 9, 0, 0, 3]
    blocks = expert_blocks(counts, row_bytes=10, block_bytes=100)
    assert sum(b[0] for b in blocks) == len(counts) and sum(b[1] for b in blocks) == sum(counts)
    assert all(n >= 1 for n, _ in blocks)
    assert all(rows * 10 <= 100 or n == 1 for n, rows in blocks)
    assert expert_blocks(counts, 10, 10**9) == [(8, 25)]


@pytest.mark.parametrize("block_bytes", [1, 4096, 1 << 30])
def test_blocked_cpu_dispatch_matches_naive(block_bytes, monkeypatch):
    """Blocks of one expert, a few experts and all experts all give the reference result."""
    import moelab.model.moe as moe_module

    monkeypatch.setattr(moe_module, "CPU_BLOCK_BYTES", block_bytes)
    blocks_seen, expert_blocks = [], moe_module.expert_blocks
    monkeypatch.setattr(moe_module, "expert_blocks", lambda *a: blocks_seen.append(expert_blocks(*a)) or blocks_seen[-1])
    moe = make_moe(16, 4)
    x = torch.randn(50, 16)
    y0, gx0, g0, _ = run(moe, x, "naive")
    y1, gx1, g1, _ = run(moe, x, "grouped_mm")
    n_blocks = len(blocks_seen[0])  # CPU_BLOCK_BYTES is read at call time
    assert n_blocks == {1: 16, 1 << 30: 1}[block_bytes] if block_bytes != 4096 else 1 < n_blocks < 16
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-5)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("token_chunk", [512, 16])
def test_blocked_cpu_dispatch_is_bitwise_independent_of_the_block_size(monkeypatch, token_chunk):
    """The block size follows the machine's caches (and thread count); every expert's products and
    every token's sum run in the same order whatever the blocks, so results are equal bit for bit.
    One block computes the expert weight gradients with one grouped matmul when no expert has more
    than TOKEN_CHUNK rows (~75 here), else with the per-expert loop (TOKEN_CHUNK 16)."""
    import moelab.model.moe as moe_module
    import moelab.model.weight_grad as weight_grad_module

    monkeypatch.setattr(weight_grad_module, "TOKEN_CHUNK", token_chunk)
    moe = make_moe(16, 4, D=32, Fh=24)
    x = torch.randn(300, 32)
    results = []
    for block_bytes in (1, 24 * 4 * 2 * 200, 1 << 30):  # one expert per block, 2-3 experts per block, one block
        monkeypatch.setattr(moe_module, "CPU_BLOCK_BYTES", block_bytes)
        results.append(run(moe, x, "grouped_mm"))
    y0, gx0, g0, _ = results[0]
    for y, gx, g, _ in results[1:]:
        assert torch.equal(y, y0) and torch.equal(gx, gx0)
        assert all(torch.equal(g[name], g0[name]) for name in g0)


def test_cpu_cache_bytes_reads_sysfs(tmp_path):
    from moelab.model.moe import cpu_cache_bytes

    for i, (level, kind, size) in enumerate([("1", "Data", "48K"), ("1", "Instruction", "32K"), ("2", "Unified", "2048K"), ("3", "Unified", "300M")]):
        d = tmp_path / f"index{i}"
        d.mkdir()
        for name, value in (("level", level), ("type", kind), ("size", size)):
            (d / name).write_text(value + "\n")
    assert cpu_cache_bytes(1, tmp_path) == 48 << 10  # the data cache, not the instruction cache
    assert cpu_cache_bytes(2, tmp_path) == 2 << 20
    assert cpu_cache_bytes(3, tmp_path) == 300 << 20
    (tmp_path / "index2" / "size").write_text("1M\n")
    assert cpu_cache_bytes(2, tmp_path) == 1 << 20
    (tmp_path / "index3" / "size").write_text("bogus\n")  # unreadable size: unknown
    assert cpu_cache_bytes(3, tmp_path) is None
    assert cpu_cache_bytes(4, tmp_path) is None
    assert cpu_cache_bytes(2, tmp_path / "missing") is None


def test_cpu_block_bytes_rule(monkeypatch):
    """max(L2 per thread, half the L3), clamped to 256 KiB - 16 MiB; an explicit setting wins."""
    import moelab.model.moe as moe_module

    threads = torch.get_num_threads()
    monkeypatch.setattr(moe_module, "_L2_BYTES", 2 << 20)
    monkeypatch.setattr(moe_module, "_L3_BYTES", None)
    try:
        torch.set_num_threads(1)
        assert moe_module.cpu_block_bytes() == 2 << 20
        torch.set_num_threads(2)
        assert moe_module.cpu_block_bytes() == 4 << 20
        monkeypatch.setattr(moe_module, "_L3_BYTES", 32 << 20)  # half the L3 when that is larger
        assert moe_module.cpu_block_bytes() == 16 << 20
        monkeypatch.setattr(moe_module, "_L3_BYTES", 4 << 20)  # ... and the L2 rule when not
        assert moe_module.cpu_block_bytes() == 4 << 20
        monkeypatch.setattr(moe_module, "_L3_BYTES", 1 << 30)  # clamped to 16 MiB
        assert moe_module.cpu_block_bytes() == 16 << 20
        monkeypatch.setattr(moe_module, "_L2_BYTES", None)  # both unknown: 256 KiB per thread
        monkeypatch.setattr(moe_module, "_L3_BYTES", None)
        assert moe_module.cpu_block_bytes() == 512 << 10
        monkeypatch.setattr(moe_module, "_L2_BYTES", 64 << 20)  # clamped to 16 MiB
        assert moe_module.cpu_block_bytes() == 16 << 20
        monkeypatch.setattr(moe_module, "CPU_BLOCK_BYTES", 12345)  # an explicit setting wins
        assert moe_module.cpu_block_bytes() == 12345
    finally:
        torch.set_num_threads(threads)


def _blocked_node(y):
    return type(y.grad_fn).__name__ == "_BlockedExpertsBackward"


def test_cpu_training_uses_one_blocked_function():
    """On CPU in fp32 (no autocast) the grouped_mm backend is one autograd node for all experts; with
    the GPU combine it is the grouped_linear custom op."""
    import moelab.model.moe as moe_module

    moe = make_moe(16, 4, backend="grouped_mm")
    y, _ = moe(torch.randn(30, 16, requires_grad=True))
    assert _blocked_node(y)
    old = moe_module.COMBINE_STRATEGY
    try:
        moe_module.COMBINE_STRATEGY = "permute"
        y, _ = moe(torch.randn(30, 16, requires_grad=True))
        assert not _blocked_node(y)
    finally:
        moe_module.COMBINE_STRATEGY = old


@pytest.mark.parametrize("block_bytes", [1, 200, 1 << 30])
@pytest.mark.parametrize("E,k", [(8, 2), (8, 8)])
def test_blocked_function_empty_blocks_and_topk_equals_e(E, k, block_bytes, monkeypatch):
    """Blocks of one expert (so blocks without any row), mixed blocks and a single block, with
    skewed routing and with k = E: output, input, router and expert gradients equal the reference,
    and experts without rows get exactly zero gradient."""
    import moelab.model.moe as moe_module

    monkeypatch.setattr(moe_module, "CPU_BLOCK_BYTES", block_bytes)
    moe = make_moe(E, k)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[3, 0] = 50.0
        moe.router.weight[5, 1] = 50.0
    x = torch.randn(40, 16)
    x[:, 0] = x[:, 0].abs() + 0.5
    y0, gx0, g0, aux0 = run(moe, x, "naive")
    y1, gx1, g1, _ = run(moe, x, "grouped_mm")
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-5)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-5, msg=f"grad of {name}")
    empty = (aux0.tokens_per_expert_E == 0).nonzero().flatten()
    assert k == E or len(empty) >= 2
    assert torch.all(g1["w_gate_up"][empty] == 0) and torch.all(g1["w_down"][empty] == 0)


def test_blocked_function_partial_grads_and_no_grad():
    """Input without gradient (only parameters train) and inference with more slots than experts."""
    moe = make_moe(8, 2, backend="grouped_mm")
    x = torch.randn(40, 16)
    y, _ = moe(x)
    assert _blocked_node(y)
    y.sum().backward()
    grads = {n: p.grad.clone() for n, p in moe.named_parameters()}
    moe.set_backend("naive")
    moe.zero_grad(set_to_none=True)
    ref, _ = moe(x)
    ref.sum().backward()
    for n, p in moe.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-5, msg=n)
    moe.set_backend("grouped_mm")
    with torch.no_grad():
        torch.testing.assert_close(moe(x)[0], ref, rtol=1e-5, atol=1e-5)


def test_blocked_function_bf16_weights():
    """bf16 parameters without autocast also run the blocked function; within bf16 rounding (relative
    to each tensor's scale) of the fp32 reference on the same bf16-rounded weights and input.
    (``grouped_mm`` needs 16-byte strides, so ``d_expert`` is a multiple of 8 in bf16.)"""
    import copy

    moe = make_moe(8, 2, Fh=16).to(torch.bfloat16)
    x = torch.randn(40, 16).to(torch.bfloat16)
    y_ref, gx_ref, g_ref, _ = run(copy.deepcopy(moe).float(), x.float(), "naive")
    y, gx, g, _ = run(moe, x, "grouped_mm")
    assert y.dtype == torch.bfloat16 and gx.dtype == torch.bfloat16
    pairs = [("y", y, y_ref), ("x.grad", gx, gx_ref)] + [(n, g[n], g_ref[n]) for n in g_ref]
    for name, got, ref in pairs:
        scale = ref.abs().max().item()
        torch.testing.assert_close(got.float(), ref, rtol=0.02, atol=0.02 * scale, msg=name)
    out, _ = moe(x.requires_grad_(True))
    assert type(out.grad_fn.next_functions[0][0]).__name__ == "_BlockedExpertsBackward"


def test_decode_under_bf16_autocast_keeps_input_dtype():
    """The per-slot decode path computes in the autocast dtype and returns the input's dtype."""
    moe = make_moe(8, 2, backend="grouped_mm")
    x = torch.randn(2, 16)
    with torch.no_grad():
        ref, _ = moe(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, aux = moe(x, with_losses=False)
    assert y.dtype == torch.float32 and aux.tokens_per_expert_E is None
    assert (y - ref).abs().max() <= 0.03 * ref.abs().max()  # bf16 arithmetic: ~3 significant digits


def test_routing_counts_are_lazy_and_exact():
    x = torch.randn(50, 16)
    r = route(x, torch.randn(8, 16), 2, True)
    assert r._tokens_per_expert_E is None
    assert torch.equal(r.tokens_per_expert_E, torch.bincount(r.expert_TK.flatten(), minlength=8))
    assert r.tokens_per_expert_E.sum() == 100


@pytest.mark.parametrize("max_len", [1, 2, 3, 8])
def test_expert_runs_tile_sorted_slots_with_constant_strides(max_len):
    from moelab.model.moe import _expert_runs

    g = torch.Generator().manual_seed(0)
    for n in range(0, 40):
        experts = sorted(torch.randint(0, 12, (n,), generator=g).tolist())
        runs = _expert_runs(experts, max_len)
        assert sum(r[1] for r in runs) == n and [r[0] for r in runs] == list(itertools.accumulate([0] + [r[1] for r in runs[:-1]]))[: len(runs)]
        for first, length, stride in runs:
            assert 1 <= length <= max_len and stride >= 0
            assert experts[first : first + length] == [experts[first] + i * stride for i in range(length)]
    assert _expert_runs([0, 0, 3, 5, 7, 9, 9], 4) == [(0, 2, 0), (2, 4, 2), (6, 1, 0)]


def test_expert_view_is_a_view_of_the_stacked_weights():
    from moelab.model.moe import _expert_view

    w = torch.randn(10, 6, 4)
    for first, n, stride in [(2, 3, 3), (5, 2, 0), (9, 1, 0), (0, 10, 1)]:
        v = _expert_view(w, first, n, stride)
        assert v.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()
        assert torch.equal(v, w[[first + i * stride for i in range(n)]])
    assert torch.equal(_expert_view(w[:, 1:5, :], 2, 2, 4), w[[2, 6], 1:5, :])  # any strides


@pytest.mark.parametrize("E,k,T", [(8, 2, 2), (8, 2, 4), (4, 4, 1), (8, 2, 1), (64, 8, 1), (64, 8, 3), (256, 8, 16), (256, 8, 32), (16, 1, 12)])
@pytest.mark.parametrize("threads", [1, 2, 4])
def test_decode_strided_runs_match_naive(E, k, T, threads, monkeypatch):
    """CPU decode of small experts with enough slots runs the selected experts as strided views, several
    per bmm (runs of up to max(2, threads)); one token (no sort) and repeated experts (stride 0)
    included; equal to the reference."""
    from moelab.model import moe as moe_mod

    strided_runs, calls = moe_mod.experts_strided_runs, []
    monkeypatch.setattr(moe_mod, "experts_strided_runs", lambda *a: calls.append(1) or strided_runs(*a))
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    moe = make_moe(E, k, backend="grouped_mm")
    x = torch.randn(T, 16)
    x[T // 2 :] = x[0]  # identical tokens choose identical experts: stride-0 runs
    with torch.no_grad():
        r = route(x, moe.router.weight, k, moe.norm_topk_prob)
        assert moe_mod._is_decode(x, r) and moe_mod._use_strided_runs(T, r.expert_TK.numel(), moe.w_gate_up[0].numel() * 4)
        y = strided_runs(x, moe.w_gate_up, moe.w_down, r)
        y_module, _ = moe(x, with_losses=False)
        moe.set_backend("naive")
        ref, _ = moe(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    assert calls == [1] and torch.equal(y_module, y)  # the module dispatches here


def test_cpu_decode_path_choice():
    """Strided runs need >= 4 slots (2 for one token, which needs no sort) and experts of <= 512 KiB."""
    from moelab.model.moe import _use_strided_runs

    small, large = 256 * 1024, 1024 * 1024
    assert _use_strided_runs(1, 2, small) and not _use_strided_runs(1, 1, small)
    assert _use_strided_runs(2, 4, small) and not _use_strided_runs(3, 3, small)
    assert not _use_strided_runs(1, 8, large) and not _use_strided_runs(4, 8, large)


@pytest.mark.parametrize("T", [1, 4])
def test_decode_large_experts_run_per_slot(T, monkeypatch):
    """Experts above STRIDED_RUNS_MAX_EXPERT_BYTES decode one pair per slot, equal to the reference."""
    from moelab.model import moe as moe_mod

    per_slot, calls = moe_mod.experts_per_slot, []
    monkeypatch.setattr(moe_mod, "experts_per_slot", lambda *a: calls.append(1) or per_slot(*a))
    monkeypatch.setattr(moe_mod, "STRIDED_RUNS_MAX_EXPERT_BYTES", 1024)  # make make_moe's experts "large"
    moe = make_moe(8, 2, backend="grouped_mm")
    x = torch.randn(T, 16)
    with torch.no_grad():
        y, _ = moe(x, with_losses=False)
        moe.set_backend("naive")
        ref, _ = moe(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    assert calls == [1]


def test_decode_strided_runs_under_bf16_autocast():
    """Under autocast the runs compute in bf16 (casting only the experts read) and return fp32."""
    from moelab.model.moe import experts_strided_runs

    moe = make_moe(16, 4, backend="grouped_mm")
    x = torch.randn(3, 16)
    with torch.no_grad():
        ref, _ = moe(x)
        r = route(x, moe.router.weight, 4, moe.norm_topk_prob)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = experts_strided_runs(x, moe.w_gate_up, moe.w_down, r)
    assert y.dtype == torch.float32
    assert (y - ref).abs().max() <= 0.03 * ref.abs().max()


@pytest.mark.parametrize("E,k,T", [(8, 2, 1), (8, 2, 4), (8, 2, 16), (4, 4, 7), (64, 8, 16), (16, 1, 40)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_static_shapes_dispatch_matches_naive(E, k, T, backend, combine_strategy):
    """``static_shapes=True`` (compiled decode): gathered weights up to E slots, sorted grouped matmuls
    with device-side group ends above (skewed routing and empty experts included), equal to the reference."""
    moe = make_moe(E, k, backend=backend)
    x = torch.randn(T, 16)
    x[: T // 2] = x[0]  # several identical tokens: some experts get many rows, others none
    with torch.no_grad():
        y, aux = moe(x, with_losses=False, static_shapes=True)
        moe.set_backend("naive")
        ref, _ = moe(x, with_losses=False)
    assert aux.tokens_per_expert_E is None
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("group", [1, 8])
@pytest.mark.parametrize("E,k,T", [(8, 2, 16), (64, 8, 16), (4, 4, 7), (16, 1, 40), (2, 1, 3)])
def test_fused_reduce_matches_naive(E, k, T, group):
    """The compiled CPU decode path, run eagerly in float64: the per-slot reductions over sorted slots,
    one or eight slots per loop (7*4 and 3 slots: padded to a multiple of 8), with skewed routing and
    empty experts, equal the reference to float64 precision, in float64."""
    from moelab.model.moe import experts_fused_reduce

    moe = make_moe(E, k, backend="grouped_mm").double()
    x = torch.randn(T, 16, dtype=torch.float64)
    x[: T // 2] = x[0]
    with torch.no_grad():
        r = route(x, moe.router.weight, k, moe.norm_topk_prob)
        y = experts_fused_reduce(x, moe.w_gate_up, moe.w_down, r, group)
        moe.set_backend("naive")
        ref, _ = moe(x, with_losses=False)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


def test_fused_reduce_keeps_bf16():
    """In bf16 the fused reductions return bf16, within bf16 rounding of the float32 reference."""
    from moelab.model.moe import experts_fused_reduce

    moe = make_moe(8, 2, backend="grouped_mm")
    x = torch.randn(16, 16)
    with torch.no_grad():
        r = route(x, moe.router.weight, 2, moe.norm_topk_prob)
        ref = experts_fused_reduce(x, moe.w_gate_up, moe.w_down, r)
        y = experts_fused_reduce(x.bfloat16(), moe.w_gate_up.bfloat16(), moe.w_down.bfloat16(), r)
    assert y.dtype == torch.bfloat16
    assert (y.float() - ref).abs().max() <= 0.03 * ref.abs().max()


@pytest.mark.parametrize("E,k,T,fused", [(8, 2, 16, True), (64, 8, 16, True), (8, 2, 60, True), (8, 2, 80, False)])
def test_compiled_static_dispatch_matches_naive(E, k, T, fused, monkeypatch):
    """Under ``torch.compile`` on CPU, the static dispatch takes the fused reductions up to
    ``FUSED_REDUCE_MAX_SLOTS_PER_EXPERT`` slots per expert (here 4, 2 and 15) and the grouped path above
    (20 per expert); both equal the reference. Eager, the static dispatch never takes them."""
    import moelab.model.moe as moe_module

    traced = []
    real = moe_module.experts_fused_reduce
    monkeypatch.setattr(moe_module, "experts_fused_reduce", lambda *a: traced.append(1) or real(*a))
    torch._dynamo.reset()
    moe = make_moe(E, k, backend="grouped_mm")
    x = torch.randn(T, 16)
    x[: T // 2] = x[0]
    with torch.no_grad():
        eager, _ = moe(x, with_losses=False, static_shapes=True)
        assert not traced
        compiled = torch.compile(lambda x: moe(x, with_losses=False, static_shapes=True)[0], fullgraph=True)(x)
        moe.set_backend("naive")
        ref, _ = moe(x, with_losses=False)
    assert bool(traced) == fused
    torch.testing.assert_close(compiled, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(eager, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,K", [(10, 16), (13, 7), (16, 16), (12, 20), (5, 3)])
def test_grouped_linear_any_size(dtype, N, K):
    """grouped_mm needs 16-byte aligned strides; unaligned d_model / d_expert are zero-padded, with the
    same values and gradients as per-group matmuls (empty group included)."""
    from moelab.model.grouped_mm import grouped_linear

    torch.manual_seed(0)
    x = torch.randn(11, K, dtype=dtype, requires_grad=True)
    w = torch.randn(3, N, K, dtype=dtype, requires_grad=True)
    y = grouped_linear(x, w, torch.tensor([3, 3, 11], dtype=torch.int32))
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    xr, wr = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    yr = torch.cat([xr[:3] @ wr[0].T, xr[3:] @ wr[2].T])
    (yr * dy.float()).sum().backward()
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    for got, want in ((y, yr), (x.grad, xr.grad), (w.grad, wr.grad)):
        torch.testing.assert_close(got.float(), want, **tol)
    assert w.grad[1].abs().sum() == 0


def test_row_bucket_bounds_the_matmul_shapes():
    """bf16 / fp16 expert rows on CPU are padded to few sizes: never fewer rows, at most 12.5 % more above
    16 rows, 8 sizes per octave (oneDNN builds a kernel per shape: few shapes, few builds)."""
    from moelab.model.grouped_mm import _row_bucket

    sizes = [_row_bucket(n) for n in range(1, 1 << 16)]
    assert all(n <= b for n, b in zip(range(1, 1 << 16), sizes))
    assert all(b <= 1.125 * n for n, b in zip(range(17, 1 << 16), sizes[16:]))
    assert sizes[:16] == list(range(1, 17)) and _row_bucket(17) == 18 and _row_bucket(1000) == 1024
    assert len(set(sizes)) == 16 + 8 * 12  # 1..16, then 8 per octave up to 2**16
    assert all(_row_bucket(b) == b for b in set(sizes))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grouped_linear_cpu_half_precision_bucketed_rows(dtype, monkeypatch):
    """CPU bf16 / fp16: groups of 17-300 rows (padded to bucket sizes) and an empty group give the values
    and gradients of per-group matmuls on the same half-precision inputs, computed in fp32."""
    from moelab.model import grouped_mm
    from moelab.model.grouped_mm import grouped_linear

    padded_rows, rows_seen = grouped_mm._padded_rows, set()
    monkeypatch.setattr(grouped_mm, "_padded_rows", lambda *a: rows_seen.add(padded_rows(*a).shape[0]) or padded_rows(*a))
    torch.manual_seed(0)
    sizes = [17, 0, 45, 300, 1]
    ends = torch.tensor(list(itertools.accumulate(sizes)), dtype=torch.int32)
    x = torch.randn(sum(sizes), 24, dtype=dtype, requires_grad=True)
    w = torch.randn(len(sizes), 40, 24, dtype=dtype, requires_grad=True)
    y = grouped_linear(x, w, ends)
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    xr, wr = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    starts = [0, *ends.tolist()[:-1]]
    yr = torch.cat([xr[s0 : s0 + n] @ wr[e].T for e, (s0, n) in enumerate(zip(starts, sizes))])
    (yr * dy.float()).sum().backward()
    for got, want in ((y, yr), (x.grad, xr.grad), (w.grad, wr.grad)):
        torch.testing.assert_close(got.float(), want, atol=0.05 * want.abs().max().item(), rtol=0.02)
    assert y.dtype == x.grad.dtype == w.grad.dtype == dtype and w.grad[1].abs().sum() == 0
    assert rows_seen == {18, 48, 320, 1}  # forward, input and weight gradients all ran on bucketed rows


def test_bf16_autocast_training_with_unaligned_expert_width():
    """Autocast runs the grouped_linear custom op; d_expert 12 (24 bytes in bf16) used to fail there."""
    moe = make_moe(8, 2, D=16, Fh=12, backend="grouped_mm")
    x = torch.randn(20, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = moe(x)
    (y.float().sum() + aux.aux_loss).backward()
    assert moe.w_gate_up.grad is not None and torch.isfinite(moe.w_gate_up.grad).all()
    moe.set_backend("naive")
    with torch.no_grad():
        ref, _ = moe(x)
    torch.testing.assert_close(y.float(), ref, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("E,k,T", [(8, 2, 16), (4, 2, 3), (8, 2, 200)])
def test_decode_batch_all_dense_matches_naive(E, k, T, packed, monkeypatch):
    """Inference with more slots than few experts runs every expert on every token (batched matmuls,
    or two packed products on CPU); large products (here T = 200 with a lowered budget) keep the
    grouped path. All equal the reference."""
    import moelab.model.linear as linear_module
    import moelab.model.moe as moe_module

    if packed:
        monkeypatch.setattr(linear_module, "PACK_MIN_BYTES", 0)

    monkeypatch.setattr(moe_module, "DENSE_DECODE_MAX_MACS", 100_000)
    monkeypatch.setattr(moe_module, "DENSE_DECODE_MAX_MACS_PACKED", 100_000)
    used = []
    real = moe_module.experts_all_dense
    monkeypatch.setattr(moe_module, "experts_all_dense", lambda *a: used.append(1) or real(*a))
    moe = make_moe(E, k, backend="grouped_mm")
    x = torch.randn(T, 16)
    with torch.no_grad():
        y, _ = moe(x, with_losses=False)
        moe.set_backend("naive")
        ref, _ = moe(x, with_losses=False)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    assert bool(used) == (T * E * 3 * 12 * 16 <= 100_000)
