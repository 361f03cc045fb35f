"""An lm-eval 0.4 model named ``moelab``: run any lm-eval task on a moelab model.

Importing this module registers the model::

    import moelab.eval.lm_eval  # noqa: F401  (registers "moelab")
    import lm_eval
    lm_eval.simple_evaluate(model="moelab", model_args="path=runs/x,tokenizer=byte", tasks=["gsm8k"])

``model_args``: ``path`` (moelab checkpoint, run directory or Mixtral directory), optional
``tokenizer`` (see :mod:`moelab.eval.loading`), ``batch_size`` (int; ``auto`` means 16), ``device``
(default cpu), ``max_length`` (default the model's ``max_seq_len``), ``max_gen_toks`` (default 256),
``seed`` (sampling seed), ``compile`` (true: generate through the compiled decode step, see
:func:`moelab.eval.generate.generate`). A loaded model can be wrapped directly: ``MoelabLM(model=m, tokenizer=t)``.

The three request types run on :mod:`moelab.eval.generate` and :mod:`moelab.eval.loglikelihood`,
which reproduce lm-eval's Hugging Face model: the same tokenisation of (context, continuation), left
truncation to the context window, stop strings plus the EOS string, and ``postprocess_generated_text``.
Sampled requests (``do_sample`` / ``temperature > 0``) use the request's position as its sample id.

lm-eval is an optional dependency (``pip install 'moelab[eval]'``); without it this import fails with
an ImportError saying so.
"""

from __future__ import annotations

import json
from typing import Any

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"moelab.eval.lm_eval needs lm-eval ({e}); install it with `pip install 'moelab[eval]'`"
    ) from None

from ..errors import ConfigError
from .generate import generate
from .loglikelihood import loglikelihood, loglikelihood_rolling

DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_GEN_TOKS = 256


def _as_int(value: Any, name: str, default: int) -> int:
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"lm-eval model_args: {name} must be an integer, got {value!r}") from None


def _as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    raise ConfigError(f"lm-eval model_args: {name} must be true or false, got {value!r}")


@register_model("moelab")
class MoelabLM(LM):
    """lm-eval ``LM`` backed by a moelab model (``loglikelihood``, ``loglikelihood_rolling``, ``generate_until``)."""

    def __init__(
        self,
        path: str | None = None,
        model=None,
        tokenizer=None,
        batch_size: int | str | None = DEFAULT_BATCH_SIZE,
        max_batch_size: int | None = None,
        device: str | None = "cpu",
        max_length: int | str | None = None,
        max_gen_toks: int | str = DEFAULT_MAX_GEN_TOKS,
        seed: int | str = 0,
        compile: bool | str = False,
        **unused: Any,
    ) -> None:
        super().__init__()
        if (path is None) == (model is None):
            raise ConfigError("the moelab lm-eval model needs exactly one of path=... or model=...")
        compile_decode = _as_bool(compile, "compile")  # checked before a model is loaded
        device = device or "cpu"
        if model is None:
            from .loading import load_for_eval

            loaded = load_for_eval(path, tokenizer=tokenizer, device=device)
            model, tokenizer = loaded.model, loaded.tokenizer
        else:
            from ..data.tokenizer import load_tokenizer

            if tokenizer is None:
                raise ConfigError("MoelabLM(model=...) needs tokenizer=... as well")
            tokenizer = load_tokenizer(tokenizer)
            model.to(device).eval()
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = _as_int(batch_size, "batch_size", DEFAULT_BATCH_SIZE)
        self.max_length = _as_int(max_length, "max_length", model.config.max_seq_len)
        self.max_gen_toks = _as_int(max_gen_toks, "max_gen_toks", DEFAULT_MAX_GEN_TOKS)
        self.seed = _as_int(seed, "seed", 0)
        self.compile = compile_decode

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "MoelabLM":
        """``"path=...,batch_size=8"`` plus lm-eval's ``batch_size`` / ``device`` (non-None ones win)."""
        from lm_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**args, **extra})

    # ---- requests -------------------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(req.args) for req in requests]
        scores = loglikelihood(self.model, self.tokenizer, pairs, batch_size=self.batch_size, max_length=self.max_length)
        return [(s.logprob, s.is_greedy) for s in scores]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [req.args[0] for req in requests]
        scores = loglikelihood_rolling(self.model, self.tokenizer, texts, batch_size=self.batch_size, max_length=self.max_length)
        return [s.logprob for s in scores]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Group requests by generation kwargs and decode each group in batches."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        results: list[str | None] = [None] * len(requests)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.pop("until", None)
            until = [until] if isinstance(until, str) else list(until or [])
            max_new = next((kwargs[k] for k in ("max_gen_toks", "max_new_tokens", "max_tokens") if kwargs.get(k) is not None), self.max_gen_toks)
            do_sample = kwargs.get("do_sample")
            temperature = float(kwargs.get("temperature") or 0.0)
            if do_sample is False:
                temperature = 0.0
            elif do_sample and temperature == 0.0:
                temperature = 1.0
            top_p = float(kwargs.get("top_p", 1.0) or 1.0)
            gens = generate(
                self.model,
                self.tokenizer,
                [requests[i].args[0] for i in indices],
                max_new_tokens=int(max_new),
                stop=until,
                temperature=temperature,
                top_p=top_p,
                seed=self.seed,
                sample_ids=indices,
                batch_size=self.batch_size,
                max_length=self.max_length,
                compile=self.compile,
            )
            for i, g in zip(indices, gens):
                results[i] = g.text
        return results  # type: ignore[return-value]

    # ---- metadata lm-eval asks for ---------------------------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "spec", type(self.tokenizer).__name__)).replace("/", "__")

    def get_model_info(self) -> dict:
        cfg = self.model.config
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()), "n_experts": cfg.n_experts, "top_k": cfg.top_k}
