"""Hugging Face Mixtral interoperability: import and export without transformers.

A Mixtral directory holds ``config.json`` (``model_type: mixtral``) and one or more ``*.safetensors``
files (sharded ones listed in ``model.safetensors.index.json``). Export writes the legacy key names that
published Mixtral checkpoints, transformers, vLLM and lm-eval all read::

    model.embed_tokens.weight, model.norm.weight, lm_head.weight
    model.layers.{i}.input_layernorm.weight / post_attention_layernorm.weight
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight
    model.layers.{i}.block_sparse_moe.gate.weight                      [E, D]
    model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight  (gate)   [F, D]
    model.layers.{i}.block_sparse_moe.experts.{j}.w3.weight  (up)     [F, D]
    model.layers.{i}.block_sparse_moe.experts.{j}.w2.weight  (down)   [D, F]

Import also reads transformers v5's fused layout (``mlp.experts.gate_up_proj`` [E, 2F, D],
``mlp.experts.down_proj`` [E, D, F], ``mlp.gate.weight``).

What Mixtral cannot express is refused on export with a message: Mixtral always renormalises the
top-k router weights, so a model with ``norm_topk_prob=False`` and more than one expert cannot be
exported (train it with ``norm_topk_prob: true``); Mixtral has no QK-norm. A dense moelab model
(E = 1) exports as a one-expert Mixtral whose router is a zero ``[1, D]`` matrix (softmax over one
expert is 1, so it is exact); importing a one-expert Mixtral drops its router the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .checkpoint import load_state_into, read_json, read_safetensors, save_safetensors
from .config import ModelConfig
from .errors import CheckpointError, ConfigError
from .io import atomic_write_json

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def is_mixtral_dir(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and (
        data.get("model_type") == "mixtral" or any("Mixtral" in a for a in data.get("architectures") or [])
    )


def config_from_mixtral(hf: dict[str, Any], **overrides: Any) -> ModelConfig:
    """Map a Mixtral ``config.json`` to a :class:`ModelConfig` (Mixtral renormalises top-k).

    A ``sliding_window`` caps ``max_seq_len`` at the window: moelab attends to the whole context, which
    equals the original model's windowed attention exactly as long as sequences fit in the window (an
    override above it is refused). RoPE scaling (``rope_parameters`` or the older ``rope_scaling``)
    other than the default is refused."""
    for key in ("rope_parameters", "rope_scaling"):  # transformers v5 / the older name: both must be default
        rope = hf.get(key) or {}
        if not isinstance(rope, dict):
            raise CheckpointError(f"Mixtral config.json: {key} must be an object, got {rope!r}; fix config.json")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise CheckpointError(f"unsupported RoPE scaling {rope_type!r} ({key}); moelab implements the default RoPE only")
    theta = hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 1e6))
    try:
        n_heads = hf["num_attention_heads"]
        fields = dict(
            vocab_size=hf["vocab_size"],
            d_model=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads", n_heads),
            head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
            d_expert=hf["intermediate_size"],
            n_experts=hf.get("num_local_experts", 8),
            top_k=hf.get("num_experts_per_tok", 2),
            norm_topk_prob=True,
            rope_theta=float(theta),
            max_seq_len=hf.get("max_position_embeddings", 4096),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
            init_std=hf.get("initializer_range", 0.02),
            router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.02),
        )
    except KeyError as e:
        raise CheckpointError(f"Mixtral config.json lacks required field {e.args[0]!r}; the directory is incomplete") from None
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"unsupported hidden_act {hf.get('hidden_act')!r}; moelab experts are SwiGLU (silu)")
    window = hf.get("sliding_window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise CheckpointError(f"Mixtral config.json: sliding_window must be a positive integer or null, got {window!r}; fix config.json")
    if window is not None:
        fields["max_seq_len"] = min(fields["max_seq_len"], window)
    fields.update(overrides)
    if window is not None and fields["max_seq_len"] > window:
        raise CheckpointError(
            f"max_seq_len={fields['max_seq_len']} exceeds the checkpoint's sliding_window={window}: moelab attends "
            f"to the whole context, so later positions would differ from the original model; use max_seq_len <= {window}"
        )
    try:
        return ModelConfig.create(**fields)
    except ConfigError as e:
        raise CheckpointError(f"Mixtral config.json: {e}") from None


def mixtral_config(cfg: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` of the exported Mixtral."""
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_expert,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "num_local_experts": cfg.n_experts,
        "num_experts_per_tok": cfg.top_k,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "sliding_window": None,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "router_aux_loss_coef": cfg.router_aux_loss_coef,
        "router_jitter_noise": 0.0,
        "output_router_logits": False,
        "use_cache": True,
        "torch_dtype": "float32",
        "dtype": "float32",
    }


def check_exportable(cfg: ModelConfig) -> None:
    if cfg.is_moe and not cfg.norm_topk_prob:
        raise CheckpointError(
            "cannot export to Mixtral: the model has norm_topk_prob=False but Mixtral always renormalises the "
            "top-k router weights, which would change its outputs; train with norm_topk_prob: true"
        )
    if cfg.qk_norm != "none":
        raise CheckpointError(f"cannot export to Mixtral: qk_norm={cfg.qk_norm!r} has no Mixtral equivalent; use qk_norm: none")


