"""The trainer learns: a small model memorises a small world (the tiny preset: tests/test_trained_tiny.py)."""

from __future__ import annotations

import json

import pytest
import torch

import moelab
from moelab.data.tokenizer import load_tokenizer
from moelab.train.config import run_config_from_dict
from moelab.train.loop import train


def greedy_answer(model, tokenizer, prompt: str, max_new_tokens: int = 12) -> str:
    """Greedy continuation of ``prompt`` up to eos or a newline (no KV cache: re-run the prefix)."""
    ids = tokenizer.encode(prompt)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            x = torch.tensor([ids + new][-model.config.max_seq_len:])
            nxt = int(model(x, logits_to_keep=1).logits[0, -1].argmax())
            if nxt == tokenizer.eos_id or tokenizer.decode([nxt]) == "\n":
                break
            new.append(nxt)
    return tokenizer.decode(new).strip()


# 1500 steps: 99-100/100 facts for train.seed 0-3 with the fused AdamW (100/100 before it; 600 steps gave
# 49-56, 1000 gave 74-98: too close to the threshold for a check whose numerics vary with the host)
MEMORIZE = {
    "model": {"vocab_size": 257, "d_model": 64, "n_layers": 2, "n_heads": 4, "d_expert": 128,
              "n_experts": 8, "top_k": 2, "max_seq_len": 64},
    "data": {"source": "synthetic",
             "synthetic": {"n_entities": 50, "attributes": ["birth_year", "birth_city"], "n_paraphrases": 1,
                           "memorization_weight": 1.0, "n_test_reasoning": 5},
             "synthetic_tokens": 200_000, "seq_len": 64, "seed": 0},
    "train": {"lr": 4e-3, "warmup_steps": 30, "micro_batch_size": 16, "steps": 1500, "eval_every": 500,
              "eval_batches": 4, "log_every": 50, "checkpoint_every": 1500, "keep_checkpoints": 1},
}


@pytest.mark.slow
def test_small_model_memorises_a_small_world(tmp_path):
    out = tmp_path / "mem"
    train(run_config_from_dict(MEMORIZE), out, quiet=True)
    model = moelab.load(out).eval()
    tokenizer = load_tokenizer(out / "checkpoints" / "step_00001500")
    items = [json.loads(line) for line in (out / "data" / "test_memorization.jsonl").read_text().splitlines()]
    assert len(items) == 100
    correct = sum(greedy_answer(model, tokenizer, it["prompt"]) == it["answer"] for it in items)
    assert correct / len(items) > 0.5, f"{correct}/{len(items)} facts recalled"
