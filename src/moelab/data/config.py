"""Data configuration: where training tokens come from (synthetic corpus or prepared shards).

All models forbid unknown keys. Invalid values raise :class:`~moelab.errors.ConfigError` (not a bare
pydantic ``ValidationError``) with one line naming the field, the problem and the offending value,
both from ``Model(**kwargs)`` and ``Model.model_validate(dict)``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import ConfigError
from .reasoning import MAX_OPS, OPERATIONS
from .world import ATTRIBUTES, MAX_PARAPHRASES


class ConfigValidationError(ConfigError):
    """A :class:`ConfigError` from model validation; ``parts`` keeps ``(field.path, message)`` pairs."""

    def __init__(self, model: str, parts: list[tuple[str, str]]):
        self.model, self.parts = model, parts
        super().__init__(f"{model}: " + "; ".join(f"{loc}: {msg}" for loc, msg in parts) + "; fix the config")


def validation_parts(e: ValidationError) -> list[tuple[str, str]]:
    """Flatten a pydantic error into ``(field.path, message)`` pairs, expanding nested config errors."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        inner = (err.get("ctx") or {}).get("error")
        if isinstance(inner, ConfigValidationError):
            parts += [(".".join(x for x in (loc, sub) if x), msg) for sub, msg in inner.parts]
            continue
        msg = err["msg"].removeprefix("Value error, ")
        got = err.get("input")
        if not isinstance(got, dict) and err["type"] not in ("missing", "value_error"):
            msg += f" (got {got!r})"
        parts.append((loc or "(model)", msg))
    return parts


class StrictModel(BaseModel):
    """Base for config models: unknown keys are errors, validation errors become ``ConfigError``.

    Pydantic routes nested-model validation and ``model_validate`` through an overridden
    ``__init__`` but wraps what it raises, so ``model_validate`` unwraps it again.
    """

    model_config = ConfigDict(extra="forbid")

    def __init__(self, **data: Any):
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise ConfigValidationError(type(self).__name__, validation_parts(e)) from None

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any):
        try:
            return super().model_validate(obj, *args, **kwargs)
        except ValidationError as e:
            inner = [(err.get("ctx") or {}).get("error") for err in e.errors()]
            if len(inner) == 1 and isinstance(inner[0], ConfigValidationError) and not e.errors()[0]["loc"]:
                raise inner[0] from None
            raise ConfigValidationError(cls.__name__, validation_parts(e)) from None


class SyntheticConfig(StrictModel):
    """The synthetic memorisation/reasoning corpus (see :mod:`moelab.data.synthetic`).

    ``seed`` fixes the world and the test sets; the training stream seed is separate (``DataConfig.seed``).
    ``memorization_weight`` is the fraction of training *tokens* (counted as UTF-8 bytes + 1 eos per
    document) that are memorisation documents; the rest are reasoning problems.
    """

    seed: int = Field(0, ge=0, description="world and test-set seed")
    n_entities: int = Field(200, ge=1, le=100_000, description="people in the world")
    attributes: list[str] = Field(default_factory=lambda: list(ATTRIBUTES), description="attributes per person")
    n_paraphrases: int = Field(3, ge=1, le=MAX_PARAPHRASES, description="biography templates used per attribute")
    qa_in_training: bool = Field(True, description="also train on 'Question: ...\\nAnswer: value' for every fact")
    n_test_memorization: int | None = Field(None, ge=1, description="facts asked in the memorisation test (None = all)")
    min_ops: int = Field(1, ge=1, le=MAX_OPS, description="easiest reasoning difficulty (operations)")
    max_ops: int = Field(4, ge=1, le=MAX_OPS, description="hardest reasoning difficulty (operations)")
    modulus: int = Field(23, ge=2, le=1000, description="all arithmetic is modulo this")
    operations: list[Literal["+", "-", "*"]] = Field(default_factory=lambda: list(OPERATIONS))
    memorization_weight: float = Field(0.5, ge=0.0, le=1.0, description="fraction of training tokens from memorisation docs")
    n_test_reasoning: int = Field(50, ge=1, le=100_000, description="test problems per difficulty")

    @model_validator(mode="after")
    def _check(self) -> "SyntheticConfig":
        if self.min_ops > self.max_ops:
            raise ValueError(f"min_ops={self.min_ops} is larger than max_ops={self.max_ops}")
        unknown = [a for a in self.attributes if a not in ATTRIBUTES]
        if unknown:
            raise ValueError(f"unknown attributes {unknown}; choose from {list(ATTRIBUTES)}")
        if not self.attributes or len(set(self.attributes)) != len(self.attributes):
            raise ValueError("attributes must be a non-empty list without repeats")
        if not self.operations or len(set(self.operations)) != len(self.operations):
            raise ValueError("operations must be a non-empty list without repeats")
        return self


class ShardSource(StrictModel):
    """One prepared shard directory and its sampling weight (weights are normalised over sources)."""

    path: str = Field(min_length=1)
    weight: float = Field(1.0, gt=0.0, allow_inf_nan=False)


class DataConfig(StrictModel):
    """What the trainer reads.

    * ``source="synthetic"``: the trainer materialises ``synthetic_tokens`` training tokens of the
      synthetic corpus (plus validation) with ``tokenizer`` and stream seed ``seed``.
    * ``source="shards"``: windows are sampled from ``shards`` by weight; ``val_path`` (optional) is
      a shard directory for validation loss. Shards must have been prepared with ``tokenizer``.
    """

    source: Literal["synthetic", "shards"] = "synthetic"
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    synthetic_tokens: int = Field(2_000_000, ge=1_000, description="training tokens to materialise for source=synthetic")
    shards: list[ShardSource] = Field(default_factory=list)
    val_path: str | None = None
    tokenizer: str = Field("byte", min_length=1, description="'byte', a tokenizer.json or a directory with one")
    seq_len: int = Field(256, ge=2, le=1 << 20, description="tokens per training sequence")
    seed: int = Field(0, ge=0, description="data-order seed (stream and loader)")

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.source == "shards" and not self.shards:
            raise ValueError("source='shards' needs at least one entry in shards: [{path, weight}]")
        return self
