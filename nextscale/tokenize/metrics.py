"""Tokenizer quality: reconstruction PSNR, codebook usage, and fp32 vs mixed-precision index agreement."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from nextscale.tokenize.scales import scale_slices
from nextscale.tokenize.vqvae import VQVAE


def psnr_db(rec_B3HW: Tensor, img_B3HW: Tensor) -> Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2, i.e. the usual PSNR on [0, 1] pixels)."""
    mse = (rec_B3HW.float().clamp(-1, 1) - img_B3HW.float()).square().flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))


@torch.no_grad()
def evaluate_reconstruction(model: VQVAE, batches: Iterable[Tensor], device: torch.device | str = "cpu") -> dict:
    """Encode + decode every batch: mean PSNR (dB), L1, codebook usage overall and per scale, dead codes."""
    V, S = model.cfg.vocab_size, len(model.cfg.patch_nums)
    hits_SV = torch.zeros(S, V, dtype=torch.long)
    psnrs, l1s = [], []
    was_training = model.training
    model.eval()
    for img in batches:
        img = img.to(device)
        codes = model.encode(img)
        rec = model.decode(codes)
        psnrs.append(psnr_db(rec, img).cpu())
        l1s.append((rec - img).abs().flatten(1).mean(1).cpu())
        for si, (b, e) in enumerate(scale_slices(model.cfg.patch_nums)):
            hits_SV[si] += codes[:, b:e].reshape(-1).bincount(minlength=V).cpu()
    model.train(was_training)
    used_V = hits_SV.sum(0) > 0
    return {
        "psnr_db": float(torch.cat(psnrs).mean()),
        "l1": float(torch.cat(l1s).mean()),
        "images": int(sum(len(p) for p in psnrs)),
        "codebook_usage": float(used_V.float().mean()),
        "dead_codes": int((~used_V).sum()),
        "codebook_usage_per_scale": [float((h > 0).float().mean()) for h in hits_SV],
    }


@torch.no_grad()
def index_agreement(model: VQVAE, batches: Iterable[Tensor], amp_dtype: torch.dtype = torch.bfloat16,
                    device: torch.device | str = "cpu") -> dict:
    """Share of codes from the ``amp_dtype`` encoder path that equal the fp32 codes, overall and per scale."""
    S = len(model.cfg.patch_nums)
    same_S, total_S = torch.zeros(S), torch.zeros(S)
    model.eval()
    for img in batches:
        img = img.to(device)
        ref, fast = model.encode(img), model.encode(img, amp_dtype=amp_dtype)
        for si, (b, e) in enumerate(scale_slices(model.cfg.patch_nums)):
            same_S[si] += (ref[:, b:e] == fast[:, b:e]).sum().cpu()
            total_S[si] += ref[:, b:e].numel()
    return {
        "agreement": float(same_S.sum() / total_S.sum()),
        "agreement_per_scale": [float(s / t) for s, t in zip(same_S, total_S)],
        "first_scale_agreement": float(same_S[0] / total_S[0]),
    }
