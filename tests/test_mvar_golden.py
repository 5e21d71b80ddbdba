"""Parity with the official M-VAR on tests/golden/mvar (tiny config, rule weights through the official-key converter).

The reference is the official train-mode path (tests/golden/mvar/README.md §7: the one its sampler
computes); its Mamba2 scan ran sequentially in float64, nextscale's chunked scan runs in float32, so
floats agree to the M-VAR family's floor (tests/tolerances.py) and sampled tokens exactly, far from any tie.
"""

from __future__ import annotations

import dataclasses
import json

import golden_rule as gr
import numpy as np
import pytest
import torch
from tolerances import MVAR_TOL, VQVAE_DECODE_TOL, token_margins

from nextscale.prior.families import PRESETS
from nextscale.prior.loader import load_official_var
from nextscale.prior.sample import SamplingConfig, sample_codes

LABELS = torch.tensor([3, 7])
NULL = torch.tensor([10, 10])
TOL = MVAR_TOL  # tests/tolerances.py: 20x the largest float32 floor measured over CPU paths


def official_tiny_state_dict() -> dict[str, torch.Tensor]:
    """Rule parameters (seed base 30000) + the official buffers, as the official state dict holds them."""
    sd = gr.rule_state_dict(gr.official_param_shapes("mvar"), gr.MVAR_SEED_BASE)
    buffers = json.loads((gr.GOLDEN_MVAR / "tiny_buffers.json").read_text())
    sd["lvl_1L"] = torch.tensor(buffers["mvar.lvl_1L"]["values"], dtype=torch.int64)
    sd["attn_bias_for_masking"] = torch.from_numpy(gr.load("mvar/mvar_buffer_attn_bias_for_masking.npy"))
    for i in range(2):
        sd[f"blocks.{i}.attn.zero_k_bias"] = torch.zeros(128)
        sd[f"blocks.{i}.attn.patch_nums"] = torch.tensor(buffers[f"mvar.blocks.{i}.attn.patch_nums"]["values"],
                                                         dtype=torch.int32)
    return sd


def max_abs(a: torch.Tensor, name: str) -> float:
    ref = gr.load(f"mvar/{name}")
    assert tuple(a.shape) == ref.shape, name
    return float(np.abs(a.detach().numpy().astype(np.float64) - ref).max())


@pytest.fixture(scope="module")
def mvar():
    return load_official_var(official_tiny_state_dict(), "mvar_golden_tiny")


@pytest.fixture(scope="module")
def x_BLCv() -> torch.Tensor:
    return torch.from_numpy(gr.load("mvar/mvar_x_BLCv_wo_first_l.npy"))


@pytest.fixture(scope="module")
def forward(mvar, x_BLCv):
    """Teacher-forced outputs (cond labels) with the intermediates the fixtures hold."""
    seen: dict[str, list] = {k: [] for k in ("block_in", "block_out", "attn", "mamba_in", "mamba_out", "head_nm")}

    def keep(name, what):  # clones: the block scales the branch outputs in place
        return lambda mod, args, out: seen[name].append((args[0] if what == "in" else out).clone())

    hooks = [mvar.head_nm.register_forward_hook(keep("head_nm", "out"))]
    for b in mvar.blocks:
        hooks += [b.register_forward_hook(keep("block_in", "in")), b.register_forward_hook(keep("block_out", "out")),
                  b.attn.register_forward_hook(keep("attn", "out")), b.mamba.register_forward_hook(keep("mamba_in", "in")),
                  b.mamba.register_forward_hook(keep("mamba_out", "out"))]
    with torch.no_grad():
        cond = mvar(LABELS, x_BLCv)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        null = mvar(NULL, x_BLCv)
    out = {"mvar_logits_cond.npy": cond, "mvar_logits_null.npy": null, "mvar_fwd_head_nm_out.npy": seen["head_nm"][0]}
    for key, name in [("block_in", "block_in"), ("block_out", "block_out"), ("attn", "attn_out"),
                      ("mamba_in", "mamba_in"), ("mamba_out", "mamba_out")]:
        out[f"mvar_fwd_{name}.npy"] = torch.stack(seen[key])
    return out


@pytest.mark.parametrize("name", ["mvar_fwd_block_in.npy", "mvar_fwd_attn_out.npy", "mvar_fwd_mamba_in.npy",
                                  "mvar_fwd_mamba_out.npy", "mvar_fwd_block_out.npy", "mvar_fwd_head_nm_out.npy",
                                  "mvar_logits_cond.npy", "mvar_logits_null.npy"])
