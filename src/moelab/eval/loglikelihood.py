"""Log-likelihood scoring of continuations and of whole texts (rolling windows), as lm-eval 0.4 does.

Tokenisation (lm-eval ``TemplateLM.loglikelihood`` / ``_encode_pair`` for causal models): trailing
whitespace of the context is moved to the front of the continuation; then
``whole = encode(context + continuation)``, ``ctx = encode(context)`` and the continuation tokens are
``whole[len(ctx):]``. An empty context is replaced by the prefix token (EOS), unless the continuation
already starts with it.

Scoring (lm-eval ``_loglikelihood_tokens``): the model input is ``(ctx + cont)[-(max_length + 1):][:-1]``
(left-truncated to the context window), and the result is ``sum log p(cont_i | everything before)`` in
nats plus ``is_greedy`` (every continuation token is the argmax). Requests are sorted by length and
batched with LEFT padding (positions and key padding mask as in generation), so every row's continuation
ends at the last position and only ``max(len(cont))`` positions per batch need logits.

Rolling log-likelihood (perplexity): lm-eval's ``get_rolling_token_windows`` with ``context_len=1`` and
``make_disjoint_window``: the text is cut into windows of at most ``max_length`` predicted tokens, the
first conditioned on EOS, each next one on the preceding tokens; the sum covers every token once.
"""

from __future__ import annotations

from typing import Callable, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError

#: Upper bound on the fp32 logits held at once (bytes); batches are split to stay below it.
LOGITS_BUDGET_BYTES = 512 * 2**20


class ContinuationScore(NamedTuple):
    """``logprob``: summed log-probability (nats) of the continuation tokens; ``is_greedy``: all of them
    are the argmax; ``n_tokens``: how many tokens were scored."""

    logprob: float
    is_greedy: bool
    n_tokens: int


class RollingScore(NamedTuple):
    """Summed log-probability (nats) of every token of a text and the number of tokens."""

    logprob: float
    n_tokens: int


def move_trailing_whitespace(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval moves the context's trailing whitespace to the start of the continuation."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        return context[:-n_spaces], context[-n_spaces:] + continuation
    return context, continuation


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids exactly as lm-eval's causal HF model makes them."""
    if context == "":
        cont = tokenizer.encode(continuation)
        prefix = tokenizer.eos_id
        if cont and cont[0] == prefix:
            return cont[:1], cont[1:]
        return [prefix], cont
    context, continuation = move_trailing_whitespace(context, continuation)
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx) :]


def _max_length(model, max_length: int | None) -> int:
    return model.config.max_seq_len if max_length is None else max_length


