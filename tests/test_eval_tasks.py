"""Task interface, registry, file errors, and per-task scoring on hand-made documents."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from moelab.errors import ConfigError, DataError
from moelab.eval.tasks import GenerationRequest, LoglikelihoodRequest, get_task, list_tasks
from moelab.eval.tasks.fewshot import sample_fewshot
from moelab.eval.tasks.hellaswag import preprocess, process_doc


def _write(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _gsm_docs(n, offset=0):
    return [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(offset, offset + n)]


@pytest.fixture
def gsm_dir(tmp_path):
    _write(tmp_path / "gsm8k" / "train.jsonl", _gsm_docs(10, offset=100))
    _write(tmp_path / "gsm8k" / "test.jsonl", _gsm_docs(3))
    return tmp_path


# ---- registry and errors ------------------------------------------------------------------------


def test_registry_lists_all_tasks():
    assert list_tasks() == sorted(
        ["gsm8k", "gsm_plus", "triviaqa", "hellaswag", "synthetic-memorization", "synthetic-reasoning"]
    )


def test_unknown_task_lists_known_ones():
    with pytest.raises(ConfigError) as err:
        get_task("mmlu")
    message = str(err.value)
    assert "mmlu" in message and all(name in message for name in list_tasks())
    assert "\n" not in message


def test_missing_file_names_full_path_and_fix(tmp_path):
    task = get_task("gsm8k", data_dir=tmp_path)
    with pytest.raises(DataError) as err:
        task.load_docs()
    message = str(err.value)
    assert str((tmp_path / "gsm8k" / "test.jsonl").resolve()) in message
    assert "MOELAB_DATA" in message and "data_dir" in message


def test_data_dir_defaults_to_env(monkeypatch, gsm_dir):
    monkeypatch.setenv("MOELAB_DATA", str(gsm_dir))
    assert len(get_task("gsm8k").load_docs()) == 3


def test_malformed_line_reports_path_and_line(gsm_dir):
    path = _write(gsm_dir / "gsm8k" / "test.jsonl", [_gsm_docs(1)[0], "", '{"question": "x", "answer"'])
    with pytest.raises(DataError, match=rf"^{path}:3: invalid JSON"):
        get_task("gsm8k", data_dir=gsm_dir).load_docs()


def test_missing_field_reports_path_and_line(gsm_dir):
    path = _write(gsm_dir / "gsm8k" / "test.jsonl", [_gsm_docs(1)[0], {"question": "no answer"}])
    with pytest.raises(DataError, match=rf"^{path}:2: missing field\(s\) answer"):
        get_task("gsm8k", data_dir=gsm_dir).load_docs()


def test_empty_dataset_is_a_clear_error(gsm_dir):
    _write(gsm_dir / "gsm8k" / "test.jsonl", ["", "   "])
    with pytest.raises(DataError, match="holds no records"):
        get_task("gsm8k", data_dir=gsm_dir).load_docs()
    with pytest.raises(DataError, match="empty"):
        get_task("synthetic-memorization", docs=[])


def test_bad_task_arguments_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="synthetic-memorization"):
        get_task("synthetic-memorization")  # docs= is required
    with pytest.raises(ConfigError):
        get_task("gsm8k", data_dir=tmp_path, num_fewshot=-1)


def test_too_few_fewshot_docs_is_a_clear_error(gsm_dir):
    task = get_task("gsm8k", data_dir=gsm_dir, num_fewshot=11)
    with pytest.raises(ConfigError, match="pool of at least 11"):
        task.fewshot_context(task.load_docs()[0])


# ---- prompts and few-shot sampling ---------------------------------------------------------------


def test_gsm8k_prompt_layout_and_request(gsm_dir):
    task = get_task("gsm8k", data_dir=gsm_dir, num_fewshot=2)
    doc = task.load_docs(limit=1)[0]
    prompt = task.fewshot_context(doc, seed=1234)
    shots = random.Random(1234).sample(task.fewshot_docs(), 2)
    expected = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
    assert prompt == expected + "Question: What is 0 + 1?\nAnswer:"
    request = task.request(doc)
    assert request == GenerationRequest(prompt=prompt, stop=("Question:", "</s>", "<|im_end|>"), max_new_tokens=256)
    assert task.answer_text(doc) == " 0 + 1 = 1\n#### 1"
    assert get_task("gsm8k", data_dir=gsm_dir).num_fewshot == 4


def test_prompts_share_one_generator_across_docs(gsm_dir):
    task = get_task("gsm8k", data_dir=gsm_dir, num_fewshot=3)
    docs = task.load_docs()
    rnd = random.Random(1234)
    assert task.prompts(docs) == [task.fewshot_context(d, rnd=rnd) for d in docs]
    assert task.prompts(docs)[1] != task.fewshot_context(docs[1], seed=1234)  # second doc: advanced generator
    assert [r.prompt for r in task.requests(docs)] == task.prompts(docs)


def test_sample_fewshot_excludes_eval_doc_like_lm_eval():
    pool = [{"i": i} for i in range(5)]
    for seed in range(20):
        shots = sample_fewshot(pool, 4, random.Random(seed), eval_doc=pool[2])
        assert len(shots) == 4 and pool[2] not in shots
        drawn = random.Random(seed).sample(pool, 5)
        assert shots == [d for d in drawn if d != pool[2]][:4]
    # duplicates of the evaluated doc: redraw from the pool without it
    dup = [{"i": 0}, {"i": 0}, {"i": 1}, {"i": 2}]
    for seed in range(20):
        shots = sample_fewshot(dup, 2, random.Random(seed), eval_doc={"i": 0})
        assert shots and len(shots) == 2 and {"i": 0} not in shots
    assert sample_fewshot(pool, 0, random.Random(0)) == []


# ---- GSM8K / GSM-Plus scoring --------------------------------------------------------------------


def test_gsm8k_score_truncates_at_stop_and_reports_both_filters(gsm_dir):
    task = get_task("gsm8k", data_dir=gsm_dir)
    doc = task.load_docs()[0]  # gold 1
    assert task.score(doc, " so 1.\n#### 1\n\nQuestion: What is 5 + 1?\nAnswer: #### 6") == {
        "exact_match,strict-match": 1.0,
        "exact_match,flexible-extract": 1.0,
    }
    assert task.score(doc, " it is 1 or maybe 2") == {"exact_match,strict-match": 0.0, "exact_match,flexible-extract": 0.0}
    assert task.vote_answer(doc, " #### 1,000.\nQuestion: #### 3") == "1000"
    assert task.vote_answer(doc, " #### $1,000") is None  # strict-match does not accept "$"
    assert task.vote_answer(doc, "no number") is None
    assert task.gold_answer(doc) == "1"


def _gsm_plus_record(i, ptype, answer):
    return {
        "question": f"Q{i}",
        "solution": f"steps {i}\n#### {answer}",
        "answer": answer,
        "perturbation_type": ptype,
        "seed_question": "s",
        "seed_solution": "s",
        "seed_answer": "1",
    }


def test_gsm_plus_reports_critical_thinking_separately(tmp_path):
    records = [
        _gsm_plus_record(0, "numerical substitution", "4"),
        _gsm_plus_record(1, "numerical substitution", "5"),
        _gsm_plus_record(2, "digit expansion", "1,200"),
        _gsm_plus_record(3, "critical thinking", "None"),
        _gsm_plus_record(4, "critical thinking", "None"),
    ]
    _write(tmp_path / "gsm_plus" / "testmini.jsonl", records)
    task = get_task("gsm_plus", data_dir=tmp_path, num_fewshot=2)
    docs = task.load_docs()
    assert task.num_fewshot == 2 and get_task("gsm_plus", data_dir=tmp_path).num_fewshot == 5
    for doc, prompt in zip(docs, task.prompts(docs)):
        assert prompt.count("Question:") == 3 and prompt.endswith(f"Question: {doc['question']}\nAnswer:")
        assert f"steps {doc['question'][1:]}\n" not in prompt  # the evaluated doc is never its own shot
    outputs = ["#### 4", "#### 6", "#### 1200", "#### None", "#### 0"]
    per_sample = [task.score(d, o) for d, o in zip(docs, outputs)]
    assert "exact_match,strict-match" not in per_sample[3]
    metrics = task.aggregate(per_sample)
    assert metrics["exact_match,strict-match"] == pytest.approx(2 / 3)
    assert metrics["exact_match,strict-match/numerical substitution"] == pytest.approx(1 / 2)
    assert metrics["exact_match,strict-match/digit expansion"] == 1.0
    assert metrics["critical_thinking_none"] == pytest.approx(1 / 2)
    assert metrics["lm_eval_exact_match,strict-match"] == pytest.approx(2 / 5)  # lm-eval: critical items always wrong
    assert metrics["n_samples"] == 5 and metrics["n_samples/critical thinking"] == 2
    assert task.vote_answer(docs[3], "#### None") == task.gold_answer(docs[3]) == "none"


# ---- TriviaQA ------------------------------------------------------------------------------------


def test_triviaqa_alias_matching_and_layouts(tmp_path):
    path = _write(
        tmp_path / "tq.jsonl",
        [
            {"question": "Capital of France", "answer": {"aliases": ["Paris", "Paree"], "normalized_aliases": ["paris", "paree"]}},
            {"question": "Band of Lennon", "answers": ["The Beatles", "Beatles"]},
            {"question": "Who wrote Hamlet", "answers": ["Shakespeare"]},
        ],
    )
    task = get_task("triviaqa", path=path, num_fewshot=1)
    docs = task.load_docs()
    assert task.doc_to_text(docs[0]) == "Question: Capital of France?\nAnswer:"
    assert task.request(docs[0]).stop == ("\n", ".", ",")
    assert task.score(docs[0], " PAREE, the city")["exact_match"] == 1.0
    assert task.score(docs[0], " Lyon")["exact_match"] == 0.0
    assert task.score(docs[1], " beatles.")["exact_match"] == 1.0
    assert task.score(docs[1], " the beatles!")["exact_match"] == 1.0
    assert task.vote_answer(docs[0], " Paree") == task.gold_answer(docs[0]) == "paris"
    assert task.answer_text(docs[2]) == " Shakespeare"
    prompt = task.fewshot_context(docs[0])
    assert prompt.endswith("\n\nQuestion: Capital of France?\nAnswer:") and "France?\nAnswer: Paris" not in prompt


def test_triviaqa_rejects_records_without_answers(tmp_path):
    path = _write(tmp_path / "tq.jsonl", [{"question": "q", "answers": []}])
    with pytest.raises(DataError, match=rf"^{path}:1: needs a non-empty"):
        get_task("triviaqa", path=path).load_docs()


# ---- HellaSwag -----------------------------------------------------------------------------------

RAW_HELLASWAG = {
    "ind": 4,
    "activity_label": "Baking cookies",
    "ctx_a": "A woman [title] mixes flour.  She",
    "ctx_b": "adds the eggs",
    "ctx": "A woman [title] mixes flour.  She adds the eggs",
    "endings": ["and stirs [step] slowly.", "a", "then  bakes them.", "leaves."],
    "label": "2",
}


def test_hellaswag_preprocessing_matches_lm_eval():
    utils = pytest.importorskip("lm_eval.tasks.hellaswag.utils", reason="lm-eval is not installed")
    texts = [" A [title] B [header] C  D ", "x [step] y", "plain", "Baking: a [title]  b"]
    for text in texts:
        assert preprocess(text) == utils.preprocess(text)
    datasets = pytest.importorskip("datasets")
    lm_doc = utils.process_docs(datasets.Dataset.from_list([RAW_HELLASWAG]))[0]
    ours = process_doc(RAW_HELLASWAG)
    assert {k: ours[k] for k in ("query", "choices", "gold")} == {k: lm_doc[k] for k in ("query", "choices", "gold")}


def test_hellaswag_request_acc_and_acc_norm(tmp_path):
    path = _write(tmp_path / "hs.jsonl", [RAW_HELLASWAG, {**RAW_HELLASWAG, "ind": 5, "label": 0}])
    task = get_task("hellaswag", path=path, num_fewshot=1)
    doc = task.load_docs()[0]
    assert doc["query"] == "Baking cookies: A woman. mixes flour. She Adds the eggs"
    request = task.request(doc)
    assert isinstance(request, LoglikelihoodRequest)
    assert request.continuations == (" and stirs slowly.", " a", " then bakes them.", " leaves.")
    assert request.context == (
        "Baking cookies: A woman. mixes flour. She Adds the eggs and stirs slowly.\n\n" + doc["query"]
    )
    # raw argmax picks the short "a"; per-character normalisation picks the gold (index 2)
    lls = [-30.0, -2.0, -10.0, -9.0]
    assert task.score(doc, lls) == {"acc": 0.0, "acc_norm": 1.0}
    assert task.score(doc, [-9.0, -9.0, -1.0, -9.0]) == {"acc": 1.0, "acc_norm": 1.0}
    with pytest.raises(ConfigError):
        task.score(doc, [-1.0, -2.0])
    assert task.answer_text(doc) == " then bakes them."


def test_hellaswag_rejects_unlabelled_records(tmp_path):
    path = _write(tmp_path / "hs.jsonl", [{**RAW_HELLASWAG, "label": ""}])
    with pytest.raises(DataError, match=rf"^{path}:1: label must be an ending index"):
        get_task("hellaswag", path=path).load_docs()


# ---- synthetic tasks -----------------------------------------------------------------------------


def test_synthetic_memorization_scores_first_line():
    docs = [
        {"prompt": "Question: What is the capital of Zorbia?\nAnswer:", "answer": "Quelport"},
        {"prompt": "Question: Who founded Vemra?\nAnswer:", "answer": " Ada Tollen"},
    ]
    task = get_task("synthetic-memorization", docs=docs)
    assert task.request(docs[0]) == GenerationRequest(prompt=docs[0]["prompt"], stop=("\n",), max_new_tokens=64)
    assert task.score(docs[0], " Quelport \nQuestion: more")["exact_match"] == 1.0
    assert task.score(docs[0], " quelport")["exact_match"] == 0.0  # memorised strings are exact
    assert task.score(docs[1], "Ada Tollen")["exact_match"] == 1.0
    assert task.answer_text(docs[1]) == " Ada Tollen"
    assert task.aggregate([task.score(d, " Quelport") for d in docs]) == {"exact_match": 0.5, "n_samples": 2.0}


def test_synthetic_reasoning_strict_answer_per_difficulty():
    docs = [
        {"prompt": "Question: 2+3?\nAnswer:", "answer": "5", "solution": "2+3=5\n#### 5", "difficulty": 1},
        {"prompt": "Question: (2+3)*4?\nAnswer:", "answer": "20", "solution": "2+3=5\n5*4=20\n#### 20", "difficulty": 2},
        {"prompt": "Question: 10*100?\nAnswer:", "answer": "#### 1000", "difficulty": 2},
    ]
    task = get_task("synthetic-reasoning", docs=docs)
    assert task.request(docs[0]).stop == ("Question:", "\n\n")
    outputs = [" 2+3=5\n#### 5\n\nQuestion: 1+1?\nAnswer: #### 2", " 2+3=5 so 20", " #### 1,000"]
    per_sample = [task.score(d, o) for d, o in zip(docs, outputs)]
    assert [s["exact_match"] for s in per_sample] == [1.0, 0.0, 1.0]
    metrics = task.aggregate(per_sample)
    assert metrics["exact_match/difficulty=1"] == 1.0
    assert metrics["exact_match/difficulty=2"] == 0.5
    assert task.answer_text(docs[1]) == " 2+3=5\n5*4=20\n#### 20"
    assert task.vote_answer(docs[2], " #### 1,000") == task.gold_answer(docs[2]) == "1000"
    assert task.vote_answer(docs[1], outputs[1]) is None


def test_synthetic_docs_are_validated():
    with pytest.raises(DataError, match="doc 1 needs"):
        get_task("synthetic-reasoning", docs=[{"prompt": "p", "answer": "1"}, {"question": "q"}])


def test_non_utf8_file_reports_path(gsm_dir):
    path = gsm_dir / "gsm8k" / "test.jsonl"
    path.write_bytes(b'{"question": "q", "answer": "#### 1"}\n{"question": "\xff\xfe", "answer": "#### 2"}\n')
    with pytest.raises(DataError, match=rf"^{path}:\d+: not valid UTF-8"):
        get_task("gsm8k", data_dir=gsm_dir).load_docs()
