"""Exact parameter, FLOP, sparsity and TPP accounting (pure functions of a :class:`ModelConfig`).

Conventions (every figure moelab reports uses these):

* ``total_params`` -- every parameter: token embedding, all layers (attention, norms, router, all
  ``E`` experts), final norm and LM head. A tied LM head shares the embedding and is counted once.
* ``active_params`` -- what one token uses: everything except the ``E - k`` unselected experts in
  each layer (the router is active). For a dense model (``E = k = 1``) active equals total.
* ``*_no_embed`` -- the same without the token embedding and without the LM head.
* ``train_flops_per_token`` -- ``6 * (active_params_no_embed + V * D) + 6 * L * T * n_heads * head_dim``:
  a multiply-add is 2 FLOPs, backward costs twice forward; the LM head is counted once (as a matmul),
  the embedding lookup is free; the attention term is QK^T and AV with causal masking
  (on average T/2 keys per query) for a context of ``T`` tokens.
* ``inference_flops_per_token`` -- the forward third: ``2 * (active_params_no_embed + V * D) + 2 * L * T * n_heads * head_dim``.
* ``sparsity = 1 - k / E``; ``tpp`` = training tokens / total params; ``tokens_per_active_param``
  = training tokens / active params.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .config import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    embedding: int  # token embedding V*D
    lm_head: int  # output projection V*D, 0 when tied
    attention: int  # all layers: q, k, v, o projections (+ q/k norms)
    norms: int  # all layers' two RMSNorms + final norm
    router: int  # all layers' routers (E*D each; none when E = 1)
    experts_total: int  # all layers, all E experts
    experts_active: int  # all layers, k experts

    @property
    def total(self) -> int:
        return self.embedding + self.lm_head + self.attention + self.norms + self.router + self.experts_total

    @property
    def active(self) -> int:
        return self.total - self.experts_total + self.experts_active

    @property
    def total_no_embed(self) -> int:
        return self.total - self.embedding - self.lm_head

    @property
    def active_no_embed(self) -> int:
        return self.active - self.embedding - self.lm_head


def param_counts(cfg: ModelConfig) -> ParamCounts:
    """Parameter counts by component, exactly as :func:`moelab.build` allocates them."""
    D, L, V = cfg.d_model, cfg.n_layers, cfg.vocab_size
    d_attn, d_kv, hd = cfg.d_attn, cfg.d_kv, cfg.head_dim
    qk_norm = {"none": 0, "head": 2 * hd, "full": d_attn + d_kv}[cfg.qk_norm]
    attn_per_layer = D * d_attn + 2 * D * d_kv + d_attn * D + qk_norm
    expert = 3 * D * cfg.d_expert
    return ParamCounts(
        embedding=V * D,
        lm_head=0 if cfg.tie_embeddings else V * D,
        attention=L * attn_per_layer,
        norms=L * 2 * D + D,
        router=L * cfg.n_experts * D if cfg.is_moe else 0,
        experts_total=L * cfg.n_experts * expert,
        experts_active=L * cfg.top_k * expert,
    )


def attention_flops_per_token(cfg: ModelConfig, seq_len: int, backward: bool = True) -> int:
    """QK^T and AV FLOPs per token with causal masking: ``2 * L * T * d_attn`` forward, x3 for training."""
    return (6 if backward else 2) * cfg.n_layers * seq_len * cfg.d_attn


def train_flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> int:
    """Training FLOPs per token (forward + backward), see module docstring."""
    T = cfg.max_seq_len if seq_len is None else seq_len
    c = param_counts(cfg)
    return 6 * (c.active_no_embed + cfg.vocab_size * cfg.d_model) + attention_flops_per_token(cfg, T, True)


def inference_flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> int:
    """Forward FLOPs per token at context ``seq_len`` (default ``max_seq_len``)."""
    T = cfg.max_seq_len if seq_len is None else seq_len
    c = param_counts(cfg)
    return 2 * (c.active_no_embed + cfg.vocab_size * cfg.d_model) + attention_flops_per_token(cfg, T, False)


def tokens_for_tpp(cfg: ModelConfig, tpp: float) -> int:
    """Training tokens that give ``tpp`` tokens per total parameter."""
    return int(round(tpp * param_counts(cfg).total))


def tokens_for_flops(cfg: ModelConfig, flops: float, seq_len: int | None = None) -> int:
    """Training tokens that a budget of ``flops`` training FLOPs buys."""
    return int(flops // train_flops_per_token(cfg, seq_len))


@dataclass(frozen=True)
class Summary:
    total_params: int
    active_params: int
    total_params_no_embed: int
    active_params_no_embed: int
    embedding_params: int
    lm_head_params: int
    train_flops_per_token: int
    inference_flops_per_token: int
    seq_len: int
    n_experts: int
    top_k: int
    sparsity: float
    tokens: int | None = None
    tpp: float | None = None
    tokens_per_active_param: float | None = None
    train_flops: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(cfg: ModelConfig, tokens: int | None = None, seq_len: int | None = None) -> Summary:
    """Everything :command:`moelab count` reports; ``tokens`` adds TPP and the total training FLOPs."""
    T = cfg.max_seq_len if seq_len is None else seq_len
    c = param_counts(cfg)
    flops_tok = train_flops_per_token(cfg, T)
    return Summary(
        total_params=c.total,
        active_params=c.active,
        total_params_no_embed=c.total_no_embed,
        active_params_no_embed=c.active_no_embed,
        embedding_params=c.embedding,
        lm_head_params=c.lm_head,
        train_flops_per_token=flops_tok,
        inference_flops_per_token=inference_flops_per_token(cfg, T),
        seq_len=T,
        n_experts=cfg.n_experts,
        top_k=cfg.top_k,
        sparsity=cfg.sparsity,
        tokens=tokens,
        tpp=None if tokens is None else tokens / c.total,
        tokens_per_active_param=None if tokens is None else tokens / c.active,
        train_flops=None if tokens is None else float(flops_tok) * tokens,
    )


def human(n: float) -> str:
    """``46_702_792_704`` -> ``'46.7B'``."""
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}" if n / div < 100 else f"{n / div:.1f}{unit}"
    return f"{n:g}"
