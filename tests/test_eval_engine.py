"""Log-likelihood scoring, task loss, the evaluation runner and ``moelab eval`` (incl. its errors)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import moelab
from moelab.checkpoint import save_model
from moelab.cli import main
from moelab.data.config import DataConfig, SyntheticConfig
from moelab.data.tokenizer import ByteTokenizer
from moelab.errors import ConfigError, DataError
from moelab.eval.loglikelihood import encode_pair, loglikelihood, loglikelihood_rolling, rolling_windows, score_tokens
from moelab.eval.runner import evaluate
from moelab.eval.tasks import get_task

pytestmark = pytest.mark.usefixtures("one_thread")


TOK = ByteTokenizer()
SYNTH = SyntheticConfig(n_entities=6, n_test_reasoning=3, min_ops=1, max_ops=2, n_test_memorization=5)


def tiny_model(max_seq_len: int = 256, seed: int = 1):
    cfg = moelab.ModelConfig(vocab_size=257, d_model=64, n_layers=2, n_heads=4, d_expert=64, n_experts=4, top_k=2,
                             max_seq_len=max_seq_len, init_std=0.3)
    return moelab.build(cfg, seed=seed).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


GSM = [{"question": f"Tom has {i} apples and buys {i + 2} more. How many now?", "answer": f"{i} + {i + 2} = {2 * i + 2}\n#### {2 * i + 2}"}
       for i in range(10)]
HELLASWAG = [{"ind": i, "activity_label": "Cooking", "ctx_a": f"A man cuts {i} onions on a board.", "ctx_b": "he",
              "ctx": "", "endings": ["cries a lot.", "laughs loudly.", "eats them [title] raw.", "goes to sleep."],
              "label": str(i % 4)} for i in range(8)]
TRIVIA = [{"question": f"What is the capital of country {i}", "answer": {"aliases": [f"City{i}", f"Town {i}"]}} for i in range(6)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    write_jsonl(d / "gsm8k" / "test.jsonl", GSM[:6])
    write_jsonl(d / "gsm8k" / "train.jsonl", GSM[6:])
    write_jsonl(d / "hellaswag" / "validation.jsonl", HELLASWAG)
    write_jsonl(d / "triviaqa" / "validation.jsonl", TRIVIA)
    return d


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model) -> Path:
    """A checkpoint as the trainer writes it: weights, tokenizer, config.json with data.synthetic."""
    d = tmp_path_factory.mktemp("ckpt")
    save_model(model, d, extra={"data": DataConfig(synthetic=SYNTH).model_dump()})
    TOK.save(d)
    return d


# ------------------------------------------------------------------------------------------------
# log-likelihood
# ------------------------------------------------------------------------------------------------


def full_forward_logprob(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """Reference: one unpadded forward over ctx + cont, sum of log p(cont)."""
    ids = torch.tensor([ctx + cont])
    logp = F.log_softmax(model(ids).logits[0].float(), dim=-1)
    pred = logp[len(ctx) - 1 : -1]
    lp = pred.gather(1, torch.tensor(cont)[:, None]).sum().item()
    return lp, bool((pred.argmax(-1) == torch.tensor(cont)).all())


def test_encode_pair_matches_lm_eval_rules():
    assert encode_pair(TOK, "Answer:", " 42") == (list(b"Answer:"), list(b" 42"))
    # trailing whitespace of the context moves to the continuation
    assert encode_pair(TOK, "Answer: ", "42") == (list(b"Answer:"), list(b" 42"))
    # empty context: the EOS token is the context
    assert encode_pair(TOK, "", "hi") == ([TOK.eos_id], list(b"hi"))


def test_loglikelihood_equals_full_forward(model):
    pairs = [("Question: 2+2?\nAnswer:", " 4"), ("Hello", " world, this is longer"), ("x", "y"), ("", "abc"),
             ("The sky is ", "blue")]
    scores = loglikelihood(model, TOK, pairs, batch_size=3)
    for (ctx, cont), s in zip(pairs, scores):
        c, k = encode_pair(TOK, ctx, cont)
        lp, greedy = full_forward_logprob(model, c, k)
        assert s.logprob == pytest.approx(lp, abs=1e-4)
        assert s.is_greedy == greedy and s.n_tokens == len(k)
    # batch size does not change the numbers
    one = loglikelihood(model, TOK, pairs, batch_size=1)
    assert [s.logprob for s in one] == pytest.approx([s.logprob for s in scores], abs=1e-4)


def test_is_greedy_true_for_the_models_own_continuation(model):
    from moelab.eval.generate import generate

    g = generate(model, TOK, ["Once upon"], max_new_tokens=6, stop_at_eos=False)[0]
    s = score_tokens(model, [(list(b"Once upon"), g.token_ids)])[0]
    assert s.is_greedy
    assert not score_tokens(model, [(list(b"Once upon"), [(g.token_ids[0] + 1) % 256] + g.token_ids[1:])])[0].is_greedy


def test_context_left_truncated_to_model_window():
    model = tiny_model(max_seq_len=16)
    ctx, cont = list(range(40, 70)), list(range(70, 75))
    s = score_tokens(model, [(ctx, cont)])[0]
    window = (ctx + cont)[-17:]  # lm-eval: (ctx + cont)[-(max_len + 1):], last token only predicted
    lp, _ = full_forward_logprob(model, window[: len(window) - len(cont)], cont)
    assert s.logprob == pytest.approx(lp, abs=1e-4)


def test_answer_longer_than_context_is_scored_in_chunks():
    model = tiny_model(max_seq_len=16)
    ctx, answer = "Question: long?\nAnswer:", " " + "step by step, " * 3  # 43 answer tokens > 16
    with pytest.raises(ConfigError, match="exceeds the model context of 16 tokens"):
        loglikelihood(model, TOK, [(ctx, answer)])
    (s,) = loglikelihood(model, TOK, [(ctx, answer)], chunk_long_continuations=True)
    c, k = encode_pair(TOK, ctx, answer)
    expected = 0.0
    for start in range(0, len(k), 16):  # each chunk conditioned on the 16 tokens before its last one
        window = (c + k[: start + 16])[-17:]
        chunk = k[start : start + 16]
        expected += full_forward_logprob(model, window[: len(window) - len(chunk)], chunk)[0]
    assert s.n_tokens == len(k) and s.logprob == pytest.approx(expected, abs=1e-3)
    # short answers: identical to loglikelihood
    pairs = [("Q:", " a"), ("Hello", " there")]
    assert [x.logprob for x in loglikelihood(model, TOK, pairs, chunk_long_continuations=True)] == pytest.approx([x.logprob for x in loglikelihood(model, TOK, pairs)])


def test_rolling_windows_cover_every_token_once():
    tokens = list(range(100, 137))
    windows = list(rolling_windows(tokens, prefix_token=7, max_seq_len=10))
    assert [t for _, c in windows for t in c] == tokens
    assert windows[0][0] == [7]
    for ctx, cont in windows:
        assert len(ctx) + len(cont) - 1 <= 10


def test_rolling_loglikelihood(model):
    text = "Perplexity is the exponential of the average negative log-likelihood."
    ids = TOK.encode(text)
    (r,) = loglikelihood_rolling(model, TOK, [text])
    lp, _ = full_forward_logprob(model, [TOK.eos_id], ids)
    assert r.n_tokens == len(ids) and r.logprob == pytest.approx(lp, abs=1e-3)
    # longer than the context: still every token once, each window conditioned on its predecessors
    short = tiny_model(max_seq_len=16)
    (r16,) = loglikelihood_rolling(short, TOK, [text], batch_size=2)
    expected = sum(full_forward_logprob(short, c, k)[0] for c, k in rolling_windows(ids, TOK.eos_id, 16))
    assert r16.n_tokens == len(ids) and r16.logprob == pytest.approx(expected, abs=1e-3)


# ------------------------------------------------------------------------------------------------
# runner
# ------------------------------------------------------------------------------------------------


def test_evaluate_metrics_and_task_loss(model, data_dir, tmp_path):
    log = tmp_path / "samples.jsonl"
    r = evaluate(model, TOK, ["gsm8k", "hellaswag"], shots=2, limit=4, max_new_tokens=12, data_dir=data_dir,
                 log_samples=log)
    gsm, hs = r["tasks"]["gsm8k"], r["tasks"]["hellaswag"]
    assert gsm["n_docs"] == 4 and set(gsm["metrics"]) >= {"exact_match,strict-match", "exact_match,flexible-extract"}
    assert hs["metrics"]["n_samples"] == 4 and 0 <= hs["metrics"]["acc"] <= 1
    assert r["config"]["total_params"] > r["config"]["active_params"] > 0
    assert r["timings"]["gsm8k"]["generated_tokens"] > 0 and r["timings"]["total_seconds"] > 0

    # task loss = answer-only NLL given the same few-shot prompt, in three units
    task = get_task("gsm8k", data_dir=data_dir, num_fewshot=2)
    docs = task.load_docs(4)
    prompts = task.prompts(docs)
    scores = loglikelihood(model, TOK, [(p, task.answer_text(d)) for p, d in zip(prompts, docs)])
    nll = -sum(s.logprob for s in scores)
    n_tok = sum(s.n_tokens for s in scores)
    n_bytes = sum(len(task.answer_text(d).encode()) for d in docs)
    loss = gsm["task_loss"]
    assert loss["n_tokens"] == n_tok and loss["n_bytes"] == n_bytes
    assert loss["nats_per_token"] == pytest.approx(nll / n_tok, rel=1e-5)
    assert loss["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)

    # hellaswag accuracy from per-choice log-likelihoods of the same prompts
    hs_task = get_task("hellaswag", data_dir=data_dir, num_fewshot=2)
    hs_docs = hs_task.load_docs(4)
    reqs = hs_task.requests(hs_docs)
    accs = []
    for doc, req in zip(hs_docs, reqs):
        lls = [s.logprob for s in loglikelihood(model, TOK, [(req.context, c) for c in req.continuations])]
        accs.append(hs_task.score(doc, lls)["acc"])
    assert hs["metrics"]["acc"] == pytest.approx(sum(accs) / len(accs))

    lines = [json.loads(line) for line in log.read_text().splitlines()]
    gen_lines = [x for x in lines if x["task"] == "gsm8k"]
    assert len(gen_lines) == 4 and gen_lines[0]["prompt"] == prompts[0]
    assert {"output", "answer", "gold", "correct", "scores"} <= set(gen_lines[0])
    assert sum(x["task"] == "hellaswag" for x in lines) == 4


def test_evaluate_synthetic_groups_and_test_time_curve(model):
    r = evaluate(model, TOK, ["synthetic-reasoning", "synthetic-memorization"], synthetic=SYNTH, samples=4,
                 temperature=1.0, max_new_tokens=8, seed=3)
    reason = r["tasks"]["synthetic-reasoning"]
    assert reason["n_docs"] == 6 and reason["metrics"]["n_samples"] == 6
    assert {"exact_match/difficulty=1", "exact_match/difficulty=2"} <= set(reason["metrics"])
    assert set(reason["task_loss"]["groups"]) == {"difficulty=1", "difficulty=2"}
    curve = reason["test_time"]
    assert [row["k"] for row in curve] == [1, 2, 4]
    for row in curve:
        assert 0 <= row["maj_at_k"] <= 1 and 0 <= row["pass_at_k"] <= 1
    assert [row["pass_at_k"] for row in curve] == sorted(row["pass_at_k"] for row in curve)
    again = evaluate(model, TOK, ["synthetic-reasoning", "synthetic-memorization"], synthetic=SYNTH, samples=4,
                     temperature=1.0, max_new_tokens=8, seed=3, batch_size=3)
    for name, res in r["tasks"].items():  # batch size changes nothing but fp32 summation noise in losses
        assert again["tasks"][name]["metrics"] == res["metrics"] and again["tasks"][name]["test_time"] == res["test_time"]
        assert again["tasks"][name]["task_loss"]["bits_per_byte"] == pytest.approx(res["task_loss"]["bits_per_byte"], rel=1e-5)


def test_test_time_curve_counts_correct_samples(monkeypatch, model):
    """pass@k / maj@k are computed from the samples' extracted answers (scripted outputs here)."""
    import moelab.eval.runner as runner
    from moelab.eval.generate import Generation

    task = get_task("synthetic-memorization", docs=[{"prompt": "Q1\nAnswer:", "answer": "7"}, {"prompt": "Q2\nAnswer:", "answer": "9"}])
    script = {"Q1\nAnswer:": [" 7", " 3", " 7", " 5"], "Q2\nAnswer:": [" 1", " 2", " 1", " 9"]}

    def fake_generate(model, tok, prompts, **kw):
        seen: dict[str, int] = {}
        out = []
        for p in prompts:
            k = seen.get(p, 0)
            seen[p] = k + 1
            out.append(Generation(script[p][k], [1], "length"))
        return out

    monkeypatch.setattr(runner, "generate", fake_generate)
    r = evaluate(model, TOK, [task], samples=4, temperature=1.0, task_loss=False)
    curve = {row["k"]: row for row in r["tasks"]["synthetic-memorization"]["test_time"]}
    # doc 1: 2 of 4 correct, majority "7"; doc 2: 1 of 4 correct, majority "1"
    assert curve[1]["pass_at_k"] == pytest.approx((0.5 + 0.25) / 2)
    assert curve[4]["pass_at_k"] == 1.0
    assert curve[4]["maj_at_k"] == pytest.approx(0.5)
    assert r["tasks"]["synthetic-memorization"]["metrics"]["exact_match"] == pytest.approx(3 / 8)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def run_cli(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_eval_writes_results(capsys, checkpoint, data_dir, tmp_path):
    out = tmp_path / "res.json"
    rc, stdout, err = run_cli(capsys, "eval", checkpoint, "--tasks", "gsm8k,synthetic-reasoning,hellaswag", "--shots", "1",
                              "--limit", "3", "--max-new-tokens", "8", "--samples", "2", "--temperature", "0.7",
                              "--data-dir", data_dir, "--out", out, "--log-samples", "--no-progress", "--seed", "1")
    assert rc == 0, err
    r = json.loads(out.read_text())
    assert set(r["tasks"]) == {"gsm8k", "synthetic-reasoning", "hellaswag"}
    assert r["config"]["model"] == str(checkpoint) and r["config"]["samples"] == 2 and r["config"]["seed"] == 1
    assert r["tasks"]["synthetic-reasoning"]["n_docs"] == 3 and "test_time" in r["tasks"]["gsm8k"]
    assert "test_time" not in r["tasks"]["hellaswag"]
    csv = (tmp_path / "res.test_time.csv").read_text().splitlines()
    assert csv[0] == "model,task,k,pass_at_k,maj_at_k" and len(csv) == 1 + 2 * 2
    samples = (tmp_path / "res.samples.jsonl").read_text().splitlines()
    assert len(samples) == 3 * 2 + 3 * 2 + 3  # gsm8k, reasoning: 3 docs x 2 samples; hellaswag: 3 docs
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_cli_greedy_matches_python_api(capsys, checkpoint, data_dir, tmp_path, model):
    out = tmp_path / "res.json"
    rc, _, err = run_cli(capsys, "eval", checkpoint, "--tasks", "triviaqa", "--shots", "2", "--limit", "4",
                         "--max-new-tokens", "6", "--data-dir", data_dir, "--out", out, "--no-progress")
    assert rc == 0, err
    api = evaluate(model, TOK, ["triviaqa"], shots=2, limit=4, max_new_tokens=6, data_dir=data_dir)
    assert json.loads(out.read_text())["tasks"] == json.loads(json.dumps(api["tasks"]))


def test_cli_on_hugging_face_mixtral_dir(capsys, checkpoint, data_dir, tmp_path, model):
    """MODEL may be an exported Mixtral directory; same weights, same numbers."""
    hf_dir = tmp_path / "mixtral"
    moelab.export_hf(model, hf_dir)
    TOK.save(hf_dir)
    args = ["--tasks", "hellaswag,gsm8k", "--shots", "1", "--limit", "3", "--max-new-tokens", "6", "--data-dir", data_dir, "--no-progress"]
    assert run_cli(capsys, "eval", hf_dir, *args, "--out", tmp_path / "hf.json")[0] == 0
    assert run_cli(capsys, "eval", checkpoint, *args, "--out", tmp_path / "ck.json")[0] == 0
    hf, ck = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("hf", "ck"))
    assert hf["tasks"]["gsm8k"]["metrics"] == ck["tasks"]["gsm8k"]["metrics"]
    assert hf["tasks"]["hellaswag"]["task_loss"]["bits_per_byte"] == pytest.approx(ck["tasks"]["hellaswag"]["task_loss"]["bits_per_byte"], rel=1e-4)
    assert hf["config"]["total_params"] == ck["config"]["total_params"]


