"""Prompt and scoring parity with lm-eval 0.4's own task objects, built offline from its YAMLs.

Each lm-eval task YAML is copied to a temporary folder with ``dataset_path: json`` pointed at local
files, loaded with ``lm_eval.tasks.TaskManager``, seeded like ``simple_evaluate`` does
(``set_fewshot_seed(1234)``) and asked for ``fewshot_context`` doc after doc, in order. Our prompts
(``Task.prompts``, which shares one generator across docs as lm-eval does) must be identical.

GSM8K / GSM-Plus use the real files in ``$MOELAB_DATA`` (default ``<repo>/../shared/data``) and skip
when they are absent; TriviaQA / HellaSwag use small hand-made files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed; parity tests need it")
lm_eval_tasks = pytest.importorskip("lm_eval.tasks", reason="lm_eval.tasks is not importable")

from moelab.eval.tasks import get_task  # noqa: E402
from lm_eval_local import write_local_task  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MOELAB_DATA") or REPO.parent / "shared" / "data")
N_DOCS = 20


def _lm_eval_task(tmp: Path, yaml_rel: str, name: str, data_files: dict[str, str], **overrides):
    """lm-eval's task from its own YAML (via ``include``), reading ``data_files`` instead of the hub."""
    folder = write_local_task(tmp, yaml_rel, name, data_files, **overrides)
    manager = lm_eval_tasks.TaskManager(include_path=str(folder), include_defaults=False)
    task = manager.load([name])["tasks"][name]
    task.set_fewshot_seed(1234)
    return task


def _lm_eval_prompts(task, docs, num_fewshot):
    task.set_fewshot_seed(1234)
    return [task.fewshot_context(doc, num_fewshot) for doc in docs]


def _need(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"{path} not found; set MOELAB_DATA to the folder holding gsm8k/ and gsm_plus/")
    return path


@pytest.fixture(scope="module")
def lm_gsm8k(tmp_path_factory):
    folder = DATA / "gsm8k"
    files = {"train": str(_need(folder / "train.jsonl")), "test": str(_need(folder / "test.jsonl"))}
    return _lm_eval_task(tmp_path_factory.mktemp("lm"), "gsm8k/gsm8k.yaml", "moelab_gsm8k", files)


@pytest.fixture(scope="module")
def lm_gsm_plus(tmp_path_factory):
    files = {"testmini": str(_need(DATA / "gsm_plus" / "testmini.jsonl"))}
    return _lm_eval_task(tmp_path_factory.mktemp("lm"), "gsm_plus/gsm_plus_mini.yaml", "moelab_gsm_plus", files)


@pytest.mark.parametrize("num_fewshot", [0, 4, 5])
def test_gsm8k_prompts_match_lm_eval(lm_gsm8k, num_fewshot):
    ours = get_task("gsm8k", data_dir=DATA, num_fewshot=num_fewshot)
    docs = ours.load_docs(limit=N_DOCS)
    lm_docs = list(lm_gsm8k.test_docs())[:N_DOCS]
    assert docs == lm_docs
    assert ours.prompts(docs) == _lm_eval_prompts(lm_gsm8k, lm_docs, num_fewshot)


def test_gsm8k_request_matches_lm_eval(lm_gsm8k):
    ours = get_task("gsm8k", data_dir=DATA)
    doc = ours.load_docs(limit=1)[0]
    assert list(ours.request(doc).stop) == lm_gsm8k.config.generation_kwargs["until"]
    assert ours.answer_text(doc) == lm_gsm8k.config.target_delimiter + lm_gsm8k.doc_to_target(doc)


@pytest.mark.parametrize("num_fewshot", [4, 5])
def test_gsm_plus_prompts_match_lm_eval(lm_gsm_plus, num_fewshot):
    ours = get_task("gsm_plus", data_dir=DATA, num_fewshot=num_fewshot)
    docs = ours.load_docs(limit=N_DOCS)
    lm_docs = list(lm_gsm_plus.test_docs())[:N_DOCS]
    assert docs == lm_docs
    assert ours.prompts(docs) == _lm_eval_prompts(lm_gsm_plus, lm_docs, num_fewshot)


