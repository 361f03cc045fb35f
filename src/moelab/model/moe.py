"""The MoE feed-forward block: fp32 top-k router, SwiGLU experts, dropless dispatch.

Shapes use suffixes: ``T`` tokens (batch x sequence flattened), ``D`` d_model, ``E`` experts,
``K`` top_k, ``F`` d_expert, ``S = T * K`` routing slots.

Routing (token choice, dropless): ``probs_TE = softmax(x_TD @ w_router.T)`` in fp32; each token keeps its
``K`` largest probabilities (optionally renormalised to sum to one) and is processed by exactly those
``K`` experts; no capacity factor, no token is ever dropped.

Expert weights are stored fused and expert-major so that one grouped matmul does the work of a
whole layer: ``w_gate_up_EDF2`` is ``[E, D, 2F]`` (gate columns first, then up) and ``w_down_EFD`` is
``[E, F, D]``. An expert computes ``down(silu(x @ gate) * (x @ up))``.

Dispatch backends (selected by ``ModelConfig.moe_backend``), all numerically equivalent:

* ``grouped_mm`` -- sort the ``S`` (token, expert) slots by expert once, gather the rows, two
  ``torch.nn.functional.grouped_mm`` calls over contiguous groups, un-sort, weight in fp32 and sum the
  ``K`` contributions per token. No host synchronisation, no padding, deterministic combine.
* ``loop`` -- the same sort, then a Python loop of plain matmuls over per-expert slices (works on any
  torch; synchronises once to read the group sizes).
* ``naive`` -- the reference for tests: every expert on every token, weighted by a dense ``[T, E]``
  matrix that is zero for unselected experts. Slow and obviously correct.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .losses import load_balancing_loss, router_z_loss

BACKENDS = ("grouped_mm", "loop", "naive")
_HAS_GROUPED_MM = hasattr(F, "grouped_mm")


@dataclass
class Routing:
    """The routing decision of one MoE layer for ``T`` tokens."""

    logits_TE: torch.Tensor  # fp32 router logits
    probs_TE: torch.Tensor  # fp32 softmax over all experts
    expert_TK: torch.Tensor  # int64 chosen experts, descending probability
    weight_TK: torch.Tensor  # fp32 combine weights (renormalised if norm_topk_prob)
    tokens_per_expert_E: torch.Tensor  # int64 routing slots per expert (sums to T * K)


def route(x_TD: torch.Tensor, w_router_ED: torch.Tensor, top_k: int, norm_topk_prob: bool) -> Routing:
    """fp32 softmax -> top-k -> optional renormalisation. Pure function of its inputs."""
    logits_TE = F.linear(x_TD.float(), w_router_ED.float())
    probs_TE = torch.softmax(logits_TE, dim=-1)
    weight_TK, expert_TK = torch.topk(probs_TE, top_k, dim=-1)
    if norm_topk_prob:
        weight_TK = weight_TK / weight_TK.sum(dim=-1, keepdim=True)
    n_experts = w_router_ED.shape[0]
    tokens_per_expert_E = torch.bincount(expert_TK.reshape(-1), minlength=n_experts)
    return Routing(logits_TE, probs_TE, expert_TK, weight_TK, tokens_per_expert_E)


def _swiglu(h_S2F: torch.Tensor) -> torch.Tensor:
    gate_SF, up_SF = h_S2F.chunk(2, dim=-1)
    return F.silu(gate_SF) * up_SF


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _sort_slots(expert_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order of the ``S = T*K`` slots grouped by expert (stable) and its inverse permutation."""
    order_S = torch.argsort(expert_TK.reshape(-1), stable=True)
    inverse_S = torch.empty_like(order_S)
    inverse_S[order_S] = torch.arange(order_S.numel(), device=order_S.device)
    return order_S, inverse_S


def _gather_sorted(x_TD: torch.Tensor, order_S: torch.Tensor, top_k: int) -> torch.Tensor:
    """Rows of ``x`` in expert-sorted slot order. Expand+permute keeps the backward deterministic."""
    n_tokens, d_model = x_TD.shape
    x_SD = x_TD.unsqueeze(1).expand(n_tokens, top_k, d_model).reshape(n_tokens * top_k, d_model)
    return x_SD[order_S]