def to_mixtral_tensors(model) -> dict[str, torch.Tensor]:
    """moelab parameter tensors -> Mixtral legacy names (fp32 copies, contiguous)."""
    cfg: ModelConfig = model.config
    F_ = cfg.d_expert
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": model.embed.weight}
    for i, block in enumerate(model.layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = block.attn_norm.weight
        out[p + "post_attention_layernorm.weight"] = block.ffn_norm.weight
        for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            out[p + f"self_attn.{theirs}.weight"] = getattr(block.attn, ours).weight
        moe = block.moe
        router = moe.router.weight if moe.router is not None else torch.zeros(1, cfg.d_model)
        out[p + "block_sparse_moe.gate.weight"] = router
        for j in range(cfg.n_experts):
            e = p + f"block_sparse_moe.experts.{j}."
            out[e + "w1.weight"] = moe.w_gate_up[j, :F_]
            out[e + "w3.weight"] = moe.w_gate_up[j, F_:]
            out[e + "w2.weight"] = moe.w_down[j]
    out["model.norm.weight"] = model.norm.weight
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = model.lm_head.weight
    return {k: v.detach().float().contiguous().cpu() for k, v in out.items()}


def from_mixtral_tensors(hf: dict[str, torch.Tensor], cfg: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    """Mixtral tensors (legacy or transformers-v5 fused names) -> moelab parameter names."""
    F_ = cfg.d_expert

    def take(key: str) -> torch.Tensor:
        if key not in hf:
            raise CheckpointError(f"{source}: missing tensor {key}; the checkpoint is incomplete")
        return hf.pop(key)

    hf = dict(hf)
    out: dict[str, torch.Tensor] = {"embed.weight": take("model.embed_tokens.weight")}
    for i in range(cfg.n_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        out[q + "attn_norm.weight"] = take(p + "input_layernorm.weight")
        out[q + "ffn_norm.weight"] = take(p + "post_attention_layernorm.weight")
        for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            out[q + f"attn.{ours}.weight"] = take(p + f"self_attn.{theirs}.weight")
        fused = p + "mlp.experts.gate_up_proj" in hf
        moe = p + ("mlp." if fused else "block_sparse_moe.")
        router = take(moe + "gate.weight")
        if cfg.is_moe:
            out[q + "moe.router.weight"] = router
        if fused:
            gate_up_E2FD = take(moe + "experts.gate_up_proj")
            down_EDF = take(moe + "experts.down_proj")
            if gate_up_E2FD.shape != (cfg.n_experts, 2 * F_, cfg.d_model) or down_EDF.shape != (cfg.n_experts, cfg.d_model, F_):
                raise CheckpointError(f"{source}: expert tensors of layer {i} have shapes {tuple(gate_up_E2FD.shape)}, {tuple(down_EDF.shape)} that do not match config.json")
            out[q + "moe.w_gate_up"] = gate_up_E2FD
            out[q + "moe.w_down"] = down_EDF
        else:
            gu, dn = [], []
            for j in range(cfg.n_experts):
                e = moe + f"experts.{j}."
                w1, w3, w2 = take(e + "w1.weight"), take(e + "w3.weight"), take(e + "w2.weight")
                if w1.shape != (F_, cfg.d_model) or w3.shape != (F_, cfg.d_model) or w2.shape != (cfg.d_model, F_):
                    raise CheckpointError(f"{source}: expert {j} of layer {i} has shapes {tuple(w1.shape)}, {tuple(w3.shape)}, {tuple(w2.shape)} that do not match config.json")
                gu.append(torch.cat([w1, w3], dim=0))
                dn.append(w2)
            out[q + "moe.w_gate_up"] = torch.stack(gu)
            out[q + "moe.w_down"] = torch.stack(dn)
    out["norm.weight"] = take("model.norm.weight")
    if cfg.tie_embeddings:
        hf.pop("lm_head.weight", None)
    else:
        out["lm_head.weight"] = take("lm_head.weight")
    hf.pop("model.rotary_emb.inv_freq", None)
    for key in [k for k in hf if k.endswith("rotary_emb.inv_freq")]:
        hf.pop(key)
    if hf:
        extra = sorted(hf)
        raise CheckpointError(f"{source}: unexpected tensor(s) {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}; config.json does not match the weights")
    return out


def mixtral_weight_files(path: Path) -> list[Path]:
    index = path / INDEX
    if index.is_file():
        data = read_json(index)
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map'; the index is corrupt")
        return [path / name for name in sorted(set(weight_map.values()))]
    if (path / SINGLE).is_file():
        return [path / SINGLE]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors weights found (pickled .bin weights are refused for safety); convert them to safetensors")
    return files


def load_mixtral_dir(path: Path, **overrides: Any):
    """Build a moelab model from a Hugging Face Mixtral directory."""
    from .model import MoELM

    cfg = config_from_mixtral(read_json(path / "config.json"), **overrides)
    hf = read_safetensors(mixtral_weight_files(path))
    model = MoELM(cfg)
    load_state_into(model, from_mixtral_tensors(hf, cfg, str(path)), str(path))
    return model


def export_mixtral(model, out_dir: str | Path, max_shard_bytes: int | None = None) -> Path:
    """Write ``model`` as a Hugging Face Mixtral directory that ``MixtralForCausalLM.from_pretrained``
    loads with no missing or unexpected keys. Shards (with an index) above ``max_shard_bytes``."""
    cfg: ModelConfig = model.config
    check_exportable(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = to_mixtral_tensors(model)
    meta = {"format": "pt"}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_safetensors(tensors, out / SINGLE, metadata=meta)
    else:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for k, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][k] = t
            size += nbytes
        weight_map = {}
        for n, shard in enumerate(shards, 1):
            name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            save_safetensors(shard, out / name, metadata=meta)
            weight_map.update({k: name for k in shard})
        atomic_write_json(out / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    atomic_write_json(out / "config.json", mixtral_config(cfg))
    atomic_write_json(out / "generation_config.json", {"_from_model_config": True})
    return out
