"""Schedule values, weight-decay groups, run-config parsing and the CLI's one-line errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import moelab
from moelab.cli import main
from moelab.errors import ConfigError
from moelab.train.config import apply_overrides, load_run_config, run_config_from_dict, total_steps
from moelab.train.optim import build_optimizer, join_state, param_groups, split_state, use_fused
from moelab.train.schedule import lr_at
from test_train_support import tiny_run_dict, write_config


# ------------------------------------------------------------------ schedule
def test_schedule_key_steps():
    peak, W, S = 4e-4, 2000, 10_000
    assert lr_at(0, peak, W, S) == pytest.approx(peak / W)
    assert lr_at(999, peak, W, S) == pytest.approx(peak * 1000 / W)  # mid-warmup: half of peak
    assert lr_at(W - 1, peak, W, S) == pytest.approx(peak)  # last warmup update reaches peak
    assert lr_at(W, peak, W, S) == pytest.approx(peak)  # decay starts at peak
    assert lr_at(W + (S - W) // 2, peak, W, S) == pytest.approx(0.55 * peak)  # cosine midpoint: (peak + floor) / 2
    assert lr_at(S, peak, W, S) == pytest.approx(0.1 * peak)  # end: 10 % of peak (4e-5)
    assert lr_at(S + 50, peak, W, S) == pytest.approx(0.1 * peak)
    lrs = [lr_at(s, peak, W, S) for s in range(S)]
    assert all(a <= b for a, b in zip(lrs[:W], lrs[1:W]))
    assert all(a >= b for a, b in zip(lrs[W:], lrs[W + 1:]))
    assert min(lrs[W:]) > 0.1 * peak


def test_schedule_in_metrics_matches_lr_at(tmp_path):
    from moelab.train.loop import train
    from moelab.train.metrics import read_metrics

    train(run_config_from_dict(tiny_run_dict(8, warmup_steps=3, checkpoint_every=8, eval_every=8)), tmp_path / "r", quiet=True)
    got = [r["lr"] for r in read_metrics(tmp_path / "r")]
    assert got == [lr_at(s, 3e-3, 3, 8) for s in range(8)]


# ------------------------------------------------------------------ weight decay groups
@pytest.mark.parametrize("tie", [False, True])
def test_weight_decay_groups(tie):
    cfg = moelab.ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, d_expert=32, n_experts=4, top_k=2,
                             qk_norm="head", tie_embeddings=tie, max_seq_len=16)
    model = moelab.build(cfg)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    want_decay = {f"layers.{i}.{n}" for i in range(2) for n in (
        "attn.wq.weight", "attn.wk.weight", "attn.wv.weight", "attn.wo.weight",
        "moe.router.weight", "moe.w_gate_up", "moe.w_down")}
    want_no = {"embed.weight", "norm.weight"} | {f"layers.{i}.{n}" for i in range(2) for n in (
        "attn_norm.weight", "ffn_norm.weight", "attn.q_norm.weight", "attn.k_norm.weight")}
    if not tie:
        want_decay.add("lm_head.weight")
    assert set(decay["names"]) == want_decay
    assert set(no_decay["names"]) == want_no
    n_params = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n_params == moelab.accounting.param_counts(cfg).total
    opt = build_optimizer(model, 4e-4, (0.9, 0.95), 1e-8, 0.1)
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8


def _train_a_few_steps(model, opt, steps=3):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randint(0, model.config.vocab_size, (2, 9), generator=g)
        model(x[:, :-1], x[:, 1:]).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_optimizer_is_fused_on_cpu_and_updates_like_plain_adamw():
    cfg = moelab.ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_experts=4, top_k=2, d_expert=16, max_seq_len=16)
    fused_model, plain_model = moelab.build(cfg, seed=0), moelab.build(cfg, seed=0)
    fused = build_optimizer(fused_model, 1e-2, (0.9, 0.95), 1e-8, 0.1)
    assert fused.defaults["fused"] is True
    plain = torch.optim.AdamW(param_groups(plain_model, 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    _train_a_few_steps(fused_model, fused)
    _train_a_few_steps(plain_model, plain)
    for (name, a), b in zip(fused_model.named_parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    # a state saved by either kind (through the checkpoint's safetensors/JSON split) loads into the other
    for src, dst_model, dst_fused in ((plain, fused_model, True), (fused, plain_model, None)):
        dst = torch.optim.AdamW(param_groups(dst_model, 0.1), lr=1e-2, fused=dst_fused)
        dst.load_state_dict(join_state(*split_state(src.state_dict())))
        _train_a_few_steps(dst_model, dst, steps=1)
        assert all(float(s["step"]) == 4 for s in dst.state.values())


def test_use_fused_needs_floating_point_parameters_on_a_supported_device():
    assert use_fused([torch.zeros(2), torch.zeros(2, dtype=torch.bfloat16)])
    assert not use_fused([])
    assert not use_fused([torch.zeros(2), torch.zeros(2, device="meta")])
    assert not use_fused([torch.zeros(2, dtype=torch.int64)])


def test_train_defaults_follow_the_study():
    run = run_config_from_dict({"model": {}, "train": {"steps": 3000}})
    t = run.train
    assert (t.lr, t.warmup_steps, t.min_lr_ratio, t.beta1, t.beta2, t.eps, t.weight_decay, t.grad_clip) == (
        4e-4, 2000, 0.1, 0.9, 0.95, 1e-8, 0.1, 1.0)


# ------------------------------------------------------------------ budgets
def test_budget_conversions():
    base = tiny_run_dict()
    per_step = 4 * 32
    for length, want in [({"steps": 7}, 7), ({"tokens": 10 * per_step + 5}, 10)]:
        d = apply_overrides(base, [])
        del d["train"]["steps"]
        d["train"].update(length)
        assert total_steps(run_config_from_dict(d)) == want
    d = apply_overrides(base, ["train.steps=null", "train.tpp=1.0"])
    run = run_config_from_dict(d)
    assert total_steps(run) == moelab.accounting.tokens_for_tpp(run.model, 1.0) // per_step
    d = apply_overrides(base, ["train.steps=null", "train.flops=1e12"])
    run = run_config_from_dict(d)
    assert total_steps(run) == moelab.accounting.tokens_for_flops(run.model, 1e12, 32) // per_step
    assert total_steps(run, world_size=2) == moelab.accounting.tokens_for_flops(run.model, 1e12, 32) // (2 * per_step)


def test_budget_errors():
    d = apply_overrides(tiny_run_dict(), ["train.steps=null", "train.tokens=100"])
    with pytest.raises(ConfigError, match="less than one optimizer step of 128 tokens"):
        total_steps(run_config_from_dict(d))
    with pytest.raises(ConfigError, match="exactly one training length"):
        run_config_from_dict(apply_overrides(tiny_run_dict(), ["train.tokens=1000"]))
    with pytest.raises(ConfigError, match="warmup_steps"):
        total_steps(run_config_from_dict(apply_overrides(tiny_run_dict(), ["train.warmup_steps=40"])))


def test_unknown_keys_suggest_at_every_level():
    for override, expect in [
        ("train.learning_rate=1", "did you mean 'train.lr'"),
        ("train.warmup=5", "did you mean 'train.warmup_steps'"),
        ("data.synthetic.n_entitys=5", "did you mean 'data.synthetic.n_entities'"),
        ("modle.d_model=5", "did you mean 'model'"),
        ("model.d_modle=5", "did you mean 'model.d_model'"),
    ]:
        with pytest.raises(ConfigError, match=expect):
            run_config_from_dict(apply_overrides(tiny_run_dict(), [override]))


def test_overrides_parse_yaml_values(tmp_path):
    cfg = write_config(tmp_path / "r.yaml", tiny_run_dict())
    run = load_run_config(cfg, ["train.lr=1e-3", "train.tensorboard=true", "data.synthetic.attributes=[birth_year]"])
    assert run.train.lr == 1e-3 and run.train.tensorboard is True
    assert run.data.synthetic.attributes == ["birth_year"]
    with pytest.raises(ConfigError, match="key.path=value"):
        load_run_config(cfg, ["train.lr"])


@pytest.mark.parametrize("name", ["tiny.yaml", "small.yaml", "study-d512.yaml"])
def test_presets_are_valid(name):
    run = load_run_config(Path(__file__).resolve().parents[1] / "configs" / name)
    steps = total_steps(run)
    assert steps > run.train.warmup_steps
    if name == "study-d512.yaml":
        m = run.model
        assert (m.d_model, m.n_layers, m.head_dim, m.d_expert, m.vocab_size, m.n_experts, m.top_k) == (512, 16, 128, 1024, 99584, 8, 2)
        assert run.train.tokens == 125_000_000_000 and run.train.warmup_steps == 2000 and run.train.lr == 4e-4


# ------------------------------------------------------------------ CLI errors: one line, exit code 1
def _cli_error(capsys, *args: str) -> str:
    assert main(list(args)) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err, err
    return err


def test_cli_bad_inputs(tmp_path, capsys):
    good = tiny_run_dict(10)
    cfg = write_config(tmp_path / "ok.yaml", good)
    out = str(tmp_path / "run")
    assert "did you mean 'train.lr'" in _cli_error(capsys, "train", str(cfg), "--out", out, "--set", "train.lrr=1")
    assert "less than one optimizer step" in _cli_error(capsys, "train", str(cfg), "--out", out, "--set", "train.steps=null", "--set", "train.tokens=5")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: [unclosed\n", encoding="utf-8")
    assert "not valid YAML" in _cli_error(capsys, "train", str(bad_yaml), "--out", out)
    shards = apply_overrides(good, ["data.source=shards"])
    shards["data"]["shards"] = [{"path": str(tmp_path / "nowhere"), "weight": 1.0}]
    assert "manifest.json not found" in _cli_error(capsys, "train", str(write_config(tmp_path / "s.yaml", shards)), "--out", out)
    assert "config file not found" in _cli_error(capsys, "train", str(tmp_path / "missing.yaml"), "--out", out)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cli_resume_with_different_config_is_refused(tmp_path, capsys):
    cfg = write_config(tmp_path / "a.yaml", tiny_run_dict(5, warmup_steps=2, checkpoint_every=5, eval_every=5))
    out = str(tmp_path / "run")
    assert main(["train", str(cfg), "--out", out, "-q"]) == 0
    capsys.readouterr()
    err = _cli_error(capsys, "train", str(cfg), "--out", out, "--resume", "--set", "model.d_model=48", "--set", "train.lr=1e-3")
    assert "different config" in err and "model.d_model" in err and "train.lr" in err
    assert "already holds checkpoints" in _cli_error(capsys, "train", str(cfg), "--out", out, "--no-resume")
    # length/eval/log settings may change; without CONFIG the stored config.yaml is used: extend the run
    assert main(["train", "--out", out, "--no-progress", "--set", "train.steps=7"]) == 0  # --no-progress = -q
    from moelab.train.metrics import read_metrics

    assert [r["step"] for r in read_metrics(out)] == list(range(1, 8))


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path, capsys):
    from moelab.train.checkpoint import latest_good_checkpoint, list_checkpoints

    cfg = write_config(tmp_path / "a.yaml", tiny_run_dict(10, checkpoint_every=1))
    out = tmp_path / "run"
    err = _cli_error(capsys, "train", str(cfg), "--out", str(out), "-q", "--set", "train.lr=1e30")
    assert "loss is nan" in err and "step_00000001" in err
    assert [s for s, _ in list_checkpoints(out)] == [1]
    ckpt = latest_good_checkpoint(out)
    assert ckpt is not None
    model = moelab.load(ckpt)
    assert all(math.isfinite(float(p.detach().abs().max())) for p in model.parameters())


def test_cli_run_dir_with_a_corrupt_stored_config_is_a_clear_error(tmp_path, capsys):
    cfg = write_config(tmp_path / "a.yaml", tiny_run_dict(5, warmup_steps=2, checkpoint_every=5, eval_every=5))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("- just\n- a list\n")
    assert "expected a mapping" in _cli_error(capsys, "train", str(cfg), "--out", str(run))
    (run / "config.yaml").write_text("model: [unclosed\n")
    assert "not valid YAML" in _cli_error(capsys, "train", str(cfg), "--out", str(run))
