"""Parity with the official VAR VQVAE: tiny config, rule weights set through the official-key converter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from golden_rule import VQVAE_SEED_BASE, load, official_param_shapes, rule_state_dict, tiny_config
from tolerances import VQVAE_DECODE_TOL, VQVAE_ENCODE_TOL, nearest_code_margins

from nextscale.tokenize.loader import load_official_vqvae
from nextscale.tokenize.scales import phi_index_table
from nextscale.tokenize.vqvae import VQVAE_PRESETS


@pytest.fixture(scope="module")
def golden_vae():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the fixtures were made (the tolerances hold for 1 and 2: tests/tolerances.py)
    sd = rule_state_dict(official_param_shapes("vqvae"), VQVAE_SEED_BASE)
    vae = load_official_vqvae(sd, "golden_tiny")
    x = torch.from_numpy(load("input_images.npy"))
    with torch.no_grad(), nearest_code_margins(vae.quantize) as margins:
        enc = vae.encoder(x)
        f = vae.quant_conv(enc)
        idx = vae.encode_scales(x)
        f_hats = vae.quantize.idx_to_fhat(idx)
        recs = [vae.fhat_to_img(fh) for fh in f_hats]
        tf = vae.quantize.teacher_forcing_input(idx)
    yield dict(vae=vae, x=x, enc=enc, f=f, idx=idx, f_hats=f_hats, recs=recs, tf=tf, margins=margins)
    torch.set_num_threads(threads)


def maxabs(a: torch.Tensor, b: np.ndarray) -> float:
    assert tuple(a.shape) == b.shape
    return float((a.double() - torch.from_numpy(b).double()).abs().max())


def test_preset_matches_official_tiny_constructor():
    cfg, tiny = VQVAE_PRESETS["golden_tiny"], tiny_config()
    kw = tiny["vqvae_kwargs"]
    assert (cfg.vocab_size, cfg.z_channels, cfg.ch, cfg.beta, cfg.quant_resi, cfg.num_phi) == (
        kw["vocab_size"], kw["z_channels"], kw["ch"], kw["beta"], kw["quant_resi"], kw["share_quant_resi"])
    assert list(cfg.patch_nums) == kw["v_patch_nums"] and cfg.image_size == tiny["image_size"]
    assert phi_index_table(len(cfg.patch_nums), cfg.num_phi) == tiny["phi_index_per_scale"]


def test_encoder_and_latent(golden_vae):
    assert maxabs(golden_vae["enc"], load("vae_encoder_out.npy")) <= VQVAE_ENCODE_TOL
    assert maxabs(golden_vae["f"], load("vae_f.npy")) <= VQVAE_ENCODE_TOL


def test_indices_identical(golden_vae):
    # no code is within the latent's tolerance of a tie, so the same codes hold on every CPU
    assert min(golden_vae["margins"]) > VQVAE_ENCODE_TOL, golden_vae["margins"]
    for si, idx in enumerate(golden_vae["idx"]):
        assert idx.dtype == torch.int64
        np.testing.assert_array_equal(idx.numpy(), load(f"vae_idx_s{si}.npy"))
    np.testing.assert_array_equal(torch.cat(golden_vae["idx"], dim=1).numpy(), load("vae_idx_BL.npy"))
    np.testing.assert_array_equal(golden_vae["vae"].encode(golden_vae["x"]).numpy(), load("vae_idx_BL.npy"))


def test_fhat_and_reconstructions(golden_vae):
    assert maxabs(torch.stack(golden_vae["f_hats"]), load("vae_fhat_scales.npy")) <= VQVAE_DECODE_TOL
    assert maxabs(torch.stack(golden_vae["recs"]), load("vae_rec_scales.npy")) <= VQVAE_DECODE_TOL
    codes = torch.from_numpy(load("vae_idx_BL.npy"))
    assert maxabs(golden_vae["vae"].decode(codes), load("vae_rec.npy")) <= VQVAE_DECODE_TOL
    # decoding the first k scales = the k-th partial reconstruction
    assert maxabs(golden_vae["vae"].decode(codes, num_scales=2), load("vae_rec_scales.npy")[1]) <= VQVAE_DECODE_TOL
    assert maxabs(golden_vae["vae"].decode(codes[:, :5]), load("vae_rec_scales.npy")[1]) <= VQVAE_DECODE_TOL


def test_teacher_forcing_input(golden_vae):
    assert golden_vae["tf"].dtype == torch.float32
    assert maxabs(golden_vae["tf"], load("var_x_BLCv_wo_first_l.npy")) <= VQVAE_ENCODE_TOL


def test_autoregressive_input_rebuilds_fhat_and_teacher_forcing(golden_vae):
    """The sampler's per-scale update reproduces the official f_hat and the teacher-forcing inputs."""
    q = golden_vae["vae"].quantize
    idx = golden_vae["idx"]
    B, Cv = idx[0].shape[0], q.Cv
    f_hat = torch.zeros(B, Cv, 4, 4)
    tf = load("var_x_BLCv_wo_first_l.npy")
    begin = 0
    with torch.no_grad():
        for si, pn in enumerate(q.patch_nums):
            h = q.embedding(idx[si]).transpose(1, 2).reshape(B, Cv, pn, pn)
            f_hat, nxt = q.next_autoregressive_input(si, f_hat, h)
            assert maxabs(f_hat, load("vae_fhat_scales.npy")[si]) <= VQVAE_DECODE_TOL
            if si == len(q.patch_nums) - 1:
                assert nxt is None
            else:
                n = q.patch_nums[si + 1] ** 2
                assert maxabs(nxt.flatten(2).transpose(1, 2), tf[:, begin:begin + n]) <= VQVAE_ENCODE_TOL
                begin += n
