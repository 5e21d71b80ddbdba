"""512 px: the official VAR-d36 pairs with the vae_ch160v4096z32 checkpoint built as preset vae_ch160v4096z32_512
(patch_nums 1…32, L = 2240; its encode/decode shapes are in test_tokenizer.py::test_preset_shapes). Meta device:
no memory, no weights."""

from __future__ import annotations

import json

import torch
from golden_rule import GOLDEN

from nextscale.config import load_config
from nextscale.eval.config import FidConfig
from nextscale.prior.families import build_prior
from nextscale.tokenize.loader import check_state_dict
from nextscale.tokenize.vqvae import build_vqvae


def test_the_512px_tokenizer_loads_the_official_checkpoint_and_pairs_with_d36():
    table = json.loads((GOLDEN / "official_keys_vae_ch160v4096z32.json").read_text())
    with torch.device("meta"):
        vae = build_vqvae("vae_ch160v4096z32_512")
        var = build_prior("d36")
        sd = {k: torch.empty(shape) for k, shape in table.items()}
    vae.load_state_dict(check_state_dict(sd, vae, "vae_ch160v4096z32_512"), strict=True)
    assert vae.cfg.patch_nums == var.patch_nums == (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
    assert (vae.cfg.num_tokens, vae.cfg.vocab_size, vae.cfg.z_channels) == (var.L, var.V, var.Cv) == (2240, 4096, 32)
    assert vae.cfg.image_size == 512 and var.attn_bias_for_masking.shape[-1] == 2240
    # from the CLI: `nextscale fid fid_imagenet512` pairs the official d36 with this preset
    models = load_config(FidConfig, "fid_imagenet512").models
    assert (models.prior_url, models.prior_preset) == ("hf://FoundationVision/var/var_d36.pth", "d36")
    assert (models.tokenizer_url, models.tokenizer_preset) == \
        ("hf://FoundationVision/var/vae_ch160v4096z32.pth", "vae_ch160v4096z32_512")
