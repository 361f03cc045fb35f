"""The ``moelab`` lm-eval model against ``moelab eval`` on the same model and the same local data.

lm-eval's own task YAMLs (gsm8k, hellaswag) are included from its package and pointed at small JSONL
files in tmp_path (``dataset_path: json``), so everything runs offline. Same model, same few-shot
count: the per-document generations, the exact-match numbers and the per-choice log-likelihoods must
agree.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'moelab[eval]')")
pytest.importorskip("lm_eval.tasks")

import lm_eval.tasks  # noqa: E402

import moelab  # noqa: E402
import moelab.eval.lm_eval  # noqa: E402,F401  (registers "moelab")
from moelab.cli import main  # noqa: E402
from moelab.data.tokenizer import ByteTokenizer  # noqa: E402
from moelab.eval.generate import generate  # noqa: E402
from moelab.eval.metrics import flexible_extract  # noqa: E402
from moelab.eval.tasks import get_task  # noqa: E402
from lm_eval_local import write_local_task  # noqa: E402

SHOTS = 2
N_DOCS = 6
MAX_NEW = 12
DIGITS = [ord(c) for c in "0123456789"]


pytestmark = pytest.mark.usefixtures("one_thread")


def digit_model():
    """A random model whose LM head can only favour digits, so its greedy answers are numbers."""
    cfg = moelab.ModelConfig(vocab_size=257, d_model=64, n_layers=2, n_heads=4, d_expert=64, n_experts=4, top_k=2,
                             max_seq_len=512, init_std=0.3)
    model = moelab.build(cfg, seed=3).eval()
    with torch.no_grad():
        keep = torch.zeros(cfg.vocab_size, 1)
        keep[DIGITS] = 1.0
        model.lm_head.weight.mul_(keep)
        model.lm_head.weight[DIGITS] += 0.05  # digits beat the zero logits of every other token
    return model


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path



def run_lm_eval(ckpt: Path, task_dir: Path, name: str) -> dict:
    manager = lm_eval.tasks.TaskManager(include_path=str(task_dir), include_defaults=False)
    return lm_eval.simple_evaluate(model="moelab", model_args=f"path={ckpt}", tasks=[name], num_fewshot=SHOTS,
                                   limit=N_DOCS, task_manager=manager, log_samples=True, batch_size=4)


def run_moelab_eval(ckpt: Path, data_dir: Path, task: str, out: Path) -> tuple[dict, list[dict]]:
    rc = main(["eval", str(ckpt), "--tasks", task, "--shots", str(SHOTS), "--limit", str(N_DOCS), "--max-new-tokens",
               str(MAX_NEW), "--data-dir", str(data_dir), "--out", str(out), "--log-samples", "--no-progress"])
    assert rc == 0
    samples = [json.loads(line) for line in out.with_name(out.stem + ".samples.jsonl").read_text().splitlines()]
    return json.loads(out.read_text()), samples


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ckpt")
    moelab.save(digit_model(), d)
    ByteTokenizer().save(d)
    return d


def test_gsm8k_generations_and_exact_match_agree(checkpoint, tmp_path):
    train = [{"question": f"Sam has {i} pens and gets {i} more. How many?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"}
             for i in range(8)]
    test = [{"question": f"A box holds {i * 3} eggs; {i} break. How many are left?", "answer": "#### 0"} for i in range(N_DOCS)]
    data = tmp_path / "data"
    write_jsonl(data / "gsm8k" / "train.jsonl", train)
    # the prompts do not depend on the test answers (shots come from train): set half of the gold
    # answers to what the model will say, so exact match is neither 0 nor 1 and must agree per doc
    write_jsonl(data / "gsm8k" / "test.jsonl", test)
    task = get_task("gsm8k", data_dir=data, num_fewshot=SHOTS)
    outputs = [g.text for g in generate(moelab.load(checkpoint), ByteTokenizer(), task.prompts(task.load_docs()),
                                        max_new_tokens=MAX_NEW, stop=task.stop)]
    for i, out in enumerate(outputs):
        number = flexible_extract(out)
        assert number != "[invalid]"
        test[i]["answer"] = f"so\n#### {number if i % 2 == 0 else number + '1'}"
    write_jsonl(data / "gsm8k" / "test.jsonl", test)

    ours, samples = run_moelab_eval(checkpoint, data, "gsm8k", tmp_path / "res.json")
    task_dir = write_local_task(tmp_path, "gsm8k/gsm8k.yaml", "local_gsm8k",
                                {"train": str(data / "gsm8k" / "train.jsonl"), "test": str(data / "gsm8k" / "test.jsonl")},
                                generation_kwargs={"until": ["Question:", "</s>", "<|im_end|>"], "do_sample": False,
                                                   "temperature": 0.0, "max_gen_toks": MAX_NEW})
    theirs = run_lm_eval(checkpoint, task_dir, "local_gsm8k")

    lm_samples = sorted((s for s in theirs["samples"]["local_gsm8k"] if s["filter"] == "strict-match"), key=lambda s: s["doc_id"])
    assert [s["arguments"][0][0] for s in lm_samples] == [s["prompt"] for s in samples]
    assert [s["resps"][0][0] for s in lm_samples] == [s["output"] for s in samples] == outputs
    res = theirs["results"]["local_gsm8k"]
    for key in ("exact_match,strict-match", "exact_match,flexible-extract"):
        assert ours["tasks"]["gsm8k"]["metrics"][key] == pytest.approx(res[key])
    assert res["exact_match,flexible-extract"] == pytest.approx(0.5)


def test_hellaswag_loglikelihoods_agree(checkpoint, tmp_path):
    endings = ["cuts the onion into rings.", "throws it [title] away.", "sings a song loudly.", "eats it."]
    records = [{"ind": i, "activity_label": "Cooking", "ctx_a": f"A chef picks up onion number {i}.", "ctx_b": "then he",
                "ctx": "", "endings": endings[i % 4:] + endings[: i % 4], "label": str(i % 4), "split": "val",
                "split_type": "indomain", "source_id": f"x{i}"} for i in range(N_DOCS + 2)]
    data = tmp_path / "data"
    write_jsonl(data / "hellaswag" / "validation.jsonl", records)
    write_jsonl(data / "hellaswag" / "train.jsonl", records[::-1])
    ours, samples = run_moelab_eval(checkpoint, data, "hellaswag", tmp_path / "res.json")
    task_dir = write_local_task(tmp_path, "hellaswag/hellaswag.yaml", "local_hellaswag",
                                {"train": str(data / "hellaswag" / "train.jsonl"),
                                 "validation": str(data / "hellaswag" / "validation.jsonl")})
    theirs = run_lm_eval(checkpoint, task_dir, "local_hellaswag")
    lm_samples = sorted(theirs["samples"]["local_hellaswag"], key=lambda s: s["doc_id"])
    assert len(lm_samples) == len(samples) == N_DOCS
    for lm_s, s in zip(lm_samples, samples):
        lm_ll = [r[0][0] for r in lm_s["resps"]]
        assert s["loglikelihoods"] == pytest.approx(lm_ll, abs=1e-4)
    res = theirs["results"]["local_hellaswag"]
    for key in ("acc", "acc_norm"):
        assert ours["tasks"]["hellaswag"]["metrics"][key] == pytest.approx(res[f"{key},none"])


def test_loglikelihood_rolling_and_model_object(checkpoint):
    """``loglikelihood_rolling`` (lm-eval's perplexity path) and wrapping an in-memory model."""
    from lm_eval.api.instance import Instance

    from moelab.eval.lm_eval import MoelabLM
    from moelab.eval.loglikelihood import loglikelihood_rolling

    model = moelab.load(checkpoint)
    lm = MoelabLM(model=model, tokenizer="byte", batch_size="auto")
    text = "The cat sat on the mat. " * 30  # longer than nothing, shorter than the 512-token window
    req = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    (lp,) = lm.loglikelihood_rolling([req])
    (ref,) = loglikelihood_rolling(model, ByteTokenizer(), [text])
    assert lp == pytest.approx(ref.logprob) and lp < 0
    from_path = MoelabLM.create_from_arg_string(f"path={checkpoint},max_length=64", {"batch_size": 2, "device": None})
    assert from_path.batch_size == 2 and from_path.max_length == 64 and from_path.compile is False


def test_compile_model_arg_reaches_generate(checkpoint, monkeypatch):
    import sys

    from lm_eval.api.instance import Instance

    from moelab.eval.lm_eval import MoelabLM

    lm = MoelabLM.create_from_arg_string(f"path={checkpoint},compile=true")
    assert lm.compile is True
    monkeypatch.setattr(sys.modules["moelab.eval.generate"], "compiled_decode_step", lambda m: m.decode_step)
    reqs = [Instance(request_type="generate_until", doc={}, arguments=(p, {"until": ["\n"], "max_gen_toks": 8}), idx=i)
            for i, p in enumerate(["Let a = 3.", "Question: 1 + 1?"])]
    plain = MoelabLM(model=lm.model, tokenizer=lm.tokenizer)
    assert lm.generate_until(reqs) == plain.generate_until(reqs)


def test_bad_model_args(tmp_path):
    from moelab.errors import MoelabError
    from moelab.eval.lm_eval import MoelabLM

    with pytest.raises(MoelabError, match="does not exist"):
        MoelabLM.create_from_arg_string(f"path={tmp_path / 'nope'}")
    with pytest.raises(MoelabError, match="exactly one of path"):
        MoelabLM()
    with pytest.raises(MoelabError, match="compile must be true or false"):
        MoelabLM.create_from_arg_string(f"path={tmp_path},compile=maybe")
