"""Batched KV-cache generation against the no-cache reference decoder, sampling, stops, EOS, lengths."""

from __future__ import annotations

import pytest
import torch

import moelab
from moelab.data.tokenizer import ByteTokenizer
from moelab.errors import ConfigError
from moelab.eval.generate import generate, generate_reference, next_tokens, row_uniforms

pytestmark = pytest.mark.usefixtures("one_thread")


PROMPTS = [
    "Question: What is 3 + 4?\nAnswer:",
    "Hi",
    "",
    "The quick brown fox jumps over the lazy dog, again and again and again.",
    "x",
    "Zorvan Keltap was born in",
]


def tiny_model(seed: int = 1, max_seq_len: int = 128, **kw):
    # init_std 0.3 makes logits peaked, so greedy choices are far from ties and robust to fp32 noise
    fields = dict(vocab_size=257, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_expert=64, n_experts=4, top_k=2,
                  max_seq_len=max_seq_len, init_std=0.3)
    cfg = moelab.ModelConfig(**{**fields, **kw})
    return moelab.build(cfg, seed=seed).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def tok():
    return ByteTokenizer()


class EosAt(ByteTokenizer):
    """Byte tokenizer that treats one ordinary byte as EOS (so a random model emits it)."""

    def __init__(self, eos_id: int):
        self.eos_id = eos_id


@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
def test_cache_generation_equals_reference(tok, backend):
    model = tiny_model(moe_backend=backend)
    gens = generate(model, tok, PROMPTS, max_new_tokens=24, batch_size=4)
    for prompt, g in zip(PROMPTS, gens):
        ref = generate_reference(model, tok, prompt, max_new_tokens=24)
        assert g.token_ids == ref.token_ids and g.text == ref.text and g.finish_reason == ref.finish_reason
        assert len(g.token_ids) <= 24 and g.finish_reason in ("length", "eos")


def test_batched_equals_unbatched(model, tok):
    one = generate(model, tok, PROMPTS, max_new_tokens=20, batch_size=1)
    for bs in (2, 3, len(PROMPTS)):
        assert [g.token_ids for g in generate(model, tok, PROMPTS, max_new_tokens=20, batch_size=bs)] == [g.token_ids for g in one]


def test_output_order_matches_input_order(model, tok):
    gens = generate(model, tok, PROMPTS, max_new_tokens=8, batch_size=2)
    rev = generate(model, tok, PROMPTS[::-1], max_new_tokens=8, batch_size=2)
    assert [g.token_ids for g in gens] == [g.token_ids for g in rev[::-1]]


def test_sampling_reproducible_and_batch_invariant(model, tok):
    kw = dict(max_new_tokens=16, temperature=1.0, top_p=0.95)
    a = generate(model, tok, PROMPTS, seed=7, batch_size=2, **kw)
    b = generate(model, tok, PROMPTS, seed=7, batch_size=5, **kw)
    c = generate(model, tok, PROMPTS, seed=8, batch_size=2, **kw)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]
    for i, prompt in enumerate(PROMPTS):
        ref = generate_reference(model, tok, prompt, seed=7, sample_id=i, **kw)
        assert ref.token_ids == a[i].token_ids


def test_sample_ids_name_the_random_stream(model, tok):
    kw = dict(max_new_tokens=12, temperature=1.5, seed=3)
    same = generate(model, tok, [PROMPTS[0]] * 4, sample_ids=["a", "b", "a", "b"], **kw)
    assert same[0].token_ids == same[2].token_ids and same[1].token_ids == same[3].token_ids
    assert same[0].token_ids != same[1].token_ids


def test_tiny_top_p_is_greedy(model, tok):
    greedy = generate(model, tok, PROMPTS, max_new_tokens=12)
    nucleus = generate(model, tok, PROMPTS, max_new_tokens=12, temperature=1.0, top_p=1e-6, seed=5)
    assert [g.token_ids for g in greedy] == [g.token_ids for g in nucleus]


