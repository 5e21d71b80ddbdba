"""M-VAR (arXiv 2411.10433, OliverRensu/MVAR): VAR with attention inside each scale and a Mamba2 across scales.

Each block runs three branches in sequence, each with its own AdaLN gate and residual:

    x = x + g1 * Attn(LN(x)(1 + s1) + h1)      bidirectional, only among the tokens of the same scale
    x = x + g2 * Mamba2(LN(x)(1 + s2) + h2)    causal over the whole sequence in VAR order (coarse -> fine)
    x = x + g3 * FFN(LN(x)(1 + s3) + h3)

with (g1, g2, g3, s1, s2, s3, h1, h2, h3) = ada_lin(cond), the official chunk order. Everything else
(embeddings, head, init, teacher-forcing front-end, sampler) is the shared
:class:`~nextscale.prior.model.NextScalePrior`; module paths are the official state-dict names, so official
checkpoints load strictly (``nextscale.prior.loader``).

Semantics follow the official code's training mode, which is what its sampler computes; nextscale
does the same in eval mode. (The official eval-mode forward attends across all scales without a mask
and reads a block cache it never initialises: tests/golden/mvar/README.md §7.) The intra-scale
attention runs one SDPA call per scale (or FlexAttention with a same-scale block mask), never a dense
L x L mask, and has no limit on a scale's size.

Sampling (``NextScalePrior.kv_caching``, used by ``nextscale.prior.sample``) needs no KV cache: a scale's attention
sees only that scale, and each block's Mamba2 continues from the state the previous scale left, so
every scale runs only its own tokens through every block (680 token-steps at 256 px; the official
sampler re-runs the mixers over the whole prefix, 1,710).

Shape legend: as ``nextscale.prior.model``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nextscale.config import doc, require
from nextscale.prior.mamba2 import Mamba2, Mamba2State
from nextscale.prior.model import (
    FFN,
    DropPath,
    ModelFamily,
    NextScalePrior,
    SelfAttention,
    VARConfig,
    dense_block_flops,
    flex_attention,
    shared_flops,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MVARConfig(VARConfig):
    """An M-VAR: the shared architecture fields plus the Mamba2 mixers' own."""

    arch: str = doc("mvar", "model family (nextscale.prior.families): mvar = M-VAR")
    mamba_d_state: int = doc(64, "state size of the Mamba2 mixers (official 64; head dim 64, expand 2)")
    mamba_chunk_size: int = doc(256, "chunk length of the Mamba2 scan (mamba_ssm's 256). Changes speed and memory, "
                                     "not the result beyond float rounding: without mamba_ssm the PyTorch scan holds "
                                     "~B * heads * L * chunk floats per block, so lower it for large models")

    def __post_init__(self) -> None:
        super().__post_init__()
        # the official M-VAR crashes with shared AdaLN (its shared linear has 6 chunks, the blocks unpack 9)
        require(not self.shared_aln, "shared_aln=true is not available for arch=mvar")
        require((2 * self.width) % 64 == 0,
                f"embed_dim={self.width} must be a multiple of 32 for arch=mvar (Mamba2 heads of 64 channels)")
        require(self.mamba_d_state >= 1 and self.mamba_chunk_size >= 1, "mamba_d_state and mamba_chunk_size must be >= 1")


class IntraScaleAttention(SelfAttention):
    """VAR's attention (same parameters) restricted to the tokens of one scale, bidirectional within it.

    A teacher-forced input covers whole scales from the first; in sampling (``caching``) every call is
    exactly one scale. The ``patch_nums`` buffer (pn^2 per scale) is the official one; the split points
    come from the config so that no device tensor is read back.
    """

    def __init__(self, C: int, H: int, attn_l2_norm: bool, patch_nums: Sequence[int]):
        super().__init__(C, H, attn_l2_norm)
        self.scale_lens = tuple(pn * pn for pn in patch_nums)
        self.register_buffer("patch_nums", torch.tensor(self.scale_lens, dtype=torch.int32))

    def derived_buffers(self, device: torch.device | str | None = None) -> dict[str, Tensor]:
        return {**super().derived_buffers(device),
                "patch_nums": torch.tensor(self.scale_lens, dtype=torch.int32, device=device)}

    def forward(self, x_BlC: Tensor, attn_bias: Tensor | None = None, block_mask=None) -> Tensor:
        B, l, C = x_BlC.shape
        q, k, v = self.qkv(x_BlC)  # (B, H, l, c) each
        if block_mask is not None:
            out_BHlc = flex_attention(q, k, v, block_mask=block_mask, scale=self.scale)
        elif self.caching:
            out_BHlc = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            out_BHlc = torch.cat([F.scaled_dot_product_attention(q[:, :, b:e], k[:, :, b:e], v[:, :, b:e],
                                                                 scale=self.scale)
                                  for b, e in scale_spans(self.scale_lens, l)], dim=2)
        return self.proj(out_BHlc.transpose(1, 2).reshape(B, l, C))