@pytest.mark.parametrize("args, needle", [
    (["--tasks", "gsm8k,nope"], "unknown eval task 'nope'; choose one of: gsm8k, gsm_plus, hellaswag"),
    (["--tasks", ","], "no eval tasks given"),
    (["--tasks", "gsm8k", "--samples", "0"], "--samples must be >= 1"),
    (["--tasks", "gsm8k", "--samples", "4", "--temperature", "0.8", "--ks", "1,8"], "--ks needs values in [1, --samples=4]"),
    (["--tasks", "gsm8k", "--samples", "4", "--ks", "1,x", "--temperature", "1"], "--ks must be comma-separated integers"),
    (["--tasks", "gsm8k", "--samples", "4"], "set --temperature > 0"),
    (["--tasks", "gsm8k", "--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--tasks", "gsm8k", "--limit", "0"], "--limit must be >= 1"),
    (["--tasks", "gsm8k", "--batch-size", "0"], "batch_size must be >= 1"),
    (["--tasks", "gsm8k", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--tasks", "gsm8k", "--shots", "-1"], "--shots must be >= 0"),
])
def test_cli_bad_settings(capsys, checkpoint, tmp_path, args, needle):
    rc, _, err = run_cli(capsys, "eval", checkpoint, *args, "--out", tmp_path / "r.json", "--no-progress")
    assert rc == 1
    assert needle in err and err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r.json").exists()


def test_cli_bad_data(capsys, checkpoint, tmp_path):
    empty_dir = tmp_path / "nothing"
    rc, _, err = run_cli(capsys, "eval", checkpoint, "--tasks", "gsm8k", "--data-dir", empty_dir, "--out", tmp_path / "r.json")
    assert rc == 1 and "data file not found" in err and str((empty_dir / "gsm8k" / "test.jsonl").resolve()) in err.replace("\n", "")

    bad = tmp_path / "bad"
    write_jsonl(bad / "gsm8k" / "train.jsonl", GSM)
    (bad / "gsm8k" / "test.jsonl").write_text(json.dumps(GSM[0]) + "\n{not json\n")
    rc, _, err = run_cli(capsys, "eval", checkpoint, "--tasks", "gsm8k", "--data-dir", bad, "--out", tmp_path / "r.json")
    assert rc == 1 and "test.jsonl:2: invalid JSON" in err.replace("\n", "")

    (bad / "gsm8k" / "test.jsonl").write_text("\n\n")
    rc, _, err = run_cli(capsys, "eval", checkpoint, "--tasks", "gsm8k", "--data-dir", bad, "--out", tmp_path / "r.json")
    assert rc == 1 and "holds no records" in err


def test_cli_bad_model_paths(capsys, tmp_path, model):
    rc, _, err = run_cli(capsys, "eval", tmp_path / "missing", "--tasks", "gsm8k", "--out", tmp_path / "r.json")
    assert rc == 1 and "does not exist" in err

    # a checkpoint without a tokenizer and without data.synthetic
    bare = tmp_path / "bare"
    moelab.save(model, bare)
    rc, _, err = run_cli(capsys, "eval", bare, "--tasks", "gsm8k", "--out", tmp_path / "r.json")
    assert rc == 1 and "no tokenizer found" in err and "--tokenizer" in err
    rc, _, err = run_cli(capsys, "eval", bare, "--tasks", "synthetic-reasoning", "--tokenizer", "byte", "--out", tmp_path / "r.json")
    assert rc == 1 and "no 'data.synthetic' section" in err

    # empty synthetic test set (nothing memorised)
    nomem = tmp_path / "nomem"
    save_model(model, nomem, extra={"data": DataConfig(synthetic=SynthNoMem()).model_dump()})
    rc, _, err = run_cli(capsys, "eval", nomem, "--tasks", "synthetic-memorization", "--tokenizer", "byte", "--out", tmp_path / "r.json")
    assert rc == 1 and "no test documents" in err


def SynthNoMem() -> SyntheticConfig:
    return SyntheticConfig(n_entities=3, memorization_weight=0.0)


def test_python_api_errors(model, data_dir):
    with pytest.raises(ConfigError, match="needs the synthetic data config"):
        evaluate(model, TOK, ["synthetic-memorization"])
    with pytest.raises(ConfigError, match="unknown eval task"):
        evaluate(model, TOK, ["gsm9k"], data_dir=data_dir)
    with pytest.raises(DataError, match="no test documents"):
        evaluate(model, TOK, ["synthetic-memorization"], synthetic=SynthNoMem())


def test_api_path_with_a_tokenizer_object(data_dir, tmp_path, model):
    """evaluate(path, tokenizer=<object>) uses that object (a checkpoint without a tokenizer file)."""
    bare = tmp_path / "bare"
    moelab.save(model, bare)
    by_path = evaluate(bare, TOK, ["triviaqa"], shots=2, limit=4, max_new_tokens=6, data_dir=data_dir)
    by_model = evaluate(model, TOK, ["triviaqa"], shots=2, limit=4, max_new_tokens=6, data_dir=data_dir)
    assert by_path["tasks"] == by_model["tasks"]


def test_compiled_decode_gives_the_same_results(monkeypatch, model, capsys, checkpoint, tmp_path):
    """``compile_decode`` / ``--compile`` reach the generator and change no metric (the static decode
    step is run eagerly here; tests/test_generate.py compiles it for real)."""
    import sys

    monkeypatch.setattr(sys.modules["moelab.eval.generate"], "compiled_decode_step", lambda m: m.decode_step)
    kw = dict(synthetic=SYNTH, samples=2, temperature=1.0, max_new_tokens=8, seed=3, batch_size=4, task_loss=False)
    plain = evaluate(model, TOK, ["synthetic-reasoning", "synthetic-memorization"], **kw)
    compiled = evaluate(model, TOK, ["synthetic-reasoning", "synthetic-memorization"], compile_decode=True, **kw)
    assert compiled["config"]["compile_decode"] is True and plain["config"]["compile_decode"] is False
    for name, res in plain["tasks"].items():
        assert compiled["tasks"][name]["metrics"] == res["metrics"]
    out = tmp_path / "r.json"
    rc, _, _ = run_cli(capsys, "eval", checkpoint, "--tasks", "synthetic-memorization", "--limit", "3", "--compile",
                       "--out", out, "--no-progress")
    assert rc == 0 and json.loads(out.read_text())["config"]["compile_decode"] is True


def test_api_settings_are_checked_before_the_model_loads(monkeypatch, tmp_path):
    import moelab.eval.loading as loading

    monkeypatch.setattr(loading, "load_for_eval", lambda *a, **k: pytest.fail("model loaded before settings were checked"))
    with pytest.raises(ConfigError, match="top_p"):
        evaluate(tmp_path / "some-run", None, ["synthetic-memorization"], top_p=2.0)


@pytest.mark.parametrize("samples, task_loss", [(1, True), (3, False), (2, True)])
def test_progress_bar_total_is_the_work_done(monkeypatch, model, data_dir, samples, task_loss):
    import moelab.eval.runner as runner

    class FakeBar:
        def __init__(self):
            self.total, self.done = {}, {}

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def add_task(self, name, total):
            self.total[name], self.done[name] = total, 0
            return name

        def update(self, task, advance):
            self.done[task] += advance

    bar = FakeBar()
    monkeypatch.setattr(runner, "_progress_bar", lambda enabled: bar)
    kw = dict(temperature=1.0) if samples > 1 else {}
    evaluate(model, TOK, ["synthetic-reasoning", "hellaswag"], synthetic=SYNTH, data_dir=data_dir, limit=3, shots=1,
             samples=samples, max_new_tokens=4, task_loss=task_loss, progress=True, **kw)
    assert bar.total == bar.done and all(v > 0 for v in bar.total.values())
