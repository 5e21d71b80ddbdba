"""Loading a trained prior + tokenizer, and index-addressed sampling shared by pictures and the FID job.

Reproducibility rule: ``sample_codes`` draws from one generator for its whole batch, so an image's
random numbers depend on which images share its batch. The FID job therefore samples fixed *groups*:
group g holds indices [g * group_size, (g + 1) * group_size) and draws from a generator seeded by
(seed, g) alone. Which worker runs a group, and how many groups a Ray batch carries, cannot change an
image; changing ``seed`` or ``group_size`` does (both are part of the sampling protocol).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from nextscale.checkpoint import CheckpointMismatch
from nextscale.eval.config import ModelsConfig, SamplingConfig
from nextscale.eval.features import to_uint8
from nextscale.prior.loader import load_prior
from nextscale.prior.model import NextScalePrior
from nextscale.prior.sample import sample_codes
from nextscale.tokenize.loader import load_tokenizer
from nextscale.tokenize.vqvae import VQVAE

log = logging.getLogger(__name__)


def load_models(cfg: ModelsConfig, device: str | torch.device = "cpu") -> tuple[NextScalePrior, VQVAE]:
    """The prior and tokenizer on ``device``, checked to fit each other."""
    var, _ = load_prior(cfg.prior_url, cfg.prior_preset)
    vqvae, _ = load_tokenizer(cfg.tokenizer_url, preset=cfg.tokenizer_preset)
    vc = vqvae.cfg
    if (tuple(vc.patch_nums), vc.vocab_size, vc.z_channels) != (var.patch_nums, var.V, var.Cv):
        raise CheckpointMismatch(f"the prior {cfg.prior_url} (patch_nums {var.patch_nums}, V {var.V}, Cv {var.Cv}) does not "
                         f"fit the tokenizer {cfg.tokenizer_url} (patch_nums {tuple(vc.patch_nums)}, "
                         f"V {vc.vocab_size}, Cv {vc.z_channels}): use the tokenizer the prior was trained with")
    return var.to(device), vqvae.to(device)


def seeded_generator(device: torch.device | str, *key: int) -> torch.Generator:
    """A generator on ``device`` seeded from the integers ``key`` (e.g. (seed, group)) via numpy's SeedSequence."""
    seed = int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device=torch.device(device).type).manual_seed(seed)


@torch.no_grad()
def sample_batch(var: NextScalePrior, vqvae: VQVAE, labels: Sequence[int] | Tensor, generator: torch.Generator,
                 sampling: SamplingConfig, *, known_codes_BL: Tensor | None = None,
                 known_mask_BL: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(codes (B, L) int64, images uint8 (B, 3, H, W)) for ``labels``, all on the model's device.

    Images are ``vqvae.decode(codes)`` rounded to uint8 as the PNG path does; with ``sampling.more_smooth`` they are
    decoded from the sampler's soft f_hat instead (its ``record`` also keeps every scale's logits, which
    is why the plain path does not ask for it).
    """
    device = var.pos_start.device
    label_B = torch.as_tensor(labels, dtype=torch.long, device=device)
    record: dict[str, list[Tensor]] | None = {} if sampling.more_smooth else None
    codes_BL = sample_codes(var, vqvae.quantize, label_B, generator=generator, sampling=sampling,
                            known_codes_BL=known_codes_BL, known_mask_BL=known_mask_BL, record=record)
    img = vqvae.fhat_to_img(record["f_hat"][0]) if record is not None else vqvae.decode(codes_BL)
    return codes_BL, to_uint8(img.add(1).mul(0.5))


def group_indices(group: int, group_size: int, num_samples: int) -> range:
    return range(group * group_size, min((group + 1) * group_size, num_samples))
