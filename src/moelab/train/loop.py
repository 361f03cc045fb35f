"""The pre-training loop: ``train(run_config, out_dir) -> summary``.

One optimizer step = ``grad_accum_steps`` micro steps of ``micro_batch_size`` sequences on every rank.
The loader yields this rank's ``micro_batch_size * grad_accum_steps`` rows of the global batch at once;
micro batch ``i`` is rows ``[i*m, (i+1)*m)``. Each micro loss is divided by ``grad_accum_steps`` and
DDP averages over ranks, so the gradient is the mean over the global batch's micro batches.

Per step, in order: set LR (:func:`moelab.train.schedule.lr_at`), forward/backward the micro batches,
stop if the loss is not finite (:class:`TrainingDiverged`, nothing is saved), clip the global gradient
norm, AdamW update, validation loss every ``eval_every`` steps and at the end, one ``metrics.jsonl``
record every ``log_every`` steps (and at evaluations and the end), a checkpoint every
``checkpoint_every`` steps and at the end. Everything that influences a step's numbers (weights,
optimizer state, step, loader position, RNG) is in the checkpoint, so a resumed run repeats the
uninterrupted run's losses bit for bit on CPU.

Run directory::

    config.yaml          resolved RunConfig (checked against on resume)
    data/                the materialised synthetic corpus (source=synthetic only; built once)
    metrics.jsonl        one JSON object per logged step
    checkpoints/step_N/  see moelab.train.checkpoint
    tensorboard/         when train.tensorboard
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

from .. import accounting
from ..data.loader import TokenLoader, eval_batches
from ..data.shards import ShardSet
from ..data.synthetic import materialize
from ..data.tokenizer import load_tokenizer
from ..errors import ConfigError, MoelabError
from ..config import read_mapping
from ..io import atomic_write_text
from . import checkpoint as ckpt
from . import distributed
from .config import RESUME_SAFE_KEYS, RunConfig, diff_keys, tokens_per_step, total_steps
from .flops import peak_flops
from .metrics import MetricsLog
from .optim import build_optimizer, join_state, split_state
from .progress import TrainProgress
from .schedule import lr_at

RUN_CONFIG = "config.yaml"
DATA_DIR = "data"


class TrainingDiverged(MoelabError):
    """The loss or gradient norm became NaN/Inf; the run stopped without saving the bad state."""


# ------------------------------------------------------------------ setup helpers
def resolve_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is available; use train.device=cpu or auto")
        return torch.device("cuda")
    return torch.device("cpu")


def autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPU (``auto``/``bf16``), fp32 on CPU unless ``bf16`` is asked for."""
    if dtype == "bf16" or (dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def check_run_dir(run: RunConfig, out: Path, resume: bool) -> None:
    """Refuse a run directory that holds a different run, or checkpoints when ``resume`` is off."""
    stored = out / RUN_CONFIG
    if stored.is_file():
        old = read_mapping(stored)
        differing = [k for k in diff_keys(old, run.to_dict()) if k not in RESUME_SAFE_KEYS]
        if differing:
            shown = ", ".join(differing[:6]) + (" ..." if len(differing) > 6 else "")
            raise ConfigError(f"{out} holds a run with a different config ({shown}); use the same config to resume or choose another --out")
    if not resume and ckpt.list_checkpoints(out):
        raise ConfigError(f"{out} already holds checkpoints; pass --resume to continue it or choose another --out")


def prepare_data(run: RunConfig, out: Path, d: distributed.Dist):
    """``(train_sources, val ShardSet | None, tokenizer)``; materialises the synthetic corpus once (rank 0)."""
    dc = run.data
    if dc.source == "synthetic":
        data_dir = out / DATA_DIR
        tokenizer = load_tokenizer(dc.tokenizer)
        if d.is_main and not (data_dir / "synthetic.json").is_file():
            materialize(dc.synthetic, tokenizer, data_dir, n_tokens=dc.synthetic_tokens, seed=dc.seed, overwrite=True)
        distributed.barrier(d)
        return [(ShardSet.open(data_dir / "train"), 1.0)], ShardSet.open(data_dir / "val"), tokenizer
    sources = [(ShardSet.open(s.path), s.weight) for s in dc.shards]
    val = ShardSet.open(dc.val_path) if dc.val_path else None
    tokenizer = sources[0][0].tokenizer()
    wanted = load_tokenizer(dc.tokenizer)
    if wanted.descriptor() != sources[0][0].tokenizer_descriptor:
        raise ConfigError(f"data.tokenizer={dc.tokenizer!r} is not the tokenizer the shards were prepared with; set data.tokenizer to the shards' tokenizer")
    return sources, val, tokenizer


def evaluate(model, val: ShardSet, seq_len: int, batch_size: int, n_batches: int, device: torch.device, amp: torch.dtype | None) -> float:
    """Mean next-token cross-entropy (nats) over the first ``n_batches * batch_size`` validation windows."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0  # summed on the device: one sync
    with torch.no_grad(), _autocast(device, amp):
        for x, y in eval_batches(val, seq_len, batch_size, max_windows=n_batches * batch_size):
            out = model(x.to(device), y.to(device))
            total += out.ce_loss.double() * y.numel()
            count += y.numel()
    model.train(was_training)
    return float(total) / max(1, count)


def _autocast(device: torch.device, amp: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()


def _export_model(raw, model_state: dict[str, torch.Tensor] | None):
    """The ``MoELM`` to write: the model itself, or (FSDP) a CPU copy holding the gathered weights."""
    if model_state is None:
        return raw
    from ..model import MoELM

    from ..checkpoint import load_state_into

    copy = MoELM(raw.config)
    load_state_into(copy, model_state, "gathered FSDP state")
    return copy


# ------------------------------------------------------------------ the loop
def train(run: RunConfig, out_dir: str | Path, resume: bool = True, quiet: bool = False,
          until_step: int | None = None) -> dict[str, Any]:
    """Train (or resume) the run in ``out_dir``; returns a summary dict (see :func:`_train`).

    ``until_step`` stops after that step (of the run's ``train.steps``, whose learning-rate schedule is
    unchanged) with a checkpoint, as if the run were interrupted there: calling again without it (or
    with a later step) continues bit for bit on CPU. For time-limited jobs, or to look at a run midway.
    """
    if until_step is not None and until_step < 1:
        raise ConfigError(f"until_step={until_step} must be at least 1; give the step to stop after, or none to train to the end")
    device = resolve_device(run.train.device)
    d = distributed.setup(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
    try:
        return _train(run, Path(out_dir), resume, quiet, d, device, until_step)
    finally:
        distributed.teardown(d)


def _train(run: RunConfig, out: Path, resume: bool, quiet: bool, d: distributed.Dist, device: torch.device,
           until_step: int | None = None) -> dict[str, Any]:
    tc, seq_len = run.train, run.data.seq_len
    check_run_dir(run, out, resume)
    steps = total_steps(run, d.world_size)
    stop = steps if until_step is None else min(steps, until_step)
    per_step = tokens_per_step(run, d.world_size)
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_temporaries(out)
    sources, val, tokenizer = prepare_data(run, out, d)
    if tokenizer.vocab_size > run.model.vocab_size:
        raise ConfigError(f"model.vocab_size={run.model.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}; raise model.vocab_size")

    import moelab

    raw = moelab.build(run.model, seed=tc.seed).to(device)
    if tc.compile:
        raw.compile_blocks()  # per decoder block: small graphs, compiled once, reused by every layer
    model = distributed.wrap(raw, tc.distributed, d, device)
    optimizer = build_optimizer(model, tc.lr, (tc.beta1, tc.beta2), tc.eps, tc.weight_decay)
    m, accum = tc.micro_batch_size, tc.grad_accum_steps
    loader = TokenLoader(sources, seq_len, m * accum, seed=run.data.seed, rank=d.rank, world_size=d.world_size)
    amp = autocast_dtype(tc.dtype, device)
    fsdp = d.enabled and tc.distributed == "fsdp"
    eval_model = model if fsdp else raw

    step, tokens, resumed_from = 0, 0, None
    if resume:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ckpt.CorruptCheckpointWarning)
            good = ckpt.latest_good_checkpoint(out)
        for w in caught if d.is_main else []:  # one line each on the console, not a warnings traceback
            print(f"warning: {w.message}", file=sys.stderr, flush=True)
        if good is not None:
            r = ckpt.load_checkpoint(good)
            distributed.load_full_state(model, optimizer, r.model_tensors, join_state(r.optimizer_tensors, r.state["optimizer"]))
            loader.load_state_dict(r.state["loader"])
            ckpt.set_rng_state(r.rng_tensors, r.state["rng"])
            step, tokens, resumed_from = r.step, int(r.state["tokens"]), str(good)

    if d.is_main:  # only once the run (and any checkpoint) is known to fit this config
        atomic_write_text(out / RUN_CONFIG, yaml.safe_dump(run.to_dict(), sort_keys=False))
    log = MetricsLog(out, step, enabled=d.is_main, tensorboard=tc.tensorboard)
    progress = TrainProgress(steps, step, enabled=d.is_main and not quiet)
    flops_per_token = accounting.train_flops_per_token(run.model, seq_len)
    peak = tc.peak_flops or peak_flops(device.type)
    if resumed_from:
        progress.note(f"resumed from {resumed_from} (step {step}/{steps})")
    last_ckpt = resumed_from
    last_val: float | None = None
    last_loss: float | None = None
    t_start = t_last = time.perf_counter()
    tokens_since = 0
    n_layers = run.model.n_layers
    try:
        while step < stop:
            lr = lr_at(step, tc.lr, tc.warmup_steps, steps, tc.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = loader.next_batch()
            # loss, ce, aux, z and routing counts summed over micro batches on the device, reduced over
            # ranks there (NCCL reduces device tensors only) and copied to the host once per step
            sums = torch.zeros(4, dtype=torch.float64, device=device)
            counts = torch.zeros(n_layers, run.model.n_experts, dtype=torch.float64, device=device)
            for i in range(accum):
                xb, yb = x[i * m:(i + 1) * m].to(device), y[i * m:(i + 1) * m].to(device)
                with distributed.no_sync(model, i == accum - 1), _autocast(device, amp):
                    outp = model(xb, yb)
                    (outp.loss / accum).backward()
                sums += torch.stack([outp.loss.detach(), outp.ce_loss.detach(), outp.aux_loss.detach(), outp.z_loss.detach()]).double()
                counts += torch.stack(outp.tokens_per_expert).double()
            stats = (distributed.all_reduce_sum(sums / accum, d) / d.world_size).cpu()
            counts = distributed.all_reduce_sum(counts, d).cpu()
            loss = float(stats[0])
            if not math.isfinite(loss):
                raise TrainingDiverged(
                    f"loss is {loss} at step {step + 1}; stopped without saving. Last good checkpoint: {last_ckpt or 'none'}; "
                    "lower train.lr (or raise warmup) and start a new run from it"
                )
            max_norm = tc.grad_clip if tc.grad_clip > 0 else math.inf
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor
            if not math.isfinite(grad_norm):
                raise TrainingDiverged(
                    f"gradient norm is {grad_norm} at step {step + 1}; stopped without saving. Last good checkpoint: {last_ckpt or 'none'}; "
                    "lower train.lr and start a new run from it"
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += per_step
            tokens_since += per_step
            last_loss = loss

            val_loss = None
            if val is not None and (step % tc.eval_every == 0 or step == steps):
                val_loss = last_val = evaluate(eval_model, val, seq_len, m, tc.eval_batches, device, amp)
            record = None
            if step % tc.log_every == 0 or step == steps or val_loss is not None:
                now = time.perf_counter()
                tps = tokens_since / max(now - t_last, 1e-9)
                t_last, tokens_since = now, 0
                load = counts / counts.mean(dim=1, keepdim=True)
                record = {
                    "step": step, "tokens": tokens, "loss": loss, "ce_loss": float(stats[1]),
                    "aux_loss": float(stats[2]), "z_loss": float(stats[3]), "lr": lr, "grad_norm": grad_norm,
                    "expert_load_max_over_mean": [float(v) for v in load.max(dim=1).values],
                    "tokens_per_s": tps, "mfu": tps * flops_per_token / (peak * d.world_size),
                    "elapsed_s": now - t_start,
                }
                if val_loss is not None:
                    record["val_loss"] = val_loss
                log.write(record)
            progress.update(step, record)
            if val_loss is not None:
                progress.note(f"step {step}/{steps}  loss {loss:.4f}  val_loss {val_loss:.4f}  lr {lr:.3g}")

            if step % tc.checkpoint_every == 0 or step == stop:  # the end, or where until_step stops
                last_ckpt = str(_save(run, out, step, tokens, model, raw, optimizer, loader, tokenizer, d, fsdp))
    finally:
        progress.close()
        log.close()
    elapsed = time.perf_counter() - t_start
    return {
        "run_dir": str(out), "rank": d.rank, "steps": steps, "step": step, "tokens": tokens, "world_size": d.world_size,
        "loss": last_loss, "val_loss": last_val, "checkpoint": last_ckpt,
        "resumed_from": resumed_from, "elapsed_s": elapsed,
    }


def _save(run: RunConfig, out: Path, step: int, tokens: int, model, raw, optimizer, loader, tokenizer, d, fsdp: bool) -> Path:
    """Gather (collective) and write a checkpoint on rank 0, prune old ones, then wait for rank 0."""
    optim_state = distributed.full_optimizer_state(model, optimizer)
    model_state = distributed.full_model_state(model) if fsdp else None
    path = ckpt.step_dir(out, step)
    if d.is_main:
        tensors, meta = split_state(optim_state)
        trainer_state = {"step": step, "tokens": tokens, "world_size": d.world_size, "optimizer": meta, "loader": loader.state_dict()}
        extra = {"data": run.data.model_dump(), "train": run.train.model_dump(), "step": step, "tokens": tokens}
        path = ckpt.save_checkpoint(out, step, _export_model(raw, model_state), tensors, trainer_state, extra, tokenizer)
        ckpt.prune(out, run.train.keep_checkpoints)
    distributed.barrier(d)
    return path
