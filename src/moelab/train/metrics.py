"""Run logging: ``metrics.jsonl`` (one JSON object per log step), TensorBoard and the console.

``metrics.jsonl`` is append-only while a run is alive; every line is flushed when written. On resume
from step ``N`` the file is first rewritten (atomically) to hold only the complete records with
``step <= N``, so an interrupted-and-resumed run ends with the same records as an uninterrupted one
(the timing fields ``tokens_per_s``, ``mfu`` and ``elapsed_s`` aside).

Record fields (losses in nats per token, means over the step's global batch; values of *that* step,
not averages over the log interval):

* ``step`` optimizer steps done, ``tokens`` training tokens consumed (global)
* ``loss`` = ``ce_loss + aux_loss + z_loss`` (the minimised objective); ``ce_loss`` next-token
  cross-entropy; ``aux_loss`` / ``z_loss`` router losses already times their coefficients
* ``val_loss`` held-out cross-entropy (only on evaluation steps)
* ``lr`` learning rate used by the step; ``grad_norm`` global L2 norm before clipping
* ``expert_load_max_over_mean`` per layer: busiest expert's routing slots / mean slots (1.0 = balanced)
* ``tokens_per_s`` since the previous record (all ranks); ``mfu`` = tokens_per_s x training FLOPs per
  token / (peak FLOP/s x ranks), peak = ``train.peak_flops`` or the measured fp32 matmul rate;
  ``elapsed_s`` wall time since this process started training
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from ..io import atomic_write_text

METRICS = "metrics.jsonl"
TIMING_FIELDS = ("tokens_per_s", "mfu", "elapsed_s")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every complete JSON record of a metrics file (a torn last line is ignored)."""
    p = Path(path)
    if p.is_dir():
        p = p / METRICS
    if not p.is_file():
        return []
    out = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _finite(x: Any) -> Any:
    """JSON has no NaN/Inf: write them as strings so every line stays valid JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


class MetricsLog:
    """Writes records for rank 0; a no-op object elsewhere (``enabled=False``)."""

    def __init__(self, run_dir: Path, resume_step: int, enabled: bool = True, tensorboard: bool = False):
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS
        self._file = None
        self._tb = None
        if not enabled:
            return
        kept = [r for r in read_metrics(self.path) if isinstance(r.get("step"), int) and r["step"] <= resume_step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("warning: tensorboard is not installed; pip install tensorboard, continuing without it", file=sys.stderr)
            else:
                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step + 1)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        assert self._file is not None
        self._file.write(json.dumps({k: _finite(v) for k, v in record.items()}) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"train/{key}", value, step)
                elif isinstance(value, list):
                    for i, v in enumerate(value):
                        self._tb.add_scalar(f"{key}/layer{i}", v, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
