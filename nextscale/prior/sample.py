"""Scale-by-scale sampling with classifier-free guidance (the official ``VAR.autoregressive_infer_cfg``).

Per scale: one KV-cached pass over the scale's tokens for a 2B batch (conditional rows first, null class
last), guidance t = cfg * si / (S - 1) applied as (1 + t) cond - t null, top-k then top-p filtering,
one ``torch.multinomial`` draw per token from the (B * pn^2, V) probability matrix with the caller's
generator, then the VQVAE's f_hat update gives the next scale's input (fed to both CFG halves).
With the same generator state this consumes random numbers exactly as the official sampler does.

Zero-shot editing (VAR paper §7): tokens given by ``known_codes_BL`` where ``known_mask_BL`` is true
replace the sampled ones at every scale, so the model only generates the rest (inpainting: known
outside the hole; outpainting: known inside; class-conditional editing: a new label for the hole).

Shape legend: B images, L tokens of all scales, l tokens of one scale, V vocabulary, Cv latent channels,
pn side of a scale's token map, H W image size; codes_BL int64.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from nextscale.config import doc, require
from nextscale.prior.model import NextScalePrior


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How images are drawn from the prior; the defaults are the paper's FID protocol."""

    RENAMED: ClassVar[dict[str, str]] = {"cfg": "guidance"}

    guidance: float = doc(1.5, "classifier-free guidance weight at the last scale, ramping from 0 at the first "
                               "(the official `cfg`; paper: 1.5; 0 = no guidance)")
    top_k: int = doc(900, "top-k filter (paper: 900; 0 = off)")
    top_p: float = doc(0.96, "top-p (nucleus) filter (paper: 0.96; 0 = off)")
    more_smooth: bool = doc(False, "Gumbel-softmax soft codes for smoother pictures (paper: off; never for FID)")

    def __post_init__(self) -> None:
        require(self.guidance >= 0, f"sampling.guidance={self.guidance} must be >= 0 (0 = no guidance)")
        require(self.top_k >= 0, f"sampling.top_k={self.top_k} must be >= 0 (0 = off)")
        require(0.0 <= self.top_p <= 1.0, f"sampling.top_p={self.top_p} must be in [0, 1] (0 = off)")


PAPER_SAMPLING = SamplingConfig()  # the paper's FID protocol