def scale_spans(scale_lens: Sequence[int], l: int) -> list[tuple[int, int]]:
    """[(begin, end)] of the scales covering the first ``l`` tokens; ``l`` must end a scale."""
    spans, b = [], 0
    for n in scale_lens:
        if b >= l:
            break
        spans.append((b, b + n))
        b += n
    if b != l:
        raise ValueError(f"{l} tokens do not end a scale (scale sizes {tuple(scale_lens)})")
    return spans


class AdaLNMambaBlock(nn.Module):
    """The M-VAR block (official ``basic_mvar.AdaLNSelfAttn``): intra-scale attention, Mamba2, FFN."""

    num_branches = 3
    static_kv_cache = False  # no KV cache at all: the attention sees one scale, the mixer carries a state

    def __init__(self, cfg: MVARConfig, drop_path: float):
        super().__init__()
        C = self.C = cfg.width
        self.attn = IntraScaleAttention(C, cfg.heads, cfg.attn_l2_norm, cfg.patch_nums)
        # the official Mamba2(d_model=C, d_state=64, d_conv=4, expand=2), mamba_ssm's defaults otherwise
        self.mamba = Mamba2(C, d_state=cfg.mamba_d_state, d_conv=4, expand=2, headdim=64,
                            chunk_size=cfg.mamba_chunk_size)
        self.ffn = FFN(C, round(C * cfg.mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(C, eps=cfg.norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 9 * C))
        self.drop_path = DropPath(drop_path)
        # sampling: the mixer's state after the scales seen so far (or, as the official sampler does and only
        # as a baseline for benchmarks and tests, every mixer input so far, re-run as a whole at each scale)
        self.caching, self.rerun_prefix = False, False
        self.state: Mamba2State | None = None
        self.prefix_BlC: Tensor | None = None

    def incremental(self, enable: bool, static_kv: Tensor | None = None) -> None:
        self.caching = self.attn.caching = enable
        self.state = self.prefix_BlC = None

    def forward(self, x_BlC: Tensor, cond_BD: Tensor, attn_bias: Tensor | None = None, block_mask=None) -> Tensor:
        g1, g2, g3, s1, s2, s3, h1, h2, h3 = self.ada_lin(cond_BD).view(-1, 1, 9, self.C).unbind(2)  # (B, 1, C)
        h = self.attn(self.ln_wo_grad(x_BlC).mul(s1.add(1)).add_(h1), attn_bias, block_mask)
        x_BlC = x_BlC + self.drop_path(h.mul_(g1))
        h = self.mix(self.ln_wo_grad(x_BlC).mul(s2.add(1)).add_(h2))
        x_BlC = x_BlC + self.drop_path(h.mul_(g2))
        h = self.ffn(self.ln_wo_grad(x_BlC).mul(s3.add(1)).add_(h3))
        return x_BlC + self.drop_path(h.mul(g3))

    def mix(self, u_BlC: Tensor) -> Tensor:
        if not self.caching:
            return self.mamba(u_BlC)
        if self.rerun_prefix:
            l = u_BlC.shape[1]
            self.prefix_BlC = u_BlC if self.prefix_BlC is None else torch.cat((self.prefix_BlC, u_BlC), dim=1)
            return self.mamba(self.prefix_BlC)[:, -l:]
        if self.state is None:
            self.state = self.mamba.empty_state(u_BlC.shape[0], u_BlC.device, u_BlC.dtype)
        return self.mamba(u_BlC, self.state)


class MVAR(NextScalePrior):
    """M-VAR: the shared embeddings, head, init and front-end with :class:`AdaLNMambaBlock` blocks (teacher forcing
    has the official train-mode semantics in both modes)."""

    block_class = AdaLNMambaBlock

    @staticmethod
    def attends(lvl_q: Tensor, lvl_kv: Tensor) -> Tensor:
        """Attention stays inside a scale (the official buffer holds this mask; the kernels never need it dense)."""
        return lvl_q == lvl_kv

    def sample_by_rerunning_prefix(self, enable: bool) -> None:
        """Sample as the official code does, re-running every mixer over the whole prefix at each scale
        instead of carrying its state: the baseline the stateful sampler is benchmarked and tested against."""
        for block in self.blocks:
            block.rerun_prefix = enable


def flops_per_image(cfg: MVARConfig, training: bool = True) -> float:
    """Matmul FLOPs (multiply-add = 2) of one teacher-forced image; x3 for forward + backward.

    The attention is counted over each scale's pn^2 x pn^2 block, plus the Mamba2 projections and its chunked
    scan (chunk-local C B^T and its product with x, chunk states).
    """
    C, L = cfg.width, cfg.num_tokens
    E, N, H = 2 * C, cfg.mamba_d_state, 2 * C // 64
    T = min(cfg.mamba_chunk_size, L)
    per_token_block = dense_block_flops(cfg)
    per_token_block += 2 * C * (2 * E + 2 * N + H) + 2 * E * C  # in_proj, out_proj
    per_token_block += 2 * T * (N + E) + 2 * 2 * E * N  # scan: C B^T (one group), y_diag, states, y_off
    attention = 4 * sum(pn**4 for pn in cfg.patch_nums) * C * cfg.depth
    forward = per_token_block * L * cfg.depth + attention + shared_flops(cfg, AdaLNMambaBlock.num_branches)
    return float(3 * forward if training else forward)


PRESETS: dict[str, MVARConfig] = {
    # M-VAR (docs/var.md §5): VAR's sizes and recipe; the d16/d20 checkpoints were trained without
    # attn_l2_norm (official README). d32 is the paper's "3.0 B" model: 3.66 B by the code's size rule.
    "mvar_d12": MVARConfig(depth=12, init_adaln_gamma=1e-3),
    "mvar_d16": MVARConfig(depth=16, attn_l2_norm=False, init_adaln_gamma=1e-3),
    "mvar_d20": MVARConfig(depth=20, attn_l2_norm=False, init_adaln_gamma=1e-3),
    "mvar_d24": MVARConfig(depth=24, init_adaln_gamma=1e-4),
    "mvar_d30": MVARConfig(depth=30, init_adaln_gamma=1e-5),
    "mvar_d32": MVARConfig(depth=32, init_adaln_gamma=1e-5),
    # tests/golden/mvar: the official constructor with tiny sizes (C=128: 4 Mamba2 heads of 64)
    "mvar_golden_tiny": MVARConfig(depth=2, embed_dim=128, num_heads=2, num_classes=10, vocab_size=64,
                                   latent_channels=8, patch_nums=(1, 2, 3, 4), drop_path_rate=0.0),
    "mvar_debug": MVARConfig(depth=2, embed_dim=64, num_heads=2, num_classes=10, vocab_size=32,
                             latent_channels=8, patch_nums=(1, 2, 3), drop_path_rate=0.0, init_adaln_gamma=1e-3),
    # the demo's sizes (pairs with VQVAE preset "demo"); the mixers add ~0.4 M parameters to VAR's 1.3 M
    "mvar_demo": MVARConfig(depth=4, embed_dim=128, num_heads=2, num_classes=10, vocab_size=512,
                            latent_channels=16, patch_nums=(1, 2, 3, 4, 6, 8), drop_path_rate=0.0,
                            init_adaln_gamma=1e-3),
}

FAMILY = ModelFamily(name="mvar", title="an M-VAR", config=MVARConfig, model=MVAR, presets=PRESETS,
                     flops_per_image=flops_per_image,
                     signature=("attn.mat_qkv.weight", "mamba.in_proj.weight", "ffn.fc1.weight"))
