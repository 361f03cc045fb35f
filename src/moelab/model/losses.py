"""Router auxiliary losses (pure functions of one layer's routing).

Conventions (per MoE layer; the model averages them over layers):

* Load-balancing loss ``= alpha * E * sum_i f_i * P_i`` where ``f_i`` is the share of the ``T * k``
  routing slots that went to expert ``i`` and ``P_i`` the mean router probability of expert ``i`` over
  the ``T`` tokens. It equals ``alpha`` exactly when routing is uniform and grows with skew
  (up to ``alpha * E / k`` when every token sends all its probability to the same k experts).
* Router z-loss ``= beta * mean_t (logsumexp_i logits_ti)^2`` (ST-MoE), which keeps router logits small.
"""

from __future__ import annotations

import torch

from .precision import to_acc


def load_balancing_loss(probs_TE: torch.Tensor, tokens_per_expert_E: torch.Tensor, top_k: int, coef: float) -> torch.Tensor:
    """``coef * E * sum_i f_i * P_i``; ``probs_TE`` are the fp32 softmax probabilities over all experts.

    ``tokens_per_expert_E`` counts routing slots (each token contributes ``top_k``); it carries no
    gradient, so the gradient flows through ``P_i`` only, as in Switch/Mixtral.
    """
    n_tokens, n_experts = probs_TE.shape
    if n_tokens == 0:
        return probs_TE.new_zeros(())
    f_E = tokens_per_expert_E.to(probs_TE.dtype) / (n_tokens * top_k)
    p_E = probs_TE.mean(dim=0)
    return coef * n_experts * torch.sum(f_E * p_E)


def router_z_loss(logits_TE: torch.Tensor, coef: float) -> torch.Tensor:
    """``coef * mean_t logsumexp(logits_t)^2`` computed in (at least) fp32."""
    if logits_TE.shape[0] == 0:
        return logits_TE.new_zeros(())
    z_T = torch.logsumexp(to_acc(logits_TE), dim=-1)
    return coef * torch.mean(z_T.square())
