"""VAR (FoundationVision/VAR ``models/{basic_var,var}.py``): next-scale prediction with block-causal attention.

A block is the official ``AdaLNSelfAttn``: pre-norm attention then FFN, each LayerNorm (no affine) modulated
by the class condition and each branch gated. A query of scale k attends to every key of scales <= k, so
sampling keeps each block's keys and values of the scales seen so far (a KV cache). Everything else
(embeddings, head, init, front-end) is the shared :class:`~nextscale.prior.model.NextScalePrior`.

Shape legend: as ``nextscale.prior.model``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from nextscale.prior.model import (
    FFN,
    DropPath,
    ModelFamily,
    NextScalePrior,
    SelfAttention,
    VARConfig,
    dense_block_flops,
    shared_flops,
)


class AdaLNSelfAttn(nn.Module):
    """Pre-norm block whose LayerNorms (no affine) are modulated by the class condition.

    x = x + DropPath(Attn(LN(x)(1 + scale1) + shift1) * gamma1)
    x = x + DropPath(FFN(LN(x)(1 + scale2) + shift2) * gamma2)
    The condition gives six C-vectors in the official chunk order (gamma1, gamma2, scale1, scale2, shift1, shift2).
    """

    num_branches = 2  # residual branches, each with its AdaLN gate (the first chunks of the modulation)
    static_kv_cache = True  # incremental(True, static_kv=...) writes into a preallocated cache

    def __init__(self, cfg: VARConfig, drop_path: float):
        super().__init__()
        C = cfg.width
        self.C, self.shared_aln = C, cfg.shared_aln
        self.attn = SelfAttention(C, cfg.heads, cfg.attn_l2_norm)
        self.ffn = FFN(C, round(C * cfg.mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(C, eps=cfg.norm_eps, elementwise_affine=False)
        if cfg.shared_aln:
            # per-block offsets added to the one shared modulation (VAR-d36-s)
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, 6 * C))
        self.drop_path = DropPath(drop_path)

    def incremental(self, enable: bool, static_kv: Tensor | None = None) -> None:
        """Scale-by-scale sampling: each call sees one scale, the attention keeps this and earlier scales' keys
        (in ``static_kv`` (2, B, H, L, c) if given)."""
        self.attn.kv_caching(enable, static_kv)

    def forward(self, x_BlC: Tensor, cond: Tensor, attn_bias: Tensor | None, block_mask=None) -> Tensor:
        """``cond`` is cond_BD, or with shared AdaLN the shared modulation (B, 1, 6, C)."""
        if self.shared_aln:
            mods_B16C = self.ada_gss + cond
        else:
            mods_B16C = self.ada_lin(cond).view(-1, 1, 6, self.C)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mods_B16C.unbind(2)  # (B, 1, C) each
        h = self.attn(self.ln_wo_grad(x_BlC).mul(scale1.add(1)).add_(shift1), attn_bias, block_mask)
        x_BlC = x_BlC + self.drop_path(h.mul_(gamma1))
        h = self.ffn(self.ln_wo_grad(x_BlC).mul(scale2.add(1)).add_(shift2))
        return x_BlC + self.drop_path(h.mul(gamma2))


class VAR(NextScalePrior):
    """VAR: :class:`AdaLNSelfAttn` blocks, each scale attending to itself and every coarser scale."""

    block_class = AdaLNSelfAttn

    @staticmethod
    def attends(lvl_q: Tensor, lvl_kv: Tensor) -> Tensor:
        """The block-causal rule: a query of scale ``lvl_q`` sees every key of a scale <= ``lvl_q``."""
        return lvl_q >= lvl_kv


def block_causal_bias(patch_nums: Sequence[int], device: torch.device | str | None = None) -> Tensor:
    """(1, 1, L, L) float32: 0 where level(query) >= level(key), -inf elsewhere (the official VAR mask buffer)."""
    return VAR.mask_bias(patch_nums, device)


def flops_per_image(cfg: VARConfig, training: bool = True) -> float:
    """Matmul FLOPs (multiply-add = 2) of one teacher-forced image; x3 for forward + backward.

    The attention is counted dense over L x L, as a masked dense kernel computes it (docs/var.md §4:
    d16 = 310 GFLOP forward, 930 GFLOP training).
    """
    L = cfg.num_tokens
    attention = 4 * L * L * cfg.width * cfg.depth  # q k^T and attn v
    forward = dense_block_flops(cfg) * L * cfg.depth + attention + shared_flops(cfg, AdaLNSelfAttn.num_branches)
    return float(3 * forward if training else forward)


_PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)

PRESETS: dict[str, VARConfig] = {
    # README training commands: init_adaln_gamma (alng) per size
    "d16": VARConfig(depth=16, init_adaln_gamma=1e-3),
    "d20": VARConfig(depth=20, init_adaln_gamma=1e-3),
    "d24": VARConfig(depth=24, init_adaln_gamma=1e-4),
    "d30": VARConfig(depth=30, init_adaln_gamma=1e-5),
    # VAR-d36-s: 512 px, shared AdaLN
    "d36": VARConfig(depth=36, patch_nums=_PATCH_NUMS_512, shared_aln=True, init_adaln_gamma=5e-6),
    # tests/golden: the official constructor with tiny sizes (pairs with VQVAE preset "golden_tiny")
    "golden_tiny": VARConfig(depth=2, embed_dim=64, num_heads=2, num_classes=10, vocab_size=64, latent_channels=8,
                             patch_nums=(1, 2, 3, 4), drop_path_rate=0.0),
    # unit tests: smallest thing that exercises every code path
    "debug": VARConfig(depth=2, embed_dim=64, num_heads=2, num_classes=10, vocab_size=32, latent_channels=8,
                       patch_nums=(1, 2, 3), drop_path_rate=0.0, init_adaln_gamma=1e-3),
    # the built-in demo dataset (10 classes), pairs with VQVAE preset "demo" (V=512, Cv=16, L=130): 1.3 M
    # parameters, ~0.75 GFLOP per training image, so a 2-core CPU sees several epochs in a few minutes
    # CPU benchmarks: the official 256-px token pyramid (L=680) and 4096-code head around a 2-block body
    "small": VARConfig(depth=2, embed_dim=128, num_heads=2, drop_path_rate=0.0, init_adaln_gamma=1e-3),
    "demo": VARConfig(depth=4, embed_dim=128, num_heads=2, num_classes=10, vocab_size=512, latent_channels=16,
                      patch_nums=(1, 2, 3, 4, 6, 8), drop_path_rate=0.0, init_adaln_gamma=1e-3),
    # the scale rehearsal (docs/scaling.md): 1,000 classes on the codes of VQVAE preset "rehearsal" (V=256, Cv=8, L=30)
    "rehearsal": VARConfig(depth=2, embed_dim=64, num_heads=2, num_classes=1000, vocab_size=256, latent_channels=8,
                           patch_nums=(1, 2, 3, 4), drop_path_rate=0.0, init_adaln_gamma=1e-3),
}

FAMILY = ModelFamily(name="var", title="a VAR", config=VARConfig, model=VAR, presets=PRESETS,
                     flops_per_image=flops_per_image, signature=("attn.mat_qkv.weight", "ffn.fc1.weight"),
                     file_prefix="var_")
