"""VAR prior: presets and official key tables, converter errors, block causality, sampler behaviour, overfitting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tolerances import REORDER_TOL

from nextscale.prior.families import PRESETS, build_prior, flops_per_image, num_params
from nextscale.prior.loader import CheckpointMismatch, load_official_var, to_official_state_dict
from nextscale.prior.sample import SamplingConfig, known_mask_from_pixels, sample_codes
from nextscale.tokenize.vqvae import MultiScaleQuantizer

GOLDEN = Path(__file__).parent / "golden"
OFFICIAL = ("d16", "d20", "d24", "d30")


def official_keys(preset: str) -> dict[str, list[int]]:
    return json.loads((GOLDEN / f"official_keys_var_{preset}.json").read_text())


def meta_state_dict(table: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """A 'checkpoint' with exactly the official keys and shapes, on the meta device (no memory)."""
    return {k: torch.empty(shape, device="meta", dtype=torch.int64 if k == "lvl_1L" else torch.float32)
            for k, shape in table.items()}


def debug_quantizer(var) -> MultiScaleQuantizer:
    torch.manual_seed(0)
    return MultiScaleQuantizer(var.V, var.Cv, var.patch_nums, beta=0.25, quant_resi=0.5, num_phi=4).eval()


@pytest.fixture
def debug_var():
    torch.manual_seed(0)
    var = build_prior("debug", init_adaln_gamma=0.5, init_head=1.0).eval()  # larger than official: visible effects
    return var


def random_input(var, B: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, var.num_classes, (B,), generator=g), torch.randn(B, var.L - 1, var.Cv, generator=g)


# ------------------------------------------------------------------------------------------------
# Presets, key tables, FLOPs


@pytest.mark.parametrize("preset", OFFICIAL)
def test_official_presets_have_the_official_keys_shapes_and_counts(preset):
    with torch.device("meta"):
        var = build_prior(preset)
    table = official_keys(preset)
    assert [(k, list(v.shape)) for k, v in var.state_dict().items()] == list(table.items())
    meta = json.loads((GOLDEN / "official_keys_meta.json").read_text())["presets"][f"var_{preset}"]
    assert num_params(PRESETS[preset]) == meta["num_params"]
    assert sorted(n for n, _ in var.named_buffers()) == sorted(meta["buffers"])


def test_d16_parameter_count_and_flops_match_the_reference():
    assert num_params(PRESETS["d16"]) == 310_283_520
    # docs/var.md §4: forward 310 GFLOP, training 930 GFLOP per image
    assert flops_per_image(PRESETS["d16"], training=False) == pytest.approx(310.06e9, rel=1e-3)
    assert flops_per_image(PRESETS["d16"]) == pytest.approx(930.2e9, rel=1e-3)


def test_d36_is_the_shared_adaln_512px_model():
    cfg = PRESETS["d36"]
    with torch.device("meta"):
        var = build_prior(cfg)
    keys = var.state_dict().keys()
    assert var.L == 2240 and var.C == 2304
    assert "shared_ada_lin.1.weight" in keys and "blocks.0.ada_gss" in keys
    assert not any(".ada_lin." in k for k in keys if k.startswith("blocks."))
    assert 2.30e9 < num_params(cfg) < 2.40e9  # README: 2.3B


@pytest.mark.parametrize("preset", ["debug", "golden_tiny", "demo"])
def test_small_presets_forward_shapes(preset):
    var = build_prior(preset).eval()
    label_B, x_BlCv = random_input(var, B=2)
    with torch.no_grad():
        logits = var(label_B, x_BlCv)
    assert logits.shape == (2, var.L, var.V) and logits.dtype == torch.float32


def test_demo_preset_pairs_with_the_demo_tokenizer():
    from nextscale.tokenize.vqvae import VQVAE_PRESETS

    vq, var = VQVAE_PRESETS["demo"], PRESETS["demo"]
    assert (vq.vocab_size, vq.z_channels, tuple(vq.patch_nums)) == (var.vocab_size, var.latent_channels,
                                                                    tuple(var.patch_nums))
    vq, var = VQVAE_PRESETS["golden_tiny"], PRESETS["golden_tiny"]
    assert (vq.vocab_size, vq.z_channels, tuple(vq.patch_nums)) == (var.vocab_size, var.latent_channels,
                                                                    tuple(var.patch_nums))


def test_init_weights_follows_the_official_rule():
    torch.manual_seed(0)
    var = build_prior("demo", embed_dim=192)  # C=192, depth 4, init_adaln_gamma 1e-3
    std, C = (1 / 192 / 3) ** 0.5, 192
    w = var.blocks[0].ada_lin[1].weight
    assert w[:2 * C].std().item() == pytest.approx(std * 1e-3, rel=0.05)
    assert w[2 * C:].std().item() == pytest.approx(std * 0.5, rel=0.05)
    assert var.blocks[0].attn.proj.weight.std().item() == pytest.approx(std / (2 * 4) ** 0.5, rel=0.05)
    assert var.head.weight.std().item() == pytest.approx(std * 0.02, rel=0.05)
    assert var.class_emb.weight.std().item() == pytest.approx(std, rel=0.05)
    assert torch.allclose(var.blocks[1].attn.scale_mul_1H11.exp(), torch.tensor(4.0))
    for bias in (var.head.bias, var.head_nm.ada_lin[1].bias, var.blocks[0].ada_lin[1].bias, var.blocks[0].attn.q_bias):
        assert not bias.any()


# ------------------------------------------------------------------------------------------------
# Converter


@pytest.mark.parametrize("preset", OFFICIAL)
def test_official_key_table_loads_strictly(preset):
    var = load_official_var(meta_state_dict(official_keys(preset)), preset)
    assert var.cfg.depth == int(preset[1:]) and not var.training


def test_wrong_depth_names_the_key_and_the_preset():
    with pytest.raises(CheckpointMismatch, match=r"blocks\.16\.\* unexpected.*var_d20.*use preset d20"):
        load_official_var(meta_state_dict(official_keys("d20")), "d16")
    with pytest.raises(CheckpointMismatch, match=r"key pos_start has shape \[1, 1, 1024\].*use preset d16"):
        load_official_var(meta_state_dict(official_keys("d16")), "d20")


def test_missing_and_misshaped_keys_are_named():
    table = official_keys("d16")
    sd = meta_state_dict(table)
    del sd["blocks.3.ffn.fc2.bias"]
    with pytest.raises(CheckpointMismatch, match=r"missing key blocks\.3\.ffn\.fc2\.bias"):
        load_official_var(sd, "d16")
    sd = meta_state_dict(table)
    sd["head.weight"] = torch.empty(1000, 1024, device="meta")
    with pytest.raises(CheckpointMismatch, match=r"key head\.weight has shape \[1000, 1024\]"):
        load_official_var(sd, "d16")
    with pytest.raises(CheckpointMismatch, match="VQVAE checkpoint"):
        load_official_var({"encoder.conv_in.weight": torch.empty(160, 3, 3, 3, device="meta")}, "d16")


def test_round_trip_through_a_file_keeps_the_logits(tmp_path, debug_var):
    path = tmp_path / "var_debug.pth"
    torch.save({"trainer": {"var_wo_ddp": to_official_state_dict(debug_var)}}, path)  # an official trainer ckpt
    loaded = load_official_var(str(path), "debug")
    label_B, x_BlCv = random_input(debug_var)
    with torch.no_grad():
        assert torch.equal(loaded(label_B, x_BlCv), debug_var(label_B, x_BlCv))


# ------------------------------------------------------------------------------------------------
# Forward semantics


def test_block_causality(debug_var):
    """Logits at positions of scales <= k depend only on the inputs of scales <= k."""
    var = debug_var
    label_B, x_BlCv = random_input(var)
    begin_ends = var.scale_begin_ends()
    with torch.no_grad():
        base = var(label_B, x_BlCv)
        for k, (_, end) in enumerate(begin_ends[:-1]):
            changed = x_BlCv.clone()
            changed[:, end - 1:] += torch.randn_like(changed[:, end - 1:])  # inputs of scales > k (input row = pos - 1)
            out = var(label_B, changed)
            assert torch.equal(out[:, :end], base[:, :end]), f"scale {k} saw finer scales"
            assert not torch.allclose(out[:, end:], base[:, end:]), "finer scales ignored their own inputs"


def test_prefix_of_scales_equals_the_full_forward(debug_var):
    """Progressive training: feeding only the first scales gives the same logits for them."""
    label_B, x_BlCv = random_input(debug_var)
    with torch.no_grad():
        full = debug_var(label_B, x_BlCv)
        prefix = debug_var(label_B, x_BlCv[:, :4])  # scales (1, 2): 5 positions
    assert torch.allclose(prefix, full[:, :5], atol=REORDER_TOL)
    with pytest.raises(ValueError, match="end of a scale"):
        debug_var(label_B, x_BlCv[:, :3])


def test_condition_dropout_only_in_training(debug_var):
    var = build_prior("debug", cond_drop_rate=1.0, init_adaln_gamma=0.5)
    var.load_state_dict(debug_var.state_dict())
    label_B, x_BlCv = random_input(var)
    null_B = torch.full_like(label_B, var.num_classes)
    with torch.no_grad():
        var.eval()
        assert torch.equal(var(label_B, x_BlCv), debug_var(label_B, x_BlCv))
        var.train()  # drop path is 0 in "debug": the only train-mode effect is the dropped label
        assert torch.equal(var(label_B, x_BlCv), debug_var(null_B, x_BlCv))


def test_flex_attention_matches_sdpa(debug_var):
    var = build_prior("debug", attn_impl="flex").eval()
    var.load_state_dict(debug_var.state_dict())
    label_B, x_BlCv = random_input(var)
    with torch.no_grad():
        assert torch.allclose(var(label_B, x_BlCv), debug_var(label_B, x_BlCv), atol=REORDER_TOL)


def test_bf16_autocast_gives_float32_logits_close_to_fp32(debug_var):
    label_B, x_BlCv = random_input(debug_var)
    with torch.no_grad():
        ref = debug_var(label_B, x_BlCv)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = debug_var(label_B, x_BlCv)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


# ------------------------------------------------------------------------------------------------
# Sampler


def test_cached_sampling_equals_teacher_forcing_on_the_sampled_tokens(debug_var):
    var, quant = debug_var, debug_quantizer(debug_var)
    label_B = torch.tensor([1, 4])
    record: dict[str, list[torch.Tensor]] = {}
    codes = sample_codes(var, quant, label_B, generator=torch.Generator().manual_seed(0), sampling=SamplingConfig(guidance=2.0, top_k=10, top_p=0.9), record=record)
    raw_2BLV = torch.cat(record["logits_raw"], dim=1)
    x_BlCv = quant.teacher_forcing_input([codes[:, b:e] for b, e in var.scale_begin_ends()])
    with torch.no_grad():
        cond = var(label_B, x_BlCv)
        null = var(torch.full_like(label_B, var.num_classes), x_BlCv)
    assert torch.allclose(raw_2BLV[:2], cond, atol=REORDER_TOL)
    assert torch.allclose(raw_2BLV[2:], null, atol=REORDER_TOL)
    # guidance ramps from 0 at the first scale to cfg at the last: (1 + t) cond - t null
    guided = torch.cat(record["logits_guided"], dim=1)
    assert torch.allclose(guided[:, :1], cond[:, :1], atol=REORDER_TOL)
    assert torch.allclose(guided[:, 5:], 3 * cond[:, 5:] - 2 * null[:, 5:], atol=5 * REORDER_TOL)  # (1 + 2t) x the error, t = 2


def test_filters_keep_top_k_and_the_nucleus(debug_var):
    record: dict[str, list[torch.Tensor]] = {}
    sample_codes(debug_var, debug_quantizer(debug_var), torch.tensor([0, 1, 2]),
                 generator=torch.Generator().manual_seed(0), sampling=SamplingConfig(top_k=5, top_p=0.5), record=record)
    kept = torch.cat([torch.isfinite(f) for f in record["logits_filtered"]], dim=1).sum(-1)
    assert kept.min() >= 1 and kept.max() <= 5


def test_same_seed_same_codes(debug_var):
    quant, labels = debug_quantizer(debug_var), torch.tensor([0, 3, 5, 9])
    run = [sample_codes(debug_var, quant, labels, generator=torch.Generator().manual_seed(s), sampling=SamplingConfig(top_k=0, top_p=0.0))
           for s in (7, 7, 8)]
    assert run[0].shape == (4, debug_var.L) and run[0].dtype == torch.int64
    assert torch.equal(run[0], run[1]) and not torch.equal(run[0], run[2])
    assert int(run[0].min()) >= 0 and int(run[0].max()) < debug_var.V


def test_bf16_sampling_runs_and_mostly_agrees_with_fp32(debug_var):
    quant, labels = debug_quantizer(debug_var), torch.arange(8)
    codes = [sample_codes(debug_var, quant, labels, generator=torch.Generator().manual_seed(1), autocast=amp)
             for amp in (False, True)]
    assert codes[1].shape == codes[0].shape and int(codes[1].max()) < debug_var.V
    assert torch.equal(codes[1][:, :1], codes[0][:, :1])  # same draws; bf16 rounding does not flip scale 0 here


def test_sampler_leaves_the_global_rng_alone(debug_var):
    quant = debug_quantizer(debug_var)
    state = torch.get_rng_state()
    sample_codes(debug_var, quant, torch.tensor([0]), generator=torch.Generator().manual_seed(0))
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("more_smooth", [False, True])
def test_editing_keeps_the_known_tokens(debug_var, more_smooth):
    var, quant = debug_var, debug_quantizer(debug_var)
    g = torch.Generator().manual_seed(3)
    known_BL = torch.randint(0, var.V, (2, var.L), generator=g)
    mask_BL = torch.rand(2, var.L, generator=g) < 0.5
    out = sample_codes(var, quant, torch.tensor([2, 2]), generator=torch.Generator().manual_seed(0),
                       sampling=SamplingConfig(more_smooth=more_smooth), known_codes_BL=known_BL, known_mask_BL=mask_BL)
    assert torch.equal(out[mask_BL], known_BL[mask_BL])
    free = sample_codes(var, quant, torch.tensor([2, 2]), generator=torch.Generator().manual_seed(0),
                        sampling=SamplingConfig(more_smooth=more_smooth))
    assert not torch.equal(out[~mask_BL], free[~mask_BL])  # the free tokens see the forced context
    full = sample_codes(var, quant, torch.tensor([2, 2]), generator=torch.Generator().manual_seed(0),
                        known_codes_BL=known_BL, known_mask_BL=torch.ones_like(mask_BL))
    assert torch.equal(full, known_BL)


def test_known_mask_from_pixels():
    keep_BHW = torch.ones(1, 12, 12)
    keep_BHW[:, :6, :6] = 0  # a hole in the top-left quarter
    mask = known_mask_from_pixels(keep_BHW, (1, 2, 3))
    # scale 1: 3/4 kept; scale 2: the top-left token is in the hole; scale 3: tokens >= half in the hole are free
    assert mask.tolist() == [[True] + [False, True, True, True] + [False, False, True, False, True, True, True, True, True]]


def test_sampler_errors_are_clear(debug_var):
    quant = debug_quantizer(debug_var)
    with pytest.raises(ValueError, match="both known_codes_BL and known_mask_BL"):
        sample_codes(debug_var, quant, torch.tensor([0]), generator=torch.Generator(),
                     known_codes_BL=torch.zeros(1, debug_var.L, dtype=torch.long))
    other = MultiScaleQuantizer(16, 8, (1, 2, 3), beta=0.25, quant_resi=0.5, num_phi=4)
    with pytest.raises(ValueError, match="does not match the VAR"):
        sample_codes(debug_var, other, torch.tensor([0]), generator=torch.Generator())


# ------------------------------------------------------------------------------------------------
# Learning


def test_tiny_model_overfits_a_tiny_batch():
    torch.manual_seed(0)
    var = build_prior("debug", cond_drop_rate=0.0)
    quant = debug_quantizer(var)
    codes_BL = torch.randint(0, var.V, (4, var.L), generator=torch.Generator().manual_seed(5))
    label_B = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        x_BlCv = quant.teacher_forcing_input([codes_BL[:, b:e] for b, e in var.scale_begin_ends()])
    opt = torch.optim.AdamW(var.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    first = None
    for _ in range(150):
        loss = F.cross_entropy(var(label_B, x_BlCv).flatten(0, 1), codes_BL.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    var.eval()
    with torch.no_grad():
        logits = var(label_B, x_BlCv)
    assert first > 3.0  # ~ln 32 at init
    assert F.cross_entropy(logits.flatten(0, 1), codes_BL.flatten()).item() < 0.1
    assert torch.equal(logits.argmax(-1), codes_BL)
