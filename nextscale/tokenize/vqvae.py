"""Multi-scale residual VQVAE of VAR (FoundationVision/VAR ``models/{basic_vae,quant,vqvae}.py``).

Module paths equal the official state-dict names (``encoder.down.4.attn.0.qkv.weight``,
``quantize.quant_resi.qresi_ls.2.bias``...), so an official checkpoint loads with a plain strict
``load_state_dict`` (see ``nextscale.tokenize.loader``).

Shape legend:
    B batch, C channels, H W image or feature height/width, Cv latent channels (z_channels),
    h w latent height/width (= patch_nums[-1]), pn side of one scale's token map, l = pn*pn tokens of
    one scale, L tokens of all scales, V vocabulary, N = B*pn*pn rows of a distance matrix, S scales.
    img_B3HW images in [-1, 1]; f_BChw encoder latent; f_hat_BChw quantised latent (float32).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import Tensor, nn

from nextscale.config import doc, preset, require
from nextscale.tokenize.scales import num_tokens, phi_index_table, scale_slices, split_codes

# ------------------------------------------------------------------------------------------------
# Encoder / decoder building blocks (latent-diffusion vq-f16 design)


def Normalize(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = Normalize(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = Normalize(out_channels, groups)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        # only a width change has a 1x1 shortcut (and thus a `nin_shortcut` state-dict entry)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x_BCHW: Tensor) -> Tensor:
        # SiLU in place on the fresh GroupNorm output, as the official blocks (saves one activation copy)
        h = self.conv1(F.silu(self.norm1(x_BCHW), inplace=True))
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=True)))
        return self.nin_shortcut(x_BCHW) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, qkv from one 1x1 conv."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.C = channels
        self.norm = Normalize(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        self.w_ratio = channels ** (-0.5)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x_BCHW: Tensor) -> Tensor:
        qkv = self.qkv(self.norm(x_BCHW))
        B, _, H, W = qkv.shape
        C = self.C
        q, k, v = qkv.reshape(B, 3, C, H, W).unbind(1)
        # the same bmm sequence as the official block, so fp32 results agree to rounding
        q_BNC = q.reshape(B, C, H * W).permute(0, 2, 1)
        w_BNN = torch.bmm(q_BNC, k.reshape(B, C, H * W)).mul_(self.w_ratio).softmax(dim=2)
        h_BCN = torch.bmm(v.reshape(B, C, H * W), w_BNN.permute(0, 2, 1))
        return x_BCHW + self.proj_out(h_BCN.view(B, C, H, W))


class Downsample2x(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x_BCHW: Tensor) -> Tensor:
        # asymmetric padding (right/bottom only) so that stride 2 halves even sizes exactly
        return self.conv(F.pad(x_BCHW, pad=(0, 1, 0, 1), mode="constant", value=0))


class Upsample2x(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x_BCHW: Tensor) -> Tensor:
        return self.conv(F.interpolate(x_BCHW, scale_factor=2, mode="nearest"))


class Level(nn.Module):
    """One resolution level: ``block`` (ResnetBlocks), ``attn`` (empty or one per block), optional resampler."""

    def __init__(self, widths: Sequence[tuple[int, int]], attention: bool, dropout: float, groups: int):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(i, o, dropout, groups) for i, o in widths)
        self.attn = nn.ModuleList(AttnBlock(o, groups) for _, o in widths) if attention else nn.ModuleList()

    def forward(self, h: Tensor) -> Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class Mid(nn.Module):
    def __init__(self, channels: int, attention: bool, dropout: float, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, groups)
        self.attn_1 = AttnBlock(channels, groups) if attention else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, dropout, groups)

    def forward(self, h: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int,
                 dropout: float, using_sa: bool, using_mid_sa: bool, norm_groups: int):
        super().__init__()
        n = len(ch_mult)
        self.conv_in = nn.Conv2d(3, ch, kernel_size=3, stride=1, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for i in range(n):
            block_out = ch * ch_mult[i]
            widths = [(block_in if b == 0 else block_out, block_out) for b in range(num_res_blocks)]
            level = Level(widths, attention=using_sa and i == n - 1, dropout=dropout, groups=norm_groups)
            if i != n - 1:
                level.downsample = Downsample2x(block_out)
            self.down.append(level)
            block_in = block_out
        self.mid = Mid(block_in, using_mid_sa, dropout, norm_groups)
        self.norm_out = Normalize(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, img_B3HW: Tensor) -> Tensor:
        h = self.conv_in(img_B3HW)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


class Decoder(nn.Module):
    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int,
                 dropout: float, using_sa: bool, using_mid_sa: bool, norm_groups: int):
        super().__init__()
        n = len(ch_mult)
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = Mid(block_in, using_mid_sa, dropout, norm_groups)
        # built coarse to fine but stored fine to coarse: `up.0` is the full-resolution level
        levels: list[Level] = []
        for i in reversed(range(n)):
            block_out = ch * ch_mult[i]
            widths = [(block_in if b == 0 else block_out, block_out) for b in range(num_res_blocks + 1)]
            level = Level(widths, attention=using_sa and i == n - 1, dropout=dropout, groups=norm_groups)
            if i != 0:
                level.upsample = Upsample2x(block_out)
            levels.insert(0, level)
            block_in = block_out
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, 3, kernel_size=3, stride=1, padding=1)

    def forward(self, z_BChw: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z_BChw))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


# ------------------------------------------------------------------------------------------------
# Multi-scale residual quantiser


class Phi(nn.Conv2d):
    """phi(h) = (1 - r) h + r conv3x3(h): a partial residual refinement of an upsampled token map."""

    def __init__(self, channels: int, resi_ratio: float):
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(resi_ratio)

    def forward(self, h_BChw: Tensor) -> Tensor:
        return h_BChw.mul(1 - self.resi_ratio) + super().forward(h_BChw).mul_(self.resi_ratio)


class PhiBank(nn.Module):
    """The K shared Phi convs; ``qresi_ls`` is the official state-dict name."""

    def __init__(self, channels: int, resi_ratio: float, num_phi: int):
        super().__init__()
        self.qresi_ls = nn.ModuleList(Phi(channels, resi_ratio) for _ in range(num_phi))


class MultiScaleQuantizer(nn.Module):
    """Residual quantisation of f (B, Cv, h, w) into token maps of growing sizes sharing one codebook."""

    def __init__(self, vocab_size: int, z_channels: int, patch_nums: Sequence[int], beta: float,
                 quant_resi: float, num_phi: int):
        super().__init__()
        self.vocab_size, self.Cv = vocab_size, z_channels
        self.patch_nums = tuple(patch_nums)
        self.beta = beta
        self.phi_idx = phi_index_table(len(self.patch_nums), num_phi)
        self.quant_resi = PhiBank(z_channels, quant_resi, num_phi)
        # per-scale EMA of code hits (official name); feeds the usage/dead-code statistics in training
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.patch_nums), vocab_size))
        # on the meta device (a driver checking a checkpoint's shapes) no random init: normal_ there imports
        # torch's compiler, seconds of CPU in every tokenize and fid driver
        shape_only = torch.empty(vocab_size, z_channels) if torch.get_default_device().type == "meta" else None
        self.embedding = nn.Embedding(vocab_size, z_channels, _weight=shape_only)

    def phi(self, si: int) -> Phi:
        return self.quant_resi.qresi_ls[self.phi_idx[si]]

    def _nearest(self, z_NC: Tensor) -> Tensor:
        """Squared-L2 nearest code, computed as the official addmm so near-ties break the same way."""
        e_VC = self.embedding.weight.detach()
        d_NV = torch.sum(z_NC.square(), dim=1, keepdim=True) + torch.sum(e_VC.square(), dim=1)
        d_NV.addmm_(z_NC, e_VC.T, alpha=-2, beta=1)
        return torch.argmin(d_NV, dim=1)

    def _residual(self, f_BChw: Tensor) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Indices (B, pn*pn) per scale, the cumulative f_hat after each scale, the quantised inputs (N, Cv).

        The f_hat list keeps the graph through the codebook and the Phi convs (the codebook loss needs
        it); the residual that drives the argmin is detached.
        """
        B, C, h, w = f_BChw.shape
        S = len(self.patch_nums)
        if (h, w) != (self.patch_nums[-1],) * 2:
            raise ValueError(f"latent is {h}x{w} but the last patch_num is {self.patch_nums[-1]}")
        f_rest = f_BChw.detach().clone()
        f_hat = torch.zeros_like(f_rest)
        idx_list, f_hats, z_list = [], [], []
        for si, pn in enumerate(self.patch_nums):
            last = si == S - 1
            # no resampling at the last scale: the residual is quantised at full latent resolution
            z_BChw = f_rest if last else F.interpolate(f_rest, size=(pn, pn), mode="area")
            z_NC = z_BChw.permute(0, 2, 3, 1).reshape(-1, C)
            with torch.no_grad():
                idx_N = self._nearest(z_NC)
            e_BChw = self.embedding(idx_N.view(B, pn, pn)).permute(0, 3, 1, 2)
            if not last:
                e_BChw = F.interpolate(e_BChw, size=(h, w), mode="bicubic", align_corners=False)
            h_BChw = self.phi(si)(e_BChw.contiguous())  # Phi runs after upsampling, at h x w
            f_hat = f_hat + h_BChw
            f_rest = f_rest - h_BChw.detach()
            idx_list.append(idx_N.reshape(B, pn * pn))
            f_hats.append(f_hat)
            z_list.append(z_NC)
        return idx_list, f_hats, z_list

    @torch.no_grad()
    def f_to_idx(self, f_BChw: Tensor) -> list[Tensor]:
        """Latent (any float dtype; quantised in float32) -> [(B, pn*pn) int64] per scale."""
        return self._residual(f_BChw.float())[0]

    @torch.no_grad()
    def residual_inputs(self, f_BChw: Tensor) -> Tensor:
        """Every vector the quantiser matches against the codebook for this latent, all scales: (N, Cv)."""
        return torch.cat(self._residual(f_BChw.float())[2])

    def idx_to_fhat(self, idx_list: Sequence[Tensor]) -> list[Tensor]:
        """Cumulative f_hat (B, Cv, h, w) float32 after each given scale (the first k scales if k given)."""
        B = idx_list[0].shape[0]
        H = W = self.patch_nums[-1]
        S = len(self.patch_nums)
        f_hat = torch.zeros(B, self.Cv, H, W, dtype=torch.float32, device=idx_list[0].device)
        out = []
        for si, idx_Bl in enumerate(idx_list):
            pn = self.patch_nums[si]
            h_BChw = self.embedding(idx_Bl.long()).transpose(1, 2).view(B, self.Cv, pn, pn)
            if si < S - 1:
                h_BChw = F.interpolate(h_BChw, size=(H, W), mode="bicubic", align_corners=False)
            f_hat = f_hat + self.phi(si)(h_BChw)
            out.append(f_hat)
        return out

    def teacher_forcing_input(self, idx_list: Sequence[Tensor]) -> Tensor:
        """(B, L - pn0^2, Cv) float32: for each scale k >= 1, f_hat of scales < k area-resized to pn_k."""
        B = idx_list[0].shape[0]
        H = W = self.patch_nums[-1]
        f_hat = torch.zeros(B, self.Cv, H, W, dtype=torch.float32, device=idx_list[0].device)
        next_scales = []
        for si in range(len(self.patch_nums) - 1):
            pn, pn_next = self.patch_nums[si], self.patch_nums[si + 1]
            h_BChw = self.embedding(idx_list[si].long()).transpose(1, 2).view(B, self.Cv, pn, pn)
            f_hat = f_hat + self.phi(si)(F.interpolate(h_BChw, size=(H, W), mode="bicubic", align_corners=False))
            x_BCl = F.interpolate(f_hat, size=(pn_next, pn_next), mode="area").view(B, self.Cv, -1)
            next_scales.append(x_BCl.transpose(1, 2))
        if not next_scales:
            return torch.zeros(B, 0, self.Cv, device=idx_list[0].device)
        return torch.cat(next_scales, dim=1)

    def next_autoregressive_input(self, si: int, f_hat_BChw: Tensor, h_BChw: Tensor) -> tuple[Tensor, Tensor | None]:
        """Sampling step: add scale ``si``'s code map h (B, Cv, pn, pn) into f_hat (not in place).

        Returns (f_hat, f_hat area-resized to the next scale) or (f_hat, None) after the last scale.
        """
        S = len(self.patch_nums)
        H = W = self.patch_nums[-1]
        if si != S - 1:
            h_BChw = F.interpolate(h_BChw, size=(H, W), mode="bicubic", align_corners=False)
        f_hat_BChw = f_hat_BChw + self.phi(si)(h_BChw)
        if si == S - 1:
            return f_hat_BChw, None
        pn = self.patch_nums[si + 1]
        return f_hat_BChw, F.interpolate(f_hat_BChw, size=(pn, pn), mode="area")

    def forward(self, f_BChw: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Training: (f_hat with a straight-through gradient to f, vq loss, code hits (V,) of this batch).

        vq loss = mean over scales of beta * mse(f_hat.detach(), f) + mse(f_hat, f.detach()), the
        first term the commitment of the encoder, the second pulling the codebook and Phi convs.
        """
        f_BChw = f_BChw.float()
        # the distances and the losses stay in float32 even inside an autocast region
        no_amp = (torch.autocast(device_type=f_BChw.device.type, enabled=False)
                  if f_BChw.device.type in ("cpu", "cuda") else contextlib.nullcontext())
        with no_amp:
            idx_list, f_hats, _ = self._residual(f_BChw)
            f_detached = f_BChw.detach()
            vq_loss = sum(
                self.beta * F.mse_loss(f_hat.detach(), f_BChw) + F.mse_loss(f_hat, f_detached) for f_hat in f_hats
            ) / len(f_hats)
            f_hat = (f_hats[-1].detach() - f_detached).add_(f_BChw)
        hits_SV = torch.stack([idx.reshape(-1).bincount(minlength=self.vocab_size).float() for idx in idx_list])
        if self.training:
            if tdist.is_available() and tdist.is_initialized():
                tdist.all_reduce(hits_SV)
            self.ema_vocab_hit_SV.mul_(0.99).add_(hits_SV, alpha=0.01)
        return f_hat, vq_loss, hits_SV.sum(0)


# ------------------------------------------------------------------------------------------------
# Config and model


@dataclasses.dataclass(frozen=True, kw_only=True)
class VQVAEConfig:
    """Architecture of a multi-scale VQVAE; the official ``vae_ch160v4096z32`` is one preset."""

    vocab_size: int = doc(4096, "codebook size V, shared by all scales (<= 65536: codes are stored as uint16)")
    z_channels: int = doc(32, "latent/codebook channels Cv")
    ch: int = doc(160, "base width of the encoder/decoder (widths = ch * ch_mult, each a multiple of 32)")
    ch_mult: tuple[int, ...] = doc((1, 1, 2, 2, 4), "width multiplier per resolution level; downsampling 2^(len-1)")
    num_res_blocks: int = doc(2, "ResnetBlocks per encoder level (the decoder uses one more)")
    patch_nums: tuple[int, ...] = doc((1, 2, 3, 4, 5, 6, 8, 10, 13, 16), "token-map side per scale; the last = latent side")
    image_size: int = doc(256, "image side in pixels (= latent side * 2^(len(ch_mult)-1))")
    beta: float = doc(0.25, "commitment loss weight")
    quant_resi: float = doc(0.5, "Phi residual ratio r: phi(h) = (1-r) h + r conv(h)")
    num_phi: int = doc(4, "number of shared Phi convs (official share_quant_resi=4)")
    dropout: float = doc(0.0, "dropout inside the ResnetBlocks")
    using_sa: bool = doc(True, "self-attention after each ResnetBlock of the lowest-resolution level")
    using_mid_sa: bool = doc(True, "self-attention in the middle blocks")
    norm_groups: int = doc(32, "GroupNorm groups (official 32; narrow models want fewer, 32 groups of 1 channel = InstanceNorm)")

    def __post_init__(self) -> None:
        require(2 <= self.vocab_size <= 65536, f"vocab_size={self.vocab_size} must be in [2, 65536] (codes are uint16)")
        require(len(self.ch_mult) >= 1, "ch_mult needs at least one level")
        widths = [self.ch * m for m in self.ch_mult]
        require(self.norm_groups >= 1 and all(w % self.norm_groups == 0 for w in widths),
                f"ch * ch_mult = {widths}: every width must be a multiple of norm_groups={self.norm_groups}")
        require(len(self.patch_nums) >= 1 and all(a < b for a, b in zip(self.patch_nums, self.patch_nums[1:])),
                f"patch_nums={self.patch_nums} must be strictly increasing")
        require(self.image_size % self.downsample == 0 and self.latent_size == self.patch_nums[-1],
                f"image_size={self.image_size} / downsample {self.downsample} must equal the last patch_num "
                f"{self.patch_nums[-1]}; change image_size, ch_mult or patch_nums")
        require(self.num_phi >= 1, f"num_phi={self.num_phi} must be >= 1")
        require(0.0 < abs(self.quant_resi) <= 1.0, f"quant_resi={self.quant_resi} must be in (0, 1]")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.downsample

    @property
    def num_tokens(self) -> int:
        return num_tokens(self.patch_nums)


class VQVAE(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.cfg = cfg
        arch = dict(ch=cfg.ch, ch_mult=cfg.ch_mult, num_res_blocks=cfg.num_res_blocks, z_channels=cfg.z_channels,
                    dropout=cfg.dropout, using_sa=cfg.using_sa, using_mid_sa=cfg.using_mid_sa,
                    norm_groups=cfg.norm_groups)
        self.encoder = Encoder(**arch)
        self.decoder = Decoder(**arch)
        self.quantize = MultiScaleQuantizer(cfg.vocab_size, cfg.z_channels, cfg.patch_nums, cfg.beta,
                                            cfg.quant_resi, cfg.num_phi)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, kernel_size=3, stride=1, padding=1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, kernel_size=3, stride=1, padding=1)
        self.memory_format = torch.contiguous_format

    def channels_last_(self, enable: bool = True) -> VQVAE:
        """Encoder and decoder convs in channels-last (NHWC) layout, the layout cuDNN's fast bf16 kernels
        want; images and latents entering them are converted too. Same numbers up to float rounding."""
        self.memory_format = torch.channels_last if enable else torch.contiguous_format
        for part in (self.encoder, self.decoder, self.quant_conv, self.post_quant_conv):
            part.to(memory_format=self.memory_format)
        return self

    def _check_images(self, img_B3HW: Tensor) -> None:
        s = self.cfg.image_size
        if img_B3HW.ndim != 4 or tuple(img_B3HW.shape[1:]) != (3, s, s):
            raise ValueError(f"images must be (B, 3, {s}, {s}) in [-1, 1] for this tokenizer, got {tuple(img_B3HW.shape)}")

    def encode_latent(self, img_B3HW: Tensor, amp_dtype: torch.dtype | None = None) -> Tensor:
        """f = quant_conv(encoder(img)) in float32; with ``amp_dtype`` the convs run under autocast."""
        self._check_images(img_B3HW)
        amp = (torch.autocast(device_type=img_B3HW.device.type, dtype=amp_dtype) if amp_dtype is not None
               else contextlib.nullcontext())
        with amp:
            f_BChw = self.quant_conv(self.encoder(img_B3HW.contiguous(memory_format=self.memory_format)))
        # the quantiser must see float32: bf16 distances flip near-ties (and the official addmm_ crashes)
        return f_BChw.float()

    @torch.no_grad()
    def encode_scales(self, img_B3HW: Tensor, amp_dtype: torch.dtype | None = None) -> list[Tensor]:
        """Images in [-1, 1] -> [(B, pn*pn) int64] per scale."""
        return self.quantize.f_to_idx(self.encode_latent(img_B3HW, amp_dtype))

    @torch.no_grad()
    def encode(self, img_B3HW: Tensor, amp_dtype: torch.dtype | None = None) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> codes (B, L) int64, scale-major."""
        return torch.cat(self.encode_scales(img_B3HW, amp_dtype), dim=1)

    def fhat_to_img(self, f_hat_BChw: Tensor, amp_dtype: torch.dtype | None = None) -> Tensor:
        """Quantised latent -> image (B, 3, H, W) float32 clamped to [-1, 1]; with ``amp_dtype`` the decoder
        runs under autocast (pictures and FID samples only: the codes never depend on it)."""
        amp = (torch.autocast(device_type=f_hat_BChw.device.type, dtype=amp_dtype) if amp_dtype is not None
               else contextlib.nullcontext())
        with amp:
            img = self.decoder(self.post_quant_conv(f_hat_BChw.contiguous(memory_format=self.memory_format)))
        return img.float().clamp(-1, 1)

    @torch.no_grad()
    def decode(self, codes_BL: Tensor, num_scales: int | None = None, amp_dtype: torch.dtype | None = None) -> Tensor:
        """Codes -> image in [-1, 1] from the first ``num_scales`` scales (default: all given).

        ``codes_BL`` holds all L tokens or a prefix made of whole scales (B, sum of the first k pn^2).
        ``amp_dtype``: see :meth:`fhat_to_img`.
        """
        bounds = [e for _, e in scale_slices(self.cfg.patch_nums)]
        if codes_BL.ndim != 2 or codes_BL.shape[1] not in bounds:
            raise ValueError(f"codes must be (B, L') with L' in {bounds} (whole scales), got {tuple(codes_BL.shape)}")
        given = bounds.index(codes_BL.shape[1]) + 1
        k = given if num_scales is None else num_scales
        if not 1 <= k <= given:
            raise ValueError(f"num_scales={num_scales} must be in [1, {given}] for codes of length {codes_BL.shape[1]}")
        full = codes_BL.long()
        idx_list = [full[:, b:e] for b, e in scale_slices(self.cfg.patch_nums)[:k]]
        return self.fhat_to_img(self.quantize.idx_to_fhat(idx_list)[-1], amp_dtype)

    @torch.no_grad()
    def decode_scales(self, codes_BL: Tensor) -> list[Tensor]:
        """Codes (B, L) -> the partial reconstruction after every scale (coarse-to-fine pictures)."""
        f_hats = self.quantize.idx_to_fhat(split_codes(codes_BL.long(), self.cfg.patch_nums))
        return [self.fhat_to_img(f) for f in f_hats]

    def forward(self, img_B3HW: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Training: (reconstruction (B, 3, H, W) unclamped, vq loss, code hits (V,) of this batch)."""
        f_hat, vq_loss, hits_V = self.quantize(self.quant_conv(self.encoder(img_B3HW)))
        return self.decoder(self.post_quant_conv(f_hat)), vq_loss, hits_V


# ------------------------------------------------------------------------------------------------
# Presets

VQVAE_PRESETS: dict[str, VQVAEConfig] = {
    # the checkpoint used by every official VAR model (256 px, 10 scales, L=680)
    "vae_ch160v4096z32": VQVAEConfig(),
    # the same checkpoint at 512 px (the official VAR-d36 pairing, `--pn=512`): a 32x32 latent cut into 10 scales,
    # L=2240; the weights do not depend on the image size (convolutions, 10 scales like the 256-px layout)
    "vae_ch160v4096z32_512": VQVAEConfig(patch_nums=(1, 2, 3, 4, 6, 9, 13, 18, 24, 32), image_size=512),
    # tests/golden: the official constructor with tiny sizes (64 px, latent 4x4, L=30)
    "golden_tiny": VQVAEConfig(vocab_size=64, z_channels=8, ch=32, patch_nums=(1, 2, 3, 4), image_size=64),
    # the built-in demo dataset at 32 px: /4 downsampling to an 8x8 latent, 6 scales, L=130. Tuned on a 2-core
    # CPU: no attention at the lowest level and 8 GroupNorm groups (32 groups of 32 channels would be an
    # InstanceNorm that strips per-image colour statistics) learn fastest per CPU second; 0.77 M parameters
    "demo": VQVAEConfig(vocab_size=512, z_channels=16, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1,
                        patch_nums=(1, 2, 3, 4, 6, 8), image_size=32, using_sa=False, norm_groups=8),
    # the scale rehearsal (docs/scaling.md): 16 px, 4 scales, L=30, V=256, 52 k parameters (18 k in the encoder),
    # so that the pipeline's own costs (listing, shards, manifest, loader, resume) show when 1.28 M images are
    # encoded on 2 CPU cores
    "rehearsal": VQVAEConfig(vocab_size=256, z_channels=8, ch=8, ch_mult=(1, 1, 2), num_res_blocks=1,
                             patch_nums=(1, 2, 3, 4), image_size=16, using_sa=False, using_mid_sa=False, norm_groups=4),
}


def build_vqvae(preset_or_cfg: str | VQVAEConfig, **overrides) -> VQVAE:
    """A VQVAE from a preset name (optionally with field overrides) or a config."""
    return VQVAE(preset(VQVAE_PRESETS, preset_or_cfg, "VQVAE", **overrides))