def test_next_tokens_inverse_cdf():
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3]]))
    picks = [int(next_tokens(logits, 1.0, 1.0, torch.tensor([u]))[0]) for u in (0.05, 0.15, 0.69, 0.71, 0.999)]
    assert picks == [0, 1, 1, 2, 2]
    # top_p=0.65: nucleus {1 (0.6), 2 (0.3)} renormalised to 2/3, 1/3 in descending order
    picks = [int(next_tokens(logits, 1.0, 0.65, torch.tensor([u]))[0]) for u in (0.0, 0.6, 0.7, 0.99)]
    assert picks == [1, 1, 2, 2]
    # sampled frequencies follow softmax(logits / T)
    u = row_uniforms(0, [0], 20000)[0]
    draws = next_tokens(logits.expand(20000, 3) * 2, 2.0, 1.0, u)
    freq = torch.bincount(draws, minlength=3).float() / 20000
    assert torch.allclose(freq, torch.tensor([0.1, 0.6, 0.3]), atol=0.02)


def test_stop_strings_cut_like_lm_eval(model, tok):
    full = generate(model, tok, PROMPTS, max_new_tokens=30)
    for prompt, g in zip(PROMPTS, full):
        text = g.text
        stop = text[6:9]  # a 3-token stop string (byte tokenizer) inside the output
        if len(stop) < 3 or "\ufffd" in stop:
            continue
        cut = generate(model, tok, [prompt], max_new_tokens=30, stop=["NEVER", stop])[0]
        assert cut.text == text.split(stop)[0]
        assert cut.finish_reason == "stop"
        # generation stopped as soon as the stop string was complete
        assert tok.decode(cut.token_ids).endswith(stop) and len(cut.token_ids) < 30
        assert cut.text == generate_reference(model, tok, prompt, max_new_tokens=30, stop=["NEVER", stop]).text


def test_eos_stops_and_is_not_returned(model):
    plain = generate(model, ByteTokenizer(), PROMPTS, max_new_tokens=30)
    for prompt, g in zip(PROMPTS, plain):
        if not prompt:  # an empty prompt is replaced by [eos], which this test changes
            continue
        eos = g.token_ids[5]
        out = generate(model, EosAt(eos), [prompt], max_new_tokens=30)[0]
        assert out.token_ids == g.token_ids[: g.token_ids.index(eos)]
        assert out.finish_reason == "eos"
        # without stop_at_eos the EOS token is kept and generation runs to the end
        free = generate(model, EosAt(eos), [prompt], max_new_tokens=30, stop_at_eos=False)[0]
        assert free.token_ids == g.token_ids and free.finish_reason == "length"


def test_finished_rows_leave_the_batch(model):
    """After a row emits EOS the following forwards run with fewer rows."""
    tok = ByteTokenizer()
    plain = generate(model, tok, PROMPTS, max_new_tokens=20)
    eos = plain[0].token_ids[2]  # row 0 stops at step <= 2
    sizes = []
    hook = model.embed.register_forward_hook(lambda m, i, o: sizes.append(o.shape[0]))
    try:
        out = generate(model, EosAt(eos), PROMPTS, max_new_tokens=20, batch_size=len(PROMPTS))
    finally:
        hook.remove()
    finished_early = sum(1 for g in out if g.finish_reason == "eos")
    assert finished_early >= 1
    assert sizes[0] == len(PROMPTS) and sizes[-1] <= len(PROMPTS) - finished_early
    assert sizes == sorted(sizes, reverse=True)


def test_max_new_tokens_and_prompt_truncation(tok):
    model = tiny_model(max_seq_len=32)
    long_prompt = "abcdefghij" * 10  # 100 tokens > 32: left-truncated to 32 - 8 tokens, as lm-eval
    for n in (1, 5, 8):
        g = generate(model, tok, [long_prompt, "a"], max_new_tokens=n, stop_at_eos=False)
        assert all(len(x.token_ids) == n and x.finish_reason == "length" for x in g)
    truncated = generate(model, tok, [long_prompt[-24:]], max_new_tokens=8)[0]
    assert generate(model, tok, [long_prompt], max_new_tokens=8)[0].token_ids == truncated.token_ids
    with pytest.raises(ConfigError, match="no room"):
        generate(model, tok, ["a"], max_new_tokens=32)


