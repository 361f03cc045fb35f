"""Batched autoregressive generation with the KV cache, greedy or sampled, with lm-eval stop semantics.

How a batch is decoded (:func:`generate`)::

    prompts --encode--> token lists (left-truncated to max_seq_len - max_new_tokens, as lm-eval)
            --sort by length, chunk into batches of batch_size-->
    one batch: left-pad to the longest prompt, positions = arange - pad (0 for pads),
               key_padding_mask marks real tokens; ONE prefill forward over all prompts,
               then one forward per new token (logits_to_keep=1) for the rows still running.

A row finishes when it emits EOS (``stop_at_eos``), when its decoded generation contains a stop string,
or after ``max_new_tokens`` tokens. Finished rows are dropped from the batch (``KVCache.select``), so
they cost nothing afterwards. The returned text is the decoded generation cut with
:func:`moelab.eval.metrics.truncate_at_stop` (lm-eval's ``postprocess_generated_text``); as lm-eval's
Hugging Face model does, the tokenizer's EOS string is appended to the stop strings.

Sampling (``temperature > 0``): ``softmax(logits / temperature)``, optionally restricted to the top-p
nucleus (the smallest set of most probable tokens whose mass reaches ``top_p``), sampled by inverse CDF
with ONE uniform number per row and step. The uniforms of a row come from its own ``torch.Generator``
seeded with ``hash(seed, sample_id)``, so a sample depends only on ``(seed, sample_id, prompt)``: the
same for any batch size, batch composition or order. Greedy decoding is ``argmax`` (first maximum).

:func:`generate_reference` is the specification: one sequence at a time, no cache, the full sequence
recomputed every step, the full text checked for stop strings every step. Tests compare the two.
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

import torch

from ..errors import ConfigError
from ..model.transformer import KVCache
from .metrics import truncate_at_stop

#: Extra tokens decoded beyond the longest stop string when checking for a stop (tokens can start
#: mid-character; a miss would only cost compute, never change the returned text).
STOP_WINDOW_SLACK = 8


@dataclass(frozen=True)
class Generation:
    """One generated continuation.

    ``text``: decoded continuation cut at the first stop string (the stop string is not included).
    ``token_ids``: the generated token ids (the EOS that ended it is not included).
    ``finish_reason``: ``"stop"`` (a stop string appeared), ``"eos"`` or ``"length"`` (max_new_tokens).
    """

    text: str
    token_ids: list[int]
    finish_reason: str


# --------------------------------------------------------------------------------------------------
# helpers shared by the batched decoder and the reference
# --------------------------------------------------------------------------------------------------


def eos_string(tokenizer) -> str | None:
    """The text of the tokenizer's EOS token (e.g. ``"</s>"``; its ``eos_token``, as on moelab's and
    transformers' tokenizers), or ``None`` when it has no text form (the byte tokenizer's EOS)."""
    return getattr(tokenizer, "eos_token", None) or None


def stop_strings(stop: Sequence[str], tokenizer) -> tuple[str, ...]:
    """``stop`` plus the tokenizer's EOS string (lm-eval's ``handle_stop_sequences``), empties dropped."""
    stop = list(stop)
    eos = eos_string(tokenizer)
    if eos is not None and eos not in stop:
        stop.append(eos)
    return tuple(s for s in stop if s)


def sample_seed(seed: int, sample_id: Hashable) -> int:
    """A 63-bit generator seed from ``(seed, sample_id)`` (blake2b of ``"seed:sample_id"``)."""
    digest = hashlib.blake2b(f"{seed}:{sample_id}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def row_uniforms(seed: int, sample_ids: Sequence[Hashable], n_steps: int) -> torch.Tensor:
    """``[R, n_steps]`` uniforms in ``[0, 1)``: row r from a ``torch.Generator`` seeded by ``sample_ids[r]``."""
    out = torch.empty(len(sample_ids), n_steps)
    gen = torch.Generator()
    for r, sid in enumerate(sample_ids):
        gen.manual_seed(sample_seed(seed, sid))
        out[r] = torch.rand(n_steps, generator=gen)
    return out


def next_tokens(logits_BV: torch.Tensor, temperature: float, top_p: float, u_B: torch.Tensor | None) -> torch.Tensor:
    """Pick one token per row: ``argmax`` when ``temperature == 0``, else an inverse-CDF sample.

    ``u_B`` holds one uniform in ``[0, 1)`` per row (ignored when greedy). With ``top_p < 1`` only the
    nucleus is kept: tokens (by descending probability) whose preceding mass is below ``top_p``.
    """
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    probs_BV = torch.softmax(logits_BV.float() / temperature, dim=-1)
    if top_p < 1.0:
        probs_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
        cdf_BV = probs_BV.cumsum(dim=-1)
        probs_BV = probs_BV.masked_fill(cdf_BV - probs_BV >= top_p, 0.0)
    else:
        order_BV = None
    cdf_BV = probs_BV.cumsum(dim=-1)
    target_B1 = (u_B.to(cdf_BV.device) * cdf_BV[:, -1]).unsqueeze(1)
    index_B = torch.searchsorted(cdf_BV, target_B1, right=True).squeeze(1).clamp_(max=cdf_BV.shape[1] - 1)
    if order_BV is None:
        return index_B
    return order_BV.gather(1, index_B.unsqueeze(1)).squeeze(1)


def check_sampling(max_new_tokens: int, temperature: float, top_p: float, batch_size: int = 1) -> None:
    """Raise :class:`ConfigError` for impossible decoding settings."""
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature >= 0:
        raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")


def prompt_ids(tokenizer, prompt: str, max_prompt_len: int) -> list[int]:
    """Token ids of ``prompt``, left-truncated to ``max_prompt_len``; an empty prompt becomes ``[eos]``."""
    ids = tokenizer.encode(prompt)
    if not ids:
        ids = [tokenizer.eos_id]
    return ids[-max_prompt_len:]


def max_prompt_len(model, max_new_tokens: int, max_length: int | None = None) -> int:
    """Room left for the prompt in the context (``max_length - max_new_tokens``, ``max_length`` defaulting
    to the model's ``max_seq_len``), as lm-eval."""
    context = model.config.max_seq_len if max_length is None else max_length
    room = context - max_new_tokens
    if room < 1:
        raise ConfigError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's context of "
            f"{context} tokens; lower max_new_tokens (--max-new-tokens)"
        )
    return room


