"""Parity with the official VAR on tests/golden (tiny config, rule weights through the official-key converter)."""

from __future__ import annotations

import json

import golden_rule as gr
import numpy as np
import pytest
import torch
from tolerances import VAR_TOL, VQVAE_DECODE_TOL, token_margins

from nextscale.prior.loader import load_official_var
from nextscale.prior.sample import SamplingConfig, sample_codes
from nextscale.prior.var import block_causal_bias

LABELS = torch.tensor([3, 7])
NULL = torch.tensor([10, 10])
TOL = VAR_TOL  # tests/tolerances.py: 20x the largest float32 floor measured over CPU paths


def official_tiny_state_dict() -> dict[str, torch.Tensor]:
    """Rule parameters (seed base 20000) + the official buffers, as the official state dict holds them."""
    sd = gr.rule_state_dict(gr.official_param_shapes("var"), gr.VAR_SEED_BASE)
    buffers = json.loads((gr.GOLDEN / "tiny_buffers.json").read_text())
    sd["lvl_1L"] = torch.tensor(buffers["var.lvl_1L"]["values"], dtype=torch.int64)
    sd["attn_bias_for_masking"] = torch.from_numpy(gr.load("var_buffer_attn_bias_for_masking.npy"))
    for i in range(2):
        sd[f"blocks.{i}.attn.zero_k_bias"] = torch.zeros(64)
    return sd


@pytest.fixture(scope="module")
def var():
    return load_official_var(official_tiny_state_dict(), "golden_tiny")


@pytest.fixture(scope="module")
def forward(var):
    """Teacher-forced outputs (cond labels) with the intermediates the fixtures hold."""
    x = torch.from_numpy(gr.load("var_x_BLCv_wo_first_l.npy"))
    seen: dict[str, list] = {"block_in": [], "block_out": [], "head_nm": []}
    hooks = [var.blocks[0].register_forward_hook(lambda m, a, o: seen["block_in"].append(a[0])),
             var.head_nm.register_forward_hook(lambda m, a, o: seen["head_nm"].append(o))]
    hooks += [b.register_forward_hook(lambda m, a, o: seen["block_out"].append(o)) for b in var.blocks]
    with torch.no_grad():
        cond = var(LABELS, x)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        null = var(NULL, x)
    return {"var_logits_cond.npy": cond, "var_logits_null.npy": null,
            "var_fwd_block_in.npy": seen["block_in"][0], "var_fwd_block_out.npy": torch.stack(seen["block_out"]),
            "var_fwd_head_nm_out.npy": seen["head_nm"][0]}


def max_abs(a: torch.Tensor, name: str) -> float:
    ref = gr.load(name)
    assert tuple(a.shape) == ref.shape, name
    return float(np.abs(a.detach().numpy().astype(np.float64) - ref).max())


@pytest.mark.parametrize("name", ["var_fwd_block_in.npy", "var_fwd_block_out.npy", "var_fwd_head_nm_out.npy",
                                  "var_logits_cond.npy", "var_logits_null.npy"])
def test_teacher_forcing_matches_official(forward, name):
    assert max_abs(forward[name], name) <= TOL


def test_attention_scale_cap_matches_official():
    sd = official_tiny_state_dict()
    sd["blocks.0.attn.scale_mul_1H11"][0, 1, 0, 0] = 5.0  # > ln 100: head 1 uses multiplier 100
    var = load_official_var(sd, "golden_tiny")
    with torch.no_grad():
        logits = var(LABELS, torch.from_numpy(gr.load("var_x_BLCv_wo_first_l.npy")))
    assert max_abs(logits, "var_logits_cond_clampvariant.npy") <= TOL


def test_mask_buffer_matches_official(var):
    ref = torch.from_numpy(gr.load("var_buffer_attn_bias_for_masking.npy"))
    assert torch.equal(var.attn_bias_for_masking, ref)
    assert torch.equal(block_causal_bias((1, 2, 3, 4)), ref)
    assert int((ref == 0).sum()) == 627


def test_eval_mode_never_drops_labels(var):
    """The official forward drops labels in eval mode too (golden README §5); nextscale only in training."""
    x = torch.from_numpy(gr.load("var_x_BLCv_wo_first_l.npy"))
    assert var.cfg.cond_drop_rate == 0.1
    torch.manual_seed(1)
    with torch.no_grad():
        outs = [var(LABELS, x) for _ in range(20)]
    assert all(torch.equal(o, outs[0]) for o in outs)


@pytest.fixture(scope="module")
def vqvae():
    from nextscale.tokenize.loader import load_official_vqvae

    return load_official_vqvae(gr.rule_state_dict(gr.official_param_shapes("vqvae"), gr.VQVAE_SEED_BASE),
                               "golden_tiny")


@pytest.fixture(scope="module")
def sampled(var, vqvae):
    kw = gr.tiny_config()["sampling"]
    record: dict[str, list[torch.Tensor]] = {}
    codes = sample_codes(var, vqvae.quantize, torch.tensor(kw["label_B"]),
                         generator=torch.Generator().manual_seed(kw["g_seed"]), sampling=SamplingConfig(guidance=kw["cfg"], top_k=kw["top_k"], top_p=kw["top_p"], more_smooth=kw["more_smooth"]), record=record)
    return codes, record


def test_sampled_tokens_match_official(sampled):
    codes, record = sampled
    kw = gr.tiny_config()["sampling"]
    margins = token_margins(record, codes, kw["g_seed"], kw["top_k"], kw["top_p"])
    # no draw, top-k or top-p set is within the logits' tolerance of a tie: the tokens hold on every CPU
    assert margins.pop("replay_equal") and min(margins.values()) > TOL, margins
    assert np.array_equal(codes.numpy(), gr.load("sample_idx_BL.npy"))


@pytest.mark.parametrize("kind", ["raw", "guided", "filtered"])
def test_sampling_logits_match_official(sampled, kind):
    _, record = sampled
    logits = torch.cat(record[f"logits_{kind}"], dim=1)
    ref = torch.from_numpy(gr.load(f"sample_logits_{kind}.npy"))
    kept = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(logits), kept)  # the same tokens survive top-k / top-p
    assert float((logits[kept] - ref[kept]).abs().max()) <= TOL


def test_sampled_image_matches_official(sampled, vqvae):
    codes, record = sampled
    assert max_abs(record["f_hat"][0], "sample_fhat.npy") <= TOL
    with torch.no_grad():
        img = vqvae.fhat_to_img(record["f_hat"][0]).add(1).mul(0.5)
        decoded = vqvae.decode(codes).add(1).mul(0.5)  # the path FID takes: codes -> image
    assert max_abs(img, "sample_img.npy") <= VQVAE_DECODE_TOL
    assert max_abs(decoded, "sample_img.npy") <= VQVAE_DECODE_TOL
