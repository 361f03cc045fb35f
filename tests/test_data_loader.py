"""TokenLoader: determinism, mixture weights, epoch coverage, exact resume, rank sharding."""

import json

import numpy as np
import pytest
import torch

from moelab.data.loader import TokenLoader, eval_batches, hash_uniform
from moelab.data.shards import ShardSet, write_shards
from moelab.errors import ConfigError


def make_set(tmp_path, name, ids, shard_tokens=4096):
    """A shard set holding exactly ``ids`` (one document; write_shards appends one eos=256)."""
    write_shards([ids], "byte", tmp_path / name, shard_tokens=shard_tokens)
    return ShardSet.open(tmp_path / name)


@pytest.fixture
def two_sets(tmp_path):
    # Source A holds tokens < 100, source B tokens in [150, 250): a row's first token names its source.
    rng = np.random.default_rng(0)
    a = make_set(tmp_path, "a", rng.integers(0, 100, 20_000).tolist(), shard_tokens=3000)
    b = make_set(tmp_path, "b", rng.integers(150, 250, 8_000).tolist())
    return a, b


@pytest.fixture
def counting_set(tmp_path):
    # Token at position i encodes i: windows are distinguishable by their first tokens.
    ids = [(i * 7919) % 256 for i in range(8 * 513)]
    return make_set(tmp_path, "c", ids)


def batches(loader, n):
    return [loader.next_batch() for _ in range(n)]


def test_shapes_and_targets_shifted(two_sets):
    a, _ = two_sets
    x, y = TokenLoader([(a, 1.0)], seq_len=32, batch_size=4, seed=0).next_batch()
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_deterministic_per_seed(two_sets):
    a, b = two_sets
    mk = lambda seed: TokenLoader([(a, 0.5), (b, 0.5)], seq_len=16, batch_size=8, seed=seed)
    one, two, other = batches(mk(1), 5), batches(mk(1), 5), batches(mk(2), 5)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(one, two))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(one, other))


def test_mixture_weights_respected(two_sets):
    a, b = two_sets
    loader = TokenLoader([(a, 0.8), (b, 0.2)], seq_len=8, batch_size=50, seed=3)
    firsts = torch.cat([loader.next_batch()[0][:, 0] for _ in range(80)])  # 4000 windows
    frac_a = (firsts < 100).float().mean().item()
    assert abs(frac_a - 0.8) < 0.03
    assert hash_uniform(3, np.arange(10)).tolist() == hash_uniform(3, np.arange(10)).tolist()


def test_no_window_repeats_within_an_epoch(counting_set):
    s = counting_set
    seq_len = 32
    loader = TokenLoader([(s, 1.0)], seq_len=seq_len, batch_size=4, seed=0)
    n = (s.total_tokens - 1) // seq_len
    starts = []
    while len(starts) < 2 * n:
        starts += [start for _, start in loader.next_windows()]
    assert sorted(starts[:n]) == [i * seq_len for i in range(n)]
    assert sorted(starts[n : 2 * n]) == [i * seq_len for i in range(n)]
    assert starts[:n] != starts[n : 2 * n]  # each epoch has its own order


def test_resume_exact(two_sets):
    a, b = two_sets
    mk = lambda: TokenLoader([(a, 0.7), (b, 0.3)], seq_len=64, batch_size=6, seed=5)
    straight = mk()
    reference = batches(straight, 12)
    first = mk()
    batches(first, 7)
    state = json.loads(json.dumps(first.state_dict()))  # must survive JSON
    resumed = mk()
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(reference[7:], batches(resumed, 5)):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_resume_rejects_mismatched_state(two_sets):
    a, b = two_sets
    state = TokenLoader([(a, 1.0)], seq_len=64, batch_size=6, seed=5).state_dict()
    with pytest.raises(ConfigError, match="seq_len"):
        TokenLoader([(a, 1.0)], seq_len=32, batch_size=6, seed=5).load_state_dict(state)
    with pytest.raises(ConfigError, match="global_batch_size"):
        TokenLoader([(a, 1.0)], seq_len=64, batch_size=3, seed=5).load_state_dict(state)


def test_two_ranks_partition_the_global_batch(two_sets):
    a, b = two_sets
    src = [(a, 0.6), (b, 0.4)]
    single = TokenLoader(src, seq_len=16, batch_size=8, seed=9)
    r0 = TokenLoader(src, seq_len=16, batch_size=4, seed=9, rank=0, world_size=2)
    r1 = TokenLoader(src, seq_len=16, batch_size=4, seed=9, rank=1, world_size=2)
    for _ in range(30):
        g = single.next_windows()
        w0, w1 = r0.next_windows(), r1.next_windows()
        assert w0 + w1 == g
        assert not set(w0) & set(w1)
    # Token content agrees too, and a 2-rank state resumes a 1-rank run (same global batch).
    x, _ = single.next_batch()
    assert torch.equal(torch.cat([r0.next_batch()[0], r1.next_batch()[0]]), x)
    elastic = TokenLoader(src, seq_len=16, batch_size=8, seed=9)
    elastic.load_state_dict(r0.state_dict())
    assert torch.equal(elastic.next_batch()[0], single.next_batch()[0])


def test_invalid_loader_arguments(two_sets, tmp_path):
    a, _ = two_sets
    with pytest.raises(ConfigError, match="rank"):
        TokenLoader([(a, 1.0)], seq_len=8, batch_size=2, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="weight"):
        TokenLoader([(a, 0.0)], seq_len=8, batch_size=2)
    with pytest.raises(ConfigError, match="seq_len"):
        TokenLoader([(a, 1.0)], seq_len=0, batch_size=2)
    with pytest.raises(ConfigError, match="fewer than seq_len"):
        TokenLoader([(a, 1.0)], seq_len=100_000, batch_size=2)
    with pytest.raises(ConfigError, match="at least one"):
        TokenLoader([], seq_len=8, batch_size=2)


def test_eval_batches_cover_consecutive_windows(counting_set):
    s = counting_set
    got = list(eval_batches(s, seq_len=100, batch_size=16))
    n = (s.total_tokens - 1) // 100
    assert sum(x.shape[0] for x, _ in got) == n
    x, y = got[0]
    assert x[1].tolist() == s.read(100, 100).tolist() and y[0].tolist() == s.read(1, 100).tolist()
    assert len(list(eval_batches(s, 100, 16, max_windows=5))[0][0]) == 5
