"""Tiny random-init prior + tokenizer files (prior.pt / tokenizer.pt in the formats the stages write) for eval tests."""

from __future__ import annotations

from pathlib import Path

import torch

from nextscale.config import to_dict
from nextscale.prior.families import build_prior
from nextscale.prior.loader import to_official_state_dict
from nextscale.prior.model import VARConfig
from nextscale.tokenize.loader import save_tokenizer
from nextscale.tokenize.vqvae import build_vqvae

# pairs with the "demo" VQVAE (32 px, V=512, Cv=16, 6 scales, L=130) at the smallest transformer size
TINY_VAR = VARConfig(depth=2, embed_dim=64, num_heads=2, num_classes=10, vocab_size=512, latent_channels=16,
                     patch_nums=(1, 2, 3, 4, 6, 8), drop_path_rate=0.0, init_adaln_gamma=1e-3)


def write_tiny_models(directory: Path, seed: int = 0) -> tuple[str, str]:
    """(prior.pt path, tokenizer.pt path) of random-init models seeded by ``seed``."""
    directory.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        var = build_prior(TINY_VAR)
        vqvae = build_vqvae("demo")
    prior, tokenizer = directory / "prior.pt", directory / "tokenizer.pt"
    torch.save({"config": to_dict(var.cfg), "state_dict": to_official_state_dict(var)}, prior)
    save_tokenizer(vqvae, str(tokenizer))
    return str(prior), str(tokenizer)