def test_gsm_plus_scores_match_lm_eval_process_results(lm_gsm_plus):
    """lm-eval's per-doc exact_match after its filters equals our lm_eval_exact_match keys."""
    ours = get_task("gsm_plus", data_dir=DATA)
    docs = ours.load_docs()[:: 150]  # every perturbation type, incl. critical thinking
    responses = [
        " The answer is 5.\n#### 5",
        " #### None",
        " so 4.33 inches in total",
        " Total: $1,200.",
    ]
    from lm_eval.filters.extraction import RegexFilter
    from lm_eval.filters.selection import TakeFirstFilter

    patterns = {
        "strict-match": RegexFilter(r"#### (\-?[0-9\.\,]+)"),
        "flexible-extract": RegexFilter(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", group_select=-1),
    }
    for doc in docs:
        for response in responses + [" " + doc["solution"]]:
            ours_scores = ours.score(doc, response)
            for name, regex in patterns.items():
                filtered = list(TakeFirstFilter().apply(regex.apply([[response]], [doc]), [doc]))[0]
                lm_score = lm_gsm_plus.process_results(doc, [filtered])["exact_match"]
                assert ours_scores[f"lm_eval_exact_match,{name}"] == lm_score, (doc["question"], response, name)


# ---- hand-made TriviaQA / HellaSwag files ------------------------------------------------------------


def _trivia_record(i: int) -> dict:
    return {
        "question": f"Which number comes after {i}",
        "question_id": f"q{i}",
        "answer": {"aliases": [str(i + 1), f"number {i + 1}"], "normalized_aliases": [str(i + 1), f"number {i + 1}"]},
    }


def _hellaswag_record(i: int) -> dict:
    return {
        "ind": i,
        "activity_label": f"Activity {i % 3}",
        "ctx_a": f"A person [title] does thing {i}.",
        "ctx_b": "then they",
        "ctx": f"A person [title] does thing {i}. then they",
        "endings": [f"stop [header] {i}.", f"go  on {i}.", f"rest {i}", f"win {i}!"],
        "label": str(i % 4),
    }


def _write(path: Path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def handmade(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("handmade")
    return {
        "trivia_train": _write(tmp / "tq_train.jsonl", [_trivia_record(i) for i in range(100, 140)]),
        "trivia_val": _write(tmp / "tq_val.jsonl", [_trivia_record(i) for i in range(12)]),
        "hs_train": _write(tmp / "hs_train.jsonl", [_hellaswag_record(i) for i in range(100, 130)]),
        "hs_val": _write(tmp / "hs_val.jsonl", [_hellaswag_record(i) for i in range(10)]),
        "tmp": tmp,
    }


def test_triviaqa_prompts_and_scores_match_lm_eval(handmade):
    lm_task = _lm_eval_task(
        handmade["tmp"], "triviaqa/default.yaml", "moelab_triviaqa",
        {"train": handmade["trivia_train"], "validation": handmade["trivia_val"]},
    )
    ours = get_task("triviaqa", path=handmade["trivia_val"], train_path=handmade["trivia_train"], num_fewshot=3)
    docs = ours.load_docs()
    lm_docs = list(lm_task.validation_docs())
    assert ours.prompts(docs) == _lm_eval_prompts(lm_task, lm_docs, 3)
    assert list(ours.request(docs[0]).stop) == lm_task.config.generation_kwargs["until"]
    from lm_eval.filters.extraction import WhitespaceFilter

    for doc, lm_doc in zip(docs, lm_docs):
        for response in [" 5", f" {doc['answer']['aliases'][0]}", " Number " + doc["answer"]["aliases"][0] + "!", " nope"]:
            filtered = list(WhitespaceFilter().apply([[response]], [lm_doc]))[0][0]
            assert ours.score(doc, response)["exact_match"] == lm_task.process_results(lm_doc, [filtered])["exact_match"]


def test_hellaswag_prompts_requests_and_acc_match_lm_eval(handmade):
    lm_task = _lm_eval_task(
        handmade["tmp"], "hellaswag/hellaswag.yaml", "moelab_hellaswag",
        {"train": handmade["hs_train"], "validation": handmade["hs_val"]}
    )
    ours = get_task("hellaswag", path=handmade["hs_val"], train_path=handmade["hs_train"], num_fewshot=4)
    docs = ours.load_docs()
    lm_docs = list(lm_task.validation_docs())
    assert ours.prompts(docs) == _lm_eval_prompts(lm_task, lm_docs, 4)
    lls_table = [[-4.0, -5.0, -6.0, -7.0], [-9.0, -8.5, -3.0, -12.0], [-10.0, -4.0, -10.0, -8.0]]
    for doc, lm_doc in zip(docs, lm_docs):
        instances = lm_task.construct_requests(lm_doc, "CTX", metadata=("x", 0, 1))
        request = ours.request_for_prompt(doc, "CTX")
        assert [inst.arguments for inst in instances] == [("CTX", c) for c in request.continuations]
        for lls in lls_table:
            lm_result = lm_task.process_results(lm_doc, [(ll, False) for ll in lls])
            ours_result = ours.score(doc, lls)
            assert ours_result == {"acc": lm_result["acc"], "acc_norm": lm_result["acc_norm"]}
