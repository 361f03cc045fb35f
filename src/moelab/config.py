"""Model configuration.

:class:`ModelConfig` describes a Mixtral-style decoder-only MoE language model. A dense model is the
special case ``n_experts = top_k = 1`` (then ``d_expert`` is the FFN hidden width and there is no
router). Every invalid value or combination raises a :class:`moelab.errors.ConfigError` whose message
names the field and what to change.

Defaults follow the published study (``shared/docs/study.md``): RMSNorm eps 1e-5, RoPE base 10 000,
untied embeddings, init std 0.02, load-balancing coefficient 1e-2, router z-loss coefficient 1e-3.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from .errors import ConfigError

MoEBackend = Literal["grouped_mm", "loop", "naive"]
QKNorm = Literal["none", "head", "full"]


class ModelConfig(BaseModel):
    """Architecture of a Mixtral-style MoE LM.

    Sizes are counts of elements (not bytes). ``d_expert`` is the hidden width of one SwiGLU expert
    (each expert has three ``d_model x d_expert`` matrices: gate, up, down). ``head_dim`` defaults to
    ``d_model // n_heads``; ``n_kv_heads`` defaults to ``n_heads`` (no grouped-query reduction).
    ``norm_topk_prob`` renormalises the k selected router probabilities to sum to one (Mixtral does);
    it defaults to True for k > 1 and False for k = 1, where renormalisation would make every weight
    1.0 and cut the router off from the language-model gradient.
    ``qk_norm`` adds RMSNorm on queries and keys: ``"head"`` per head over ``head_dim`` (Qwen3),
    ``"full"`` over the whole projection (OLMoE), ``"none"`` (Mixtral, the default).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=False, frozen=False)

    vocab_size: int = 512
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None
    head_dim: int | None = None
    d_expert: int = 256
    n_experts: int = 8
    top_k: int = 2
    norm_topk_prob: bool | None = None
    rope_theta: float = 10_000.0
    max_seq_len: int = 512
    tie_embeddings: bool = False
    rms_norm_eps: float = 1e-5
    init_std: float = 0.02
    router_aux_loss_coef: float = 1e-2
    router_z_loss_coef: float = 1e-3
    qk_norm: QKNorm = "none"
    moe_backend: MoEBackend = "grouped_mm"

    @model_validator(mode="before")
    @classmethod
    def _unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = set(cls.model_fields)
            for key in data:
                if key not in known:
                    close = difflib.get_close_matches(str(key), known, n=1)
                    hint = f"; did you mean {close[0]!r}?" if close else f"; known fields: {', '.join(sorted(known))}"
                    raise ValueError(f"unknown model config field {key!r}{hint}")
        return data

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        positive = ["vocab_size", "d_model", "n_layers", "n_heads", "d_expert", "n_experts", "max_seq_len"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.n_kv_heads <= 0:
            raise ValueError(f"n_kv_heads must be a positive integer, got {self.n_kv_heads}")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"d_model ({self.d_model}) is not divisible by n_heads ({self.n_heads}); "
                    "set head_dim explicitly or change n_heads"
                )
            self.head_dim = self.d_model // self.n_heads
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"head_dim must be a positive even integer (RoPE rotates pairs), got {self.head_dim}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads}) for grouped-query attention"
            )
        if self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k ({self.top_k}) cannot exceed n_experts ({self.n_experts}); lower top_k or add experts")
        if self.norm_topk_prob is None:
            self.norm_topk_prob = self.top_k > 1
        for name in ("rope_theta", "rms_norm_eps", "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("router_aux_loss_coef", "router_z_loss_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        return self

    # -- derived quantities -------------------------------------------------------------------
    @property
    def d_attn(self) -> int:
        """Width of the concatenated query heads, ``n_heads * head_dim``."""
        return self.n_heads * self.head_dim  # type: ignore[operator]

    @property
    def d_kv(self) -> int:
        """Width of the concatenated key (or value) heads, ``n_kv_heads * head_dim``."""
        return self.n_kv_heads * self.head_dim  # type: ignore[operator]

    @property
    def is_moe(self) -> bool:
        """True when the FFN has a router (``n_experts > 1``)."""
        return self.n_experts > 1

    @property
    def sparsity(self) -> float:
        """Fraction of experts a token does not use: ``1 - top_k / n_experts``."""
        return 1.0 - self.top_k / self.n_experts

    # -- construction helpers -----------------------------------------------------------------
    @classmethod
    def create(cls, **fields: Any) -> "ModelConfig":
        """Validate ``fields`` and raise a one-line :class:`ConfigError` on failure."""
        try:
            return cls(**fields)
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, "model config")) from None

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        """Read a model config from YAML or JSON. A top-level ``model:`` section is accepted too."""
        data = read_mapping(path)
        if "model" in data and isinstance(data["model"], dict):
            data = data["model"]
        return cls.create(**data)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


def format_validation_error(e: ValidationError, what: str) -> str:
    """Turn a pydantic error into one line: ``invalid <what>: field: message``."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()))
        msg = err.get("msg", "")
        msg = msg.removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return f"invalid {what}: " + "; ".join(parts)


def read_mapping(path: str | Path) -> dict[str, Any]:
    """Load a YAML/JSON file that must contain a mapping (``yaml.safe_load``; never executes code)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}; check the path")
    try:
        text = p.read_text(encoding="utf-8")
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{p}: not valid YAML/JSON ({first}); fix the syntax") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of field: value at the top level, got {type(data).__name__}")
    return data
