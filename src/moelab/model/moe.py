"""The MoE feed-forward block: fp32 top-k router, SwiGLU experts, dropless dispatch.

Shapes use suffixes: ``T`` tokens (batch x sequence flattened), ``D`` d_model, ``E`` experts,
``K`` top_k, ``F`` d_expert, ``S = T * K`` routing slots.

Routing (token choice, dropless): ``probs_TE = softmax(x_TD @ w_router.T)`` in fp32; each token keeps its
``K`` largest probabilities (optionally renormalised to sum to one) and is processed by exactly those
``K`` experts; no capacity factor, no token is ever dropped.

Expert weights are stored fused and expert-major in the ``nn.Linear`` (out, in) layout, so that one
grouped matmul does the work of a whole layer: ``w_gate_up_E2FD`` is ``[E, 2F, D]`` (the F gate rows
first, then the F up rows) and ``w_down_EDF`` is ``[E, D, F]``. Expert ``e`` computes
``silu(x @ gate_e.T) * (x @ up_e.T) @ down_e.T``; the routing weight multiplies the activation (in
fp32) before the down projection, which is linear, so it equals weighting the expert's output.

Dispatch backends (selected by ``ModelConfig.moe_backend``), all numerically equivalent:

* ``grouped_mm`` -- sort the ``S`` (token, expert) slots by expert once, gather the rows, two
  ``torch.nn.functional.grouped_mm`` calls over contiguous groups, and sum the ``K`` weighted
  contributions per token in fp32. No host synchronisation, no padding, deterministic combine
  (``index_add_`` on CPU; a permutation and a fixed-order sum on GPUs, where ``index_add_`` is atomic).
  On CPU (eager, no autocast) it runs block by block of experts as one autograd function
  (``_BlockedExperts``) whose backward writes the expert weight gradients in place.
  Without autograd and with at most ``E`` slots (decoding) it reads only the selected experts'
  weights: on GPUs gathered into two batched matmuls (``experts_gathered``: no sort, no host
  synchronisation); on CPU in place, as strided views of several experts per ``bmm``
  (``experts_strided_runs``), or one matrix-vector pair per slot (``experts_per_slot``) for few slots
  or large experts (``_use_strided_runs``). Without autograd, with more slots than experts but few experts
  (``E <= 4 k``, or ``8 k`` through packed CPU products) and a small product (a decoding batch), every
  expert runs on every token (``experts_all_dense``): about the same weights read (most experts are
  touched), in two products instead of two per expert.
  ``MoE(..., static_shapes=True)`` (the compiled decode step) uses :func:`experts_static`; compiling on
  CPU with more slots than experts but only a few per expert, it writes each slot's expert product as
  sums that ``torch.compile`` fuses into two loops reading the experts' weights in place
  (``experts_fused_reduce``).
  In a dtype ``grouped_mm`` does not take (float64, e.g. for numerical checks) it runs as ``loop``.
* ``loop`` -- the same sort, then a Python loop of plain matmuls over per-expert slices (works on any
  torch and dtype; synchronises once to read the group sizes).
* ``naive`` -- the reference for tests: every expert on every token, weighted by a dense ``[T, E]``
  matrix that is zero for unselected experts. Slow and obviously correct.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..config import ModelConfig
from .grouped_mm import grouped_linear
from .linear import packed_linear, use_packed
from .losses import load_balancing_loss, router_z_loss
from .materialize import materialize
from .precision import acc_dtype, to_acc
from .swiglu import weighted_swiglu, weighted_swiglu_backward, weighted_swiglu_forward
from .weight_grad import is_one_product, linear, weight_grad

BACKENDS = ("grouped_mm", "loop", "naive")
_HAS_GROUPED_MM = hasattr(F, "grouped_mm")
#: Dtypes ``torch.nn.functional.grouped_mm`` accepts; others (float64) dispatch like the ``loop`` backend.
GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _grouped_mm_supports(x: torch.Tensor) -> bool:
    return _HAS_GROUPED_MM and _compute_dtype(x) in GROUPED_MM_DTYPES


@dataclass
class Routing:
    """The routing decision of one MoE layer for ``T`` tokens."""

    logits_TE: torch.Tensor  # fp32 router logits
    probs_TE: torch.Tensor  # fp32 softmax over all experts
    expert_TK: torch.Tensor  # int64 chosen experts, descending probability
    weight_TK: torch.Tensor  # fp32 combine weights (renormalised if norm_topk_prob)
    _tokens_per_expert_E: torch.Tensor | None = None

    @property
    def tokens_per_expert_E(self) -> torch.Tensor:
        """int64 routing slots per expert (sums to ``T * K``); counted on first use (decoding one
        token at a time through a handful of experts never needs it)."""
        if self._tokens_per_expert_E is None:
            self._tokens_per_expert_E = torch.bincount(self.expert_TK.reshape(-1), minlength=self.probs_TE.shape[1])
        return self._tokens_per_expert_E


def route(x_TD: torch.Tensor, w_router_ED: torch.Tensor, top_k: int, norm_topk_prob: bool) -> Routing:
    """fp32 (at least: float64 stays float64) logits -> softmax -> top-k -> optional renormalisation,
    also under autocast (which would run the router's product in bf16). Pure function of its inputs."""
    router_dtype = acc_dtype(x_TD.dtype)
    device = x_TD.device.type  # entering autocast(enabled=False) costs ~8 us: only when autocast is on
    with torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else contextlib.nullcontext():
        logits_TE = linear(_cast(x_TD, router_dtype), _cast(w_router_ED, router_dtype))
    probs_TE = torch.softmax(logits_TE, dim=-1)
    weight_TK, expert_TK = torch.topk(probs_TE, top_k, dim=-1)
    if norm_topk_prob:
        weight_TK = weight_TK / weight_TK.sum(dim=-1, keepdim=True)
    return Routing(logits_TE, probs_TE, expert_TK, weight_TK)


def _swiglu(h_S2F: torch.Tensor) -> torch.Tensor:
    gate_SF, up_SF = h_S2F.chunk(2, dim=-1)
    return F.silu(gate_SF) * up_SF


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the call when it is already ``dtype``: on the decode paths, whose
    products take ~30 us, the no-op ``.to`` calls (a few us each) added 10-20 % per token."""
    return t if t.dtype == dtype else t.to(dtype)


@dataclass
class DispatchPlan:
    """The ``S = T*K`` routing slots in expert-sorted order.

    ``token_S`` is the token of each sorted slot, ``weight_S`` its fp32 combine weight, ``expert_S`` its
    expert (non-decreasing); ``inverse_S`` (the permutation back to (token, k) order) is computed when
    asked for: the training dispatch does not need it. Built once per layer and used by the gather,
    the grouped matmuls (via ``tokens_per_expert_E``) and the combine.
    """

    token_S: torch.Tensor
    weight_S: torch.Tensor
    expert_S: torch.Tensor
    order_S: torch.Tensor
    n_tokens: int
    top_k: int

    @classmethod
    def from_routing(cls, routing: "Routing") -> "DispatchPlan":
        n_tokens, top_k = routing.expert_TK.shape
        # one stable sort gives the sorted experts with the order (argsort would compute and drop them);
        # compiled, they come out of the sort as a buffer, not as a gather of a gather inside every loop
        expert_S, order_S = torch.sort(routing.expert_TK.reshape(-1), stable=True)
        return cls(
            token_S=torch.div(order_S, top_k, rounding_mode="floor"),
            weight_S=routing.weight_TK.reshape(-1)[order_S],
            expert_S=expert_S,
            order_S=order_S,
            n_tokens=n_tokens,
            top_k=top_k,
        )

    @property
    def inverse_S(self) -> torch.Tensor:
        inverse_S = torch.empty_like(self.order_S)
        inverse_S[self.order_S] = torch.arange(self.order_S.numel(), device=self.order_S.device)
        return inverse_S


def _use_index_add(x: torch.Tensor) -> bool:
    """Gather/scatter strategy. On CPU ``index_select`` + ``index_add_`` are deterministic and touch
    each slot once; on CUDA ``index_add_`` uses atomics, so a permutation + fixed-order sum is used."""
    return x.device.type == "cpu" and COMBINE_STRATEGY != "permute"


COMBINE_STRATEGY = "auto"  # "auto" | "permute" (tests force "permute" to exercise the GPU path on CPU)


def _gather(x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Rows of ``x`` in expert-sorted slot order, ``[S, D]``."""
    if _use_index_add(x_TD):
        return x_TD.index_select(0, plan.token_S)
    n_tokens, d_model = x_TD.shape
    x_SD = x_TD.unsqueeze(1).expand(n_tokens, plan.top_k, d_model).reshape(n_tokens * plan.top_k, d_model)
    return x_SD[plan.order_S]  # unique indices: deterministic backward


def _combine(y_SD: torch.Tensor, plan: DispatchPlan, out_dtype: torch.dtype) -> torch.Tensor:
    """Sum the ``K`` (already weighted) expert outputs of every token, accumulating in fp32."""
    d_model = y_SD.shape[-1]
    if _use_index_add(y_SD):
        out_TD = y_SD.new_zeros(plan.n_tokens, d_model, dtype=acc_dtype(y_SD.dtype))
        return out_TD.index_add_(0, plan.token_S, to_acc(y_SD)).to(out_dtype)
    y_TKD = y_SD[plan.inverse_S].view(plan.n_tokens, plan.top_k, d_model)
    return to_acc(y_TKD).sum(dim=1).to(out_dtype)


def _weighted_swiglu(h_S2F: torch.Tensor, weight_S: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation scaled by the slot's routing weight (in fp32). The down projection is
    linear, so weighting its input equals weighting its output, on ``F`` instead of ``D`` columns."""
    return weighted_swiglu(h_S2F, weight_S)


def _is_decode(x_TD: torch.Tensor, routing: Routing) -> bool:
    """Inference on fewer routing slots than experts (decoding): gather the selected experts."""
    return not torch.is_grad_enabled() and routing.expert_TK.numel() <= routing.probs_TE.shape[1]


def experts_gathered(x_TD, w_gate_up_E2FD, w_down_EDF, routing: Routing) -> torch.Tensor:
    """Decode path: gather the weights of each slot's expert and run two batched matmuls.

    It reads exactly the selected experts' weights (like computing them one by one) in two kernels
    and needs no sort or host synchronisation. Used without autograd when there are at most ``E``
    slots, off the CPU and in the compiled decode step."""
    dtype = _compute_dtype(x_TD)
    n_tokens, top_k = routing.expert_TK.shape
    expert_S = routing.expert_TK.reshape(-1)
    x_S1D = x_TD.to(dtype).repeat_interleave(top_k, dim=0).unsqueeze(1)
    h_S12F = torch.bmm(x_S1D, w_gate_up_E2FD[expert_S].to(dtype).transpose(1, 2))  # cast only what is read
    a_S1F = _weighted_swiglu(h_S12F.squeeze(1), routing.weight_TK.reshape(-1)).unsqueeze(1)
    y_SD = torch.bmm(a_S1F, w_down_EDF[expert_S].to(dtype).transpose(1, 2)).squeeze(1)
    return to_acc(y_SD.view(n_tokens, top_k, -1)).sum(dim=1).to(x_TD.dtype)


def cpu_cache_bytes(level: int, sysfs: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int | None:
    """The size in bytes of CPU 0's data (or unified) cache of ``level`` (2: per core; 3: usually
    shared by the cores), read from Linux sysfs (``index*/{level,type,size}``); None where it cannot
    be read (other systems, no such level)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    for index in sorted(sysfs.glob("index*")):
        try:
            found, kind, size = ((index / f).read_text().strip() for f in ("level", "type", "size"))
        except OSError:
            continue
        if found == str(level) and kind in ("Unified", "Data") and size:
            if size[-1] in units and size[:-1].isdigit():
                return int(size[:-1]) * units[size[-1]]
            if size.isdigit():
                return int(size)
    return None


_L2_BYTES, _L3_BYTES = cpu_cache_bytes(2), cpu_cache_bytes(3)

#: CPU: bytes of activations (``[rows, 2F]``) per block of experts; None (the default) means
#: :func:`cpu_block_bytes`'s rule. Tests and users may set an int here (read at call time).
CPU_BLOCK_BYTES: int | None = None
CPU_BLOCK_MIN_BYTES, CPU_BLOCK_MAX_BYTES = 1 << 18, 1 << 24


def cpu_block_bytes() -> int:
    """The CPU block size: the larger of one core's L2 cache per intra-op thread (256 KiB per thread
    where unknown) and half the last-level (L3) cache, clamped to 256 KiB - 16 MiB. Larger blocks
    mean fewer and larger kernels (the row gathers and scatter-adds of a few hundred rows run far
    below their bandwidth) and fewer Python steps; smaller ones keep the elementwise work in cache.

    Measured with ``benchmarks/moe_layer.py``'s shapes (fwd+bwd, 4 096 tokens, 2 threads, paired runs
    in one process):

    * 2-core Sapphire Rapids (2 MiB L2 per core): 2 MiB instead of 256 KiB cut the layer's time by
      20-26 % for E 256, 7-11 % for E 64, 2-10 % for E 8 and 0-3 % for E 32; 4 MiB instead of 2 MiB by a
      further 1-6 % for E 32, E 64 and E 256 (E 8 unchanged). Larger blocks, which this rule gives there
      when the L3 is 32 MiB or more, were not measured there.
    * 2-core AMD EPYC (512 KiB L2 per core, 32 MiB L3): 16 MiB (half the L3) instead of 1 MiB (the
      L2 rule) cut the time by a median of 10 % for E 64, 8 % for E 32, 4-10 % for E 256 (k 1-16)
      under uniform routing and 4-10 % under skewed routing (E 8: no change); 32 MiB was no better.
      Whole training steps (``benchmarks/train_step.py`` models) were unchanged within noise."""
    if CPU_BLOCK_BYTES is not None:
        return CPU_BLOCK_BYTES
    per_thread_l2 = (_L2_BYTES or 1 << 18) * torch.get_num_threads()
    half_llc = (_L3_BYTES or 0) // 2
    return min(max(per_thread_l2, half_llc, CPU_BLOCK_MIN_BYTES), CPU_BLOCK_MAX_BYTES)


def expert_blocks(tokens_per_expert: list[int], row_bytes: int, block_bytes: int | None = None) -> list[tuple[int, int]]:
    """Split consecutive experts into blocks of ``(n_experts, n_rows)`` of about ``block_bytes`` (default
    :func:`cpu_block_bytes`, at call time) of activations each (at least one expert per block)."""
    if block_bytes is None:
        block_bytes = cpu_block_bytes()
    blocks: list[tuple[int, int]] = []
    n_experts = n_rows = 0
    for count in tokens_per_expert:
        if n_experts and (n_rows + count) * row_bytes > block_bytes:
            blocks.append((n_experts, n_rows))
            n_experts = n_rows = 0
        n_experts += 1
        n_rows += count
    blocks.append((n_experts, n_rows))
    return blocks


def _block_spans(blocks: list[tuple[int, int]]) -> list[tuple[int, int, int, int]]:
    """``(first_expert, end_expert, first_row, end_row)`` of every block of ``(n_experts, n_rows)``."""
    spans, e0, r0 = [], 0, 0
    for n_experts, n_rows in blocks:
        spans.append((e0, e0 + n_experts, r0, r0 + n_rows))
        e0, r0 = e0 + n_experts, r0 + n_rows
    return spans


def _grouped_mm_nt(a_SK: torch.Tensor, w_ENK: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """``[S, K] x [E, N, K] -> [S, N]``: rows of group ``e`` times ``w[e].T`` (no autograd)."""
    return F.grouped_mm(a_SK, w_ENK.transpose(1, 2), offs=offsets_E)


def _expert_weight_grads(dy_SN, x_SK, counts: list[int], offsets_E: torch.Tensor, grad_ENK: torch.Tensor | None) -> torch.Tensor:
    """``grad[e] = dy_e.T @ x_e`` (``[E, N, K]``) for the consecutive experts whose row groups of sizes
    ``counts`` (ending at ``offsets_E``) tile ``dy_SN`` and ``x_SK``; zero for an expert without rows.
    Each sum over an expert's rows is :func:`weight_grad`'s thread-count-independent order.

    When no expert has more than :data:`~moelab.model.weight_grad.TOKEN_CHUNK` rows, one grouped matmul
    computes them all: each expert's sum is then one product, the very call :func:`weight_grad` makes
    (bitwise equal, tested), without a Python step per expert (E 256, k 8: 18.3 instead of 21.0 ms for
    one of the two). Otherwise a loop of :func:`weight_grad` calls. The result is written into
    ``grad_ENK`` when given (``grouped_mm`` has no ``out=``: a copy) and returned."""
    if is_one_product(max(counts, default=0)):
        grouped_ENK = F.grouped_mm(dy_SN.t(), x_SK, offs=offsets_E)
        return grouped_ENK if grad_ENK is None else grad_ENK.copy_(grouped_ENK)
    if grad_ENK is None:
        grad_ENK = dy_SN.new_empty(len(counts), dy_SN.shape[1], x_SK.shape[1])
    # one split / unbind call each instead of slicing per expert: fewer Python-level ops per expert
    for n, dy_nN, x_nK, grad_NK in zip(counts, dy_SN.split(counts), x_SK.split(counts), grad_ENK.unbind(0)):
        if n:
            weight_grad(dy_nN, x_nK, out=grad_NK)
        else:
            grad_NK.zero_()
    return grad_ENK


class _BlockedExperts(torch.autograd.Function):
    """The whole CPU expert computation with ``index_select``/``index_add_`` dispatch, block by block.

    ``out_TD[t] = sum over slots s of token t: (silu(x_t @ gate_e^T) * (x_t @ up_e^T) * weight_s) @ down_e^T``
    in fp32, ``e`` the slot's expert. Slots are expert-sorted (``token_S``, ``weight_S``) and expert
    ``e`` owns the ``counts[e]`` consecutive slots after those of experts ``< e``. Each block of
    consecutive experts (``blocks`` from :func:`expert_blocks`) gathers its rows, runs grouped matmul
    -> weighted SwiGLU -> grouped matmul on cache-resident data and adds into the output.

    Backward loops over the same blocks and writes the expert weight gradients straight into one
    ``[E, 2F, D]`` and one ``[E, D, F]`` tensor: one autograd node instead of several per block, and
    no ``cat`` of per-block weight gradients (a single block returns its own, with no copy: see
    :func:`_expert_weight_grads`). Only the pre-activation ``h`` of every block is saved;
    the gathered rows, the activation and the output-gradient rows are re-gathered or recomputed.
    """

    @staticmethod
    def forward(ctx, x_TD, w_gate_up_E2FD, w_down_EDF, weight_S, token_S, counts: list[int], blocks: list[tuple[int, int]]):
        out_TD = x_TD.new_zeros(x_TD.shape, dtype=torch.float32)
        spans = _block_spans(blocks)
        h_blocks = []
        for e0, e1, r0, r1 in spans:
            if r0 == r1:  # no rows: nothing to compute, an empty placeholder keeps blocks aligned
                h_blocks.append(x_TD.new_empty(0, w_gate_up_E2FD.shape[1]))
                continue
            token_B = token_S[r0:r1]
            offsets_E = _host_offsets(counts[e0:e1], x_TD.device)
            h_B2F = _grouped_mm_nt(x_TD.index_select(0, token_B), w_gate_up_E2FD[e0:e1], offsets_E)
            a_BF = weighted_swiglu_forward(h_B2F, weight_S[r0:r1])
            y_BD = _grouped_mm_nt(a_BF, w_down_EDF[e0:e1], offsets_E)
            out_TD.index_add_(0, token_B, y_BD.float())
            h_blocks.append(h_B2F)
        ctx.save_for_backward(x_TD, w_gate_up_E2FD, w_down_EDF, weight_S, token_S, *h_blocks)
        ctx.counts, ctx.spans = counts, spans
        return out_TD

    @staticmethod
    @once_differentiable
    def backward(ctx, dout_TD):
        x_TD, w_gate_up_E2FD, w_down_EDF, weight_S, token_S, *h_blocks = ctx.saved_tensors
        need_dx, need_dgu, need_ddown, need_dweight = ctx.needs_input_grad[:4]
        dout_TD = dout_TD.to(x_TD.dtype).contiguous()
        one_block = len(ctx.spans) == 1 and ctx.spans[0][2] < ctx.spans[0][3]  # with rows

        def weight_grad_buffer(need: bool, w: torch.Tensor) -> torch.Tensor | None:
            # one block computes its weight gradients whole (none given); several write into one tensor
            return torch.empty_like(w) if need and not one_block else None

        grads = _ExpertGrads(
            dx_TD=torch.zeros_like(x_TD) if need_dx else None,  # accumulated with index_add_
            dgu_E2FD=weight_grad_buffer(need_dgu, w_gate_up_E2FD),  # every expert written
            ddown_EDF=weight_grad_buffer(need_ddown, w_down_EDF),
            dweight_S=torch.empty_like(weight_S) if need_dweight else None,  # every row written
            need_dgu=need_dgu,
            need_ddown=need_ddown,
        )
        for (e0, e1, r0, r1), h_B2F in zip(ctx.spans, h_blocks):
            if r0 == r1:  # experts without rows: zero weight gradient
                for grad in (grads.dgu_E2FD, grads.ddown_EDF):
                    if grad is not None:
                        grad[e0:e1].zero_()
                continue
            _block_backward(
                dout_TD, x_TD, w_gate_up_E2FD[e0:e1], w_down_EDF[e0:e1], weight_S[r0:r1], token_S[r0:r1],
                ctx.counts[e0:e1], h_B2F, grads if one_block else grads.block(e0, e1, r0, r1),
            )
        return grads.dx_TD, grads.dgu_E2FD, grads.ddown_EDF, grads.dweight_S, None, None, None


@dataclass
class _ExpertGrads:
    """Gradients of :class:`_BlockedExperts` (None where not needed); :meth:`block` gives the views
    of one block (its experts' weight gradients and its rows' combine-weight gradients). A needed
    weight gradient that is None is computed by the (only) block and stored here."""

    dx_TD: torch.Tensor | None
    dgu_E2FD: torch.Tensor | None
    ddown_EDF: torch.Tensor | None
    dweight_S: torch.Tensor | None
    need_dgu: bool
    need_ddown: bool

    def block(self, e0: int, e1: int, r0: int, r1: int) -> "_ExpertGrads":
        return _ExpertGrads(
            self.dx_TD,
            None if self.dgu_E2FD is None else self.dgu_E2FD[e0:e1],
            None if self.ddown_EDF is None else self.ddown_EDF[e0:e1],
            None if self.dweight_S is None else self.dweight_S[r0:r1],
            self.need_dgu,
            self.need_ddown,
        )


def _block_backward(dout_TD, x_TD, w_gate_up_B2FD, w_down_BDF, weight_S, token_S, counts, h_S2F, grads: _ExpertGrads) -> None:
    """Backward of one block of experts (``B`` of them, ``S`` rows here), writing into ``grads``:
    ``dx`` accumulated over the block's tokens, the block's weight gradients and combine-weight
    gradients overwritten. ``h_S2F`` is the saved pre-activation; everything else is recomputed."""
    offsets_B = _host_offsets(counts, x_TD.device)
    dy_SD = dout_TD.index_select(0, token_S)
    gate, up = h_S2F.chunk(2, dim=-1)
    silu_gate = F.silu(gate)
    act_SF = silu_gate * up  # unweighted activation
    if grads.need_ddown:
        grads.ddown_EDF = _expert_weight_grads(dy_SD, _apply_weight(act_SF, weight_S), counts, offsets_B, grads.ddown_EDF)
    da_SF = F.grouped_mm(dy_SD, w_down_BDF, offs=offsets_B)
    need_dweight = grads.dweight_S is not None
    dh_S2F, dweight_S = weighted_swiglu_backward(h_S2F, weight_S, da_SF, need_dweight, silu_gate, act_SF)
    if need_dweight:
        grads.dweight_S.copy_(dweight_S)
    if grads.need_dgu:
        grads.dgu_E2FD = _expert_weight_grads(dh_S2F, x_TD.index_select(0, token_S), counts, offsets_B, grads.dgu_E2FD)
    if grads.dx_TD is not None:
        grads.dx_TD.index_add_(0, token_S, F.grouped_mm(dh_S2F, w_gate_up_B2FD, offs=offsets_B))


def _apply_weight(act_SF: torch.Tensor, w_S: torch.Tensor) -> torch.Tensor:
    """``act * w[:, None]`` with the weight applied in fp32, as in :func:`weighted_swiglu_forward`."""
    return (act_SF.float() * w_S.unsqueeze(-1)).to(act_SF.dtype)


def _host_offsets(counts: list[int], device: torch.device) -> torch.Tensor:
    """int32 end offsets of consecutive row groups of sizes ``counts``."""
    return torch.tensor(list(itertools.accumulate(counts)), dtype=torch.int32, device=device)


def _use_blocked_function(x_TD: torch.Tensor, w_gate_up_E2FD: torch.Tensor) -> bool:
    """The CPU ``index_add_`` path in eager mode without dtype conversion (no autocast) runs as one
    :class:`_BlockedExperts`; otherwise blocks of the ``grouped_linear`` custom op."""
    return not torch.compiler.is_compiling() and _compute_dtype(x_TD) == x_TD.dtype == w_gate_up_E2FD.dtype


def _experts_block(x_SD, weight_S, w_gate_up_E2FD, w_down_EDF, ends_E, dtype) -> torch.Tensor:
    """grouped matmul -> weighted SwiGLU -> grouped matmul for one block of experts whose row groups
    end at ``ends_E`` (int32)."""
    h_S2F = grouped_linear(x_SD, w_gate_up_E2FD.to(dtype), ends_E)
    return grouped_linear(_weighted_swiglu(h_S2F, weight_S), w_down_EDF.to(dtype), ends_E)


def experts_per_slot(x_TD, w_gate_up_E2FD, w_down_EDF, routing: Routing) -> torch.Tensor:
    """Decode path for a handful of slots on CPU: each slot's expert on its token, reading the
    expert's weights in place (no gather copy, no sort) -- the work of computing the selected
    experts one by one, in the fewest kernels (called without autograd): per slot a matrix-vector
    product (``torch.mv``), the SwiGLU, and the down projection added into the token's fp32 output.

    The routing weight is a Python float (its exact fp32 value). In fp32 it is the ``alpha`` of the
    ``addmv_`` that adds the down projection (five calls per slot instead of eight with ``F.linear``:
    one token through two 1.5 MiB experts, E 8, d 256, F 512, went from 1.06-1.07x to 0.98-1.03x the
    one-by-one floor in ``benchmarks/moe_layer.py``); in half precision it scales the activation (a
    half-precision tensor times a Python scalar is computed in fp32) before a product whose result is
    cast to fp32. Under autocast only the experts read are cast."""
    dtype, out_dtype = _compute_dtype(x_TD), x_TD.dtype
    x_TD_c = _cast(x_TD, dtype)
    n_f = w_down_EDF.shape[2]
    rows = []
    for t, (experts, weights) in enumerate(zip(routing.expert_TK.tolist(), routing.weight_TK.tolist())):
        x_D, out_D = x_TD_c[t], None
        for e, w in zip(experts, weights):
            h_2F = torch.mv(_cast(w_gate_up_E2FD[e], dtype), x_D)
            a_F = F.silu(h_2F[:n_f]).mul_(h_2F[n_f:])
            w_down_DF = _cast(w_down_EDF[e], dtype)
            if dtype != acc_dtype(dtype):  # half precision
                y_D = _cast(torch.mv(w_down_DF, a_F.mul_(w)), torch.float32)
                out_D = y_D if out_D is None else out_D.add_(y_D)
            elif out_D is None:
                out_D = torch.mv(w_down_DF, a_F).mul_(w)
            else:
                out_D.addmv_(w_down_DF, a_F, alpha=w)
        rows.append(out_D)
    if not rows:
        return x_TD.new_zeros(x_TD.shape)
    return _cast(torch.stack(rows) if len(rows) > 1 else rows[0].unsqueeze(0), out_dtype)


def _expert_runs(expert_S: list[int], max_len: int) -> list[tuple[int, int, int]]:
    """Split expert indices sorted ascending into runs ``(first_slot, n_slots, stride)`` of at most
    ``max_len`` slots whose experts step by one constant ``stride >= 0`` (two slots always do), so a
    run's expert weights are one zero-copy strided view of the stacked weights."""
    runs, i, n = [], 0, len(expert_S)
    while i < n:
        j = i + 1
        stride = expert_S[j] - expert_S[i] if j < n else 0
        while j < n and j - i < max_len and expert_S[j] - expert_S[j - 1] == stride:
            j += 1
        runs.append((i, j - i, stride))
        i = j
    return runs


def _expert_view(w_EAB: torch.Tensor, first: int, n: int, stride: int) -> torch.Tensor:
    """Experts ``first, first + stride, ...`` (``n`` of them) of ``w_EAB`` as an ``[n, A, B]`` view, no copy."""
    _, a, b = w_EAB.shape
    s0, s1, s2 = w_EAB.stride()
    return w_EAB.as_strided((n, a, b), (stride * s0, s1, s2), w_EAB.storage_offset() + first * s0)


#: CPU decode: fewer slots than this run one matrix-vector pair each (:func:`experts_per_slot`), more as
#: strided runs (:func:`experts_strided_runs`), whose sort and gather cost more than they save below it.
#: A single token needs no sort or gather, so two of its slots already gain from one ``bmm``.
STRIDED_RUNS_MIN_SLOTS = 4
STRIDED_RUNS_MIN_SLOTS_ONE_TOKEN = 2
#: Experts whose gate/up matrix is larger than this (bytes) run per slot at any slot count: one such
#: matrix-vector product already keeps both cores busy, and inside a whole model's decode step the
#: ``bmm`` runs measured slower (E 8, d 256, F 512 (1 MiB), batch 4: 5.3 vs 4.7 ms per step), while
#: small experts gain from them (E 64 / 256, F 128 / 64, batch 4: 9.4 / 6.0 vs 11.6 / 7.3 ms).
STRIDED_RUNS_MAX_EXPERT_BYTES = 512 * 1024


def _use_strided_runs(n_tokens: int, n_slots: int, expert_bytes: int) -> bool:
    """CPU decode: strided runs (:func:`experts_strided_runs`) rather than one pair per slot?"""
    min_slots = STRIDED_RUNS_MIN_SLOTS_ONE_TOKEN if n_tokens == 1 else STRIDED_RUNS_MIN_SLOTS
    return n_slots >= min_slots and expert_bytes <= STRIDED_RUNS_MAX_EXPERT_BYTES


def _run_linear(x_N1K: torch.Tensor, w_NMK: torch.Tensor, out_N1M: torch.Tensor) -> None:
    """``out[i] = x[i] @ w[i].T`` for one run: a matrix-vector product for a single expert, else ``bmm``."""
    if x_N1K.shape[0] == 1:
        torch.mm(x_N1K[0], w_NMK[0].t(), out=out_N1M[0])
    else:
        torch.bmm(x_N1K, w_NMK.transpose(1, 2), out=out_N1M)


def experts_strided_runs(x_TD, w_gate_up_E2FD, w_down_EDF, routing: Routing) -> torch.Tensor:
    """CPU decode path for a few slots: the selected experts' weights read in place, several experts
    per batched matmul.

    Slots are sorted by expert and cut into runs whose experts are evenly spaced (any two are), so each
    run's weights are a strided view of ``w_gate_up`` / ``w_down`` (stride 0 when two tokens chose the
    same expert) and one ``bmm`` computes the whole run. It reads exactly the weights of computing the
    selected experts one by one, with no copy, and ``bmm`` spreads a run's small experts over the
    threads, where a small expert's one-row product alone keeps few of them busy (large experts run per
    slot, see :data:`STRIDED_RUNS_MAX_EXPERT_BYTES`). One token needs no sort: its ``K`` distinct
    experts are ordered on the host and its output is their fp32 sum. Called without autograd."""
    dtype = _compute_dtype(x_TD)
    if x_TD.shape[0] == 1:  # one token: no DispatchPlan, gather or scatter
        experts = routing.expert_TK[0].tolist()
        order = sorted(range(len(experts)), key=experts.__getitem__)
        expert_S, plan = [experts[i] for i in order], None
        weight_S = routing.weight_TK[0, order]
        x_S1D = _cast(x_TD, dtype).expand(len(experts), -1).unsqueeze(1)  # a view of the one row
    else:
        plan = DispatchPlan.from_routing(routing)  # the shared sort: slots in expert order
        expert_S = plan.expert_S.tolist()
        weight_S = plan.weight_S
        x_S1D = _cast(_gather(x_TD, plan), dtype).unsqueeze(1)
    h_S12F = x_S1D.new_empty(len(expert_S), 1, w_gate_up_E2FD.shape[1])
    runs = _expert_runs(expert_S, max(2, torch.get_num_threads()))
    for first, n, stride in runs:  # casts only the run's experts under autocast
        _run_linear(x_S1D[first : first + n], _cast(_expert_view(w_gate_up_E2FD, expert_S[first], n, stride), dtype), h_S12F[first : first + n])
    a_S1F = weighted_swiglu(h_S12F.squeeze(1), weight_S).unsqueeze(1)
    y_S1D = x_S1D.new_empty(len(expert_S), 1, w_down_EDF.shape[1])
    for first, n, stride in runs:
        _run_linear(a_S1F[first : first + n], _cast(_expert_view(w_down_EDF, expert_S[first], n, stride), dtype), y_S1D[first : first + n])
    if plan is None:  # the token's K weighted expert outputs, summed in fp32
        return _cast(to_acc(y_S1D.squeeze(1)).sum(0, keepdim=True), x_TD.dtype)
    return _combine(y_S1D.squeeze(1), plan, x_TD.dtype)


def experts_grouped_mm(x_TD, w_gate_up_E2FD, w_down_EDF, routing: Routing) -> torch.Tensor:
    """Dispatch with grouped matmuls over expert-contiguous groups.

    On GPUs: one gather, two grouped matmuls over all experts, one combine; no host synchronisation.
    On CPU: the same per block of consecutive experts whose activations fit in cache (see
    :func:`cpu_block_bytes`), so the memory-bound elementwise work runs on cache-resident data; the
    group sizes are read on the host, which costs nothing there. Without dtype conversion and outside
    ``torch.compile`` the blocks run inside one :class:`_BlockedExperts`; otherwise (autocast, compile)
    each block uses the ``grouped_linear`` custom op.
    """
    if _is_decode(x_TD, routing):
        if x_TD.device.type != "cpu":  # no host synchronisation
            return experts_gathered(x_TD, w_gate_up_E2FD, w_down_EDF, routing)
        expert_bytes = w_gate_up_E2FD.shape[1] * w_gate_up_E2FD.shape[2] * _compute_dtype(x_TD).itemsize
        if _use_strided_runs(x_TD.shape[0], routing.expert_TK.numel(), expert_bytes):
            return experts_strided_runs(x_TD, w_gate_up_E2FD, w_down_EDF, routing)
        return experts_per_slot(x_TD, w_gate_up_E2FD, w_down_EDF, routing)
    if not torch.is_grad_enabled() and _use_all_dense(x_TD, w_gate_up_E2FD, w_down_EDF, routing):
        return experts_all_dense(x_TD, w_gate_up_E2FD, w_down_EDF, routing)
    if not _grouped_mm_supports(x_TD):  # e.g. float64 (numerical checks): plain matmuls
        return experts_loop(x_TD, w_gate_up_E2FD, w_down_EDF, routing)
    dtype = _compute_dtype(x_TD)
    plan = DispatchPlan.from_routing(routing)
    if not _use_index_add(x_TD):
        x_SD = _gather(x_TD, plan).to(dtype)
        ends_E = torch.cumsum(routing.tokens_per_expert_E, dim=0).to(torch.int32)
        y_SD = _experts_block(x_SD, plan.weight_S, w_gate_up_E2FD, w_down_EDF, ends_E, dtype)
        return _combine(y_SD, plan, x_TD.dtype)
    row_bytes = w_gate_up_E2FD.shape[1] * torch.empty((), dtype=dtype).element_size()
    counts = routing.tokens_per_expert_E.tolist()
    blocks = expert_blocks(counts, row_bytes)
    if _use_blocked_function(x_TD, w_gate_up_E2FD):
        out_TD = _BlockedExperts.apply(x_TD, w_gate_up_E2FD, w_down_EDF, plan.weight_S, plan.token_S, counts, blocks)
        return out_TD.to(x_TD.dtype)
    n_experts, n_rows = [b[0] for b in blocks], [b[1] for b in blocks]
    x_SD = _gather(x_TD, plan).to(dtype)  # one gather: its backward is one index_add_
    out_TD = x_TD.new_zeros(x_TD.shape, dtype=torch.float32)
    for x_block, token_S, weight_S, w_gu, w_d, counts_E, rows in zip(
        x_SD.split(n_rows), plan.token_S.split(n_rows), plan.weight_S.split(n_rows),
        w_gate_up_E2FD.split(n_experts), w_down_EDF.split(n_experts), routing.tokens_per_expert_E.split(n_experts), n_rows,
    ):
        if rows:
            y_SD = _experts_block(x_block, weight_S, w_gu, w_d, torch.cumsum(counts_E, dim=0).to(torch.int32), dtype)
            out_TD.index_add_(0, token_S, y_SD.float())
    return out_TD.to(x_TD.dtype)


# Inference: every expert on every token when there are more routing slots than experts, E <= this many
# times k, and the all-experts product has at most this many multiply-adds -- through batched matmuls,
# or through two packed CPU products (efficient at a decoding batch's few rows, so it affords more).
# Tuned on the benchmark models at batch 16 (tiny / small / small-e64 / vocab32k).
DENSE_DECODE_MAX_EXPERTS_PER_K, DENSE_DECODE_MAX_MACS = 4, 1 << 24
DENSE_DECODE_MAX_EXPERTS_PER_K_PACKED, DENSE_DECODE_MAX_MACS_PACKED = 8, 1 << 27


def _use_all_dense(x_TD: torch.Tensor, w_gate_up_E2FD: torch.Tensor, w_down_EDF: torch.Tensor, routing: Routing) -> bool:
    """A decoding batch with more slots than experts, few experts, and a small all-experts product."""
    n_tokens, top_k = routing.expert_TK.shape
    n_experts = w_gate_up_E2FD.shape[0]
    dense_macs = n_tokens * w_gate_up_E2FD.numel() * 3 // 2
    if use_packed(x_TD, w_down_EDF):
        per_k, budget = DENSE_DECODE_MAX_EXPERTS_PER_K_PACKED, DENSE_DECODE_MAX_MACS_PACKED
    else:
        per_k, budget = DENSE_DECODE_MAX_EXPERTS_PER_K, DENSE_DECODE_MAX_MACS
    return n_tokens * top_k > n_experts and n_experts <= per_k * top_k and dense_macs <= budget


def experts_all_dense(x_TD, w_gate_up_E2FD, w_down_EDF, routing: Routing) -> torch.Tensor:
    """Every expert on every token in two batched matmuls, weighted by a dense ``[T, E]`` matrix that is
    zero for unselected experts (inference). For a decoding batch that touches most of few experts this
    reads the same weights as the grouped path, in a few kernels instead of two per expert."""
    dtype = _compute_dtype(x_TD)
    n_tokens, n_experts = routing.probs_TE.shape
    weight_TE = torch.zeros(n_tokens, n_experts, dtype=routing.weight_TK.dtype, device=x_TD.device)
    weight_TE = weight_TE.scatter(1, routing.expert_TK, routing.weight_TK)
    if use_packed(x_TD, w_down_EDF):  # CPU fp32, both big enough: two packed products, the second sums over experts
        h_TE2F = packed_linear(x_TD, w_gate_up_E2FD, "experts_gate_up").view(n_tokens, n_experts, -1)
        a_TEF = _swiglu(h_TE2F) * weight_TE.unsqueeze(-1)
        return packed_linear(a_TEF.reshape(n_tokens, -1), w_down_EDF, "experts_down")
    weight_ET = weight_TE.t()
    h_ET2F = torch.matmul(x_TD.to(dtype), w_gate_up_E2FD.to(dtype).transpose(1, 2))
    gate_ETF, up_ETF = h_ET2F.chunk(2, dim=-1)
    a_ETF = (to_acc(F.silu(gate_ETF) * up_ETF) * weight_ET.unsqueeze(-1)).to(dtype)
    y_ETD = torch.bmm(a_ETF, w_down_EDF.to(dtype).transpose(1, 2))
    return to_acc(y_ETD).sum(dim=0).to(x_TD.dtype)


#: Compiled CPU decode: with more slots than experts but at most this many slots per expert, the experts
#: run as fused per-slot reductions (:func:`experts_fused_reduce`). On a 2-core AMD EPYC (one MoE layer,
#: compiled) they took 0.5-0.9x the time of the all-experts or grouped products at batch 16 for E 8 k 2
#: (d 64-256) and E 64 k 8 (d 128), 0.59-0.85x at 16 slots per expert, and 1.07x at 32 (d 256, F 512).
FUSED_REDUCE_MAX_SLOTS_PER_EXPERT = 16
#: Slots per loop of :func:`experts_fused_reduce`. Whole compiled decode steps at batch 16 on a 2-core AMD
#: EPYC, against one slot per loop: 0.82x the time (vocab32k: d 256, F 512), 0.81x (E 64 k 8, d 128),
#: 0.97x (d 128, F 256), 1.00x (d 64, F 128); 16 per loop was slower than 8.
FUSED_REDUCE_SLOTS_PER_GROUP = 8


def _slot_products(w_EOI: torch.Tensor, expert_S: torch.Tensor, a_SI: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """``[S, O]``: every slot's row of ``a`` times its expert's ``[O, I]`` weight, as elementwise products
    summed over ``I`` in fp32 and rounded to ``dtype`` (as a matmul's output). ``S`` is a multiple of
    ``group``: the slots are taken ``group`` at a time (slot ``n * group + g`` is the ``g``-th
    product), so compiled, one loop runs ``group`` independent accumulators side by side and slots of
    one expert share each weight load from L1."""
    a_NGI = a_SI.view(a_SI.shape[0] // group, group, -1)
    products = [
        (to_acc(w_EOI[expert_S[g::group]].to(dtype)) * a_NGI[:, g].unsqueeze(1)).sum(dim=-1) for g in range(group)
    ]
    return torch.stack(products, dim=1).flatten(0, 1).to(dtype)


def experts_fused_reduce(x_TD, w_gate_up_E2FD, w_down_EDF, routing: Routing, group: int = 1) -> torch.Tensor:
    """Compiled CPU decode path for a batch: each slot's expert products written as elementwise products
    summed over ``D`` (then ``F``), which ``torch.compile`` turns into two loops that read every slot's
    expert weights in place -- no gathered copy of the weights, no per-expert matmul call, no
    all-experts product.

    Slots are sorted by expert first, so an expert's slots run one after the other and re-read its
    weights from cache: the touched experts' weights come from memory once, as when computing them one
    by one. ``group`` slots run per loop (:func:`_slot_products`; the slots are padded with zero rows
    to a multiple of it). The products accumulate in fp32 and are rounded to the compute dtype, as a
    matmul's outputs are (the rounding points of the other paths, e.g. in bf16); the activation is
    :func:`materialize`-d (computed once, not once per output channel) and the ``K`` outputs of a token
    are summed in fp32 in a fixed order (deterministic). Eager it is correct but builds ``[S, 2F, D]``
    products: :func:`experts_static` uses it only while compiling."""
    dtype = _compute_dtype(x_TD)
    n_tokens, top_k = routing.expert_TK.shape
    plan = DispatchPlan.from_routing(routing)
    expert_S, weight_S = plan.expert_S, plan.weight_S
    x_SD = to_acc(x_TD.to(dtype)).index_select(0, plan.token_S)
    n_pad = -expert_S.numel() % group
    if n_pad:  # zero rows of the last slot's expert
        expert_S = torch.cat([expert_S, expert_S[-1:].expand(n_pad)])
        weight_S = torch.cat([weight_S, weight_S.new_zeros(n_pad)])
        x_SD = torch.cat([x_SD, x_SD.new_zeros(n_pad, x_SD.shape[1])])
    h_S2F = _slot_products(w_gate_up_E2FD, expert_S, materialize(x_SD), group, dtype)
    a_SF = materialize(to_acc(_weighted_swiglu(h_S2F, weight_S)))
    y_SD = _slot_products(w_down_EDF, expert_S, a_SF, group, dtype)
    y_TKD = to_acc(y_SD[plan.inverse_S]).view(n_tokens, top_k, -1)
    return y_TKD.sum(dim=1).to(x_TD.dtype)


def experts_static(x_TD, w_gate_up_E2FD, w_down_EDF, routing: Routing) -> torch.Tensor:
    """Inference dispatch with no host synchronisation and shapes fixed by ``T`` and ``K`` alone (for a
    compiled decode step). With at most ``E`` slots (or without ``grouped_mm`` for the dtype): the gathered-weights
    path, which reads only the selected experts; compiling on CPU with at most
    :data:`FUSED_REDUCE_MAX_SLOTS_PER_EXPERT` slots per expert: fused per-slot reductions
    (:func:`experts_fused_reduce`, :data:`FUSED_REDUCE_SLOTS_PER_GROUP` slots per loop); with few experts
    and a small product: every expert on every token (:func:`experts_all_dense`, see
    :func:`_use_all_dense`); otherwise: one sort, a gather, two grouped matmuls whose group ends come
    from ``searchsorted`` on the device, and the deterministic combine."""
    n_slots, n_experts = routing.expert_TK.numel(), w_gate_up_E2FD.shape[0]
    if n_slots <= n_experts or not _grouped_mm_supports(x_TD):
        return experts_gathered(x_TD, w_gate_up_E2FD, w_down_EDF, routing)
    compiling_on_cpu = x_TD.device.type == "cpu" and torch.compiler.is_compiling()  # the fused loops are the compiler's
    if compiling_on_cpu and n_slots <= FUSED_REDUCE_MAX_SLOTS_PER_EXPERT * n_experts:
        return experts_fused_reduce(x_TD, w_gate_up_E2FD, w_down_EDF, routing, FUSED_REDUCE_SLOTS_PER_GROUP)
    if _use_all_dense(x_TD, w_gate_up_E2FD, w_down_EDF, routing):
        return experts_all_dense(x_TD, w_gate_up_E2FD, w_down_EDF, routing)
    dtype = _compute_dtype(x_TD)
    plan = DispatchPlan.from_routing(routing)
    expert_S = plan.expert_S
    ends_E = torch.searchsorted(expert_S, torch.arange(1, n_experts + 1, device=x_TD.device) - 1, right=True)
    x_SD = _gather(x_TD, plan).to(dtype)
    y_SD = _experts_block(x_SD, plan.weight_S, w_gate_up_E2FD, w_down_EDF, ends_E.to(torch.int32), dtype)
    return _combine(y_SD, plan, x_TD.dtype)


def experts_loop(x_TD, w_gate_up_E2FD, w_down_EDF, routing: Routing) -> torch.Tensor:
    """Dispatch with one plain matmul pair per non-empty expert over its contiguous slice (weight
    gradients in :func:`weight_grad`'s thread-count-independent order when training on CPU)."""
    dtype = _compute_dtype(x_TD)
    plan = DispatchPlan.from_routing(routing)
    x_SD = _gather(x_TD, plan).to(dtype)
    sizes = routing.tokens_per_expert_E.tolist()
    w_gate_up = w_gate_up_E2FD.to(dtype).unbind(0)  # one backward node for all experts
    w_down = w_down_EDF.to(dtype).unbind(0)
    outputs = [
        linear(_weighted_swiglu(linear(x_nD, w_gate_up[e]), w_n), w_down[e])
        for e, (x_nD, w_n) in enumerate(zip(x_SD.split(sizes), plan.weight_S.split(sizes)))
        if sizes[e] > 0
    ]
    y_SD = torch.cat(outputs) if outputs else x_SD.new_zeros(0, x_TD.shape[1])
    return _combine(y_SD, plan, x_TD.dtype)


def experts_naive(x_TD, w_gate_up_E2FD, w_down_EDF, routing: Routing) -> torch.Tensor:
    """Reference: run every expert on every token and weight by a dense, mostly-zero ``[T, E]``."""
    n_tokens, n_experts = routing.probs_TE.shape
    dense_weight_TE = torch.zeros(n_tokens, n_experts, dtype=routing.weight_TK.dtype, device=x_TD.device)
    dense_weight_TE.scatter_(1, routing.expert_TK, routing.weight_TK)
    out_TD = torch.zeros(n_tokens, x_TD.shape[1], dtype=acc_dtype(x_TD.dtype), device=x_TD.device)
    for e in range(n_experts):
        y_TD = _swiglu(x_TD @ w_gate_up_E2FD[e].T) @ w_down_EDF[e].T
        out_TD = out_TD + dense_weight_TE[:, e : e + 1] * to_acc(y_TD)
    return out_TD.to(x_TD.dtype)


def _experts_fn(backend: str):
    if backend == "grouped_mm":
        return experts_grouped_mm if _HAS_GROUPED_MM else experts_loop
    if backend == "loop":
        return experts_loop
    if backend == "naive":
        return experts_naive
    raise ValueError(f"unknown moe_backend {backend!r}; choose one of {', '.join(BACKENDS)}")


@dataclass
class MoEAux:
    """Per-layer auxiliary outputs: weighted losses and routing statistics (no gradient in stats).
    All three are None when the layer ran without losses (decoding); a dense layer has zero losses."""

    aux_loss: torch.Tensor | None
    z_loss: torch.Tensor | None
    tokens_per_expert_E: torch.Tensor | None


class MoE(nn.Module):
    """SwiGLU experts behind a top-k router. With ``n_experts == 1`` it is a plain dense SwiGLU FFN
    (no router, no auxiliary losses)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts = cfg.n_experts
        self.top_k = cfg.top_k
        self.norm_topk_prob = bool(cfg.norm_topk_prob)
        self.aux_coef = cfg.router_aux_loss_coef
        self.z_coef = cfg.router_z_loss_coef
        self.backend = cfg.moe_backend
        E, D, Fh = cfg.n_experts, cfg.d_model, cfg.d_expert
        self.router = nn.Linear(D, E, bias=False) if E > 1 else None
        self.w_gate_up = nn.Parameter(torch.empty(E, 2 * Fh, D))  # [E, 2F, D]: gate rows, then up rows
        self.w_down = nn.Parameter(torch.empty(E, D, Fh))  # [E, D, F]
        self._experts = _experts_fn(self.backend)

    def set_backend(self, backend: str) -> None:
        self._experts = _experts_fn(backend)
        self.backend = backend

    def forward(self, x_TD: torch.Tensor, with_losses: bool = True, static_shapes: bool = False) -> tuple[torch.Tensor, MoEAux]:
        """``with_losses=False`` skips the router losses and counts (returned as None), e.g. when decoding.
        ``static_shapes=True`` (inference only) dispatches without reading anything on the host
        (:func:`experts_static`), so ``torch.compile`` captures the layer as one graph."""
        if self.router is None:  # dense FFN
            dtype = _compute_dtype(x_TD)
            y_TD = _swiglu(x_TD.to(dtype) @ self.w_gate_up[0].to(dtype).T) @ self.w_down[0].to(dtype).T
            zero = x_TD.new_zeros((), dtype=torch.float32)
            counts = torch.full((1,), x_TD.shape[0], dtype=torch.long, device=x_TD.device)
            return y_TD.to(x_TD.dtype), MoEAux(zero, zero, counts)
        routing = route(x_TD, self.router.weight, self.top_k, self.norm_topk_prob)
        experts = experts_static if static_shapes and self.backend != "naive" else self._experts
        y_TD = experts(x_TD, self.w_gate_up, self.w_down, routing)
        if not with_losses:
            return y_TD, MoEAux(None, None, None)
        aux = MoEAux(
            aux_loss=load_balancing_loss(routing.probs_TE, routing.tokens_per_expert_E, self.top_k, self.aux_coef),
            z_loss=router_z_loss(routing.logits_TE, self.z_coef),
            tokens_per_expert_E=routing.tokens_per_expert_E.detach(),
        )
        return y_TD, aux

    def reset_parameters(self, std: float) -> None:
        if self.router is not None:
            nn.init.normal_(self.router.weight, std=std)
        nn.init.normal_(self.w_gate_up, std=std)
        nn.init.normal_(self.w_down, std=std)


def expert_load_stats(tokens_per_expert_E: torch.Tensor) -> dict[str, float]:
    """Max and mean routing slots per expert and their ratio (1.0 = perfectly balanced)."""
    counts = tokens_per_expert_E.float()
    mean = counts.mean().item()
    mx = counts.max().item()
    return {"max_load": mx, "mean_load": mean, "max_over_mean": mx / mean if mean > 0 else math.nan}
