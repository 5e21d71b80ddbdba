"""A model family is a plug-in (docs/architecture.md, "Where to add a model family"): a toy third family, defined
and registered here, trains, checkpoints and resumes, samples, converts and reports FLOPs through the
ordinary stages with no change to nextscale/."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from prior_codes import write_codes
from torch import Tensor, nn

from nextscale.config import load_config
from nextscale.eval.config import SampleConfig
from nextscale.pipelines import sample, train
from nextscale.prior import families
from nextscale.prior.config import PriorTrainConfig
from nextscale.prior.engine import train_prior
from nextscale.prior.loader import CheckpointMismatch, load_official_var, load_prior, matching_preset
from nextscale.prior.model import (
    FFN,
    ModelFamily,
    NextScalePrior,
    SelfAttention,
    VARConfig,
    dense_block_flops,
    shared_flops,
)
from nextscale.prior.sample import sample_codes
from nextscale.runtime import LocalContext
from nextscale.tokenize.loader import load_tokenizer, save_tokenizer
from nextscale.tokenize.scales import split_codes
from nextscale.tokenize.vqvae import build_vqvae

pytestmark = pytest.mark.usefixtures("one_thread")


# --- the toy family: a scale attends to itself and to the scale just before it -----------------------------


class PrevScaleAttention(SelfAttention):
    """Teacher forcing: the family's mask does it. Sampling: the keys and values of the previous scale only."""

    def forward(self, x_BlC: Tensor, attn_bias: Tensor | None, block_mask=None) -> Tensor:
        if not self.caching:
            return super().forward(x_BlC, attn_bias, block_mask)
        B, l, C = x_BlC.shape
        q, k, v = self.qkv(x_BlC)
        k_all = k if self.cached_k is None else torch.cat((self.cached_k, k), dim=2)
        v_all = v if self.cached_v is None else torch.cat((self.cached_v, v), dim=2)
        self.cached_k, self.cached_v = k, v  # the next scale sees this one, no earlier ones
        out = F.scaled_dot_product_attention(q, k_all, v_all, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(B, l, C))


