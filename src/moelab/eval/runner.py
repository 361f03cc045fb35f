"""Run evaluation tasks on a model: metrics, answer-only task loss, test-time-compute curves.

``evaluate(model, tokenizer, tasks=[...], ...) -> dict`` is the Python API; ``moelab eval`` wraps it.
For every task:

1. **metrics** -- documents -> lm-eval requests (few-shot prompts drawn as lm-eval does) -> model
   outputs (generation, or per-choice log-likelihoods) -> ``task.score`` -> ``task.aggregate``. Group
   means such as ``exact_match/difficulty=3`` (synthetic reasoning) or
   ``exact_match,strict-match/<perturbation>`` (GSM-Plus) come from the task.
2. **task loss** -- cross-entropy of the gold answer only (``task.answer_text(doc)``, e.g. ``" 1923"``)
   given the same few-shot prompt (answers longer than the context window are scored in chunks), summed over documents, in nats/token, bits/token and bits/byte
   (:func:`moelab.eval.metrics.task_loss`), overall and per group.
3. **test-time compute** (generation tasks, ``samples > 1``) -- ``samples`` sampled generations per
   document (``temperature`` > 0, ``top_p``); pass@k (unbiased) and maj@k for ``ks`` (default 1, 2, 4,
   ..., samples) via :func:`moelab.eval.metrics.test_time_curve`. With several samples the task metrics
   are means over all samples (``n_samples`` still counts documents).

Sample ``s`` of document ``i`` of task ``t`` draws its randomness from ``(seed, "t:i:s")`` only, so the
numbers do not depend on batch size. Model outputs are parsed with regular expressions, never run.

The returned dict (and ``results.json``)::

    {"moelab_version", "config": {model, params, tasks, shots, samples, ...},
     "tasks": {name: {"n_docs", "metrics", "task_loss", "test_time"?}},
     "timings": {name: {...seconds, generated tokens/s}, "total_seconds"}}
"""

from __future__ import annotations

import inspect
import json
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import ConfigError, DataError
from ..io import atomic_write_text
from .generate import check_sampling, generate
from .loglikelihood import loglikelihood, move_trailing_whitespace
from .metrics import default_ks, task_loss as to_task_loss, test_time_curve
from .tasks import GenerationTask, MultipleChoiceTask, Task, get_task, list_tasks
from .tasks.base import GROUP_KEY, argmax
from .tasks.files import LOCAL, check_source
from .tasks.registry import TASKS

SYNTHETIC_TASKS = ("synthetic-memorization", "synthetic-reasoning")