class _StopChecker:
    """Does a row's decoded generation contain a stop string? Decodes only a tail window, and confirms a
    hit on the full text, so a row stops exactly when its full text first contains a stop string."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.decode = tokenizer.decode
        self.stop = tuple(stop)
        self.window = max((len(s.encode("utf-8")) for s in self.stop), default=0) + STOP_WINDOW_SLACK

    def hit(self, tokens: list[int]) -> bool:
        if not self.stop:
            return False
        tail = self.decode(tokens[-self.window :])
        if not any(s in tail for s in self.stop):
            return False
        text = self.decode(tokens)
        return any(s in text for s in self.stop)


# --------------------------------------------------------------------------------------------------
# batched decoding
# --------------------------------------------------------------------------------------------------


# model -> its compiled decode step; kept beside the model (not on it), so a deep copy or a pickle of
# the model never carries a step bound to the original's weights
_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def compiled_decode_step(model):
    """``torch.compile(model.decode_step)``, built once per model object. :func:`_decode_batch`
    marks the cache length dynamic, so one graph serves every prompt length and step; it recompiles
    for a new batch size or dtype."""
    step = _COMPILED.get(model)
    if step is None:
        # no per-call size/stride asserts on the graph's inputs: dynamo's guards already check them
        # before the graph runs, and the ~100 asserts cost ~4 % of a step of the `small` preset at batch 16.
        # A C++ wrapper instead of the Python one around the kernels: 3-8 % less time per step at batch 16
        # (vocab32k, small) on a 2-core CPU; on GPU it changes nothing of the results.
        options = {"size_asserts": False, "cpp_wrapper": True}
        # dynamic=False: a new batch size gets its own static graph; by default dynamo would recompile the
        # second size with a symbolic batch dimension, and that graph ran batch 16 1.5-2x slower. The cache
        # length stays dynamic (marked by `_decode_batch`).
        compiled = torch.compile(model.decode_step, fullgraph=True, dynamic=False, options=options)

        def step(*args):
            try:
                return compiled(*args)
            except torch._dynamo.exc.BackendCompilerFailed as e:
                inner = getattr(e, "inner_exception", e)
                reason = (f"{type(inner).__name__}: {inner}".strip().splitlines() or ["unknown error"])[0][:200]
                raise ConfigError(
                    f"torch.compile could not build the decode step ({reason}); generate without compiling (drop --compile / compile=True)"
                ) from e

        _COMPILED[model] = step
    return step


def _decode_batch(
    model,
    batch_ids: list[list[int]],
    uniforms_RN: torch.Tensor | None,
    *,
    max_new_tokens: int,
    eos_id: int | None,
    checker: _StopChecker,
    temperature: float,
    top_p: float,
    static_step: Callable | None = None,
    n_padding: int = 0,
) -> list[tuple[list[int], str]]:
    """Decode one batch of (already truncated) prompts. Returns ``(generated ids, finish_reason)`` per row.

    Eager (``static_step is None``): finished rows are dropped from the batch. Compiled (``static_step``,
    e.g. :func:`compiled_decode_step`): the batch size changes only by halving -- when at most half the
    rows are still running it shrinks to the next power of two, finished rows filling it up (their
    tokens are ignored); the last ``n_padding`` rows are filler that is never decoded. The cache length
    is marked dynamic, so each batch size compiles once.
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    B = len(batch_ids)
    lengths_B = torch.tensor([len(ids) for ids in batch_ids], device=device)
    L = int(lengths_B.max())
    capacity = L + max_new_tokens
    pad_id = 0 if eos_id is None else eos_id
    input_BL = torch.full((B, L), pad_id, dtype=torch.long, device=device)
    for r, ids in enumerate(batch_ids):
        input_BL[r, L - len(ids) :] = torch.tensor(ids, dtype=torch.long)
    pad_B = L - lengths_B
    positions_BL = (torch.arange(L, device=device)[None, :] - pad_B[:, None]).clamp_(min=0)
    # key padding mask over every cache slot: True for real prompt tokens and, once written, generated ones
    mask_BS = torch.zeros(B, capacity, dtype=torch.bool, device=device)
    mask_BS[:, :L] = torch.arange(L, device=device)[None, :] >= pad_B[:, None]
    cache = KVCache.empty(model.config, B, capacity, device=device, dtype=dtype)
    if static_step is not None:  # one compiled graph for every cache size
        for buffer in cache.keys + cache.values:
            torch._dynamo.mark_dynamic(buffer, 2)
    logits_BV = model(
        input_BL, positions=positions_BL, cache=cache, key_padding_mask=mask_BS[:, :L], logits_to_keep=1
    ).logits[:, -1]

    greedy_in_graph = static_step is not None and temperature == 0  # the step returns tokens (argmax in the graph)
    tokens_B = None
    out: list[list[int]] = [[] for _ in range(B)]
    reasons: list[str] = ["length"] * B
    done = [r >= B - n_padding for r in range(B)]
    rows = list(range(B))  # batch row index of each row still in the cache
    for step in range(max_new_tokens):
        u_B = uniforms_RN[rows, step] if uniforms_RN is not None else None
        next_B = tokens_B if tokens_B is not None else next_tokens(logits_BV, temperature, top_p, u_B)
        keep = []
        for j, token in enumerate(next_B.tolist()):
            r = rows[j]
            if done[r]:  # static decoding keeps finished (and filler) rows in the batch
                continue
            if eos_id is not None and token == eos_id:
                reasons[r], done[r] = "eos", True
                continue
            out[r].append(token)
            if checker.hit(out[r]):
                reasons[r], done[r] = "stop", True
                continue
            keep.append(j)
        if not keep or step + 1 == max_new_tokens:
            break
        # drop finished rows: they cost nothing from now on. Compiled, the batch shrinks by powers of two
        # (each size compiles once), finished rows filling it up; eager, to exactly the running rows.
        size = len(keep) if static_step is None else 1 << (len(keep) - 1).bit_length()
        if size < len(rows):
            kept = set(keep)
            keep_t = torch.tensor(keep + [j for j in range(len(rows)) if j not in kept][: size - len(keep)], device=device)
            cache.select(keep_t)
            mask_BS, lengths_B, next_B = mask_BS[keep_t], lengths_B[keep_t], next_B[keep_t]
            rows = [rows[j] for j in keep_t.tolist()]
            if static_step is not None:
                for buffer in cache.keys + cache.values:
                    torch._dynamo.mark_dynamic(buffer, 2)
        slot = L + step
        mask_BS[:, slot] = True
        if static_step is None:
            logits_BV = model(
                next_B[:, None],
                positions=(lengths_B + step)[:, None],
                cache=cache,
                key_padding_mask=mask_BS[:, : slot + 1],
                logits_to_keep=1,
            ).logits[:, -1]
            continue
        attend_BS = mask_BS[:, : slot + 1]
        torch._dynamo.mark_dynamic(attend_BS, 1)
        if greedy_in_graph:
            tokens_B = static_step(next_B, lengths_B + step, cache, attend_BS, True)
        else:
            logits_BV = static_step(next_B, lengths_B + step, cache, attend_BS)
    return [(out[r], reasons[r]) for r in range(B - n_padding)]


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    stop: Sequence[str] = (),
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    sample_ids: Sequence[Hashable] | None = None,
    batch_size: int = 16,
    stop_at_eos: bool = True,
    max_length: int | None = None,
    progress: Callable[[int], None] | None = None,
    compile: bool = False,
) -> list[Generation]:
    """Generate a continuation for every prompt, in the order given.

    ``stop``: stop strings (the tokenizer's EOS string is added). ``temperature == 0`` is greedy.
    ``sample_ids`` (default ``0..n-1``) name each prompt's random stream: equal ``(seed, sample_id,
    prompt)`` give equal samples whatever the batching. ``stop_at_eos=False`` keeps generating after
    EOS (for benchmarks). Prompts are left-truncated to ``max_length - max_new_tokens`` tokens
    (``max_length`` defaults to the model's ``max_seq_len``). ``progress(n)`` is called with the number
    of prompts just finished.

    ``compile=True`` runs every decoding step through ``torch.compile`` with static shapes
    (:meth:`moelab.model.MoELM.decode_step`): the same tokens up to floating-point rounding, several
    times fewer kernel launches per step, at the price of a one-off compilation (seconds per batch
    size). Batches are padded to a fixed size; as rows finish the batch shrinks by halving.
    """
    check_sampling(max_new_tokens, temperature, top_p, batch_size)
    if sample_ids is None:
        sample_ids = range(len(prompts))
    if len(sample_ids) != len(prompts):
        raise ConfigError(f"got {len(sample_ids)} sample_ids for {len(prompts)} prompts; pass one per prompt")
    stop = stop_strings(stop, tokenizer)
    checker = _StopChecker(tokenizer, stop)
    room = max_prompt_len(model, max_new_tokens, max_length)
    encoded = [prompt_ids(tokenizer, p, room) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (-len(encoded[i]), i))  # longest first, like lm-eval
    results: list[Generation | None] = [None] * len(prompts)
    static_step = compiled_decode_step(model) if compile else None
    rows_per_batch = min(batch_size, len(prompts))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        uniforms = None if temperature == 0 else row_uniforms(seed, [sample_ids[i] for i in idx], max_new_tokens)
        n_padding = rows_per_batch - len(idx) if compile else 0  # compiled shapes: pad the last batch
        if uniforms is not None and n_padding:
            uniforms = torch.cat([uniforms, uniforms.new_zeros(n_padding, max_new_tokens)])
        decoded = _decode_batch(
            model,
            [encoded[i] for i in idx] + [[tokenizer.eos_id]] * n_padding,
            uniforms,
            static_step=static_step,
            n_padding=n_padding,
            max_new_tokens=max_new_tokens,
            eos_id=tokenizer.eos_id if stop_at_eos else None,
            checker=checker,
            temperature=temperature,
            top_p=top_p,
        )
        for i, (ids, reason) in zip(idx, decoded):
            results[i] = Generation(truncate_at_stop(tokenizer.decode(ids), stop), ids, reason)
        if progress is not None:
            progress(len(idx))
    return results  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------------------


