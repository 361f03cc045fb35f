"""The opt-in Hugging Face ``datasets`` source of the file-backed tasks (``source="hf"`` / ``--source hf``).

No network: a fake ``datasets`` module (only ``load_dataset(path, name, split=...)`` returning an
iterable of dict rows) stands in for the package, and the real package, when installed, is used with
``load_dataset`` monkeypatched to return ``datasets.Dataset.from_list(...)``. Hub records must give
exactly the documents, prompts and targets the same records give from local JSON Lines files.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

import moelab
from moelab.checkpoint import save_model
from moelab.cli import main
from moelab.data.tokenizer import ByteTokenizer
from moelab.errors import ConfigError, DataError
from moelab.eval.runner import EvalSettings, build_task
from moelab.eval.tasks import get_task

# ---- records: the same rows serve as hub splits and as local files -----------------------------


def _gsm8k(i: int) -> dict:
    return {"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"}


def _gsm_plus(i: int) -> dict:
    ptype, answer = ("critical thinking", "None") if i % 3 == 2 else ("numerical substitution", str(i + 2))
    return {"question": f"Q{i}: how many?", "solution": f"steps {i}\n#### {answer}", "answer": answer,
            "perturbation_type": ptype, "seed_question": "s", "seed_solution": "s", "seed_answer": "1"}


def _triviaqa(i: int) -> dict:
    """The ``rc.nocontext`` layout: ``answer`` holds value, aliases, normalized_aliases, ..."""
    return {"question": f"Capital of country {i}", "question_id": f"tq_{i}", "question_source": "web",
            "answer": {"value": f"City{i}", "aliases": [f"City{i}", f"Town {i}"],
                       "normalized_aliases": [f"city{i}", f"town {i}"], "normalized_value": f"city{i}",
                       "matched_wiki_entity_name": "", "normalized_matched_wiki_entity_name": "", "type": "WikipediaEntity"}}


def _hellaswag(i: int) -> dict:
    return {"ind": i, "activity_label": "Baking cookies", "ctx_a": f"A woman [title] mixes {i} cups of flour.  She",
            "ctx_b": "adds the eggs", "ctx": "", "endings": ["and stirs [step] slowly.", "a", "then  bakes them.", "leaves."],
            "source_id": f"src~{i}", "split": "val", "split_type": "indomain", "label": str(i % 4)}


def _rows(make, offset: int, n: int = 5) -> list[dict]:
    return [make(i) for i in range(offset, offset + n)]


# task -> (hub path, hub config, {split: rows}, {local file under data_dir: split})
CASES = {
    "gsm8k": ("openai/gsm8k", "main", {"test": _rows(_gsm8k, 0), "train": _rows(_gsm8k, 100)},
              {"gsm8k/test.jsonl": "test", "gsm8k/train.jsonl": "train"}),
    "gsm_plus": ("qintongli/GSM-Plus", None, {"testmini": _rows(_gsm_plus, 0, 6)},
                 {"gsm_plus/testmini.jsonl": "testmini"}),
    "triviaqa": ("mandarjoshi/trivia_qa", "rc.nocontext", {"validation": _rows(_triviaqa, 0), "train": _rows(_triviaqa, 50)},
                 {"triviaqa/validation.jsonl": "validation", "triviaqa/train.jsonl": "train"}),
    "hellaswag": ("Rowan/hellaswag", None, {"validation": _rows(_hellaswag, 0), "train": _rows(_hellaswag, 20)},
                  {"hellaswag/validation.jsonl": "validation", "hellaswag/train.jsonl": "train"}),
}
#: Splits each task loads, in order: evaluated split, then the few-shot split.
LOADED_SPLITS = {"gsm8k": ["test", "train"], "gsm_plus": ["testmini"], "triviaqa": ["validation", "train"],
                 "hellaswag": ["validation", "train"]}


def _write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _local_dir(tmp_path: Path) -> Path:
    """All four tasks' records as local JSON Lines files."""
    root = tmp_path / "local"
    for _, _, splits, files in CASES.values():
        for rel, split in files.items():
            _write_jsonl(root / rel, splits[split])
    return root


class FakeHub:
    """Stands in for ``datasets.load_dataset``: serves rows per ``(path, name, split)``, records calls."""

    def __init__(self, make_split=lambda rows: (r for r in rows)) -> None:
        self.splits: dict[tuple[str, str | None, str], list[dict]] = {}
        self.calls: list[tuple[str, str | None, str]] = []
        self.make_split = make_split  # rows -> what load_dataset returns (default: a one-shot generator)
        for path, name, splits, _ in CASES.values():
            for split, rows in splits.items():
                self.splits[(path, name, split)] = rows

    def load_dataset(self, path, name=None, *, split):
        self.calls.append((path, name, split))
        try:
            rows = self.splits[(path, name, split)]
        except KeyError:
            raise FileNotFoundError(f"Couldn't find dataset {path} config {name} split {split}\nsecond line") from None
        return self.make_split(rows)


