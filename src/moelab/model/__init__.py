"""Model components: the transformer, the MoE block and its losses."""

from .moe import BACKENDS, MoE, Routing, expert_load_stats, route
from .transformer import KVCache, MoELM, ModelOutput, RMSNorm

__all__ = ["BACKENDS", "MoE", "Routing", "expert_load_stats", "route", "KVCache", "MoELM", "ModelOutput", "RMSNorm"]