@torch.inference_mode()
def score_tokens(
    model,
    requests: Sequence[tuple[list[int], list[int]]],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[ContinuationScore]:
    """Score ``(context_ids, continuation_ids)`` pairs; results in request order.

    ``max_length`` defaults to the model's ``max_seq_len``. Raises :class:`ConfigError` for an empty
    context or continuation, or a continuation longer than ``max_length``.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    max_len = _max_length(model, max_length)
    inputs, conts = [], []
    for ctx, cont in requests:
        if not ctx or not cont:
            raise ConfigError("log-likelihood needs a non-empty context and continuation; check the request texts")
        if len(cont) > max_len:
            raise ConfigError(
                f"continuation of {len(cont)} tokens exceeds the model context of {max_len} tokens; "
                "lm-eval cannot score it either: shorten it or use a model with a longer context"
            )
        inputs.append((ctx + cont)[-(max_len + 1) :][:-1])
        conts.append(cont)
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    order = sorted(range(len(inputs)), key=lambda i: (-len(inputs[i]), i))
    results: list[ContinuationScore | None] = [None] * len(inputs)
    start = 0
    while start < len(order):
        # rows sorted by input length; shrink the batch if the kept logits would be too large
        n = min(batch_size, len(order) - start)
        while n > 1 and n * max(len(conts[i]) for i in order[start : start + n]) * vocab * 4 > LOGITS_BUDGET_BYTES:
            n //= 2
        idx = order[start : start + n]
        start += n
        L = len(inputs[idx[0]])
        keep = max(len(conts[i]) for i in idx)
        input_BL = torch.zeros(n, L, dtype=torch.long)
        mask_BL = torch.zeros(n, L, dtype=torch.bool)
        for r, i in enumerate(idx):
            input_BL[r, L - len(inputs[i]) :] = torch.tensor(inputs[i], dtype=torch.long)
            mask_BL[r, L - len(inputs[i]) :] = True
        pad_B = (~mask_BL).sum(1)
        positions_BL = (torch.arange(L)[None, :] - pad_B[:, None]).clamp_(min=0)
        logits_BKV = model(
            input_BL.to(device), positions=positions_BL.to(device), key_padding_mask=mask_BL.to(device), logits_to_keep=keep
        ).logits
        logprobs_BKV = F.log_softmax(logits_BKV.float(), dim=-1)
        greedy_BK = logprobs_BKV.argmax(dim=-1).cpu()
        for r, i in enumerate(idx):
            cont_t = torch.tensor(conts[i], dtype=torch.long)
            k = len(conts[i])
            lp = logprobs_BKV[r, keep - k :].gather(1, cont_t.to(device)[:, None]).squeeze(1)
            results[i] = ContinuationScore(float(lp.sum()), bool((greedy_BK[r, keep - k :] == cont_t).all()), k)
        if progress is not None:
            progress(n)
    return results  # type: ignore[return-value]


def loglikelihood(
    model,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    progress: Callable[[int], None] | None = None,
    chunk_long_continuations: bool = False,
) -> list[ContinuationScore]:
    """``log p(continuation | context)`` for each ``(context, continuation)`` text pair (lm-eval semantics).

    ``chunk_long_continuations``: a continuation longer than the context window (``max_length``) is
    scored in consecutive chunks of ``max_length`` tokens, each conditioned on the (left-truncated)
    context and the chunks before it, and the scores are summed -- for answer-only task loss on long
    gold answers. Without it, a continuation must fit in the window, as in lm-eval.
    """
    max_len = _max_length(model, max_length)
    requests, owner = [], []
    for p, (ctx_text, cont_text) in enumerate(pairs):
        ctx, cont = encode_pair(tokenizer, ctx_text, cont_text)
        if not cont:
            raise ConfigError(f"continuation {cont_text!r} has no tokens after context {ctx_text[-40:]!r}; it cannot be scored")
        step = max_len if chunk_long_continuations else len(cont)
        for start in range(0, len(cont), step):
            requests.append((ctx + cont[:start], cont[start : start + step]))
            owner.append(p)
    if len(requests) == len(pairs):  # one request per pair: the scores are the answer
        return score_tokens(model, requests, batch_size=batch_size, max_length=max_len, progress=progress)
    scores = score_tokens(model, requests, batch_size=batch_size, max_length=max_len)
    totals: list[list] = [[0.0, True, 0] for _ in pairs]
    for p, s in zip(owner, scores):
        totals[p][0] += s.logprob
        totals[p][1] = totals[p][1] and s.is_greedy
        totals[p][2] += s.n_tokens
    if progress is not None:
        progress(len(pairs))
    return [ContinuationScore(lp, greedy, n) for lp, greedy, n in totals]


def rolling_windows(tokens: list[int], prefix_token: int, max_seq_len: int, context_len: int = 1) -> Iterator[tuple[list[int], list[int]]]:
    """lm-eval's ``get_rolling_token_windows`` followed by ``make_disjoint_window``:
    ``(context, continuation)`` token windows whose continuations cover ``tokens`` exactly once."""
    if not 1 <= context_len <= max_seq_len:
        raise ConfigError(f"context_len must be in [1, {max_seq_len}], got {context_len}")
    if not tokens:
        return
    pred_len = max_seq_len - context_len + 1
    first = min(max_seq_len, len(tokens))
    windows = [([prefix_token] + tokens[: first - 1], tokens[:first])]
    predicted = first
    while predicted < len(tokens):
        n = min(len(tokens) - predicted, pred_len)
        end = predicted + n
        windows.append((tokens[end - max_seq_len - 1 : end - 1], tokens[end - n : end]))
        predicted += n
    for ctx, cont in windows:
        yield ctx[: len(ctx) - (len(cont) - 1)], cont


def loglikelihood_rolling(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[RollingScore]:
    """Total log-probability of each text (every token scored once, first one given EOS)."""
    max_len = _max_length(model, max_length)
    requests, owner = [], []
    for t, text in enumerate(texts):
        for window in rolling_windows(tokenizer.encode(text), tokenizer.eos_id, max_len):
            requests.append(window)
            owner.append(t)
    scores = score_tokens(model, requests, batch_size=batch_size, max_length=max_len)
    totals = [0.0] * len(texts)
    counts = [0] * len(texts)
    for t, s in zip(owner, scores):
        totals[t] += s.logprob
        counts[t] += s.n_tokens
    if progress is not None:
        progress(len(texts))
    return [RollingScore(lp, n) for lp, n in zip(totals, counts)]