def top_k_top_p_filter_(logits_BlV: Tensor, top_k: int, top_p: float) -> Tensor:
    """In place: -inf below the k-th largest logit (ties kept), then outside the top-p nucleus.

    top-p as the official code: sort ascending, drop tokens whose cumulative softmax mass is <= 1 - top_p,
    never the most likely one. top_k <= 0 or top_p <= 0 disables that filter.
    """
    V = logits_BlV.shape[-1]
    if top_k > 0:
        kth_Bl1 = logits_BlV.topk(min(top_k, V), largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
        logits_BlV.masked_fill_(logits_BlV < kth_Bl1, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits_BlV.sort(dim=-1, descending=False)
        sorted_remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        sorted_remove[..., -1:] = False
        logits_BlV.masked_fill_(sorted_remove.scatter(sorted_idx.ndim - 1, sorted_idx, sorted_remove), -torch.inf)
    return logits_BlV


def gumbel_softmax(logits: Tensor, tau: float, generator: torch.Generator) -> Tensor:
    """Soft Gumbel-softmax drawing its noise from ``generator`` (the official ``gumbel_softmax_with_rng``)."""
    gumbels = -torch.empty_like(logits, memory_format=torch.legacy_contiguous_format).exponential_(
        generator=generator).log()
    return ((logits + gumbels) / tau).softmax(-1)


def _check_known(known_codes_BL: Tensor | None, known_mask_BL: Tensor | None, B: int, L: int, V: int):
    if known_codes_BL is None and known_mask_BL is None:
        return None, None
    if known_codes_BL is None or known_mask_BL is None:
        raise ValueError("zero-shot editing needs both known_codes_BL and known_mask_BL")
    if tuple(known_codes_BL.shape) != (B, L) or tuple(known_mask_BL.shape) != (B, L):
        raise ValueError(f"known_codes_BL and known_mask_BL must be ({B}, {L}), got "
                         f"{tuple(known_codes_BL.shape)} and {tuple(known_mask_BL.shape)}")
    known_mask_BL = known_mask_BL.bool()
    forced = known_codes_BL[known_mask_BL]
    if forced.numel() and (int(forced.min()) < 0 or int(forced.max()) >= V):
        raise ValueError(f"known codes must be in [0, {V}) where known_mask_BL is true")
    return known_codes_BL.long(), known_mask_BL


@torch.no_grad()
def sample_codes(var: NextScalePrior, quantizer, label_B: Tensor, *, generator: torch.Generator,
                 sampling: SamplingConfig = PAPER_SAMPLING, known_codes_BL: Tensor | None = None, known_mask_BL: Tensor | None = None,
                 autocast: bool | None = None, record: dict[str, list[Tensor]] | None = None,
                 static_cache: bool = False, graphs: bool = False) -> Tensor:
    """Sample codes (B, L) int64 for class labels (B,) (the null class ``var.num_classes`` = unconditional).

    ``quantizer`` is the VQVAE's ``MultiScaleQuantizer`` (codebook, Phi convs and f_hat update).
    ``sampling`` holds the guidance weight (the official ``cfg``), the top-k / top-p filters and ``more_smooth``.
    ``generator`` must live on the model's device; it is the only source of randomness (the global
    torch RNG is untouched). ``more_smooth`` feeds a Gumbel-softmax mixture of codes instead of the
    drawn code into f_hat (for pictures, never for FID); the returned codes are the drawn ones and the
    smooth f_hat is in ``record["f_hat"]``. ``autocast`` (default: on for CUDA) runs the blocks in bf16.
    ``record``, if given, receives per scale "logits_raw" (2B, l, V), "logits_guided" and
    "logits_filtered" (B, l, V) float32, and the final "f_hat" (B, Cv, h, w).
    ``static_cache``: a preallocated KV cache written in place (fixed shapes and addresses per scale; the
    same tokens). ``graphs`` (CUDA, implies ``static_cache``): each scale's transformer pass is replayed as
    a CUDA graph (``torch.compile(mode="reduce-overhead")``, one graph per scale, captured on first use).
    """
    device = _check_devices_and_quantizer(var, quantizer, generator)
    label_B = torch.as_tensor(label_B, device=device).long().view(-1)
    B, Cv, S = label_B.shape[0], var.Cv, len(var.patch_nums)
    known_codes_BL, known_mask_BL = _check_known(known_codes_BL, known_mask_BL, B, var.L, var.V)
    if known_codes_BL is not None:
        known_codes_BL, known_mask_BL = known_codes_BL.to(device), known_mask_BL.to(device)
    use_amp = device.type == "cuda" if autocast is None else autocast
    graphs = graphs and device.type == "cuda"
    run_blocks = _graphed_run_blocks(var) if graphs else var.run_blocks
    begin_ends = var.scale_begin_ends()

    with torch.autocast(device_type=device.type, enabled=False):
        cond_BD = var.class_emb(torch.cat((label_B, torch.full_like(label_B, var.num_classes))))
        next_BlC = var.sos_tokens(cond_BD)
    f_hat = torch.zeros(B, Cv, var.patch_nums[-1], var.patch_nums[-1], device=device)
    idx_list: list[Tensor] = []
    cache_dtype = torch.bfloat16 if use_amp else torch.float32
    with var.kv_caching(static_B=2 * B if static_cache or graphs else 0, dtype=cache_dtype):
        for si, pn in enumerate(var.patch_nums):
            ratio = si / (S - 1) if S > 1 else 0.0
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits_2BlV = run_blocks(next_BlC, cond_BD, attn_bias=None)
            if graphs:
                logits_2BlV = logits_2BlV.clone()  # the graph's output buffer is overwritten by the next replay
            b, e = begin_ends[si]
            known = None if known_codes_BL is None else (known_codes_BL[:, b:e], known_mask_BL[:, b:e])
            idx_Bl, filtered_BlV = _draw_scale(logits_2BlV, sampling.guidance * ratio, sampling, generator, known,
                                               record)
            idx_list.append(idx_Bl)
            h_BlCv = _scale_embedding(idx_Bl, filtered_BlV, ratio, sampling, quantizer.embedding, generator, known)
            # the official (B, Cv, pn, pn) view of (B, l, Cv): a transpose, not a copy (Phi sees the same layout)
            h_BChw = h_BlCv.transpose(1, 2).reshape(B, Cv, pn, pn)
            f_hat, next_BCvhw = quantizer.next_autoregressive_input(si, f_hat, h_BChw)
            if si < S - 1:
                with torch.autocast(device_type=device.type, enabled=False):
                    next_BlC = var.word_tokens(next_BCvhw.reshape(B, Cv, -1).transpose(1, 2),
                                               *begin_ends[si + 1]).repeat(2, 1, 1)
    if record is not None:
        record["f_hat"] = [f_hat]
    return torch.cat(idx_list, dim=1)


def _check_devices_and_quantizer(var: NextScalePrior, quantizer, generator: torch.Generator) -> torch.device:
    """The model's device, after checking that the generator lives there and the quantizer matches the model."""
    device = var.pos_start.device
    if generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but the model is on {device}: "
                         f"use torch.Generator(device={device.type!r})")
    patch_nums, V, Cv = var.patch_nums, var.V, var.Cv
    if tuple(quantizer.patch_nums) != tuple(patch_nums) or quantizer.Cv != Cv or quantizer.vocab_size != V:
        raise ValueError(f"the quantizer (patch_nums {tuple(quantizer.patch_nums)}, Cv {quantizer.Cv}, "
                         f"V {quantizer.vocab_size}) does not match the VAR (patch_nums {patch_nums}, Cv {Cv}, V {V})")
    return device


def _draw_scale(logits_2BlV: Tensor, t: float, sampling: SamplingConfig, generator: torch.Generator,
                known: tuple[Tensor, Tensor] | None, record: dict[str, list[Tensor]] | None) -> tuple[Tensor, Tensor]:
    """One scale's codes (B, l) and its filtered logits (B, l, V): guidance weight ``t``, top-k / top-p, one
    multinomial draw per token; ``known`` (codes, mask) of this scale replace the drawn codes where the mask is set."""
    B = logits_2BlV.shape[0] // 2
    guided_BlV = (1 + t) * logits_2BlV[:B] - t * logits_2BlV[B:]
    filtered_BlV = top_k_top_p_filter_(guided_BlV.clone() if record is not None else guided_BlV,
                                       sampling.top_k, sampling.top_p)
    probs_NV = filtered_BlV.softmax(dim=-1).view(-1, filtered_BlV.shape[-1])
    idx_Bl = torch.multinomial(probs_NV, num_samples=1, replacement=True, generator=generator).view(B, -1)
    if known is not None:
        idx_Bl = torch.where(known[1], known[0], idx_Bl)
    if record is not None:
        record.setdefault("logits_raw", []).append(logits_2BlV)
        record.setdefault("logits_guided", []).append(guided_BlV)
        record.setdefault("logits_filtered", []).append(filtered_BlV)
    return idx_Bl, filtered_BlV


def _scale_embedding(idx_Bl: Tensor, filtered_BlV: Tensor, ratio: float, sampling: SamplingConfig,
                     codebook: torch.nn.Embedding, generator: torch.Generator,
                     known: tuple[Tensor, Tensor] | None) -> Tensor:
    """What f_hat takes from a scale (B, l, Cv): the drawn codes' embeddings, or with ``more_smooth`` a
    Gumbel-softmax mixture of the codebook (the known codes kept as they are)."""
    if not sampling.more_smooth:
        return codebook(idx_Bl)
    tau = max(0.27 * (1 - ratio * 0.95), 0.005)  # MaskGIT-style annealing, as the official code
    h_BlCv = gumbel_softmax(filtered_BlV.mul(1 + ratio), tau, generator) @ codebook.weight.unsqueeze(0)
    if known is not None:
        h_BlCv = torch.where(known[1][..., None], codebook(idx_Bl), h_BlCv)
    return h_BlCv


def _graphed_run_blocks(var: NextScalePrior):
    """``var.run_blocks`` compiled for CUDA-graph replay, cached on the model (one compile per model)."""
    if getattr(var, "_graphed_run_blocks", None) is None:
        # one graph per scale: each scale has its own shapes and cache offset (a recompile each), more than
        # dynamo's default limit of 8 for the 10 scales of the 256-px pyramid
        limit = max(4 * len(var.patch_nums), torch._dynamo.config.recompile_limit)
        torch._dynamo.config.recompile_limit = limit
        var._graphed_run_blocks = torch.compile(var.run_blocks, mode="reduce-overhead", dynamic=False)
    return var._graphed_run_blocks


def known_mask_from_pixels(keep_BHW: Tensor, patch_nums: Sequence[int], threshold: float = 0.5) -> Tensor:
    """Token mask (B, L) bool for editing: a token is known where more than ``threshold`` of its area is kept.

    ``keep_BHW`` is 1 where the given image must be kept (e.g. outside an inpainting hole), at any
    resolution; each scale's pn x pn grid averages it by area.
    """
    keep_B1HW = keep_BHW.float().unsqueeze(1)
    masks = [F.adaptive_avg_pool2d(keep_B1HW, (pn, pn)).flatten(1) > threshold for pn in patch_nums]
    return torch.cat(masks, dim=1)