@pytest.fixture
def fake_hub(monkeypatch) -> FakeHub:
    """A fake ``datasets`` module in ``sys.modules`` whose ``load_dataset`` is a :class:`FakeHub`."""
    hub = FakeHub()
    module = types.ModuleType("datasets")
    module.load_dataset = hub.load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)
    return hub


@pytest.fixture
def real_hub(monkeypatch) -> FakeHub:
    """The installed ``datasets`` package, ``load_dataset`` serving ``Dataset.from_list`` of the rows."""
    datasets = pytest.importorskip("datasets")
    hub = FakeHub(make_split=datasets.Dataset.from_list)
    monkeypatch.setattr(datasets, "load_dataset", hub.load_dataset)
    return hub


def _views(task) -> dict:
    """Everything a task derives from its records: docs, few-shot pool, prompts, targets, requests."""
    docs = task.load_docs()
    return {
        "docs": docs,
        "fewshot": task.fewshot_docs(),
        "prompts": task.prompts(docs),
        "targets": [task.doc_to_target(d) for d in docs],
        "answers": [task.answer_text(d) for d in docs],
        "requests": task.requests(docs),
    }


# ---- same documents, prompts and targets as local files -------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
def test_hub_records_equal_local_files(name, fake_hub, tmp_path):
    local = get_task(name, data_dir=_local_dir(tmp_path), num_fewshot=2)
    hub = get_task(name, source="hf", num_fewshot=2)
    assert hub.source == "hf" and local.source == "local"
    assert _views(hub) == _views(local)
    path, config, _, _ = CASES[name]
    assert fake_hub.calls == [(path, config, split) for split in LOADED_SPLITS[name]]


@pytest.mark.parametrize("name", sorted(CASES))
def test_real_datasets_package_equals_local_files(name, real_hub, tmp_path):
    local = get_task(name, data_dir=_local_dir(tmp_path), num_fewshot=2)
    hub = get_task(name, source="hf", num_fewshot=2)
    assert _views(hub) == _views(local)
    path, config, _, _ = CASES[name]
    assert real_hub.calls == [(path, config, split) for split in LOADED_SPLITS[name]]


def test_limit_and_requested_datasets_match_lm_eval(fake_hub):
    """``dataset_path`` / ``dataset_name`` / splits as in lm-eval 0.4's task YAMLs."""
    assert len(get_task("gsm8k", source="hf").load_docs(limit=2)) == 2
    assert fake_hub.calls == [("openai/gsm8k", "main", "test")]
    yaml_names = {  # task: (dataset_path, dataset_name) in lm_eval/tasks/<task>/*.yaml
        "gsm8k": ("openai/gsm8k", "main"),
        "gsm_plus": ("qintongli/GSM-Plus", None),
        "triviaqa": ("mandarjoshi/trivia_qa", "rc.nocontext"),
        "hellaswag": ("Rowan/hellaswag", None),
    }
    assert {name: CASES[name][:2] for name in CASES} == yaml_names


# ---- the same record checks, located as hf:<dataset>/<config>/<split>:<row> ----------------------


def test_hub_record_errors_name_dataset_split_and_row(fake_hub):
    fake_hub.splits[("openai/gsm8k", "main", "test")] = [_gsm8k(0), {"question": "no answer"}]
    with pytest.raises(DataError, match=r"^hf:openai/gsm8k/main/test:1: missing field\(s\) answer; every record needs question, answer$"):
        get_task("gsm8k", source="hf").load_docs()

    fake_hub.splits[("Rowan/hellaswag", None, "validation")] = [{**_hellaswag(0), "label": ""}]
    with pytest.raises(DataError, match=r"^hf:Rowan/hellaswag/validation:0: label must be an ending index"):
        get_task("hellaswag", source="hf").load_docs()

    fake_hub.splits[("mandarjoshi/trivia_qa", "rc.nocontext", "validation")] = [{**_triviaqa(0), "answer": {"aliases": []}}]
    with pytest.raises(DataError, match=r"^hf:mandarjoshi/trivia_qa/rc\.nocontext/validation:0: needs a non-empty"):
        get_task("triviaqa", source="hf").load_docs()

    fake_hub.splits[("qintongli/GSM-Plus", None, "testmini")] = [_gsm_plus(0), ["not", "a", "record"]]
    with pytest.raises(DataError, match=r"^hf:qintongli/GSM-Plus/testmini:1: expected a record with named fields, got list"):
        get_task("gsm_plus", source="hf").load_docs()

    fake_hub.splits[("openai/gsm8k", "main", "test")] = []
    with pytest.raises(DataError, match=r"^hf:openai/gsm8k/main/test holds no records"):
        get_task("gsm8k", source="hf").load_docs()