class ToyBlock(nn.Module):
    num_branches, static_kv_cache = 2, False

    def __init__(self, cfg: VARConfig, drop_path: float):
        super().__init__()
        C = self.C = cfg.width
        self.attn = PrevScaleAttention(C, cfg.heads, cfg.attn_l2_norm)
        self.ffn = FFN(C, round(C * cfg.mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(C, eps=cfg.norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.layer_scale = nn.Parameter(torch.ones(C))  # the family's own key: its checkpoints are told apart

    def incremental(self, enable: bool, static_kv: Tensor | None = None) -> None:
        self.attn.kv_caching(enable)

    def forward(self, x: Tensor, cond: Tensor, attn_bias: Tensor | None, block_mask=None) -> Tensor:
        g1, g2, s1, s2, h1, h2 = self.ada_lin(cond).view(-1, 1, 6, self.C).unbind(2)
        x = x + self.attn(self.ln_wo_grad(x).mul(s1.add(1)).add_(h1), attn_bias, block_mask).mul(g1 * self.layer_scale)
        return x + self.ffn(self.ln_wo_grad(x).mul(s2.add(1)).add_(h2)).mul(g2)


class Toy(NextScalePrior):
    block_class = ToyBlock

    @staticmethod
    def attends(lvl_q: Tensor, lvl_kv: Tensor) -> Tensor:
        return (lvl_kv == lvl_q) | (lvl_kv == lvl_q - 1)


def toy_flops(cfg: VARConfig, training: bool = True) -> float:
    pn2 = [pn * pn for pn in cfg.patch_nums]
    seen = sum(n * (n + prev) for n, prev in zip(pn2, [0, *pn2]))  # keys per query: its scale and the one before
    forward = (dense_block_flops(cfg) * cfg.num_tokens * cfg.depth + 4 * seen * cfg.width * cfg.depth
               + shared_flops(cfg, ToyBlock.num_branches))
    return float(3 * forward if training else forward)


TOY = ModelFamily(name="toy", title="a toy prior", config=VARConfig, model=Toy, flops_per_image=toy_flops,
                  presets={"toy_tiny": VARConfig(arch="toy", depth=2, embed_dim=64, num_heads=2, num_classes=10,
                                                 vocab_size=64, latent_channels=8, patch_nums=(1, 2, 3, 4),
                                                 drop_path_rate=0.0, init_adaln_gamma=0.5)},
                  signature=("attn.mat_qkv.weight", "layer_scale", "ffn.fc1.weight"))


# --- through the stages ---------------------------------------------------------------------------------


@pytest.fixture
def toy_family():
    families.register(TOY)
    yield
    del families.FAMILIES["toy"], families.PRESETS["toy_tiny"]


class CrashAfterFirstCheckpoint(LocalContext):
    def report(self, metrics, checkpoint_dir=None):
        super().report(metrics, checkpoint_dir)
        if checkpoint_dir is not None:
            raise KeyboardInterrupt("simulated crash")


def test_a_toy_family_goes_through_every_stage(toy_family, tmp_path):
    torch.manual_seed(0)
    tok = str(tmp_path / "tokenizer.pt")
    save_tokenizer(build_vqvae("golden_tiny"), tok)
    codes = write_codes(str(tmp_path / "codes"), tok, num_samples=16, views=1, seed=0)

    def cfg(out: str) -> PriorTrainConfig:
        return load_config(PriorTrainConfig, None, [f"data.url={codes}", "data.batch_size=8", "model.preset=toy_tiny",
                                                    "steps=2", "log_every=1", "ckpt_every=1", "sample_every=2",
                                                    f"output={tmp_path / out}", "workers.count=0"])

    # train two steps with the train-prior driver; killed after the first checkpoint, resumed: the same weights
    straight = train.run_prior(cfg("straight"))
    with pytest.raises(KeyboardInterrupt):
        train_prior(cfg("resumed"), CrashAfterFirstCheckpoint(str(tmp_path / "resumed")))
    resumed = train.run_prior(cfg("resumed"))
    assert (straight["steps"], resumed["steps_trained"]) == (2, 1)
    (prior, _), (prior_again, _) = load_prior(straight["prior_url"]), load_prior(resumed["prior_url"])
    assert isinstance(prior, Toy) and all(torch.equal(a, b) for a, b in zip(prior.state_dict().values(),
                                                                              prior_again.state_dict().values()))
    # FLOPs (and so MFU) are the family's own
    assert straight["gflops_per_image"] == toy_flops(prior.cfg) / 1e9 == families.flops_per_image(prior.cfg) / 1e9

    # the sampler's incremental state (only the previous scale's keys) gives the teacher-forced logits
    quantizer = load_tokenizer(tok)[0].quantize
    record: dict[str, list[Tensor]] = {}
    codes_BL = sample_codes(prior, quantizer, torch.tensor([1, 2]), generator=torch.Generator().manual_seed(0),
                            record=record)
    logits_BLV = prior(torch.tensor([1, 2]), quantizer.teacher_forcing_input(split_codes(codes_BL, prior.patch_nums)))
    sampled = torch.cat([logits[:2] for logits in record["logits_raw"]], dim=1)
    assert torch.allclose(sampled, logits_BLV, atol=1e-5)

    # the sample stage and the training pictures draw with it
    pictures = sample.run(load_config(SampleConfig, None, [
        f"models.prior_url={straight['prior_url']}", f"models.tokenizer_url={tok}", "classes=0,1",
        "samples_per_class=2", "coarse_to_fine=1", f"output={tmp_path / 'sample'}", "device=cpu"]))
    assert set(pictures["pictures"]) == {"grid", "coarse_to_fine"}
    assert (tmp_path / "straight" / "samples" / "step-00000002.png").exists()

    # official-format state dicts: a round trip, the preset told from the keys, another family's preset refused
    state_dict = {k: v.clone() for k, v in prior.state_dict().items()}
    assert matching_preset(state_dict) == "toy_tiny"
    assert all(torch.equal(v, state_dict[k]) for k, v in load_official_var(state_dict, prior.cfg).state_dict().items())
    with pytest.raises(CheckpointMismatch, match="looks like a toy prior toy_tiny"):
        load_official_var(state_dict, "golden_tiny")
    assert json.loads((tmp_path / "straight" / "train_summary.json").read_text())["num_params"] == \
        families.num_params(prior.cfg)
