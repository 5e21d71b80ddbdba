"""M-VAR: official key tables and sizes, converter errors across families, intra-scale attention, causality
across scales, scale-by-scale sampling equal to teacher forcing, AdaLN gate init."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from golden_rule import GOLDEN_MVAR
from tolerances import MVAR_TOL, REORDER_TOL

from nextscale.prior.families import PRESETS, build_prior, flops_per_image, num_params
from nextscale.prior.loader import CheckpointMismatch, load_official_var
from nextscale.prior.model import VARConfig
from nextscale.prior.mvar import MVAR, IntraScaleAttention
from nextscale.prior.sample import SamplingConfig, sample_codes
from nextscale.tokenize.vqvae import MultiScaleQuantizer

pytestmark = pytest.mark.usefixtures("one_thread")

TABLES = ("d12", "d16", "d16_anorm0", "d20", "d20_anorm0", "d24", "d30", "d32")


def official_keys(table: str) -> dict[str, list[int]]:
    return json.loads((GOLDEN_MVAR / f"official_keys_mvar_{table}.json").read_text())


def meta_state_dict(table: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    dtypes = {"lvl_1L": torch.int64}
    return {k: torch.empty(shape, device="meta", dtype=torch.int32 if k.endswith("attn.patch_nums")
                           else dtypes.get(k, torch.float32)) for k, shape in table.items()}


def config_for(table: str) -> VARConfig:
    """The preset a key table was made from (d16_anorm0: mvar_d16 with attn_l2_norm off)."""
    name, _, variant = table.partition("_")
    return dataclasses.replace(PRESETS[f"mvar_{name}"], attn_l2_norm=variant != "anorm0")


# ------------------------------------------------------------------------------------------------
# Presets, key tables, sizes


@pytest.mark.parametrize("table", TABLES)
def test_official_presets_have_the_official_keys_shapes_and_counts(table):
    with torch.device("meta"):
        mvar = build_prior(config_for(table))
    assert isinstance(mvar, MVAR)
    assert [(k, list(v.shape)) for k, v in mvar.state_dict().items()] == list(official_keys(table).items())
    meta = json.loads((GOLDEN_MVAR / "official_keys_mvar_meta.json").read_text())["presets"][f"mvar_{table}"]
    assert num_params(config_for(table)) == meta["num_params"]


def test_parameter_counts_by_the_official_size_rule():
    counts = {name: num_params(PRESETS[name]) for name in ("mvar_d16", "mvar_d20", "mvar_d30", "mvar_d32")}
    # the d16/d20 presets have no scale_mul_1H11 (attn_l2_norm off, as the released checkpoints)
    assert counts == {"mvar_d16": 464_157_184, "mvar_d20": 900_528_736, "mvar_d30": 3_017_065_756,
                      "mvar_d32": 3_658_707_968}  # the paper's "3.0 B" model is 3.66 B by the code
    assert flops_per_image(PRESETS["mvar_d16"]) == pytest.approx(1335.1e9, rel=1e-3)  # 1.44 x VAR-d16's


def test_flops_formula_agrees_with_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    mvar = build_prior("mvar_demo").eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        mvar(torch.tensor([1]), torch.randn(1, mvar.L - 1, mvar.Cv))
    # the counter does not see CPU SDPA: add the per-scale attention (q k^T and attn v) by hand
    attention = 4 * sum(pn**4 for pn in mvar.patch_nums) * mvar.C * mvar.cfg.depth
    assert counter.get_total_flops() + attention == pytest.approx(flops_per_image(mvar.cfg, training=False), rel=0.01)


@pytest.mark.parametrize("table", ["d16_anorm0", "d24"])
def test_official_state_dict_loads_strictly(table):
    mvar = load_official_var(meta_state_dict(official_keys(table)), config_for(table))
    assert isinstance(mvar, MVAR) and not mvar.training


def test_a_checkpoint_of_the_other_family_is_named():
    var_d16 = {k: torch.empty(s, device="meta") for k, s in
               json.loads((GOLDEN_MVAR.parent / "official_keys_var_d16.json").read_text()).items()}
    with pytest.raises(CheckpointMismatch, match=r"an M-VAR \(preset mvar_d16\).*looks like a VAR var_d16.*"
                                                 r"use preset d16"):
        load_official_var(var_d16, "mvar_d16")
    with pytest.raises(CheckpointMismatch, match=r"for a VAR \(preset d16\).*looks like an M-VAR mvar_d16.*"
                                                 r"use preset mvar_d16$"):
        load_official_var(meta_state_dict(official_keys("d16_anorm0")), "d16")
    with pytest.raises(CheckpointMismatch, match=r"use preset mvar_d16 with model.overrides.attn_l2_norm=true"):
        load_official_var(meta_state_dict(official_keys("d16")), "d16")


def test_shared_adaln_is_refused():
    from nextscale.config import ConfigError

    with pytest.raises(ConfigError, match="shared_aln=true is not available for arch=mvar"):
        build_prior("mvar_debug", shared_aln=True)


# ------------------------------------------------------------------------------------------------
# Attention and causality


def test_intra_scale_attention_equals_dense_masked_attention_without_a_size_limit():
    torch.manual_seed(0)
    patch_nums = (1, 2, 32)  # a 512-px-sized scale: 1,024 tokens (the official code stops at 256)
    attn = IntraScaleAttention(32, 2, attn_l2_norm=True, patch_nums=patch_nums).eval()
    with torch.no_grad():
        for p in (attn.q_bias, attn.v_bias):
            p.normal_()
    x = torch.randn(2, 1 + 4 + 1024, 32)
    bias = MVAR.mask_bias(patch_nums)
    with torch.no_grad():
        q, k, v = attn.qkv(x)
        dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)
        dense = attn.proj(dense.transpose(1, 2).reshape(2, -1, 32))
        assert torch.allclose(attn(x), dense, atol=REORDER_TOL)
        assert torch.allclose(attn(x[:, :5]), dense[:, :5], atol=REORDER_TOL)  # a prefix of whole scales


@pytest.fixture
def debug_mvar():
    torch.manual_seed(0)
    # gates and head far larger than the official init, so every branch visibly contributes
    return build_prior("mvar_debug", init_adaln_gamma=0.5, init_head=1.0, cond_drop_rate=0.0).eval()


def random_input(var, B: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, var.num_classes, (B,), generator=g), torch.randn(B, var.L - 1, var.Cv, generator=g)


def test_later_scales_never_change_earlier_logits(debug_mvar):
    label_B, x_BlCv = random_input(debug_mvar)
    with torch.no_grad():
        full = debug_mvar(label_B, x_BlCv)
        prefix = debug_mvar(label_B, x_BlCv[:, :4])  # scales (1, 2): 5 positions
        x_BlCv[:, 4:] += 1.0  # perturb the last scale's inputs
        perturbed = debug_mvar(label_B, x_BlCv)
    assert torch.allclose(prefix, full[:, :5], atol=MVAR_TOL) and torch.equal(perturbed[:, :5], full[:, :5])
    assert (perturbed[:, 5:] - full[:, 5:]).abs().max() > 1e-2
    debug_mvar.train()  # train and eval mode compute the same function (no drop rates here)
    with torch.no_grad():
        assert torch.equal(debug_mvar(label_B, x_BlCv), perturbed)


def test_flex_attention_matches_sdpa(debug_mvar):
    mvar = build_prior("mvar_debug", attn_impl="flex").eval()
    mvar.load_state_dict(debug_mvar.state_dict())
    label_B, x_BlCv = random_input(mvar)
    with torch.no_grad():
        assert torch.allclose(mvar(label_B, x_BlCv), debug_mvar(label_B, x_BlCv), atol=MVAR_TOL)


def test_scale_by_scale_sampling_equals_teacher_forcing_and_the_prefix_rerun(debug_mvar):
    torch.manual_seed(0)
    quantizer = MultiScaleQuantizer(debug_mvar.V, debug_mvar.Cv, debug_mvar.patch_nums, beta=0.25, quant_resi=0.5,
                                    num_phi=4).eval()
    label_B = torch.tensor([1, 4])
    runs = []
    for rerun in (False, True):
        debug_mvar.sample_by_rerunning_prefix(rerun)
        record: dict[str, list[torch.Tensor]] = {}
        codes = sample_codes(debug_mvar, quantizer, label_B, generator=torch.Generator().manual_seed(5), sampling=SamplingConfig(guidance=2.0, top_k=0, top_p=0.0),
                             record=record)
        runs.append((codes, torch.cat(record["logits_raw"], dim=1)))
    debug_mvar.sample_by_rerunning_prefix(False)
    (codes, logits), (codes_rerun, logits_rerun) = runs
    from nextscale.tokenize.scales import split_codes

    x_BlCv = quantizer.teacher_forcing_input(split_codes(codes, debug_mvar.patch_nums))
    with torch.no_grad():
        tf = torch.cat((debug_mvar(label_B, x_BlCv), debug_mvar(torch.full_like(label_B, 10), x_BlCv)))
    assert torch.allclose(logits, tf, atol=MVAR_TOL) and logits.abs().max() > 1.0
    assert torch.equal(codes, codes_rerun) and torch.allclose(logits, logits_rerun, atol=MVAR_TOL)
    assert all(b.state is None for b in debug_mvar.blocks)  # the sampler leaves no state behind


# ------------------------------------------------------------------------------------------------
# Initialisation


@pytest.mark.parametrize("gate_init", ["small", "official"])
def test_adaln_gate_init(gate_init):
    torch.manual_seed(0)
    mvar = build_prior("mvar_demo", init_adaln_gamma=1e-3, gate_init=gate_init)
    C, std = mvar.C, (1 / 128 / 3) ** 0.5
    w = mvar.blocks[0].ada_lin[1].weight.view(9, C, C)
    stds = [w[i].std().item() / std for i in range(9)]
    g3 = 1e-3 if gate_init == "small" else 0.5  # the official code leaves the FFN gate at init_adaln
    assert stds == pytest.approx([1e-3, 1e-3, g3] + [0.5] * 6, rel=0.05)
    m = mvar.blocks[1].mamba
    assert m.conv1d.weight.std().item() == pytest.approx(0.02, rel=0.05) and not m.conv1d.bias.any()
    assert m.in_proj.weight.std().item() == pytest.approx(std, rel=0.05)
    # mamba_ssm's own init of the SSM parameters survives: A in [-16, -1], dt in [1e-3, 0.1], D = 1
    A = -m.A_log.exp()
    dt = torch.nn.functional.softplus(m.dt_bias)
    assert A.min() >= -16 and A.max() <= -1 and dt.min() >= 1e-3 - 1e-9 and dt.max() <= 0.1 and (m.D == 1).all()
