"""What every next-scale family shares (FoundationVision/VAR ``models/{basic_var,var}.py``), and the spec a family
declares: a family is a plug-in (``nextscale.prior.families`` lists them; ``var`` and ``mvar`` are two).

Shared here: the building blocks (DropPath, FFN, attention with L2-normalised q/k and a KV cache, the AdaLN
head, the shared AdaLN linear, FlexAttention block masks), the architecture config every family starts from
(:class:`VARConfig`), the block protocol (:class:`Block`), :class:`NextScalePrior` (embeddings, head, init,
teacher-forcing front-end, incremental state for the sampler), the FLOPs of the shared parts, and
:class:`ModelFamily`, the spec a family module fills in.

Module paths and buffer names equal the official state-dict names (``blocks.3.attn.mat_qkv.weight``,
``head_nm.ada_lin.1.bias``, ``attn_bias_for_masking``...), so an official ``var_d16.pth`` loads with a
strict ``load_state_dict`` (see ``nextscale.prior.loader``) and produces the official logits.

Deliberate difference from the official code: the condition dropout (label -> null class) fires only in
``train()`` mode; the official ``VAR.forward`` also drops labels in eval mode.

Shape legend:
    B batch, L tokens of all scales (sum of pn^2), l tokens of one step (a scale, or a prefix of scales),
    C width, D condition width (= C), H heads, c head dim (C / H), Cv latent channels of the VQVAE,
    V vocabulary, S scales, pn side of one scale's token map.
    x_BlCv teacher-forcing features (the VQVAE's f_hat of coarser scales, area-resized), x_BlC tokens,
    cond_BD class condition, logits_BlV float32 logits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import ClassVar, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nextscale.config import doc, require

# ------------------------------------------------------------------------------------------------
# Building blocks


class DropPath(nn.Module):
    """Per-sample stochastic depth, scaled by 1/keep (timm ``drop_path`` as VAR uses it)."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x_BLC: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x_BLC
        keep = 1 - self.drop_prob
        mask_B11 = x_BLC.new_empty((x_BLC.shape[0],) + (1,) * (x_BLC.ndim - 1)).bernoulli_(keep)
        return x_BLC * mask_B11.div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:g}"


class FFN(nn.Module):
    def __init__(self, C: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(C, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, C)

    def forward(self, x_BLC: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x_BLC)))


