"""Synthetic corpus: determinism, train/test separation, answer correctness, materialisation."""

import itertools
import json
import random
import re

import pytest

from moelab.data.config import SyntheticConfig
from moelab.data.reasoning import answer, document, draw_problem, problem_hash, question_text
from moelab.data.reasoning_check import CheckFailed, check_document, solve_question, split_document
from moelab.data.shards import ShardSet
from moelab.data.synthetic import (
    build_world,
    iter_documents,
    iter_tagged_documents,
    iter_validation_documents,
    materialize,
    memorization_test_set,
    reasoning_test_set,
)
from moelab.data.world import ATTRIBUTES, biography, qa_document
from moelab.errors import ConfigError

SMALL = SyntheticConfig(seed=3, n_entities=20, n_test_reasoning=10, min_ops=1, max_ops=3)


def take(it, n):
    return list(itertools.islice(it, n))


def test_same_seed_same_docs_and_test_sets():
    assert take(iter_documents(SMALL, seed=7), 300) == take(iter_documents(SMALL, seed=7), 300)
    assert memorization_test_set(SMALL) == memorization_test_set(SMALL.model_copy())
    assert reasoning_test_set(SMALL) == reasoning_test_set(SMALL.model_copy())


def test_different_seed_different_docs_and_world():
    assert take(iter_documents(SMALL, seed=7), 50) != take(iter_documents(SMALL, seed=8), 50)
    other = SMALL.model_copy(update={"seed": 4})
    assert build_world(SMALL).names != build_world(other).names
    assert reasoning_test_set(SMALL) != reasoning_test_set(other)
    assert memorization_test_set(SMALL) != memorization_test_set(other)


def test_world_names_unique_and_information_bits():
    world = build_world(SyntheticConfig(n_entities=500))
    assert len(set(world.names)) == 500
    assert all(len(n.split()) == 2 and n.split()[0][0].isupper() for n in world.names)
    expected = 500 * sum(__import__("math").log2(len(ATTRIBUTES[a]["values"])) for a in world.attributes)
    assert world.information_bits() == pytest.approx(expected)
    assert len(world.attributes) >= 4


def test_training_stream_contains_every_fact_each_epoch_in_all_forms():
    world = build_world(SMALL)
    units = 20 * len(world.attributes) * (SMALL.n_paraphrases + 1)
    mem = [t for k, t, _ in itertools.islice(iter_tagged_documents(SMALL, 0), 4 * units) if k == "memorization"]
    first_epoch = mem[:units]
    for fact in world.facts():
        assert qa_document(fact) in first_epoch
        for p in range(SMALL.n_paraphrases):
            assert biography(fact, p) in first_epoch
    # Next epoch has the same documents in a different order.
    assert sorted(mem[units : 2 * units]) == sorted(first_epoch) and mem[units : 2 * units] != first_epoch


def test_mixture_token_fraction_tracks_weight():
    cfg = SMALL.model_copy(update={"memorization_weight": 0.8})
    sizes = {"memorization": 0, "reasoning": 0}
    for kind, text, _ in itertools.islice(iter_tagged_documents(cfg, 1), 3000):
        sizes[kind] += len(text.encode()) + 1
    frac = sizes["memorization"] / sum(sizes.values())
    assert abs(frac - 0.8) < 0.01
    only_reasoning = SMALL.model_copy(update={"memorization_weight": 0.0})
    assert all(d.startswith("Question: Work modulo") for d in take(iter_documents(only_reasoning), 100))
    assert memorization_test_set(only_reasoning) == []


def test_memorization_test_set_format():
    items = memorization_test_set(SMALL)
    assert len(items) == 20 * len(SMALL.attributes)
    world = build_world(SMALL)
    for it in items:
        assert it["prompt"].startswith("Question: ") and it["prompt"].endswith("\nAnswer:")
        assert it["entity"] in it["prompt"]
        assert world.values[it["entity"]][it["attribute"]] == it["answer"]
    sub = memorization_test_set(SMALL.model_copy(update={"n_test_memorization": 7}))
    assert len(sub) == 7 and all(x in items for x in sub)


def test_reasoning_answers_correct_by_independent_checker():
    for item in reasoning_test_set(SMALL):
        doc = item["prompt"] + item["solution"]
        assert check_document(doc) == int(item["answer"])
        assert item["solution"].endswith(f"\n#### {item['answer']}")
    checked = 0
    for doc in take(iter_documents(SMALL, seed=5), 2000):
        if doc.startswith("Question: Work modulo"):
            check_document(doc)
            checked += 1
    assert checked > 200


def test_checker_rejects_wrong_answers_and_steps():
    p = draw_problem(random.Random(0), 3, 23)
    doc = document(p)
    right = answer(p)
    head, _, _ = doc.rpartition("#### ")
    with pytest.raises(CheckFailed):
        check_document(head + f"#### {(right + 1) % 23}")
    q, sol = split_document(doc)
    first_result = sol.split("\n")[0].rstrip(".").rsplit("= ", 1)
    bad_step = sol.replace(sol.split("\n")[0], first_result[0] + "= " + str((int(first_result[1]) + 1) % 23) + ".", 1)
    with pytest.raises(CheckFailed):
        check_document("Question: " + q + "\nAnswer:" + bad_step)
    assert solve_question(q) == right
    with pytest.raises(CheckFailed):
        solve_question(q.replace("Let", "Set", 1))