@pytest.mark.parametrize("kw, msg", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=4, temperature=-1.0), "temperature"),
    (dict(max_new_tokens=4, top_p=0.0), "top_p"),
    (dict(max_new_tokens=4, batch_size=0), "batch_size"),
])
def test_bad_settings(model, tok, kw, msg):
    with pytest.raises(ConfigError, match=msg):
        generate(model, tok, ["a"], **kw)


# --------------------------------------------------------------------------------------------------
# the static-shape decode step (compile=True)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [
    dict(),  # GQA, 16 routing slots of 4 experts: sorted grouped dispatch
    dict(n_kv_heads=4, qk_norm="head"),
    dict(qk_norm="full", n_experts=16, top_k=2),  # 8 slots <= 16 experts: gathered-weights dispatch
])
def test_decode_step_equals_cached_forward(kw, dtype=torch.float32, tol=1e-4):
    """``decode_step`` (static shapes, dynamic cache length) gives the cached forward's logits."""
    from moelab.model.transformer import KVCache

    model = tiny_model(**kw).to(dtype)
    cfg = model.config
    torch.manual_seed(0)
    B, L, steps = 4, 7, 5
    prompt = torch.randint(1, 257, (B, L))
    pad_B = torch.tensor([0, 3, 1, 6])
    mask_BS = torch.zeros(B, L + steps, dtype=torch.bool)
    mask_BS[:, :L] = torch.arange(L)[None] >= pad_B[:, None]
    positions = (torch.arange(L)[None] - pad_B[:, None]).clamp(min=0)
    with torch.no_grad():
        caches = [KVCache.empty(cfg, B, L + steps, dtype=dtype) for _ in range(2)]
        for cache in caches:
            model(prompt, positions=positions, cache=cache, key_padding_mask=mask_BS[:, :L])
        tokens = torch.randint(1, 257, (B,))
        for step in range(steps):
            slot = L + step
            mask_BS[:, slot] = True
            pos_B = L - pad_B + step
            want = model(tokens[:, None], positions=pos_B[:, None], cache=caches[0], key_padding_mask=mask_BS[:, : slot + 1],
                         logits_to_keep=1).logits[:, -1]
            # the step writes the same key/value into the same slot each time: running it twice is harmless
            greedy = model.decode_step(tokens, pos_B, caches[1], mask_BS[:, : slot + 1], greedy=True)
            got = model.decode_step(tokens, pos_B, caches[1], mask_BS[:, : slot + 1])
            torch.testing.assert_close(got, want, atol=tol, rtol=tol)
            assert greedy.dtype == torch.int64 and torch.equal(greedy, got.argmax(-1))  # greedy: the same step's argmax
            for a, b in zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values):
                torch.testing.assert_close(a[:, :, : slot + 1], b[:, :, : slot + 1], atol=tol, rtol=tol)
            tokens = want.argmax(-1)


def test_decode_step_in_bf16():
    """A bf16 model: attention in fp32 inside the step, bf16 weights and cache, logits within bf16 rounding."""
    test_decode_step_equals_cached_forward(dict(), dtype=torch.bfloat16, tol=0.25)  # 2 bf16 ulps at |logit| ~ 8-16


@pytest.fixture
def uncompiled_static_step(monkeypatch):
    """generate(compile=True) with the static decode step run eagerly: the loop logic without compiling."""
    import sys

    monkeypatch.setattr(sys.modules["moelab.eval.generate"], "compiled_decode_step", lambda model: model.decode_step)


