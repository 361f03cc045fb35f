"""Greedy generation throughput: moelab's batched KV-cache decoder vs transformers' ``generate``.

For each model in ``--models`` a moelab model is built, exported with ``moelab.export_hf`` and loaded as
``MixtralForCausalLM`` (fp32, CPU, transformers' default attention / experts implementations), so both
sides run the same weights. Models:

* ``vocab32k`` -- d 256, 4 layers, E 8, k 2, d_expert 512, a 32 000-token vocabulary (shape flags below):
  a 16 x 256 x 32 000 LM head per step that both implementations pay identically;
* ``tiny``, ``small`` -- the model sections of ``configs/tiny.yaml`` / ``configs/small.yaml`` (byte
  vocabulary), the models the default synthetic study trains and evaluates;
* ``small-e64`` -- ``small`` with E 64, k 8 (a sparse model of the study's grid at that width).

moelab is timed twice: eager (``generate``) and compiled (``generate(..., compile=True)``: the
static-shape decode step through ``torch.compile``; its first call, which compiles, is timed apart and
shown in brackets). For each batch size the same random prompts (``--prompt-len`` tokens each)
are decoded greedily for exactly ``--new-tokens`` tokens (moelab: ``stop_at_eos=False``; transformers:
``min_new_tokens = max_new_tokens``, ``do_sample=False``). Times are medians over interleaved rounds
(:func:`benchmarks.common.interleaved_times`), so machine drift hits both columns alike. Reported:
generated tokens per second (batch x new tokens / wall time, prefill included) and the speed-up over
transformers (the median of the per-round ratios, with its interquartile range), plus the
fraction of generated tokens on which the two implementations agree (fp32 noise can flip near-ties).

    python -m benchmarks.generate [--models vocab32k,tiny,small,small-e64] [--batch-sizes 1,16] [--new-tokens 128]
                                  [--vocab 32000] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

import moelab
from moelab.data.tokenizer import ByteTokenizer
from moelab.eval.generate import generate

from .common import interleaved_times, machine_info, print_table, ratio_text, setup, summarise, write_json


MODELS = ("vocab32k", "tiny", "small", "small-e64")
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def model_fields(name: str, args) -> dict:
    """ModelConfig fields of a benchmark model (see the module docstring)."""
    if name == "vocab32k":
        return dict(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                    d_expert=args.d_expert, n_experts=args.n_experts, top_k=args.top_k)
    preset, _, variant = name.partition("-")
    if preset not in ("tiny", "small") or variant not in ("", "e64"):
        raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    from moelab.config import read_mapping

    fields = dict(read_mapping(CONFIGS / f"{preset}.yaml")["model"])
    if variant == "e64":
        fields.update(n_experts=64, top_k=8)
    return fields


def build(fields: dict, args):
    cfg = moelab.ModelConfig(
        **{**fields, "max_seq_len": args.prompt_len + args.new_tokens + 64},
        init_std=0.1,  # peaked logits: greedy paths stay comparable between implementations
    )
    model = moelab.build(cfg, seed=0).eval()
    from transformers import MixtralForCausalLM

    with tempfile.TemporaryDirectory() as d:
        moelab.export_hf(model, d)
        hf = MixtralForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    return model, hf


def bench_model(name: str, args, rows: list[list[str]]) -> list[dict]:
    """Time both implementations on one model for every batch size; append table rows, return results."""
    torch.manual_seed(0)
    fields = model_fields(name, args)
    model, hf = build(fields, args)
    c = model.config
    shape = f"d={c.d_model} L={c.n_layers} E={c.n_experts} k={c.top_k} F={c.d_expert} V={c.vocab_size}"
    tok = ByteTokenizer()  # prompts are printable bytes; a larger vocabulary is still scored in full
    rng = random.Random(0)
    results = []
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        prompts = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(args.prompt_len)) for _ in range(bs)]
        ids = torch.tensor([tok.encode(s) for s in prompts])
        mask = torch.ones_like(ids)
        n = args.new_tokens

        def run_moelab():
            return generate(model, tok, prompts, max_new_tokens=n, batch_size=bs, stop_at_eos=False)

        def run_compiled():
            return generate(model, tok, prompts, max_new_tokens=n, batch_size=bs, stop_at_eos=False, compile=True)

        @torch.inference_mode()
        def run_hf():
            return hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=0)

        ours = [g.token_ids for g in run_moelab()]
        theirs = run_hf()[:, ids.shape[1]:].tolist()
        t0 = time.perf_counter()
        compiled = [g.token_ids for g in run_compiled()]  # first call compiles: timed separately
        compile_s = time.perf_counter() - t0
        assert all(len(t) == n for t in ours + theirs + compiled)

        def agreement(a_rows, b_rows):
            return sum(a == b for x, y in zip(a_rows, b_rows) for a, b in zip(x, y)) / (bs * n)

        agree, agree_compiled = agreement(ours, theirs), agreement(compiled, theirs)
        timed = summarise(interleaved_times({"moelab": run_moelab, "compiled": run_compiled, "transformers": run_hf},
                                            rounds=args.rounds, warmup=0), "transformers")
        t = timed["seconds"]
        ours_tps, compiled_tps, hf_tps = (bs * n / t[k] for k in ("moelab", "compiled", "transformers"))
        # speed-up = transformers' time / ours, round by round: the reciprocals of the per-round ratios
        speedup = {k: 1 / timed["ratio"][k] for k in ("moelab", "compiled")}
        speedup_iqr = {k: (1 / timed["ratio_iqr"][k][1], 1 / timed["ratio_iqr"][k][0]) for k in ("moelab", "compiled")}
        results.append({"model": name, "shape": shape, "batch_size": bs, "new_tokens": n, "moelab_tokens_per_s": ours_tps,
                        "compiled_tokens_per_s": compiled_tps, "first_compiled_call_s": compile_s,
                        "transformers_tokens_per_s": hf_tps, "ratio": speedup["moelab"], "ratio_iqr": speedup_iqr["moelab"],
                        "compiled_ratio": speedup["compiled"], "compiled_ratio_iqr": speedup_iqr["compiled"], "token_agreement": agree,
                        "compiled_token_agreement": agree_compiled})
        rows.append([name, shape, str(bs), f"{ours_tps:,.0f}", f"{compiled_tps:,.0f} ({compile_s:.0f} s)", f"{hf_tps:,.0f}",
                     ratio_text(speedup["moelab"], speedup_iqr["moelab"]), ratio_text(speedup["compiled"], speedup_iqr["compiled"]),
                     f"{agree:.3f} / {agree_compiled:.3f}"])
    return results


def main(argv: list[str] | None = None) -> dict:
    setup()  # keep freed memory: no page faults timed (benchmarks.common.setup)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {MODELS}")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--vocab", type=int, default=32000, help="vocab32k model: vocabulary (and the shape flags below)")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--d-expert", type=int, default=512)
    p.add_argument("--n-experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    rows, results = [], []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        results += bench_model(name, args, rows)
    print_table(f"greedy generation, {args.new_tokens} new tokens, prompt {args.prompt_len}, fp32 CPU, tokens/s (prefill included)",
                ["model", "shape", "batch", "moelab tok/s", "compiled tok/s (1st call)", "transformers tok/s",
                 "moelab / transformers", "compiled / transformers", "same tokens (eager / compiled)"], rows)
    payload = {"machine": machine_info(), "args": vars(args), "results": results}
    if args.json:
        write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