def _combine(y_sorted_SD: torch.Tensor, inverse_S: torch.Tensor, weight_TK: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Un-sort, weight each slot in fp32 and sum the ``K`` slots of every token (fixed order)."""
    n_tokens, top_k = weight_TK.shape
    y_TKD = y_sorted_SD[inverse_S].view(n_tokens, top_k, y_sorted_SD.shape[-1])
    out_TD = (y_TKD.float() * weight_TK.unsqueeze(-1)).sum(dim=1)
    return out_TD.to(out_dtype)


def experts_grouped_mm(x_TD, w_gate_up_EDF2, w_down_EFD, routing: Routing) -> torch.Tensor:
    """Dispatch with two grouped matmuls over expert-contiguous groups (no host sync)."""
    dtype = _compute_dtype(x_TD)
    top_k = routing.expert_TK.shape[1]
    order_S, inverse_S = _sort_slots(routing.expert_TK)
    offsets_E = torch.cumsum(routing.tokens_per_expert_E, dim=0).to(torch.int32)
    x_SD = _gather_sorted(x_TD, order_S, top_k).to(dtype)
    h_S2F = F.grouped_mm(x_SD, w_gate_up_EDF2.to(dtype), offs=offsets_E)
    y_SD = F.grouped_mm(_swiglu(h_S2F), w_down_EFD.to(dtype), offs=offsets_E)
    return _combine(y_SD, inverse_S, routing.weight_TK, x_TD.dtype)


def experts_loop(x_TD, w_gate_up_EDF2, w_down_EFD, routing: Routing) -> torch.Tensor:
    """Dispatch with one plain matmul pair per non-empty expert over its contiguous slice."""
    dtype = _compute_dtype(x_TD)
    top_k = routing.expert_TK.shape[1]
    order_S, inverse_S = _sort_slots(routing.expert_TK)
    x_SD = _gather_sorted(x_TD, order_S, top_k).to(dtype)
    sizes = routing.tokens_per_expert_E.tolist()
    w_gate_up = w_gate_up_EDF2.to(dtype).unbind(0)  # one backward node for all experts
    w_down = w_down_EFD.to(dtype).unbind(0)
    outputs = [
        _swiglu(x_nD @ w_gate_up[e]) @ w_down[e] for e, x_nD in enumerate(x_SD.split(sizes)) if sizes[e] > 0
    ]
    y_SD = torch.cat(outputs) if outputs else x_SD.new_zeros(0, x_TD.shape[1])
    return _combine(y_SD, inverse_S, routing.weight_TK, x_TD.dtype)


def experts_naive(x_TD, w_gate_up_EDF2, w_down_EFD, routing: Routing) -> torch.Tensor:
    """Reference: run every expert on every token and weight by a dense, mostly-zero ``[T, E]``."""
    n_tokens, n_experts = routing.probs_TE.shape
    dense_weight_TE = torch.zeros(n_tokens, n_experts, dtype=torch.float32, device=x_TD.device)
    dense_weight_TE.scatter_(1, routing.expert_TK, routing.weight_TK)
    out_TD = torch.zeros(n_tokens, x_TD.shape[1], dtype=torch.float32, device=x_TD.device)
    for e in range(n_experts):
        y_TD = _swiglu(x_TD @ w_gate_up_EDF2[e]) @ w_down_EFD[e]
        out_TD = out_TD + dense_weight_TE[:, e : e + 1] * y_TD.float()
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
    """Per-layer auxiliary outputs: weighted losses and routing statistics (no gradient in stats)."""

    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert_E: torch.Tensor


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
        self.w_gate_up = nn.Parameter(torch.empty(E, D, 2 * Fh))
        self.w_down = nn.Parameter(torch.empty(E, Fh, D))
        self._experts = _experts_fn(self.backend)

    def set_backend(self, backend: str) -> None:
        self._experts = _experts_fn(backend)
        self.backend = backend

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
        if self.router is None:  # dense FFN
            y_TD = _swiglu(x_TD @ self.w_gate_up[0].to(_compute_dtype(x_TD))) @ self.w_down[0].to(_compute_dtype(x_TD))
            zero = x_TD.new_zeros((), dtype=torch.float32)
            counts = torch.full((1,), x_TD.shape[0], dtype=torch.long, device=x_TD.device)
            return y_TD.to(x_TD.dtype), MoEAux(zero, zero, counts)
        routing = route(x_TD, self.router.weight, self.top_k, self.norm_topk_prob)
        y_TD = self._experts(x_TD, self.w_gate_up, self.w_down, routing)
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