class SelfAttention(nn.Module):
    """Multi-head attention with L2-normalised q/k, a learned per-head temperature and no key bias.

    With ``attn_l2_norm`` the attention logit is s_h * cos(q, k) with s_h = exp(min(scale_mul_1H11, ln 100))
    (init 4) and softmax scale 1. A KV cache (``caching``) serves scale-by-scale sampling: each call
    appends this step's keys/values, and queries attend to everything cached without a mask (a scale
    sees itself and all coarser scales).
    """

    def __init__(self, C: int, H: int, attn_l2_norm: bool):
        super().__init__()
        self.C, self.H, self.c = C, H, C // H
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, H, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100)
        else:
            self.scale = 0.25 / math.sqrt(self.c)
        # the official qkv projection has no bias of its own: (q_bias, 0, v_bias) is concatenated instead
        self.q_bias = nn.Parameter(torch.zeros(C))
        self.v_bias = nn.Parameter(torch.zeros(C))
        self.register_buffer("zero_k_bias", torch.zeros(C))
        self.mat_qkv = nn.Linear(C, 3 * C, bias=False)
        self.proj = nn.Linear(C, C)
        self.kv_caching(False)

    def derived_buffers(self, device: torch.device | str | None = None) -> dict[str, Tensor]:
        """Buffers computed from the sizes, not learned (a checkpoint's copies are replaced by these)."""
        return {"zero_k_bias": torch.zeros(self.C, device=device)}

    def kv_caching(self, enable: bool, static_kv: Tensor | None = None) -> None:
        """``static_kv`` (2, B, H, L, c): a preallocated cache written in place at fixed addresses (CUDA graphs)."""
        self.caching, self.cached_k, self.cached_v = enable, None, None
        self.static_kv, self.cache_len = static_kv, 0

    def qkv(self, x_BlC: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries (normalised and scaled with attn_l2_norm), keys and values, (B, H, l, c) each."""
        B, l, C = x_BlC.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x_BlC, self.mat_qkv.weight, bias).view(B, l, 3, self.H, self.c)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, l, c) each
        main_dtype = v.dtype
        if self.attn_l2_norm:
            scale_mul_1H11 = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q = F.normalize(q, dim=-1).mul(scale_mul_1H11)
            k = F.normalize(k, dim=-1)
        # normalize runs in fp32 under autocast; the kernel gets the autocast dtype, as the official SDPA call does
        return q.to(main_dtype), k.to(main_dtype), v

    def forward(self, x_BlC: Tensor, attn_bias: Tensor | None, block_mask=None) -> Tensor:
        B, l, C = x_BlC.shape
        q, k, v = self.qkv(x_BlC)
        if self.caching and self.static_kv is not None:
            # the keys of scale k go to [begin_k, end_k); queries read the prefix [0, end_k), a static shape per scale
            b, e = self.cache_len, self.cache_len + l
            self.static_kv[0, :, :, b:e].copy_(k)
            self.static_kv[1, :, :, b:e].copy_(v)
            k, v = self.static_kv[0, :, :, :e], self.static_kv[1, :, :, :e]
            self.cache_len = e
        elif self.caching:
            if self.cached_k is not None:
                k = torch.cat((self.cached_k, k), dim=2)
                v = torch.cat((self.cached_v, v), dim=2)
            self.cached_k, self.cached_v = k, v
        if block_mask is not None:
            out_BHlc = flex_attention(q, k, v, block_mask=block_mask, scale=self.scale)
        else:
            out_BHlc = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=self.scale)
        return self.proj(out_BHlc.transpose(1, 2).reshape(B, l, C))


class AdaLNBeforeHead(nn.Module):
    """Final modulated LayerNorm: LN(x)(1 + scale) + shift, chunks in the official order (scale, shift)."""

    def __init__(self, C: int, D: int, eps: float):
        super().__init__()
        self.C = C
        self.ln_wo_grad = nn.LayerNorm(C, eps=eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * C))

    def forward(self, x_BlC: Tensor, cond_BD: Tensor) -> Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x_BlC).mul(scale.add(1)).add_(shift)


class SharedAdaLin(nn.Linear):
    """The one AdaLN linear of the shared-AdaLN variant; returns (B, 1, 6, C)."""

    def forward(self, cond_BD: Tensor) -> Tensor:
        return super().forward(cond_BD).view(-1, 1, 6, self.out_features // 6)


def flex_attention(q: Tensor, k: Tensor, v: Tensor, *, block_mask, scale: float) -> Tensor:
    """FlexAttention, compiled to its fused kernel off the CPU (eager on CUDA is a slow reference path)."""
    from torch.nn.attention.flex_attention import flex_attention as _flex

    fn = _flex if q.device.type == "cpu" or torch.compiler.is_compiling() else _compiled_flex()
    return fn(q, k, v, block_mask=block_mask, scale=scale)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention as _flex

    return torch.compile(_flex, dynamic=False)


@functools.lru_cache(maxsize=32)
def cached_block_mask(attends, patch_nums: tuple[int, ...], L: int, device: torch.device | str):
    """The FlexAttention ``BlockMask`` of the first L positions under a family's ``attends(lvl_q, lvl_kv)`` rule.

    Built once per (rule, patch_nums, L, device). Its block tables list only the key blocks a query block
    can see, so the kernel skips fully masked blocks (a VAR query of scale k never loads keys of scales > k).
    """
    from torch.nn.attention.flex_attention import create_block_mask

    lvl_L = level_index(patch_nums, device)[:L]

    def mask_mod(b, h, q_idx, kv_idx):
        return attends(lvl_L[q_idx], lvl_L[kv_idx])

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=L, KV_LEN=L, device=device)


# ------------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True, kw_only=True)
class VARConfig:
    """Architecture (and initialisation) of a next-scale prior, the fields every family shares; a family with
    settings of its own subclasses it (``nextscale.prior.mvar.MVARConfig``). The official sizes are presets."""

    arch: str = doc("var", "model family (nextscale.prior.families): var = block-causal attention over all scales; "
                           "mvar = M-VAR (arXiv 2411.10433): attention inside each scale, then a causal Mamba2 "
                           "over all tokens, then the FFN")
    depth: int = doc(16, "number of transformer blocks")
    embed_dim: int = doc(0, "width C; 0 = 64 * depth (the official size rule)")
    num_heads: int = doc(0, "attention heads; 0 = depth (head dim 64 with the size rule)")
    num_classes: int = doc(1000, "class labels; the class embedding has one more row, the null class")
    vocab_size: int = doc(4096, "codebook size V of the VQVAE")
    latent_channels: int = doc(32, "VQVAE latent channels Cv (input features of the token embedding)")
    patch_nums: tuple[int, ...] = doc((1, 2, 3, 4, 5, 6, 8, 10, 13, 16), "token-map side per scale (the VQVAE's)")
    mlp_ratio: float = doc(4.0, "FFN hidden width / C")
    drop_path_rate: float = doc(-1.0, "stochastic depth at the last block (linear from 0); < 0 = 0.1 * depth / 24")
    cond_drop_rate: float = doc(0.1, "probability of replacing a label by the null class in training (for CFG)")
    attn_l2_norm: bool = doc(True, "L2-normalised q/k with a learned per-head scale (all released models)")
    shared_aln: bool = doc(False, "one AdaLN linear shared by all blocks plus per-block offsets (VAR-d36-s)")
    norm_eps: float = doc(1e-6, "LayerNorm epsilon")
    attn_impl: Literal["sdpa", "flex"] = doc(
        "sdpa", "teacher-forcing attention kernel: SDPA with the additive block-causal mask, or FlexAttention "
                "with a block mask (GPU + torch.compile; CPU training falls back to SDPA: no CPU backward)")
    init_std: float = doc(-1.0, "std of the truncated-normal init of linears/embeddings; < 0 = sqrt(1 / (3C))")
    init_head: float = doc(0.02, "multiplier of the head weight after init")
    init_adaln: float = doc(0.5, "multiplier of the AdaLN scale/shift weights after init")
    init_adaln_gamma: float = doc(1e-5, "multiplier of the AdaLN gamma weights after init (README: d16 1e-3 ... d30 1e-5)")
    gate_init: Literal["small", "official"] = doc(
        "small", "which AdaLN gates get init_adaln_gamma: small = every branch's gate; official = the first two "
                 "chunks as the official code does (same for VAR; M-VAR's FFN gate then gets init_adaln)")

    def __post_init__(self) -> None:
        require(self.depth >= 1, f"depth={self.depth} must be >= 1")
        require(self.width % self.heads == 0, f"embed_dim={self.width} must be divisible by num_heads={self.heads}")
        require(self.num_classes >= 1, f"num_classes={self.num_classes} must be >= 1")
        require(self.vocab_size >= 2, f"vocab_size={self.vocab_size} must be >= 2")
        require(len(self.patch_nums) >= 1 and all(a < b for a, b in zip(self.patch_nums, self.patch_nums[1:]))
                and self.patch_nums[0] >= 1, f"patch_nums={self.patch_nums} must be strictly increasing and >= 1")
        require(self.patch_nums[0] == 1, f"patch_nums={self.patch_nums} must start at 1 (the class token is scale 0)")
        require(0.0 <= self.cond_drop_rate <= 1.0, f"cond_drop_rate={self.cond_drop_rate} must be in [0, 1]")
        require(self.attn_impl in ("sdpa", "flex"), f"attn_impl={self.attn_impl!r} must be 'sdpa' or 'flex'")

    @property
    def width(self) -> int:
        return self.embed_dim or 64 * self.depth

    @property
    def heads(self) -> int:
        return self.num_heads or self.depth

    @property
    def drop_path(self) -> float:
        return 0.1 * self.depth / 24 if self.drop_path_rate < 0 else self.drop_path_rate

    @property
    def num_tokens(self) -> int:
        return sum(pn * pn for pn in self.patch_nums)

    @property
    def std(self) -> float:
        return math.sqrt(1 / self.width / 3) if self.init_std < 0 else self.init_std


def level_index(patch_nums: Sequence[int], device: torch.device | str | None = None) -> Tensor:
    """(L,) int64: the scale of every position."""
    return torch.cat([torch.full((pn * pn,), si, dtype=torch.long, device=device) for si, pn in enumerate(patch_nums)])


# ------------------------------------------------------------------------------------------------
# The block protocol and the shared model


class Block(Protocol):
    """What :class:`NextScalePrior` needs of a family's block, built as ``block_class(cfg, drop_path)``.

    The attribute names are the official state-dict names, and the shared init relies on them: ``attn.proj``
    and ``ffn.fc2`` (residual outputs, scaled down by depth), ``ada_lin = Sequential(SiLU, Linear(C, 3 * branches
    * C))`` (or ``ada_gss`` offsets with shared AdaLN), its rows ordered (gates, scales, shifts) with one gate per
    residual branch first.
    """

    num_branches: ClassVar[int]  # residual branches, each with its AdaLN gate (3 chunks of modulation each)
    static_kv_cache: ClassVar[bool]  # incremental(True, static_kv=...) works: sampling with a preallocated cache
    attn: SelfAttention
    ffn: FFN

    def __call__(self, x_BlC: Tensor, cond: Tensor, attn_bias: Tensor | None, block_mask=None) -> Tensor:
        """One block on tokens x; ``cond`` is cond_BD, or with shared AdaLN the shared modulation (B, 1, 6, C)."""

    def incremental(self, enable: bool, static_kv: Tensor | None = None) -> None:
        """Sampling, scale by scale: from ``enable`` on, each call sees one scale's tokens and the block keeps what
        later scales need (its state is cleared by every call); ``static_kv`` (2, B, H, L, c): the preallocated
        cache of a ``static_kv_cache`` block."""


class NextScalePrior(nn.Module):
    """What every family's model shares: embeddings, head, init, teacher-forcing front-end, the incremental state
    the sampler drives. A family's model subclasses it with its ``block_class`` (a :class:`Block`) and its
    attention rule ``attends`` (``nextscale.prior.var.VAR``, ``nextscale.prior.mvar.MVAR``)."""

    block_class: type[Block]

    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.cfg = cfg
        C, L, std = cfg.width, cfg.num_tokens, cfg.std
        self.C = self.D = C
        self.L, self.num_classes, self.V, self.Cv = L, cfg.num_classes, cfg.vocab_size, cfg.latent_channels
        self.patch_nums = tuple(cfg.patch_nums)
        self.first_l = self.patch_nums[0] ** 2
        # registration order = the official state-dict order
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, C))
        self.pos_1LC = nn.Parameter(torch.empty(1, L, C))
        nn.init.trunc_normal_(self.pos_start, mean=0, std=std)
        nn.init.trunc_normal_(self.pos_1LC, mean=0, std=std)
        self.register_buffer("lvl_1L", level_index(self.patch_nums).view(1, L))
        self.register_buffer("attn_bias_for_masking", self.mask_bias(self.patch_nums).contiguous())
        self.word_embed = nn.Linear(self.Cv, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)  # row num_classes = the null class (CFG)
        nn.init.trunc_normal_(self.class_emb.weight, mean=0, std=std)
        self.lvl_embed = nn.Embedding(len(self.patch_nums), C)
        nn.init.trunc_normal_(self.lvl_embed.weight, mean=0, std=std)
        chunks = 3 * self.block_class.num_branches  # (gate, scale, shift) per residual branch
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), SharedAdaLin(self.D, chunks * C)) if cfg.shared_aln \
            else nn.Identity()
        dpr = torch.linspace(0, cfg.drop_path, cfg.depth, device="cpu").tolist()  # official rates, also under meta
        self.blocks = nn.ModuleList(self.block_class(cfg, dpr[i]) for i in range(cfg.depth))
        self.head_nm = AdaLNBeforeHead(C, self.D, cfg.norm_eps)
        self.head = nn.Linear(C, self.V)

    @staticmethod
    def attends(lvl_q: Tensor, lvl_kv: Tensor) -> Tensor:
        """Whether a query of scale ``lvl_q`` sees a key of scale ``lvl_kv`` (elementwise): the family's rule."""
        raise NotImplementedError

    @classmethod
    def mask_bias(cls, patch_nums: Sequence[int], device: torch.device | str | None = None) -> Tensor:
        """(1, 1, L, L) float32: 0 where ``attends``, -inf elsewhere (the ``attn_bias_for_masking`` buffer)."""
        lvl_L = level_index(patch_nums, device)
        allowed_LL = cls.attends(lvl_L[:, None], lvl_L[None, :])
        return torch.where(allowed_LL, 0.0, -torch.inf).reshape(1, 1, lvl_L.numel(), lvl_L.numel())

    def derived_buffers(self, device: torch.device | str | None = None) -> dict[str, Tensor]:
        """Every buffer of the model computed from the config on ``device``: checkpoints carry the buffers (the
        official files do), loading replaces them with these."""
        out = {"lvl_1L": level_index(self.patch_nums, device).view(1, self.L),
               "attn_bias_for_masking": self.mask_bias(self.patch_nums, device).contiguous()}
        for name, module in self.named_modules():
            if module is not self and hasattr(module, "derived_buffers"):
                out.update({f"{name}.{k}": v for k, v in module.derived_buffers(device).items()})
        return out

    # --- initialisation -------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self) -> None:
        """The official ``VAR.init_weights`` (``build_vae_var`` calls it with init_std=-1, conv std 0.02)."""
        cfg, std, C = self.cfg, self.cfg.std, self.C
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=std)
            elif isinstance(m, nn.Conv1d):  # e.g. M-VAR's Mamba2 convs
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    m.bias.zero_()
        self.head.weight.mul_(cfg.init_head)
        self.head.bias.zero_()
        self.head_nm.ada_lin[-1].weight.mul_(cfg.init_adaln)
        self.head_nm.ada_lin[-1].bias.zero_()
        for block in self.blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * cfg.depth))
            block.ffn.fc2.weight.div_(math.sqrt(2 * cfg.depth))
            # The gates come first in the modulation; small gates start every residual branch near zero, so
            # each block starts close to the identity. The official M-VAR kept VAR's 6-chunk rows ([:2C]
            # gates) for its 9 chunks, which leaves its third gate (the FFN's) at init_adaln: "official"
            # reproduces that, the default makes all of a block's gates small as VAR intends.
            g = 2 if cfg.gate_init == "official" else block.num_branches
            if cfg.shared_aln:
                block.ada_gss[:, :, g:].mul_(cfg.init_adaln)
                block.ada_gss[:, :, :g].mul_(cfg.init_adaln_gamma)
            else:
                block.ada_lin[-1].weight[g * C:].mul_(cfg.init_adaln)
                block.ada_lin[-1].weight[:g * C].mul_(cfg.init_adaln_gamma)
                block.ada_lin[-1].bias.zero_()

    # --- pieces shared by teacher forcing and sampling ------------------------------------------

    def scale_begin_ends(self) -> list[tuple[int, int]]:
        out, b = [], 0
        for pn in self.patch_nums:
            out.append((b, b + pn * pn))
            b += pn * pn
        return out

    def lvl_pos(self) -> Tensor:
        """(1, L, C): level embedding + absolute position embedding of every position."""
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC

    def sos_tokens(self, cond_BD: Tensor) -> Tensor:
        """(B, first_l, C): class embedding + pos_start + level/position of scale 0."""
        B = cond_BD.shape[0]
        sos = cond_BD.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, self.first_l, -1)
        return sos + self.lvl_pos()[:, :self.first_l]

    def word_tokens(self, x_BlCv: Tensor, begin: int, end: int) -> Tensor:
        """(B, l, C): embedded features of positions [begin, end) plus their level/position embeddings."""
        return self.word_embed(x_BlCv.float()) + self.lvl_pos()[:, begin:end]

    def modulation(self, cond_BD: Tensor) -> Tensor:
        """What the blocks receive as condition: cond_BD, or the shared modulation with shared AdaLN."""
        return self.shared_ada_lin(cond_BD)

    def run_blocks(self, x_BlC: Tensor, cond_BD: Tensor, attn_bias: Tensor | None, block_mask=None,
                   head: bool = True) -> Tensor:
        """Blocks on tokens x (fp32 embeddings) in the autocast dtype if any, then the AdaLN head: fp32 logits
        (with ``head=False`` the head's fp32 input features (B, l, C) instead, for a chunked loss)."""
        dtype = _autocast_dtype(x_BlC)
        x_BlC = x_BlC.to(dtype)
        cond = self.modulation(cond_BD).to(dtype)
        attn_bias = None if attn_bias is None else attn_bias.to(dtype)
        for block in self.blocks:
            x_BlC = block(x_BlC, cond, attn_bias, block_mask)
        return self.logits(x_BlC, cond_BD) if head else self.head_features(x_BlC, cond_BD)

    def head_features(self, h_BlC: Tensor, cond_BD: Tensor) -> Tensor:
        return self.head_nm(h_BlC.float(), cond_BD).float()

    def logits(self, h_BlC: Tensor, cond_BD: Tensor) -> Tensor:
        return self.head(self.head_features(h_BlC, cond_BD)).float()

    @contextlib.contextmanager
    def kv_caching(self, static_B: int = 0, dtype: torch.dtype = torch.float32) -> Iterator[None]:
        """Scale-by-scale sampling: within the block each ``run_blocks`` call gets the next scale's tokens and
        every block keeps what later scales need (``Block.incremental``: VAR keys/values, M-VAR its mixer's
        state); cleared on entry and exit.

        ``static_B`` > 0 (blocks with ``static_kv_cache``): each attention layer writes into a KV cache preallocated for
        ``static_B`` rows and all L positions in ``dtype`` (the blocks' dtype) instead of concatenating, so
        every scale's step has fixed shapes and addresses (what CUDA-graph capture needs).
        """
        if static_B > 0 and not self.block_class.static_kv_cache:
            raise ValueError(f"{type(self).__name__} blocks keep no KV cache: sample with static_cache=False")
        for block in self.blocks:
            if static_B > 0:
                attn = block.attn
                block.incremental(True, static_kv=torch.empty(2, static_B, attn.H, self.L, attn.c, dtype=dtype,
                                                              device=self.pos_1LC.device))
            else:
                block.incremental(True)
        try:
            yield
        finally:
            for block in self.blocks:
                block.incremental(False)

    def _block_mask(self, L: int, device: torch.device):
        return cached_block_mask(self.attends, self.patch_nums, L, device)

    # --- teacher forcing --------------------------------------------------------------------------

    def forward(self, label_B: Tensor, x_BlCv: Tensor, head: bool = True) -> Tensor:
        """Teacher forcing: labels (B,) int64 and features (B, l - first_l, Cv) -> logits (B, l, V) float32
        (``head=False``: the head's input features (B, l, C) float32, see ``prior.loss.head_cross_entropy``).

        ``x_BlCv`` is the VQVAE's teacher-forcing input (``MultiScaleQuantizer.teacher_forcing_input``),
        L - 1 rows for the whole pyramid, or fewer rows covering whole scales (progressive training).
        Position i predicts token i (no shift). Labels become the null class with probability
        ``cond_drop_rate`` only in train() mode.
        """
        x_BLC, cond_BD = self.embed(label_B, x_BlCv)
        ed = x_BLC.shape[1]
        # FlexAttention has no CPU backward (torch 2.14): CPU training takes the SDPA path
        if self.cfg.attn_impl == "flex" and (x_BLC.device.type != "cpu" or not torch.is_grad_enabled()):
            return self.run_blocks(x_BLC, cond_BD, None, self._block_mask(ed, x_BLC.device), head)
        return self.run_blocks(x_BLC, cond_BD, self.attn_bias_for_masking[:, :, :ed, :ed], head=head)

    def embed(self, label_B: Tensor, x_BlCv: Tensor) -> tuple[Tensor, Tensor]:
        """(tokens x_BlC fp32 with the class token first, cond_BD) of a teacher-forced input (see ``forward``)."""
        B, ed = x_BlCv.shape[0], self.first_l + x_BlCv.shape[1]
        if ed not in [e for _, e in self.scale_begin_ends()] or x_BlCv.ndim != 3 or x_BlCv.shape[2] != self.Cv:
            raise ValueError(f"x_BlCv must be (B, l, {self.Cv}) with l + {self.first_l} at the end of a scale "
                             f"(L - 1 = {self.L - 1} for all scales), got {tuple(x_BlCv.shape)}")
        with torch.autocast(device_type=x_BlCv.device.type, enabled=False):
            if self.training and self.cfg.cond_drop_rate > 0:
                dropped_B = torch.rand(B, device=label_B.device) < self.cfg.cond_drop_rate
                label_B = torch.where(dropped_B, self.num_classes, label_B)
            cond_BD = self.class_emb(label_B)
            # the same association order as the official code: (sos + pos_start) + (lvl_embed + pos_1LC)
            sos_BlC = cond_BD.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, self.first_l, -1)
            x_BLC = torch.cat((sos_BlC, self.word_embed(x_BlCv.float())), dim=1) if ed > self.first_l else sos_BlC
            x_BLC = x_BLC + self.lvl_pos()[:, :ed]
        return x_BLC, cond_BD