def test_teacher_forcing_matches_official(forward, name):
    assert max_abs(forward[name], name) <= TOL


def test_without_attn_l2_norm_matches_official(x_BLCv):
    sd = {k: v for k, v in official_tiny_state_dict().items() if not k.endswith("scale_mul_1H11")}
    mvar = load_official_var(sd, dataclasses.replace(PRESETS["mvar_golden_tiny"], attn_l2_norm=False))
    with torch.no_grad():
        assert max_abs(mvar(LABELS, x_BLCv), "mvar_nol2_logits_cond.npy") <= TOL


def test_mask_buffer_is_the_official_block_diagonal(mvar):
    ref = torch.from_numpy(gr.load("mvar/mvar_buffer_attn_bias_for_masking.npy"))
    assert torch.equal(mvar.attn_bias_for_masking, ref) and int((ref == 0).sum()) == 1 + 16 + 81 + 256
    assert [b.attn.patch_nums.tolist() for b in mvar.blocks] == [[1, 4, 9, 16]] * 2


@pytest.fixture(scope="module")
def vqvae():
    from nextscale.tokenize.loader import load_official_vqvae

    return load_official_vqvae(gr.rule_state_dict(gr.official_param_shapes("vqvae"), gr.VQVAE_SEED_BASE),
                               "golden_tiny")


def sample(mvar, vqvae, record=None):
    kw = json.loads((gr.GOLDEN_MVAR / "tiny_config.json").read_text())["sampling"]
    return sample_codes(mvar, vqvae.quantize, torch.tensor(kw["label_B"]),
                        generator=torch.Generator().manual_seed(kw["g_seed"]), sampling=SamplingConfig(guidance=kw["cfg"], top_k=kw["top_k"], top_p=kw["top_p"], more_smooth=kw["more_smooth"]), record=record)


@pytest.fixture(scope="module")
def sampled(mvar, vqvae):
    record: dict[str, list[torch.Tensor]] = {}
    return sample(mvar, vqvae, record), record


def test_sampled_tokens_match_official(sampled):
    codes, record = sampled
    kw = json.loads((gr.GOLDEN_MVAR / "tiny_config.json").read_text())["sampling"]
    margins = token_margins(record, codes, kw["g_seed"], kw["top_k"], kw["top_p"])
    # no draw, top-k or top-p set is within the logits' tolerance of a tie: the tokens hold on every CPU
    assert margins.pop("replay_equal") and min(margins.values()) > TOL, margins
    assert np.array_equal(codes.numpy(), gr.load("mvar/sample_idx_BL.npy"))


def test_the_official_prefix_rerun_samples_the_same_tokens(mvar, vqvae, sampled):
    mvar.sample_by_rerunning_prefix(True)
    try:
        record: dict[str, list[torch.Tensor]] = {}
        codes = sample(mvar, vqvae, record)
    finally:
        mvar.sample_by_rerunning_prefix(False)
    assert torch.equal(codes, sampled[0])
    assert torch.allclose(torch.cat(record["logits_raw"], 1), torch.cat(sampled[1]["logits_raw"], 1), atol=TOL)


@pytest.mark.parametrize("kind", ["raw", "guided", "filtered"])
def test_sampling_logits_match_official(sampled, kind):
    _, record = sampled
    logits = torch.cat(record[f"logits_{kind}"], dim=1)
    ref = torch.from_numpy(gr.load(f"mvar/sample_logits_{kind}.npy"))
    kept = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(logits), kept)  # the same tokens survive top-k / top-p
    assert float((logits[kept] - ref[kept]).abs().max()) <= TOL


def test_incremental_logits_equal_teacher_forcing_on_the_sampled_tokens(mvar, vqvae, sampled):
    codes, record = sampled
    from nextscale.tokenize.scales import split_codes

    x = vqvae.quantize.teacher_forcing_input(split_codes(codes, mvar.patch_nums))
    with torch.no_grad():
        tf = torch.cat((mvar(LABELS, x), mvar(NULL, x)))
    assert float((torch.cat(record["logits_raw"], 1) - tf).abs().max()) <= TOL


def test_sampled_image_matches_official(sampled, vqvae):
    codes, record = sampled
    assert max_abs(record["f_hat"][0], "sample_fhat.npy") <= TOL
    with torch.no_grad():
        img = vqvae.fhat_to_img(record["f_hat"][0]).add(1).mul(0.5)
    assert max_abs(img, "sample_img.npy") <= VQVAE_DECODE_TOL
