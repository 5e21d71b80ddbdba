"""M-VAR (arXiv 2411.10433, OliverRensu/MVAR): VAR with attention inside each scale and a Mamba2 across scales.

Each block runs three branches in sequence, each with its own AdaLN gate and residual:

    x = x + g1 * Attn(LN(x)(1 + s1) + h1)      bidirectional, only among the tokens of the same scale
    x = x + g2 * Mamba2(LN(x)(1 + s2) + h2)    causal over the whole sequence in VAR order (coarse -> fine)
    x = x + g3 * FFN(LN(x)(1 + s3) + h3)

with (g1, g2, g3, s1, s2, s3, h1, h2, h3) = ada_lin(cond), the official chunk order. Everything else
(embeddings, head, init, teacher-forcing front-end, sampler) is VAR's; module paths are the official
state-dict names, so official checkpoints load strictly (``nextscale.prior.convert``).

Semantics follow the official code's training mode, which is what its sampler computes; nextscale
does the same in eval mode. (The official eval-mode forward attends across all scales without a mask
and reads a block cache it never initialises: tests/golden/mvar/README.md §7.) The intra-scale
attention runs one SDPA call per scale (or FlexAttention with a same-scale block mask), never a dense
L x L mask, and has no limit on a scale's size.

Sampling (``kv_caching``, used by ``nextscale.prior.sample``) needs no KV cache: a scale's attention
sees only that scale, and each block's Mamba2 continues from the state the previous scale left, so
every scale runs only its own tokens through every block (680 token-steps at 256 px; the official
sampler re-runs the mixers over the whole prefix, 1,710).

Shape legend: as ``nextscale.prior.model``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nextscale.prior.mamba2 import Mamba2, Mamba2State
from nextscale.prior.model import FFN, VAR, DropPath, SelfAttention, VARConfig, flex_attention


class IntraScaleAttention(SelfAttention):
    """VAR's attention (same parameters) restricted to the tokens of one scale, bidirectional within it.

    A teacher-forced input covers whole scales from the first; in sampling (``caching``) every call is
    exactly one scale. The ``patch_nums`` buffer (pn^2 per scale) is the official one; the split points
    come from the config so that no device tensor is read back.
    """

    def __init__(self, C: int, H: int, attn_l2_norm: bool, patch_nums: Sequence[int]):
        super().__init__(C, H, attn_l2_norm)
        self.register_buffer("patch_nums", torch.tensor([pn * pn for pn in patch_nums], dtype=torch.int32))
        self.scale_lens = tuple(pn * pn for pn in patch_nums)

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

    def __init__(self, cfg: VARConfig, drop_path: float):
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

    def incremental(self, enable: bool) -> None:
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


class MVAR(VAR):
    """M-VAR: VAR's embeddings, head, init and front-end with :class:`AdaLNMambaBlock` blocks."""

    block_class = AdaLNMambaBlock

    @staticmethod
    def attends(lvl_q: Tensor, lvl_kv: Tensor) -> Tensor:
        """Attention stays inside a scale (the official buffer holds this mask; the kernels never need it dense)."""
        return lvl_q == lvl_kv

    def forward(self, label_B: Tensor, x_BlCv: Tensor, head: bool = True) -> Tensor:
        """Teacher forcing, as ``VAR.forward`` (the official train-mode semantics in both modes)."""
        x_BLC, cond_BD = self.embed(label_B, x_BlCv)
        if self.cfg.attn_impl == "flex" and (x_BLC.device.type != "cpu" or not torch.is_grad_enabled()):
            return self.run_blocks(x_BLC, cond_BD, None, self._block_mask(x_BLC.shape[1], x_BLC.device), head)
        return self.run_blocks(x_BLC, cond_BD, None, head=head)

    def sample_by_rerunning_prefix(self, enable: bool) -> None:
        """Sample as the official code does, re-running every mixer over the whole prefix at each scale
        instead of carrying its state: the baseline the stateful sampler is benchmarked and tested against."""
        for block in self.blocks:
            block.rerun_prefix = enable