def test_checker_rejects_each_corrupted_field_of_a_step():
    # a step: "x = l op r, l = a, r = b, a op b = v, x = v." -- corrupting any one field is caught
    p = draw_problem(random.Random(2), 2, 23)
    q, sol = split_document(document(p))
    first, rest = sol.split("\n", 1)
    fields = re.split(r"(\w+)", first)
    check_document("Question: " + q + "\nAnswer:" + sol)
    for i, field in enumerate(fields):
        if not field.strip() or not field.strip().isalnum():
            continue
        other = str((int(field) + 1) % 23) if field.isdigit() else ("a" if field != "a" else "b")
        bad = "".join(fields[:i] + [other] + fields[i + 1:])
        with pytest.raises(CheckFailed):
            check_document("Question: " + q + "\nAnswer:" + bad + "\n" + rest)


def test_difficulty_equals_operations_and_all_are_needed():
    rng = random.Random(1)
    for n_ops in range(1, 9):
        p = draw_problem(rng, n_ops, 23)
        assert p.difficulty == n_ops
        used = {x for _, l, _, r in p.steps for x in (l, r)}
        defined = [g for g, _ in p.givens] + [s[0] for s in p.steps]
        assert set(defined) - used == {p.target}
    counts = {}
    for item in reasoning_test_set(SMALL):
        counts[item["difficulty"]] = counts.get(item["difficulty"], 0) + 1
    assert counts == {1: 10, 2: 10, 3: 10}


def test_test_problems_never_in_training_stream():
    # Force collisions: tiny modulus and one operation give a small problem space, so the raw
    # generator would reproduce test problems; the training stream must skip all of them.
    cfg = SyntheticConfig(seed=0, n_entities=5, min_ops=1, max_ops=1, modulus=2, operations=["+"],
                          n_test_reasoning=40, memorization_weight=0.0)
    test_hashes = {it["hash"] for it in reasoning_test_set(cfg)}
    rng = random.Random("probe")
    raw = {problem_hash(question_text(draw_problem(rng, 1, 2, ("+",)))) for _ in range(3000)}
    assert raw & test_hashes, "the probe should show the raw generator does hit test problems"
    for doc in take(iter_documents(cfg), 3000) + take(iter_validation_documents(cfg), 500):
        q, _ = split_document(doc)
        assert problem_hash(q) not in test_hashes
    default = SyntheticConfig(n_entities=5)
    test_default = {it["hash"] for it in reasoning_test_set(default)}
    for doc in take(iter_documents(default), 4000):
        if doc.startswith("Question: Work"):
            assert problem_hash(split_document(doc)[0]) not in test_default


def test_materialize_writes_corpus_and_test_facts_are_trained(tmp_path):
    out = tmp_path / "syn"
    summary = materialize(SMALL, "byte", out, n_tokens=60_000, seed=11)
    assert (out / "synthetic.json").is_file()
    on_disk = json.loads((out / "synthetic.json").read_text())
    assert on_disk["world"]["information_bits"] == pytest.approx(build_world(SMALL).information_bits())
    train, val = ShardSet.open(out / "train", verify=True), ShardSet.open(out / "val", verify=True)
    assert train.total_tokens == summary["train"]["tokens"] >= 60_000
    assert summary["train"]["memorization_tokens"] + summary["train"]["reasoning_tokens"] == train.total_tokens
    assert val.total_tokens == summary["val"]["tokens"] >= 3_000
    tok = train.tokenizer()
    ids = train.all_tokens().tolist()
    docs = _split_docs(ids, tok)
    assert docs[:50] == take(iter_documents(SMALL, seed=11), 50)
    text = "\n".join(docs)
    for item in memorization_test_set(SMALL):
        assert item["prompt"] + " " + item["answer"] in text
        bios = [biography(f, p) for f in build_world(SMALL).facts() if f.entity == item["entity"] and f.attribute == item["attribute"] for p in range(SMALL.n_paraphrases)]
        assert any(b in text for b in bios)
    for item in reasoning_test_set(SMALL):
        assert item["prompt"] not in text
    lines = (out / "test_reasoning.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == reasoning_test_set(SMALL)


def _split_docs(ids, tok):
    docs, cur = [], []
    for i in ids:
        if i == tok.eos_id:
            docs.append(tok.decode(cur))
            cur = []
        else:
            cur.append(i)
    return docs


def test_materialize_refuses_budget_that_misses_facts(tmp_path):
    with pytest.raises(ConfigError, match="covers only"):
        materialize(SMALL, "byte", tmp_path / "small", n_tokens=2_000)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="exactly one"):
        materialize(SMALL, "byte", tmp_path / "x")


@pytest.mark.parametrize("bad", [
    {"n_entities": 0}, {"min_ops": 4, "max_ops": 2}, {"modulus": 1}, {"memorization_weight": 1.5},
    {"attributes": ["height"]}, {"operations": ["/"]}, {"n_paraphrases": 9}, {"bogus": 1},
])
def test_invalid_synthetic_config_is_config_error(bad):
    with pytest.raises(ConfigError) as e:
        SyntheticConfig(**bad)
    msg = str(e.value)
    assert "\n" not in msg and "SyntheticConfig" in msg and "fix" in msg
    with pytest.raises(ConfigError):
        SyntheticConfig.model_validate(bad)


def test_tiny_problem_space_is_an_error_not_a_hang(monkeypatch):
    """When the test set exhausts the problem space, training-stream generation fails clearly."""
    import itertools

    import moelab.data.synthetic as synthetic
    from moelab.errors import ConfigError

    monkeypatch.setattr(synthetic, "test_problem_hashes", lambda cfg: _all_hashes())
    monkeypatch.setattr(synthetic, "problem_hash", lambda q: "same")
    cfg = synthetic.SyntheticConfig(memorization_weight=0.0, min_ops=1, max_ops=1)
    with pytest.raises(ConfigError, match="problem space is too small"):
        list(itertools.islice(synthetic.iter_documents(cfg, 0), 5))


def _all_hashes():
    return frozenset({"same"})