def test_missing_datasets_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    task = get_task("hellaswag", source="hf")  # constructing needs nothing; loading needs the package
    with pytest.raises(ConfigError) as err:
        task.load_docs()
    message = str(err.value)
    assert "pip install 'moelab[datasets]'" in message and "--source local" in message and "\n" not in message


def test_unreachable_hub_is_one_line_data_error(fake_hub):
    def offline(path, name=None, *, split):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (OfflineModeIsEnabled)\nTraceback detail")

    sys.modules["datasets"].load_dataset = offline
    with pytest.raises(DataError) as err:
        get_task("triviaqa", source="hf").load_docs()
    message = str(err.value)
    assert message.startswith("cannot load hf:mandarjoshi/trivia_qa/rc.nocontext/validation")
    assert "ConnectionError: Couldn't reach 'mandarjoshi/trivia_qa' on the Hub (OfflineModeIsEnabled)" in message
    assert "--data-dir" in message and "Traceback" not in message and "\n" not in message
    with pytest.raises(DataError, match=r"^cannot load hf:qintongli/GSM-Plus/testmini \(ConnectionError"):
        get_task("gsm_plus", source="hf").load_docs()


# ---- selection: local stays the default, options are checked --------------------------------------


def test_local_default_never_imports_datasets(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)  # any `import datasets` would now raise
    data_dir = _local_dir(tmp_path)
    for name in CASES:
        task = get_task(name, data_dir=data_dir, num_fewshot=1)
        assert task.source == "local"
        task.requests(task.load_docs())


def test_eval_cli_module_and_local_tasks_do_not_import_datasets(tmp_path):
    code = (
        "import sys, moelab.cli, moelab.eval\n"
        "from moelab.eval.tasks import get_task\n"
        f"t = get_task('gsm8k', data_dir={str(_local_dir(tmp_path))!r})\n"
        "t.requests(t.load_docs())\n"
        "assert 'datasets' not in sys.modules, 'datasets was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_bad_source_options_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown data source 'hub'; use 'local' .* or 'hf'"):
        get_task("gsm8k", source="hub")
    with pytest.raises(ConfigError, match=r"local file option\(s\) data_dir were given; drop them or use source 'local'"):
        get_task("gsm8k", source="hf", data_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"option\(s\) path, train_path"):
        get_task("triviaqa", source="hf", path=tmp_path / "v.jsonl", train_path=tmp_path / "t.jsonl")
    with pytest.raises(ConfigError, match="unknown data source"):
        EvalSettings(source="HF")


def test_build_task_passes_source_to_file_backed_tasks(fake_hub):
    assert build_task("hellaswag", source="hf").source == "hf"
    assert build_task("gsm8k").source == "local"
    assert fake_hub.calls == []  # constructing a task loads nothing


# ---- the CLI -----------------------------------------------------------------------------------


def _run_cli(capsys, *args) -> tuple[int, str]:
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


@pytest.fixture
def checkpoint(tmp_path, one_thread) -> Path:
    cfg = moelab.ModelConfig(vocab_size=257, d_model=32, n_layers=1, n_heads=2, d_expert=32, n_experts=2, top_k=1,
                             max_seq_len=256)
    path = tmp_path / "ckpt"
    save_model(moelab.build(cfg, seed=0).eval(), path)
    ByteTokenizer().save(path)
    return path


def test_cli_source_hf_equals_local_files(capsys, fake_hub, checkpoint, tmp_path):
    args = ["--tasks", "gsm8k,hellaswag", "--shots", "1", "--limit", "2", "--max-new-tokens", "3", "--no-progress"]
    rc, err = _run_cli(capsys, "eval", checkpoint, *args, "--source", "hf", "--out", tmp_path / "hf.json")
    assert rc == 0, err
    rc, err = _run_cli(capsys, "eval", checkpoint, *args, "--data-dir", _local_dir(tmp_path), "--out", tmp_path / "local.json")
    assert rc == 0, err
    hub, local = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("hf", "local"))
    assert hub["tasks"] == local["tasks"]
    assert hub["config"]["source"] == "hf" and local["config"]["source"] == "local"
    assert [c[2] for c in fake_hub.calls] == ["test", "train", "validation", "train"]


@pytest.mark.parametrize("args, needle", [
    (["--source", "web"], "unknown data source 'web'"),
    (["--source", "hf", "--data-dir", "somewhere"], "local file option(s) data_dir were given"),
])
def test_cli_bad_source_fails_before_loading_the_model(capsys, tmp_path, args, needle):
    rc, err = _run_cli(capsys, "eval", tmp_path / "no-such-model", "--tasks", "gsm8k", *args, "--out", tmp_path / "r.json")
    assert rc == 1 and err.startswith("error:") and needle in err.replace("\n", " ")
    assert "does not exist" not in err