@torch.inference_mode()
def generate_reference(
    model,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int,
    stop: Sequence[str] = (),
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    sample_id: Hashable = 0,
    stop_at_eos: bool = True,
) -> Generation:
    """The obviously-correct decoder :func:`generate` must match: one prompt, no KV cache, the whole
    sequence re-run every step, the whole generated text checked for stop strings every step."""
    check_sampling(max_new_tokens, temperature, top_p)
    stop = stop_strings(stop, tokenizer)
    device = next(model.parameters()).device
    ids = prompt_ids(tokenizer, prompt, max_prompt_len(model, max_new_tokens))
    uniforms = row_uniforms(seed, [sample_id], max_new_tokens) if temperature > 0 else None
    generated: list[int] = []
    reason = "length"
    for step in range(max_new_tokens):
        logits_V = model(torch.tensor([ids + generated], device=device)).logits[0, -1]
        u = uniforms[:, step] if uniforms is not None else None
        token = int(next_tokens(logits_V[None], temperature, top_p, u)[0])
        if stop_at_eos and token == tokenizer.eos_id:
            reason = "eos"
            break
        generated.append(token)
        if any(s in tokenizer.decode(generated) for s in stop):
            reason = "stop"
            break
    return Generation(truncate_at_stop(tokenizer.decode(generated), stop), generated, reason)