@pytest.mark.parametrize("batch_size", [1, 4, 16])
def test_static_loop_equals_eager_loop(model, tok, uncompiled_static_step, batch_size):
    """Fixed batch (filler rows, finished rows kept): same greedy and sampled tokens, stops and EOS."""
    for kw in (dict(max_new_tokens=20), dict(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=3),
               dict(max_new_tokens=30, stop=["e", "\n\n"])):
        want = generate(model, tok, PROMPTS, batch_size=batch_size, **kw)
        got = generate(model, tok, PROMPTS, batch_size=batch_size, compile=True, **kw)
        assert got == want
    eos = want[0].token_ids[2]
    assert generate(model, EosAt(eos), PROMPTS, max_new_tokens=20, batch_size=batch_size, compile=True) == \
        generate(model, EosAt(eos), PROMPTS, max_new_tokens=20, batch_size=batch_size)


@pytest.mark.slow
def test_compiled_generation_equals_eager(model, tok):
    """The real ``torch.compile`` path: one graph for every prompt length, the same tokens."""
    want = generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=4)
    got = generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=4, compile=True)
    assert got == want
    sampled = dict(max_new_tokens=12, batch_size=4, temperature=1.0, seed=1)
    assert generate(model, tok, PROMPTS[:3], compile=True, **sampled) == generate(model, tok, PROMPTS[:3], **sampled)


def test_compile_failure_is_a_config_error(monkeypatch, tok):
    from torch._dynamo.exc import BackendCompilerFailed

    def broken(fn, **kw):
        def run(*a):
            raise BackendCompilerFailed(fn, RuntimeError("InvalidCxxCompiler: no working C++ compiler found"), None)
        return run

    model = tiny_model()
    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(ConfigError, match=r"could not build the decode step \(RuntimeError: InvalidCxxCompiler.*drop --compile"):
        generate(model, tok, ["a"], max_new_tokens=3, compile=True)


def test_static_batch_shrinks_by_halving(model, uncompiled_static_step):
    """Compiled decoding keeps few batch sizes: as rows finish it halves (16 -> 8 -> ...), never to an
    odd size, and gives the same generations as eager decoding."""
    tok = ByteTokenizer()
    prompts = [p + str(i) for i in range(3) for p in PROMPTS][:16]
    plain = generate(model, tok, prompts, max_new_tokens=40, batch_size=16)
    from collections import Counter

    eos = Counter(t for g in plain for t in set(g.token_ids[:30])).most_common(1)[0][0]  # in most rows
    want = generate(model, EosAt(eos), prompts, max_new_tokens=40, batch_size=16)
    sizes = []
    hook = model.embed.register_forward_hook(lambda m, i, o: sizes.append(o.shape[0]))
    try:
        got = generate(model, EosAt(eos), prompts, max_new_tokens=40, batch_size=16, compile=True)
    finally:
        hook.remove()
    assert got == want
    assert sum(g.finish_reason == "eos" for g in got) >= 9, "too few rows finish early to shrink the batch"
    assert sizes[0] == 16 and sizes == sorted(sizes, reverse=True) and sizes[-1] < 16
    assert set(sizes) <= {16, 8, 4, 2, 1}


def test_compiled_step_belongs_to_its_model(monkeypatch, tok):
    """A copy of a model gets its own compiled step (never one bound to the original's weights), and
    the model stays deep-copyable and picklable after compiled generation."""
    import copy
    import pickle

    from moelab.eval.generate import compiled_decode_step

    compile_kwargs = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_kwargs.append(kw) or fn)  # the bookkeeping, not the compiler
    a = tiny_model()
    step_a = compiled_decode_step(a)
    generate(a, tok, ["a"], max_new_tokens=3, compile=True)
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.lm_head.weight.mul_(-1)
    assert compiled_decode_step(a) is step_a and compiled_decode_step(b) is not step_a
    # one static graph per batch size (only the cache length dynamic), never a symbolic batch dimension
    assert all(kw["dynamic"] is False and kw["fullgraph"] for kw in compile_kwargs)
    assert generate(b, tok, PROMPTS[:2], max_new_tokens=6, compile=True) == generate(b, tok, PROMPTS[:2], max_new_tokens=6)
    pickle.dumps(a)