@dataclass
class EvalSettings:
    """Everything that shapes an evaluation besides the model and the task names (validated)."""

    shots: int | None = None
    limit: int | None = None
    samples: int = 1
    ks: list[int] | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    batch_size: int = 16
    max_new_tokens: int | None = None
    seed: int = 0
    source: str = LOCAL
    compile_decode: bool = False

    def __post_init__(self) -> None:
        check_source(self.source)
        if self.shots is not None and self.shots < 0:
            raise ConfigError(f"--shots must be >= 0, got {self.shots}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be >= 1 document, got {self.limit}")
        if self.samples < 1:
            raise ConfigError(f"--samples must be >= 1, got {self.samples}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        check_sampling(1, self.temperature, self.top_p, self.batch_size)
        if self.samples > 1 and self.temperature == 0:
            raise ConfigError(
                f"--samples {self.samples} with greedy decoding gives {self.samples} identical samples; "
                "set --temperature > 0 (e.g. 0.8)"
            )
        if self.ks is not None:
            bad = [k for k in self.ks if k < 1 or k > self.samples]
            if bad or not self.ks:
                raise ConfigError(
                    f"--ks needs values in [1, --samples={self.samples}], got {self.ks}; "
                    f"draw at least k samples per problem (--samples {max(self.ks or [1])})"
                )
            self.ks = sorted(set(self.ks))


@dataclass
class _TaskRun:
    """One task's documents, requests and collected outputs."""

    name: str
    task: Task
    docs: list[dict]
    requests: list
    per_sample: list[list[dict]] = field(default_factory=list)  # [doc][sample] score dicts
    outputs: list[list[Any]] = field(default_factory=list)  # [doc][sample] generation or loglikelihoods
    answer_scores: list = field(default_factory=list)  # [doc] ContinuationScore of the gold answer
    answer_bytes: list[int] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def n_units(self, samples: int, task_loss: bool) -> int:
        """Progress units: generated sequences (``samples`` per doc) or scored continuations, plus one
        task-loss item per doc when ``task_loss``."""
        if isinstance(self.task, MultipleChoiceTask):
            model_units = sum(len(r.continuations) for r in self.requests)
        else:
            model_units = len(self.docs) * samples
        return model_units + (len(self.docs) if task_loss else 0)


# --------------------------------------------------------------------------------------------------
# task construction
# --------------------------------------------------------------------------------------------------


def synthetic_docs(name: str, synthetic) -> list[dict]:
    """The test docs of a synthetic task from a SyntheticConfig (or its dict)."""
    from ..data.config import SyntheticConfig
    from ..data.synthetic import memorization_test_set, reasoning_test_set

    cfg = synthetic if isinstance(synthetic, SyntheticConfig) else SyntheticConfig.model_validate(synthetic)
    docs = memorization_test_set(cfg) if name == "synthetic-memorization" else reasoning_test_set(cfg)
    if not docs:
        raise DataError(
            f"{name}: the checkpoint's synthetic data has no test documents "
            "(memorization_weight is 0?); drop the task or evaluate a model trained on memorisation data"
        )
    return docs


def build_task(
    name: str,
    *,
    shots: int | None = None,
    max_new_tokens: int | None = None,
    data_dir: str | Path | None = None,
    source: str = LOCAL,
    synthetic=None,
) -> Task:
    """Construct a registered task, passing only the options it accepts (``source`` goes to file-backed tasks)."""
    if name not in TASKS:
        raise ConfigError(f"unknown eval task {name!r}; choose one of: {', '.join(list_tasks())}")
    params = inspect.signature(TASKS[name]).parameters
    kwargs: dict[str, Any] = {}
    if shots is not None:
        kwargs["num_fewshot"] = shots
    if max_new_tokens is not None and "max_new_tokens" in params:
        kwargs["max_new_tokens"] = max_new_tokens
    if data_dir is not None and "data_dir" in params:
        kwargs["data_dir"] = data_dir
    if "source" in params:
        kwargs["source"] = source
    if "docs" in params:
        if synthetic is None:
            raise ConfigError(
                f"task {name!r} needs the synthetic data config the model was trained on; evaluate a checkpoint "
                "whose config.json has 'data.synthetic' (or pass synthetic= to evaluate())"
            )
        kwargs["docs"] = synthetic_docs(name, synthetic)
    return get_task(name, **kwargs)


def parse_task_list(tasks: str | Sequence[str]) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` -> unique names in order; unknown names are an error listing known ones."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t and t.strip()]
    if not names:
        raise ConfigError(f"no eval tasks given; pass --tasks with some of: {', '.join(list_tasks())}")
    for n in names:
        if n not in TASKS:
            raise ConfigError(f"unknown eval task {n!r}; choose one of: {', '.join(list_tasks())}")
    return list(dict.fromkeys(names))


# --------------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------------


def _run_generation(run: _TaskRun, model, tokenizer, s: EvalSettings, tick) -> None:
    task: GenerationTask = run.task  # type: ignore[assignment]
    req0 = run.requests[0]
    prompts, sample_ids = [], []
    for i, req in enumerate(run.requests):
        for k in range(s.samples):
            prompts.append(req.prompt)
            sample_ids.append(f"{run.name}:{i}:{k}")
    t0 = time.perf_counter()
    max_new = req0.max_new_tokens
    if s.max_new_tokens is None:  # a task default must not exceed a small model's context: keep half for the prompt
        max_new = max(1, min(max_new, model.config.max_seq_len // 2))
    gens = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new,
        stop=req0.stop,
        temperature=s.temperature,
        top_p=s.top_p,
        seed=s.seed,
        sample_ids=sample_ids,
        batch_size=s.batch_size,
        progress=tick,
        compile=s.compile_decode,
    )
    seconds = time.perf_counter() - t0
    n_tokens = sum(len(g.token_ids) for g in gens)
    run.timings.update(generate_seconds=seconds, generated_tokens=n_tokens, generated_tokens_per_second=n_tokens / max(seconds, 1e-9))
    run.outputs = [gens[i * s.samples : (i + 1) * s.samples] for i in range(len(run.docs))]
    run.per_sample = [[task.score(doc, g.text) for g in outs] for doc, outs in zip(run.docs, run.outputs)]


def _run_multiple_choice(run: _TaskRun, model, tokenizer, s: EvalSettings, tick) -> None:
    pairs = [(r.context, c) for r in run.requests for c in r.continuations]
    t0 = time.perf_counter()
    scores = loglikelihood(model, tokenizer, pairs, batch_size=s.batch_size, progress=tick)
    run.timings["loglikelihood_seconds"] = time.perf_counter() - t0
    pos = 0
    run.outputs, run.per_sample = [], []
    for doc, req in zip(run.docs, run.requests):
        lls = [sc.logprob for sc in scores[pos : pos + len(req.continuations)]]
        pos += len(req.continuations)
        run.outputs.append([lls])
        run.per_sample.append([run.task.score(doc, lls)])


def _run_task_loss(run: _TaskRun, model, tokenizer, prompts: list[str], s: EvalSettings, tick) -> None:
    answers = [run.task.answer_text(doc) for doc in run.docs]
    t0 = time.perf_counter()
    run.answer_scores = loglikelihood(
        model, tokenizer, list(zip(prompts, answers)), batch_size=s.batch_size, progress=tick, chunk_long_continuations=True
    )
    run.answer_bytes = [len(move_trailing_whitespace(p, a)[1].encode("utf-8")) for p, a in zip(prompts, answers)]
    run.timings["task_loss_seconds"] = time.perf_counter() - t0


def _loss_dict(nll: float, n_tokens: int, n_bytes: int) -> dict[str, float]:
    tl = to_task_loss(nll, n_tokens, n_bytes)
    return {
        "nats_per_token": tl.nats_per_token,
        "bits_per_token": tl.bits_per_token,
        "bits_per_byte": tl.bits_per_byte,
        "n_tokens": n_tokens,
        "n_bytes": n_bytes,
    }


def _summarise(run: _TaskRun, s: EvalSettings) -> dict[str, Any]:
    flat = [score for doc_scores in run.per_sample for score in doc_scores]
    metrics = run.task.aggregate(flat)
    if s.samples > 1 and isinstance(run.task, GenerationTask):
        metrics = {k: (v / s.samples if k.startswith("n_samples") else v) for k, v in metrics.items()}
    out: dict[str, Any] = {"n_docs": len(run.docs), "metrics": metrics}
    if run.answer_scores:
        groups: dict[str, list[int]] = {}
        for i, doc_scores in enumerate(run.per_sample):
            g = doc_scores[0].get(GROUP_KEY)
            if g is not None:
                groups.setdefault(str(g), []).append(i)

        def loss_over(idx: Sequence[int]) -> dict[str, float]:
            return _loss_dict(
                sum(-run.answer_scores[i].logprob for i in idx),
                sum(run.answer_scores[i].n_tokens for i in idx),
                sum(run.answer_bytes[i] for i in idx),
            )

        loss = loss_over(range(len(run.docs)))
        if groups:
            loss["groups"] = {g: loss_over(idx) for g, idx in sorted(groups.items())}
        out["task_loss"] = loss
    if s.samples > 1 and isinstance(run.task, GenerationTask):
        task: GenerationTask = run.task  # type: ignore[assignment]
        problems = [
            ([task.vote_answer(doc, g.text) for g in outs], task.gold_answer(doc))
            for doc, outs in zip(run.docs, run.outputs)
        ]
        out["test_time"] = test_time_curve(problems, s.ks or default_ks(s.samples), seed=s.seed)
    return out


def _sample_records(run: _TaskRun, prompts: list[str]) -> list[dict[str, Any]]:
    """Per-sample log lines: prompt, output, extracted answer, gold, correctness, scores."""
    records = []
    for i, (doc, prompt, outs, scores) in enumerate(zip(run.docs, prompts, run.outputs, run.per_sample)):
        base: dict[str, Any] = {"task": run.name, "doc": i, "prompt": prompt}
        if run.answer_scores:
            base["answer_nll_nats"] = -run.answer_scores[i].logprob
            base["answer_tokens"] = run.answer_scores[i].n_tokens
        if isinstance(run.task, MultipleChoiceTask):
            lls = outs[0]
            gold = run.task.gold_index(doc)
            pred = argmax(lls)
            records.append({**base, "choices": run.task.choices(doc), "loglikelihoods": lls, "pred": pred, "gold": gold,
                            "correct": bool(scores[0].get("acc")), "scores": scores[0]})
            continue
        task: GenerationTask = run.task  # type: ignore[assignment]
        gold = task.gold_answer(doc)
        for k, (gen, score) in enumerate(zip(outs, scores)):
            answer = task.vote_answer(doc, gen.text)
            records.append({**base, "sample": k, "output": gen.text, "finish_reason": gen.finish_reason,
                            "answer": answer, "gold": gold, "correct": answer is not None and answer == gold,
                            "scores": score})
    return records


def _progress_bar(enabled: bool):
    if not enabled:
        return nullcontext(None)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=Console(stderr=True), transient=False,
    )


def model_summary(model) -> dict[str, Any]:
    """Parameter counts (moelab.accounting) and the architecture of ``model``."""
    from .. import accounting

    cfg = model.config
    c = accounting.param_counts(cfg)
    return {
        "total_params": c.total,
        "active_params": c.active,
        "total_params_no_embed": c.total_no_embed,
        "active_params_no_embed": c.active_no_embed,
        "n_experts": cfg.n_experts,
        "top_k": cfg.top_k,
        "model_config": cfg.to_dict(),
    }


def evaluate(
    model,
    tokenizer=None,
    tasks: Sequence[str | Task] | str = (),
    *,
    shots: int | None = None,
    limit: int | None = None,
    samples: int = 1,
    ks: Sequence[int] | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    seed: int = 0,
    data_dir: str | Path | None = None,
    source: str = LOCAL,
    synthetic=None,
    task_loss: bool = True,
    log_samples: str | Path | None = None,
    progress: bool = False,
    model_info: dict[str, Any] | None = None,
    compile_decode: bool = False,
) -> dict[str, Any]:
    """Evaluate ``model`` on ``tasks`` (names or :class:`Task` objects); see the module docstring.

    ``model`` is a model object (then ``tokenizer`` is a tokenizer or a spec such as ``"byte"``) or a
    path to a checkpoint, run or Mixtral directory, whose tokenizer and synthetic data config are used.

    ``shots`` / ``max_new_tokens`` override the task defaults; ``limit`` keeps the first documents;
    ``source`` is where gsm8k, gsm_plus, triviaqa and hellaswag get their records: ``"local"`` JSON
    Lines files under ``data_dir`` (default) or ``"hf"``, the Hugging Face datasets lm-eval uses
    (needs ``pip install 'moelab[datasets]'``; see :mod:`moelab.eval.tasks.files`);
    ``synthetic`` (a SyntheticConfig or its dict) provides the synthetic test sets; ``log_samples``
    writes one JSON line per sample there. ``compile_decode`` generates through the compiled decode
    step (:func:`moelab.eval.generate.generate` with ``compile=True``): faster once compiled, the same
    answers up to floating-point rounding. Every setting is checked before a model is loaded, and all
    documents and few-shot pools are loaded before the model runs, so bad inputs fail fast.
    """
    from .. import __version__

    settings = EvalSettings(
        shots=shots, limit=limit, samples=samples, ks=list(ks) if ks is not None else None,
        temperature=temperature, top_p=top_p, batch_size=batch_size, max_new_tokens=max_new_tokens, seed=seed,
        source=source, compile_decode=compile_decode,
    )

    if isinstance(model, (str, Path)):  # a checkpoint, run or Mixtral directory: load what it holds
        from .loading import load_for_eval, synthetic_config

        loaded = load_for_eval(model, tokenizer=tokenizer)
        model, tokenizer = loaded.model, loaded.tokenizer
        if synthetic is None and isinstance((loaded.meta.get("data") or {}).get("synthetic"), dict):
            synthetic = synthetic_config(loaded.meta, loaded.checkpoint / "config.json")
    elif tokenizer is None or isinstance(tokenizer, (str, Path)):
        from ..data.tokenizer import load_tokenizer

        if tokenizer is None:
            raise ConfigError("evaluate() needs a tokenizer for a model object: pass tokenizer='byte', a tokenizer.json or a tokenizer")
        tokenizer = load_tokenizer(tokenizer)
    if isinstance(tasks, str):
        tasks = parse_task_list(tasks)
    if not tasks:
        raise ConfigError(f"no eval tasks given; choose some of: {', '.join(list_tasks())}")
    t_start = time.perf_counter()
    runs: list[_TaskRun] = []
    for t in tasks:
        task = t if isinstance(t, Task) else build_task(
            parse_task_list([t])[0], shots=shots, max_new_tokens=max_new_tokens, data_dir=data_dir, source=source,
            synthetic=synthetic,
        )
        if not isinstance(task, (GenerationTask, MultipleChoiceTask)):
            raise ConfigError(f"task {task.name!r} is neither a generation nor a multiple-choice task")
        docs = task.load_docs(limit)
        if not docs:
            raise DataError(f"task {task.name!r} has no documents to evaluate; check its data file")
        runs.append(_TaskRun(task.name, task, docs, task.requests(docs)))

    report: dict[str, Any] = {"tasks": {}, "timings": {}}
    records: list[dict[str, Any]] = []
    was_training = model.training
    model.eval()
    try:
        with _progress_bar(progress) as bar:
            for run in runs:
                bar_task = bar.add_task(run.name, total=run.n_units(samples, task_loss)) if bar is not None else None
                tick: Callable[[int], None] | None = (lambda n, b=bar_task: bar.update(b, advance=n)) if bar is not None else None
                t0 = time.perf_counter()
                prompts = [r.prompt if isinstance(run.task, GenerationTask) else r.context for r in run.requests]
                if isinstance(run.task, GenerationTask):
                    _run_generation(run, model, tokenizer, settings, tick)
                else:
                    _run_multiple_choice(run, model, tokenizer, settings, tick)
                if task_loss:
                    _run_task_loss(run, model, tokenizer, prompts, settings, tick)
                run.timings["seconds"] = time.perf_counter() - t0
                report["tasks"][run.name] = _summarise(run, settings)
                report["timings"][run.name] = run.timings
                if log_samples is not None:
                    records += _sample_records(run, prompts)
    finally:
        model.train(was_training)
    report["timings"]["total_seconds"] = time.perf_counter() - t_start
    report = {
        "moelab_version": __version__,
        "config": {
            **(model_info or {}),
            **model_summary(model),
            "tasks": [r.name for r in runs],
            "shots": shots,
            "shots_per_task": {r.name: r.task.num_fewshot for r in runs},
            "limit": limit,
            "samples": samples,
            "ks": settings.ks or (default_ks(samples) if samples > 1 else None),
            "temperature": temperature,
            "top_p": top_p,
            "batch_size": batch_size,
            "max_new_tokens": max_new_tokens,
            "seed": seed,
            "source": source,
            "compile_decode": compile_decode,
            "tokenizer": getattr(tokenizer, "spec", type(tokenizer).__name__),
        },
        **report,
    }
    if log_samples is not None:
        atomic_write_text(log_samples, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return report


def test_time_csv(report: dict[str, Any], model_name: str) -> str:
    """The test-time curves of a report as CSV: ``model,task,k,pass_at_k,maj_at_k``."""
    lines = ["model,task,k,pass_at_k,maj_at_k"]
    for name, res in report["tasks"].items():
        for row in res.get("test_time", []):
            lines.append(f"{model_name},{name},{row['k']},{row['pass_at_k']:.6f},{row['maj_at_k']:.6f}")
    return "\n".join(lines) + "\n"


test_time_csv.__test__ = False  # type: ignore[attr-defined]  # not a pytest test
