"""AdamW with the study's weight-decay convention, and its state as safetensors + JSON (no pickle).

Weight decay (decoupled, AdamW) applies to every parameter with ``ndim >= 2`` **except** the token
embedding ``embed.weight``: the attention projections ``wq wk wv wo``, the expert matrices
``w_gate_up`` / ``w_down`` (3-D, one slice per expert), the router ``router.weight`` and the untied
LM head ``lm_head.weight``. No decay on RMSNorm weights (all 1-D: ``*_norm.weight``, ``norm.weight``,
q/k norms), biases (the model has none) or the embedding (nor a tied LM head, which *is* the embedding).
This is the OLMo / nanoGPT convention: decay matrices that multiply activations, not lookup tables or
gains.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

NO_DECAY_MATRICES = ("embed.weight",)


def _clean(name: str) -> str:
    """Strip wrapper prefixes (DDP ``module.``, torch.compile ``_orig_mod.``) from a parameter name."""
    for prefix in ("module.", "_orig_mod."):
        while name.startswith(prefix):
            name = name[len(prefix):]
    return name


def decays(name: str, param: torch.Tensor) -> bool:
    """True if ``param`` (named as in ``MoELM.named_parameters``) gets weight decay."""
    return param.ndim >= 2 and _clean(name) not in NO_DECAY_MATRICES


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups, ``[decay, no_decay]``, each with ``names`` for inspection (tied weights once)."""
    decay, no_decay = {"params": [], "names": [], "weight_decay": weight_decay}, {"params": [], "names": [], "weight_decay": 0.0}
    for name, p in model.named_parameters():  # remove_duplicate=True: a tied head appears as embed.weight
        if not p.requires_grad:
            continue
        group = decay if decays(name, p) else no_decay
        group["params"].append(p)
        group["names"].append(_clean(name))
    return [decay, no_decay]


#: Devices with torch's fused AdamW kernel used here (one kernel per dtype group for all parameters).
FUSED_DEVICES = ("cpu", "cuda", "xpu")


def use_fused(params: list[torch.Tensor]) -> bool:
    """True if every parameter is a floating-point tensor (plain or FSDP2 ``DTensor``) on a device of
    :data:`FUSED_DEVICES`: then AdamW runs as torch's fused kernel."""
    return bool(params) and all(p.is_floating_point() and p.device.type in FUSED_DEVICES for p in params)


def build_optimizer(model: nn.Module, lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`, fused where :func:`use_fused` (otherwise torch's default).

    The fused kernel reads and writes each parameter, gradient and moment once per step instead of
    once per elementwise op: on a 2-core CPU, 9.5 instead of 60 ms for 12.8 M parameters, which is a
    large part of a step for MoE models, whose total parameters are many times their active ones (the
    E = 64 model of ``benchmarks/train_step.py``: step 325 instead of 372 ms). Same update up to
    float rounding (max 1.2e-7 apart after one step); its optimizer state (``exp_avg``,
    ``exp_avg_sq``, ``step``) has the same keys and loads either way."""
    groups = param_groups(model, weight_decay)
    fused = use_fused([p for g in groups for p in g["params"]]) or None
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


# ------------------------------------------------------------------ state <-> (tensors, json)
def split_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer ``state_dict`` (keys may be ints or FQNs) into safetensors and JSON parts.

    Tensors go to ``{"state/<param>/<key>": tensor}``; everything else (param groups, non-tensor
    per-parameter values) stays JSON. :func:`join_state` inverts it.
    """
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{pid}/{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    meta = {
        "param_groups": state["param_groups"],
        "scalars": scalars,
        "param_ids": [str(pid) for pid in state["state"]],
        "int_ids": all(isinstance(pid, int) for pid in state["state"]),
    }
    return tensors, meta


def join_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Rebuild an optimizer ``state_dict`` from :func:`split_state` output."""
    def pid(s: str):
        return int(s) if meta["int_ids"] else s

    state: dict[Any, dict[str, Any]] = {pid(p): dict(meta["scalars"].get(p, {})) for p in meta["param_ids"]}
    for name, value in tensors.items():
        _, p, key = name.split("/", 2)
        state[pid(p)][key] = value
    return {"state": state, "param_groups": meta["param_groups"]}
