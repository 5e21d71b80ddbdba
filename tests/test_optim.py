"""Official VAR parameter groups and lr / weight-decay schedules (docs/var.md §2)."""

from __future__ import annotations

import math

import pytest
import torch

from nextscale.prior.families import build_prior
from nextscale.prior.optim import build_optimizer, param_groups
from nextscale.schedule import Schedule, lr_at, wd_at

# d16 recipe: global batch 768, 200 epochs of ceil(1,281,167 / 768) = 1,669 steps, warm-up ep/50 = 4 epochs
D16 = dict(peak_lr=1e-4 * 768 / 256, warmup_steps=4 * 1669, total_steps=200 * 1669, start_ratio=0.005,
           final_ratio=0.1, kind="lin0")


def test_peak_lr_and_step_counts_of_the_d16_recipe():
    assert D16["peak_lr"] == pytest.approx(3e-4)
    assert (D16["warmup_steps"], D16["total_steps"]) == (6676, 333800)


@pytest.mark.parametrize("step, expected_ratio", [
    (0, 0.005),                                   # warm-up starts at wp0
    (3338, 0.005 + 0.995 * 3338 / 6676),          # half-way through the warm-up
    (6675, 0.005 + 0.995 * 6675 / 6676),          # last warm-up step
    (6676, 1.0),                                  # progress 0: flat
    (6676 + 16000, 1.0),                          # progress < 0.05: still flat
    (6676 + round(0.5 * 327123), 0.1 + 0.9 * (1 - round(0.5 * 327123) / 327123) / 0.95),  # linear part
    (333799, 0.1),                                # last step: final ratio wpe
])
def test_lin0_lr_matches_the_official_formula(step, expected_ratio):
    assert lr_at(step, **D16) == pytest.approx(3e-4 * expected_ratio, rel=1e-12)


def test_lin0_is_continuous_where_the_flat_part_ends():
    span = D16["total_steps"] - 1 - D16["warmup_steps"]
    p_end = D16["warmup_steps"] + math.ceil(0.05 * span)
    assert lr_at(p_end, **D16) == pytest.approx(3e-4, rel=1e-4)
    assert lr_at(p_end, **D16) < 3e-4


def test_cos_and_const_schedules():
    kw = dict(D16, kind="cos")
    mid = D16["warmup_steps"] + (D16["total_steps"] - 1 - D16["warmup_steps"]) / 2
    assert lr_at(int(mid), **kw) == pytest.approx(3e-4 * (0.1 + 0.9 * 0.5), rel=1e-5)
    assert lr_at(D16["total_steps"] - 1, **kw) == pytest.approx(3e-5)
    assert lr_at(D16["total_steps"] - 1, **dict(D16, kind="const")) == D16["peak_lr"]
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_at(10_000, **dict(D16, kind="exp"))


def test_weight_decay_cosine_d30_and_constant_default():
    total = 350 * 1252
    assert wd_at(0, start=0.05, end=0.08, total_steps=total) == pytest.approx(0.05)
    assert wd_at((total - 1) / 2, start=0.05, end=0.08, total_steps=total) == pytest.approx(0.065)
    assert wd_at(total - 1, start=0.05, end=0.08, total_steps=total) == pytest.approx(0.08)
    assert {wd_at(s, start=0.05, end=0.05, total_steps=total) for s in (0, 1000, total - 1)} == {0.05}


def test_param_groups_follow_the_official_no_decay_rules():
    model = build_prior("debug")
    decay, no_decay = param_groups(model)
    block = {"attn.mat_qkv.weight", "attn.proj.weight", "ffn.fc1.weight", "ffn.fc2.weight", "ada_lin.1.weight"}
    assert set(decay["param_names"]) == {
        "class_emb.weight", "word_embed.weight", "head_nm.ada_lin.1.weight", "head.weight",
        *(f"blocks.{i}.{n}" for i in range(2) for n in block)}
    expected_no_decay = {"pos_start", "pos_1LC", "lvl_embed.weight", "word_embed.bias", "head_nm.ada_lin.1.bias",
                         "head.bias"}
    for i in range(2):
        expected_no_decay |= {f"blocks.{i}.{n}" for n in (
            "attn.scale_mul_1H11", "attn.q_bias", "attn.v_bias", "attn.proj.bias", "ffn.fc1.bias", "ffn.fc2.bias",
            "ada_lin.1.bias")}
    assert set(no_decay["param_names"]) == expected_no_decay
    assert (decay["wd_sc"], no_decay["wd_sc"]) == (1.0, 0.0)
    assert sum(len(g["params"]) for g in (decay, no_decay)) == len(list(model.parameters()))


def test_shared_adaln_offsets_are_not_decayed():
    with torch.device("meta"):
        model = build_prior("d36")
    decay, no_decay = param_groups(model)
    assert "blocks.0.ada_gss" in no_decay["param_names"] and "shared_ada_lin.1.weight" in decay["param_names"]


def test_wrapper_prefixes_do_not_change_the_groups():
    model = build_prior("debug")
    wrapped = torch.nn.Sequential()
    wrapped.add_module("module", model)  # what DDP's parameter names look like
    assert [g["param_names"] for g in param_groups(wrapped)] == [g["param_names"] for g in param_groups(model)]


def test_schedule_writes_lr_and_group_scaled_weight_decay():
    model = build_prior("debug")
    opt = build_optimizer(model, lr=1.0, betas=(0.9, 0.95))
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["fused"]  # torch has a fused CPU kernel
    sched = Schedule(peak_lr=2e-4, warmup_steps=10, total_steps=100, final_ratio=0.1, wd=0.05, wd_end=0.08)
    lr, wd = sched.apply(opt, 5)
    assert lr == pytest.approx(2e-4 * (0.005 + 0.995 * 0.5)) and wd == pytest.approx(wd_at(5, start=0.05, end=0.08,
                                                                                           total_steps=100))
    assert [g["lr"] for g in opt.param_groups] == [lr, lr]
    assert [g["weight_decay"] for g in opt.param_groups] == [wd, 0.0]


def test_fused_adamw_on_cpu_equals_the_foreach_update():
    """The fused kernel (now also on CPU) takes the same steps as the default update, to fp32 rounding."""
    torch.manual_seed(0)
    fused_model, plain_model = build_prior("debug"), build_prior("debug")
    plain_model.load_state_dict(fused_model.state_dict())
    fused = build_optimizer(fused_model, lr=1e-2, betas=(0.9, 0.95))
    plain = build_optimizer(plain_model, lr=1e-2, betas=(0.9, 0.95), fused=False)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    sched = Schedule(peak_lr=1e-2, warmup_steps=0, total_steps=3, wd=0.05, wd_end=0.05)
    for step in range(3):
        for model, opt in ((fused_model, fused), (plain_model, plain)):
            sched.apply(opt, step)
            for i, p in enumerate(model.parameters()):
                p.grad = torch.full_like(p, 0.01 * (i % 5 - 2)) + 0.001 * torch.arange(p.numel()).view_as(p).sin()
            opt.step()
    for (name, a), b in zip(fused_model.named_parameters(), plain_model.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), name