def _autocast_dtype(x: Tensor) -> torch.dtype:
    """The autocast dtype where autocast is on, else ``x``'s own (float32; float64 when measuring noise floors)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


# ------------------------------------------------------------------------------------------------
# FLOPs and the family spec


def dense_block_flops(cfg: VARConfig) -> float:
    """Matmul FLOPs per token of a block's attention projections and FFN (qkv, proj, fc1, fc2; multiply-add = 2)."""
    C, hidden = cfg.width, round(cfg.width * cfg.mlp_ratio)
    return 2 * (3 * C * C + C * C + 2 * C * hidden)


def shared_flops(cfg: VARConfig, num_branches: int) -> float:
    """Forward matmul FLOPs of one image outside the blocks: the head over L tokens, the AdaLN linears (once per
    image) and the word embedding of the L - 1 teacher-forced tokens."""
    C, L = cfg.width, cfg.num_tokens
    adaln = (2 * C * 3 * num_branches * C) * (1 if cfg.shared_aln else cfg.depth) + 2 * C * 2 * C
    return 2 * C * cfg.vocab_size * L + adaln + 2 * cfg.latent_channels * C * (L - 1)


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """A model family, as its module declares it (torchtitan's ``ModelSpec``); ``nextscale.prior.families`` lists them.

    Nothing outside the family's module and the table branches on ``name``: building, presets, parameter count,
    FLOPs (and so MFU), checkpoint conversion, resume checks and sampling all go through this spec.
    """

    name: str  # the config's ``arch``
    title: str  # how messages name it: "a VAR", "an M-VAR"
    config: type[VARConfig]  # VARConfig, or a subclass with the family's own fields
    model: type[NextScalePrior]  # built as model(cfg); its block_class follows :class:`Block`
    presets: Mapping[str, VARConfig]
    flops_per_image: Callable[[VARConfig, bool], float]  # (cfg, training) -> matmul FLOPs of one image
    signature: tuple[str, ...]  # keys under ``blocks.<i>.`` every official state dict of the family holds
    file_prefix: str = ""  # the official file of preset p is ``{file_prefix}{p}.pth``

    def build(self, cfg: VARConfig) -> NextScalePrior:
        if not isinstance(cfg, self.config):
            raise TypeError(f"{self.title} is built from a {self.config.__name__}, not a {type(cfg).__name__}")
        return self.model(cfg)

    def num_params(self, cfg: VARConfig) -> int:
        """Parameters of the model built from ``cfg``, counted on the meta device (no memory, no init)."""
        with torch.device("meta"):
            return sum(p.numel() for p in self.build(cfg).parameters())
