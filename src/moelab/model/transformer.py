"""Mixtral-style decoder-only transformer: RMSNorm (pre-norm), RoPE (rotate-half), causal GQA
attention through ``scaled_dot_product_attention``, and a MoE FFN in every layer.

Shapes: ``B`` batch, ``T`` query positions, ``S`` key positions, ``D`` d_model, ``H`` query heads,
``G`` key/value heads, ``Hd`` head_dim, ``V`` vocabulary.

``MoELM.forward`` returns a :class:`ModelOutput` with ``logits`` ([B, T, V], fp32), the router
losses averaged over layers (already multiplied by their coefficients; computed when gradients are
enabled or ``targets`` are given, zero otherwise) and per-layer routing counts.
With ``targets`` it also returns ``ce_loss`` (mean next-token cross-entropy in nats over targets that
are not ``ignore_index``) and ``loss = ce_loss + aux_loss + z_loss``, the quantity to minimise.

Incremental decoding uses a :class:`KVCache` (one key and one value buffer per layer, filled slot by
slot). Prompts of different lengths are left-padded; ``positions`` gives each token's RoPE position
and ``key_padding_mask`` marks which cached slots hold real tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .linear import Linear
from .materialize import materialize
from .moe import MoE, MoEAux
from .precision import to_acc


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight``, computed in (at least) fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = to_acc(x)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(positions_BT: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[B, 1, T, Hd]`` in the rotate-half layout (frequencies repeated twice)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions_BT.device, dtype=torch.float32) / head_dim))
    freqs_BTh = positions_BT.float()[..., None] * inv_freq
    emb_BTd = torch.cat((freqs_BTh, freqs_BTh), dim=-1)
    return emb_BTd.cos()[:, None], emb_BTd.sin()[:, None]


def apply_rope(x_BHTd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x_BHTd.shape[-1] // 2
    x1, x2 = x_BHTd[..., :half], x_BHTd[..., half:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return (to_acc(x_BHTd) * cos + to_acc(rotated) * sin).to(x_BHTd.dtype)


@dataclass
class KVCache:
    """Pre-allocated key/value buffers ``[B, G, max_len, Hd]`` per layer; ``length`` slots are filled."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0

    @classmethod
    def empty(cls, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32) -> "KVCache":
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        return cls(
            keys=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)],
            values=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)],
        )

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def select(self, batch_index: torch.Tensor) -> None:
        """Keep only the given batch rows (e.g. drop finished sequences)."""
        self.keys = [k[batch_index] for k in self.keys]
        self.values = [v[batch_index] for v in self.values]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = Linear(cfg.d_model, cfg.d_attn)
        self.wk = Linear(cfg.d_model, cfg.d_kv)
        self.wv = Linear(cfg.d_model, cfg.d_kv)
        self.wo = Linear(cfg.d_attn, cfg.d_model)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm == "head":
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        elif cfg.qk_norm == "full":
            self.q_norm = RMSNorm(cfg.d_attn, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.d_kv, cfg.rms_norm_eps)

    def _qkv(self, x_BTD, cos, sin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projected, normalised (``qk_norm``) and rotated queries ``[B, H, T, Hd]``, keys and values ``[B, G, T, Hd]``."""
        B, T, _ = x_BTD.shape
        q, k, v = self.wq(x_BTD), self.wk(x_BTD), self.wv(x_BTD)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q_BHTd = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k_BGTd = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v_BGTd = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm == "head":
            q_BHTd, k_BGTd = self.q_norm(q_BHTd), self.k_norm(k_BGTd)
        return apply_rope(q_BHTd, cos, sin), apply_rope(k_BGTd, cos, sin), v_BGTd

    def decode_step(self, x_B1D, cos, sin, keys_BGCd, values_BGCd, mask_B11S) -> torch.Tensor:
        """One query per row: write its key/value into cache slot ``S - 1`` and attend over the first
        ``S`` slots of the cache buffers (capacity ``C``), masked by ``mask_B11S`` (``[B, 1, 1, S]``,
        True = attend).

        Attention is written out as products and sums rather than ``scaled_dot_product_attention``,
        whose CPU kernel costs ~100 us per call at this size: compiled, the two single-query products
        become fused reductions. Their inputs (the rotated queries, the probabilities) are
        :func:`materialize`-d first; otherwise the compiler would recompute RoPE for every key and the
        softmax for every channel inside those reductions."""
        B, G, _, Hd = keys_BGCd.shape
        n_slots = mask_B11S.shape[-1]
        slot_1 = torch.arange(n_slots - 1, n_slots, device=keys_BGCd.device)
        q_BH1d, k_BG1d, v_BG1d = self._qkv(x_B1D, cos, sin)
        keys_BGCd.index_copy_(2, slot_1, k_BG1d.to(keys_BGCd.dtype))
        values_BGCd.index_copy_(2, slot_1, v_BG1d.to(values_BGCd.dtype))
        # in fp32 whatever the model's dtype (compiled, the casts fuse into the reductions)
        keys_BGSd, values_BGSd = to_acc(keys_BGCd[:, :, :n_slots]), to_acc(values_BGCd[:, :, :n_slots])
        q_BGRd = materialize(to_acc(q_BH1d.reshape(B, G, self.n_heads // G, Hd)))  # R query heads per key/value head
        scores_BGRS = (q_BGRd.unsqueeze(-2) * keys_BGSd.unsqueeze(2)).sum(dim=-1) * Hd**-0.5
        probs_BGRS = materialize(scores_BGRS.masked_fill(~mask_B11S, float("-inf")).softmax(dim=-1))
        o_BGRd = (probs_BGRS.unsqueeze(-1) * values_BGSd.unsqueeze(2)).sum(dim=-2)
        return self.wo(o_BGRd.reshape(B, 1, -1).to(x_B1D.dtype))

    def forward(self, x_BTD, cos, sin, cache: KVCache | None, layer: int, mask_BTS: torch.Tensor | None):
        B, T, _ = x_BTD.shape
        q_BHTd, k_BGTd, v_BGTd = self._qkv(x_BTD, cos, sin)
        if cache is not None:
            start = cache.length
            cache.keys[layer][:, :, start : start + T] = k_BGTd.to(cache.keys[layer].dtype)
            cache.values[layer][:, :, start : start + T] = v_BGTd.to(cache.values[layer].dtype)
            k_BGTd = cache.keys[layer][:, :, : start + T].to(q_BHTd.dtype)
            v_BGTd = cache.values[layer][:, :, : start + T].to(q_BHTd.dtype)
        gqa = self.n_heads != self.n_kv_heads
        if mask_BTS is None:
            o_BHTd = F.scaled_dot_product_attention(q_BHTd, k_BGTd, v_BGTd, is_causal=True, enable_gqa=gqa)
        else:
            o_BHTd = F.scaled_dot_product_attention(q_BHTd, k_BGTd, v_BGTd, attn_mask=mask_BTS[:, None], enable_gqa=gqa)
        return self.wo(o_BHTd.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.moe = MoE(cfg)

    def forward(self, x_BTD, cos, sin, cache, layer, mask_BTS, with_losses: bool = True) -> tuple[torch.Tensor, MoEAux]:
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), cos, sin, cache, layer, mask_BTS)
        B, T, D = x_BTD.shape
        y_TD, aux = self.moe(self.ffn_norm(x_BTD).reshape(B * T, D), with_losses)
        return x_BTD + y_TD.view(B, T, D), aux

    def decode_step(self, x_B1D, cos, sin, keys_BGCd, values_BGCd, mask_B11S) -> torch.Tensor:
        """:meth:`forward` for one new token per row (see :meth:`MoELM.decode_step`)."""
        x_B1D = x_B1D + self.attn.decode_step(self.attn_norm(x_B1D), cos, sin, keys_BGCd, values_BGCd, mask_B11S)
        B, _, D = x_B1D.shape
        y_BD, _ = self.moe(self.ffn_norm(x_B1D).reshape(B, D), with_losses=False, static_shapes=True)
        return x_B1D + y_BD.view(B, 1, D)


@dataclass
class ModelOutput:
    logits: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert: list[torch.Tensor] = field(default_factory=list)  # per layer; empty when decoding
    ce_loss: torch.Tensor | None = None
    loss: torch.Tensor | None = None


class MoELM(nn.Module):
    """The language model. Build it with :func:`moelab.build` (which also initialises weights)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def reset_parameters(self, seed: int | None = None) -> None:
        """Normal(0, init_std) for every matrix, ones for norms; deterministic given ``seed``."""
        gen_state = torch.random.get_rng_state()
        if seed is not None:
            torch.manual_seed(seed)
        std = self.config.init_std
        try:
            nn.init.normal_(self.embed.weight, std=std)
            for block in self.layers:
                for lin in (block.attn.wq, block.attn.wk, block.attn.wv, block.attn.wo):
                    nn.init.normal_(lin.weight, std=std)
                block.moe.reset_parameters(std)
            if not self.config.tie_embeddings:
                nn.init.normal_(self.lm_head.weight, std=std)
            for m in self.modules():
                if isinstance(m, RMSNorm):
                    nn.init.ones_(m.weight)
        finally:
            if seed is not None:
                torch.random.set_rng_state(gen_state)

    def compile_blocks(self, **compile_kwargs) -> None:
        """``torch.compile`` each decoder block in place (per-block compilation: small graphs, one
        compiled artifact reused by every layer of the same shape, no graph break at layer edges)."""
        for block in self.layers:
            block.compile(**compile_kwargs)

    def set_moe_backend(self, backend: str) -> None:
        for block in self.layers:
            block.moe.set_backend(backend)
        self.config.moe_backend = backend  # type: ignore[assignment]

    def decode_step(
        self, input_B: torch.Tensor, positions_B: torch.Tensor, cache: KVCache, mask_BS: torch.Tensor, greedy: bool = False
    ) -> torch.Tensor:
        """One decoding step with no host synchronisation and no data-dependent shapes, so that
        ``torch.compile`` captures it as one graph (:func:`moelab.eval.generate.generate` with ``compile=True``).

        ``input_B``: the newest token of each row; ``positions_B``: its RoPE position; ``mask_BS``: bool
        ``[B, S]``, True for every slot among the first ``S`` the row may attend to, prompt padding
        False. The new token's key and value go to slot ``S - 1`` (the same for every row: prompts are
        left-padded), which the mask includes. Attention runs over the first ``S`` cache slots (mark
        ``S`` dynamic so one compiled graph serves every step) and the
        MoE layers use host-synchronisation-free dispatch (``static_shapes=True``). Does not change
        ``cache.length``. Returns fp32 logits ``[B, V]``, or with ``greedy`` their ``argmax`` (int64 ``[B]``,
        the first maximum; compiled, it is a vectorised reduction inside the graph, where eager
        ``argmax`` over a 32 000-token vocabulary costs ~0.35 ms per batch-16 step on a 2-core CPU).
        """
        cfg = self.config
        cos, sin = rope_cos_sin(positions_B[:, None], cfg.head_dim, cfg.rope_theta)
        mask_B11S = mask_BS[:, None, None, :]
        x_B1D = self.embed(input_B[:, None])
        for i, block in enumerate(self.layers):
            x_B1D = block.decode_step(x_B1D, cos, sin, cache.keys[i], cache.values[i], mask_B11S)
        logits_BV = to_acc(self.lm_head(self.norm(x_B1D[:, 0])))
        return logits_BV.argmax(dim=-1) if greedy else logits_BV

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        key_padding_mask: torch.Tensor | None = None,
        ignore_index: int = -100,
        logits_to_keep: int | None = None,
    ) -> ModelOutput:
        """Run the model on ``input_ids`` ``[B, T]``.

        ``positions`` ``[B, T]`` defaults to ``cache.length + arange(T)``. ``key_padding_mask`` ``[B, S]``
        (True = real token) covers every slot up to ``cache.length + T`` when decoding with left padding.
        ``logits_to_keep`` computes logits only for the last that many positions (decoding).
        """
        B, T = input_ids.shape
        cfg = self.config
        start = cache.length if cache is not None else 0
        if cache is not None and start + T > cache.capacity:
            raise ValueError(f"KV cache holds {cache.capacity} positions; cannot add {T} after {start}")
        if positions is None:
            positions = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
        mask_BTS = None
        if cache is not None or key_padding_mask is not None:
            S = start + T
            q_slot = torch.arange(start, S, device=input_ids.device)
            k_slot = torch.arange(S, device=input_ids.device)
            mask_BTS = (k_slot[None, :] <= q_slot[:, None]).expand(B, T, S)
            if key_padding_mask is not None:
                mask_BTS = mask_BTS & key_padding_mask[:, None, :S].bool()
                # a fully masked row (a pad query) would give NaN: let it attend to itself
                mask_BTS = mask_BTS | (k_slot[None, :] == q_slot[:, None])[None]
        # router losses are needed to train and to report a loss; decoding skips them
        with_losses = targets is not None or torch.is_grad_enabled()
        x_BTD = self.embed(input_ids)
        aux_sum = x_BTD.new_zeros((), dtype=torch.float32)
        z_sum = x_BTD.new_zeros((), dtype=torch.float32)
        counts = []
        for i, block in enumerate(self.layers):
            x_BTD, aux = block(x_BTD, cos, sin, cache, i, mask_BTS, with_losses)
            if aux.aux_loss is not None:  # None when decoding without losses
                aux_sum = aux_sum + aux.aux_loss
                z_sum = z_sum + aux.z_loss
            if aux.tokens_per_expert_E is not None:
                counts.append(aux.tokens_per_expert_E)
        if cache is not None:
            cache.length = start + T
        x_BTD = self.norm(x_BTD)
        if logits_to_keep is not None:
            x_BTD = x_BTD[:, -logits_to_keep:]
        logits = to_acc(self.lm_head(x_BTD))
        n = len(self.layers)
        out = ModelOutput(logits=logits, aux_loss=aux_sum / n, z_loss=z_sum / n, tokens_per_expert=counts)
        if targets is not None:
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index)
            out.ce_loss = ce
            out.loss = ce + out.aux_loss + out.z_loss
        return out
