"""Deterministic, resumable, rank-sharded sampling of training windows from a weighted mixture of shard sets.

Definitions (all counts are in windows unless stated otherwise):

* A *window* is ``seq_len + 1`` consecutive tokens; inputs are its first ``seq_len`` tokens and targets
  its last ``seq_len``. Window ``i`` of a shard set starts at token ``i * seq_len`` (stride ``seq_len``,
  so windows overlap by exactly the one token that is both the last target and the next first input).
  A shard set of ``N`` tokens has ``(N - 1) // seq_len`` windows.
* The *global batch* at step ``t`` is windows ``g = t*G ... t*G + G - 1`` with ``G = batch_size *
  world_size``. Rank ``r`` takes the contiguous rows ``[r*batch_size, (r+1)*batch_size)``, so the
  ranks' batches are disjoint and concatenated in rank order equal the 1-rank batch of size ``G``.
* Global window ``g`` draws from source ``s`` with probability ``weight_s / sum(weights)`` using a
  counter-based hash of ``(seed, g)`` (SplitMix64), so the choice depends on nothing else.
* The ``k``-th window drawn from source ``s`` is window ``perm_{s,e}[k mod n_s]`` with epoch
  ``e = k // n_s`` and ``perm_{s,e}`` a permutation seeded by ``(seed, s, e)``: no window repeats
  within an epoch of a source.

The sequence of global batches is therefore a pure function of ``(seed, step)`` given the sources and
``G``. ``state_dict()`` is ``{step, consumed per source, ...}`` as plain ints; resuming is exact, also
with a different ``world_size`` as long as the global batch size is unchanged.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import torch

from ..errors import ConfigError

if TYPE_CHECKING:
    from .shards import ShardSet

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
STATE_VERSION = 1


def hash_uniform(seed: int, index: np.ndarray) -> np.ndarray:
    """Uniform floats in [0, 1), one per ``index``: SplitMix64 of ``seed`` mixed with each index."""
    base = np.uint64((seed * 0xD1B54A32D192ED03 + 0x632BE59BD9B4E019) & _MASK64)
    with np.errstate(over="ignore"):
        z = base + (np.asarray(index, dtype=np.uint64) + np.uint64(1)) * np.uint64(_GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


class TokenLoader:
    """Yield ``(inputs, targets)`` int64 tensors of shape ``[batch_size, seq_len]`` for one rank."""

    def __init__(
        self,
        sources: Sequence[tuple["ShardSet", float]],
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        _check_int("seq_len", seq_len, 1)
        _check_int("batch_size", batch_size, 1)
        _check_int("seed", seed, 0)
        _check_int("world_size", world_size, 1)
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ConfigError(f"rank={rank!r} must be in [0, world_size={world_size}); check the launcher's RANK/WORLD_SIZE")
        if not sources:
            raise ConfigError("the loader needs at least one shard set; configure data.shards or use the synthetic source")
        weights = [float(w) for _, w in sources]
        for (shards, _), w in zip(sources, weights):
            if not math.isfinite(w) or w <= 0:
                raise ConfigError(f"weight {w} for {shards!r} must be a positive number; fix the mixture weights")
        first = sources[0][0].tokenizer_descriptor
        for shards, _ in sources[1:]:
            if shards.tokenizer_descriptor != first:
                raise ConfigError(f"{shards!r} was tokenised differently from {sources[0][0]!r}; re-prepare all shard sets with one tokenizer")
        self.shard_sets = [s for s, _ in sources]
        self.n_windows = [(s.total_tokens - 1) // seq_len for s in self.shard_sets]
        for s, n in zip(self.shard_sets, self.n_windows):
            if n < 1:
                raise ConfigError(f"{s!r} has {s.total_tokens} tokens, fewer than seq_len+1={seq_len + 1}; use a shorter seq_len or more data")
        w = np.asarray(weights) / sum(weights)
        self.cum_weights = np.cumsum(w)
        self.cum_weights[-1] = 1.0
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch_size = batch_size * world_size
        self.step = 0
        self.consumed = [0] * len(self.shard_sets)
        self._perms: dict[int, tuple[int, np.ndarray]] = {}

    def source_of_windows(self, global_index: np.ndarray) -> np.ndarray:
        """Source index chosen for each global window index (a pure function of ``(seed, index)``)."""
        if len(self.shard_sets) == 1:
            return np.zeros(len(global_index), dtype=np.int64)
        u = hash_uniform(self.seed, global_index)
        return np.minimum(np.searchsorted(self.cum_weights, u, side="right"), len(self.shard_sets) - 1)

    def _permutation(self, source: int, epoch: int) -> np.ndarray:
        cached = self._perms.get(source)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, source, epoch])
            cached = (epoch, rng.permutation(self.n_windows[source]))
            self._perms[source] = cached
        return cached[1]

    def _window_start(self, source: int, k: int) -> int:
        n = self.n_windows[source]
        return int(self._permutation(source, k // n)[k % n]) * self.seq_len

    def next_windows(self) -> list[tuple[int, int]]:
        """Advance one step; return this rank's ``(source, start_token)`` pairs in row order."""
        g0 = self.step * self.global_batch_size
        choice = self.source_of_windows(np.arange(g0, g0 + self.global_batch_size, dtype=np.int64))
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        rows: list[tuple[int, int]] = []
        for row, s in enumerate(choice.tolist()):
            k = self.consumed[s]
            self.consumed[s] = k + 1
            if lo <= row < hi:
                rows.append((s, self._window_start(s, k)))
        self.step += 1
        return rows

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``(inputs, targets)``, each int64 ``[batch_size, seq_len]``."""
        rows = self.next_windows()
        window = np.stack([self.shard_sets[s].read(start, self.seq_len + 1) for s, start in rows])
        x = torch.from_numpy(window)
        return x[:, :-1].contiguous(), x[:, 1:].contiguous()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def epochs(self) -> list[float]:
        """Fraction of an epoch consumed so far, per source (global, over all ranks)."""
        return [c / n for c, n in zip(self.consumed, self.n_windows)]

    def state_dict(self) -> dict:
        """JSON-serialisable state; ``load_state_dict`` on a fresh loader resumes exactly."""
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
            "n_windows": list(self.n_windows),
            "step": self.step,
            "consumed": list(self.consumed),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a state from ``state_dict()``; refuses a state from a different data setup."""
        want = {"version": STATE_VERSION, "seed": self.seed, "seq_len": self.seq_len,
                "global_batch_size": self.global_batch_size, "n_windows": list(self.n_windows)}
        for key, value in want.items():
            if state.get(key) != value:
                raise ConfigError(f"loader state has {key}={state.get(key)!r} but this loader has {value!r}; resume with the same data, seed, seq_len and global batch size")
        consumed = state.get("consumed")
        if not isinstance(consumed, list) or len(consumed) != len(self.shard_sets) or not all(isinstance(c, int) and c >= 0 for c in consumed):
            raise ConfigError(f"loader state has malformed 'consumed' {consumed!r}; use a state saved by TokenLoader.state_dict()")
        if not isinstance(state.get("step"), int) or state["step"] < 0 or sum(consumed) != state["step"] * self.global_batch_size:
            raise ConfigError("loader state is inconsistent (step and consumed windows disagree); use a state saved by TokenLoader.state_dict()")
        self.step = state["step"]
        self.consumed = list(consumed)
        self._perms.clear()


def eval_batches(shards: "ShardSet", seq_len: int, batch_size: int, max_windows: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive non-overlapping windows of ``shards`` in file order, for validation loss.

    Yields ``(inputs, targets)`` int64 ``[b, seq_len]`` with ``b <= batch_size`` (the last batch may be
    smaller); covers ``min(max_windows, (N-1)//seq_len)`` windows. Same windows every call.
    """
    _check_int("seq_len", seq_len, 1)
    _check_int("batch_size", batch_size, 1)
    n = (shards.total_tokens - 1) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    for b0 in range(0, n, batch_size):
        rows = [shards.read(i * seq_len, seq_len + 1) for i in range(b0, min(n, b0 + batch_size))]
        x = torch.from_numpy(np.stack(rows))
        yield x[:, :-1].contiguous(), x[:, 1:].contiguous()


def _check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name}={value!r} must be an integer >= {minimum}; fix the data/train config")
