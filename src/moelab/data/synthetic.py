"""The synthetic corpus that separates memorisation from reasoning.

Two kinds of training documents are interleaved:

* **memorisation** — facts about the people of a :class:`~moelab.data.world.World`: every fact as
  ``n_paraphrases`` biography sentences plus (if ``qa_in_training``) its QA pair
  ``"Question: What is the birth year of X?\\nAnswer: 1923"``. One *epoch* is all these units in a
  seeded shuffled order; epochs repeat forever, each shuffled anew. The QA form is trained on so that
  a tiny model learns the answer format; the memorisation test then measures recall of the values.
* **reasoning** — modular arithmetic problems (:mod:`moelab.data.reasoning`), difficulty uniform in
  ``[min_ops, max_ops]``, drawn from an unlimited seeded stream.

Token fractions: the stream picks, before each document, the kind whose emitted size divided by its
weight is smallest (sizes in UTF-8 bytes + 1 for eos, i.e. byte-tokenizer tokens), so the memorisation
share of tokens tracks ``memorization_weight`` within one document at every prefix.

Test sets (functions of ``cfg`` only, never of the stream seed):

* ``memorization_test_set`` — QA prompts about facts of the world, all of which are trained on (every
  fact appears once per memorisation epoch; :func:`materialize` refuses a budget below one epoch).
  ``answer`` is the bare value (``"1923"``); the trained continuation of ``prompt`` is ``" " + answer``,
  so compare after ``strip()``. Empty when ``memorization_weight == 0`` (nothing is trained).
* ``reasoning_test_set`` — ``n_test_reasoning`` distinct problems per difficulty from a separate seed
  stream. Training and validation streams skip every problem whose canonical-question hash
  (:func:`~moelab.data.reasoning.problem_hash`) is in the test set, so no test problem is ever trained
  on verbatim. (Problems equal up to renaming variables are *not* excluded.)

Validation (``materialize``'s ``val/``) mixes fresh reasoning problems (own seed stream, test problems
excluded, not guaranteed disjoint from training) with memorisation documents of the same world —
these necessarily repeat trained facts, so memorisation validation loss measures recall, not
generalisation.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import ConfigError
from ..io import atomic_write_json, atomic_write_text
from .atomic_dir import atomic_dir
from .config import SyntheticConfig
from .reasoning import document, draw_problem, problem_hash, prompt_text, question_text, solution_text, answer
from .shards import DEFAULT_SHARD_TOKENS, write_shards
from .tokenizer import Tokenizer, load_tokenizer
from .world import ATTRIBUTES, World, biography, qa_document, qa_prompt

__all__ = [
    "SyntheticConfig", "build_world", "memorization_test_set", "reasoning_test_set",
    "iter_documents", "iter_validation_documents", "iter_tagged_documents", "materialize",
]

MEMORIZATION, REASONING = "memorization", "reasoning"


def build_world(cfg: SyntheticConfig) -> World:
    """The world of ``cfg`` (a pure function of ``cfg.seed``, ``n_entities`` and ``attributes``)."""
    return World(cfg.seed, cfg.n_entities, cfg.attributes)


# ---------------------------------------------------------------- test sets


def memorization_test_set(cfg: SyntheticConfig) -> list[dict]:
    """QA items ``{prompt, answer, entity, attribute}`` about trained facts (all, or a seeded sample)."""
    if cfg.memorization_weight == 0:
        return []
    facts = build_world(cfg).facts()
    if cfg.n_test_memorization is not None and cfg.n_test_memorization < len(facts):
        facts = random.Random(f"{cfg.seed}:memorization-test").sample(facts, cfg.n_test_memorization)
    return [
        {"prompt": qa_prompt(f.entity, f.attribute), "answer": f.value, "entity": f.entity, "attribute": f.attribute}
        for f in facts
    ]


def reasoning_test_set(cfg: SyntheticConfig) -> list[dict]:
    """Items ``{prompt, answer, difficulty, solution, question, hash}``, ``n_test_reasoning`` per difficulty.

    ``answer`` is the decimal string after ``####``; ``solution`` is the reference continuation of
    ``prompt`` (it starts with a space and ends with ``#### <answer>``).
    """
    items = []
    for d in range(cfg.min_ops, cfg.max_ops + 1):
        rng = random.Random(f"{cfg.seed}:reasoning-test:{d}")
        seen: set[str] = set()
        attempts = 0
        while len(seen) < cfg.n_test_reasoning:
            attempts += 1
            if attempts > 100 * cfg.n_test_reasoning + 1000:
                raise ConfigError(f"cannot draw {cfg.n_test_reasoning} distinct test problems of difficulty {d} mod {cfg.modulus}; lower n_test_reasoning or raise modulus")
            p = draw_problem(rng, d, cfg.modulus, tuple(cfg.operations))
            h = problem_hash(question_text(p))
            if h in seen:
                continue
            seen.add(h)
            items.append({"prompt": prompt_text(p), "answer": str(answer(p)), "difficulty": d,
                          "solution": solution_text(p), "question": question_text(p), "hash": h})
    return items


def test_problem_hashes(cfg: SyntheticConfig) -> frozenset[str]:
    return frozenset(item["hash"] for item in reasoning_test_set(cfg))


# ---------------------------------------------------------------- streams


def memorization_units(world: World, cfg: SyntheticConfig) -> list[tuple[int, str]]:
    """One epoch of memorisation documents as ``(fact_index, text)``, in canonical (unshuffled) order."""
    units = []
    for i, fact in enumerate(world.facts()):
        units += [(i, biography(fact, k)) for k in range(cfg.n_paraphrases)]
        if cfg.qa_in_training:
            units.append((i, qa_document(fact)))
    return units


def _memorization_stream(units: list[tuple[int, str]], key: str) -> Iterator[tuple[str, int]]:
    epoch = 0
    while True:
        order = list(range(len(units)))
        random.Random(f"{key}:epoch:{epoch}").shuffle(order)
        for j in order:
            fact_index, text = units[j]
            yield text, fact_index
        epoch += 1


MAX_EXCLUDED_IN_A_ROW = 10_000


def _reasoning_stream(cfg: SyntheticConfig, key: str, exclude: frozenset[str]) -> Iterator[tuple[str, int]]:
    rng = random.Random(key)
    ops = tuple(cfg.operations)
    excluded_in_a_row = 0
    while True:
        p = draw_problem(rng, rng.randint(cfg.min_ops, cfg.max_ops), cfg.modulus, ops)
        if problem_hash(question_text(p)) in exclude:
            excluded_in_a_row += 1
            if excluded_in_a_row >= MAX_EXCLUDED_IN_A_ROW:  # the test set has used up the problem space
                raise ConfigError(
                    f"{MAX_EXCLUDED_IN_A_ROW} reasoning problems in a row were test problems: the problem space is too small "
                    "for the test set; raise modulus or max_ops, add operations, or lower n_test_reasoning"
                )
            continue
        excluded_in_a_row = 0
        yield document(p), p.difficulty


def iter_tagged_documents(cfg: SyntheticConfig, seed: int | None = None, split: str = "train") -> Iterator[tuple[str, str, int]]:
    """Endless ``(kind, text, info)``: kind is ``"memorization"`` (info = fact index) or ``"reasoning"`` (info = difficulty).

    ``split`` is ``"train"`` or ``"val"`` (independent seed streams); ``seed`` defaults to ``cfg.seed``.
    """
    if split not in ("train", "val"):
        raise ConfigError(f"split={split!r} must be 'train' or 'val'")
    seed = cfg.seed if seed is None else seed
    w = cfg.memorization_weight
    mem = _memorization_stream(memorization_units(build_world(cfg), cfg), f"{seed}:{split}:memorization") if w > 0 else None
    rea = _reasoning_stream(cfg, f"{seed}:{split}:reasoning", test_problem_hashes(cfg)) if w < 1 else None
    size = {MEMORIZATION: 0, REASONING: 0}
    while True:
        if rea is None or (mem is not None and size[MEMORIZATION] / w <= size[REASONING] / (1 - w)):
            kind, (text, info) = MEMORIZATION, next(mem)
        else:
            kind, (text, info) = REASONING, next(rea)
        size[kind] += len(text.encode("utf-8")) + 1
        yield kind, text, info


def iter_documents(cfg: SyntheticConfig, seed: int | None = None) -> Iterator[str]:
    """Endless deterministic training documents (strings without eos) for stream ``seed`` (default ``cfg.seed``)."""
    for _, text, _ in iter_tagged_documents(cfg, seed, "train"):
        yield text


def iter_validation_documents(cfg: SyntheticConfig, seed: int | None = None) -> Iterator[str]:
    """Endless validation documents: same world and mixture, independent streams (see module docstring)."""
    for _, text, _ in iter_tagged_documents(cfg, seed, "val"):
        yield text


# ---------------------------------------------------------------- materialisation


def _budgeted(tagged: Iterator[tuple[str, str, int]], tok: Tokenizer, n_tokens: int | None, n_docs: int | None, stats: dict) -> Iterator[list[int]]:
    """Encode documents until ``n_tokens`` (eos included) or ``n_docs`` is reached, filling ``stats``."""
    covered: set[int] = set()
    for kind, text, info in tagged:
        if (n_tokens is not None and stats["tokens"] >= n_tokens) or (n_docs is not None and stats["documents"] >= n_docs):
            break
        ids = tok.encode(text)
        stats["tokens"] += len(ids) + 1
        stats["documents"] += 1
        stats[f"{kind}_tokens"] += len(ids) + 1
        stats[f"{kind}_documents"] += 1
        if kind == MEMORIZATION:
            covered.add(info)
        yield ids
    stats["facts_covered"] = len(covered)


def _new_stats() -> dict:
    return {"tokens": 0, "documents": 0, "memorization_tokens": 0, "memorization_documents": 0,
            "reasoning_tokens": 0, "reasoning_documents": 0}


def materialize(
    cfg: SyntheticConfig,
    tokenizer: Tokenizer | str,
    out_dir: str | Path,
    n_tokens: int | None = None,
    n_docs: int | None = None,
    seed: int | None = None,
    val_fraction: float = 0.05,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    overwrite: bool = False,
    on_document: Callable[[int], None] | None = None,
) -> dict:
    """Write the corpus to ``out_dir`` atomically and return the ``synthetic.json`` summary.

    Layout: ``train/`` and ``val/`` shard directories, ``test_memorization.jsonl``,
    ``test_reasoning.jsonl`` and ``synthetic.json`` (config, world size, information bits, token
    counts per split and kind). Give exactly one of ``n_tokens`` (training tokens incl. eos; the last
    document may overshoot) or ``n_docs``. Validation gets ``ceil(val_fraction * budget)`` of the same
    unit. Raises ``ConfigError`` if the training budget does not cover every fact at least once.
    """
    if (n_tokens is None) == (n_docs is None):
        raise ConfigError("give exactly one of n_tokens or n_docs for the synthetic corpus (e.g. --tokens 2000000)")
    budget = n_tokens if n_tokens is not None else n_docs
    if not isinstance(budget, int) or budget < 1:
        raise ConfigError(f"corpus size {budget!r} must be a positive integer")
    if not 0 < val_fraction <= 1:
        raise ConfigError(f"val_fraction={val_fraction} must be in (0, 1]")
    tok = load_tokenizer(tokenizer)
    seed = cfg.seed if seed is None else seed
    world = build_world(cfg)
    units = memorization_units(world, cfg)
    n_val = math.ceil(budget * val_fraction)
    train, val = _new_stats(), _new_stats()
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_shards(_budgeted(iter_tagged_documents(cfg, seed, "train"), tok, n_tokens, n_docs, train), tok, tmp / "train",
                     shard_tokens=shard_tokens, meta={"synthetic": "train"}, on_document=on_document)
        if cfg.memorization_weight > 0 and train["facts_covered"] < len(world.facts()):
            epoch_tokens = sum(len(tok.encode(t)) + 1 for _, t in units)
            need = math.ceil(epoch_tokens / cfg.memorization_weight * 1.05)
            raise ConfigError(f"the training budget covers only {train['facts_covered']} of {len(world.facts())} facts; "
                              f"use at least ~{need} tokens or fewer entities/paraphrases")
        write_shards(_budgeted(iter_tagged_documents(cfg, seed, "val"), tok, n_val if n_tokens else None,
                               n_val if n_docs else None, val), tok, tmp / "val",
                     shard_tokens=shard_tokens, meta={"synthetic": "val"})
        mem_test, rea_test = memorization_test_set(cfg), reasoning_test_set(cfg)
        atomic_write_text(tmp / "test_memorization.jsonl", "".join(json.dumps(x) + "\n" for x in mem_test))
        atomic_write_text(tmp / "test_reasoning.jsonl", "".join(json.dumps(x) + "\n" for x in rea_test))
        for stats in (train, val):
            stats["memorization_epochs"] = stats["memorization_documents"] / len(units) if units else 0.0
        summary = {
            "format": "moelab-synthetic",
            "version": 1,
            "config": cfg.model_dump(),
            "stream_seed": seed,
            "tokenizer": tok.descriptor(),
            "world": {
                "n_entities": len(world),
                "attributes": world.attributes,
                "value_set_sizes": {a: len(ATTRIBUTES[a]["values"]) for a in world.attributes},
                "n_facts": len(world.facts()),
                "information_bits": world.information_bits(),
                "information_bits_counts": "sum over facts of log2(|value set|); names not counted",
                "memorization_units_per_epoch": len(units),
            },
            "train": train,
            "val": val,
            "test": {"memorization": len(mem_test), "reasoning": len(rea_test)},
        }
        atomic_write_json(tmp / "synthetic.json", summary)
    return summary
