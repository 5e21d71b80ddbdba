"""The fast paths against the plain path on the CPU (fp32, same weights and inputs; tolerances in
``nextscale.levers``, restated here): FlexAttention, torch.compile, chunked cross-entropy, the static
KV cache, H2D prefetch, channels-last / bf16 VQVAE. ``scripts/gpu_check.py`` runs the same checks on CUDA."""

from __future__ import annotations

import golden_rule as gr
import pytest
import torch
import torch.nn.functional as F

from nextscale import levers
from nextscale.prior.loss import head_cross_entropy
from nextscale.prior.model import cached_block_mask
from nextscale.prior.var import VAR
from nextscale.tokenize.loader import load_official_vqvae
from nextscale.tokenize.vqvae import build_vqvae

pytestmark = pytest.mark.usefixtures("one_thread")


def test_flex_attention_forward_equals_sdpa_and_its_mask_is_built_once():
    out = levers.check_flex("cpu", preset="debug")
    assert out["tol"] == levers.FP32_TOL and out["logits"] <= levers.FP32_TOL and out["ok"]
    pn = (1, 2, 3, 4, 5, 6, 8, 10, 13)
    assert cached_block_mask(VAR.attends, pn, 424, "cpu") is cached_block_mask(VAR.attends, pn, 424, "cpu")
    # 128-blocks of a 424-token pyramid: query block 0 (scales 0-6) never sees key blocks 2-3 (scale 8)
    assert cached_block_mask(VAR.attends, pn, 424, "cpu").sparsity() > 0


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_chunked_cross_entropy_equals_full_logits(chunk):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50)
    h_NC = torch.randn(23, 16, requires_grad=True)
    target_N = torch.randint(0, 50, (23,))
    ref = F.cross_entropy(head(h_NC).float(), target_N, label_smoothing=0.1)
    ref_grads = torch.autograd.grad(ref, [h_NC, head.weight, head.bias])
    loss, pred_N = head_cross_entropy(head, h_NC, target_N, chunk=chunk, label_smoothing=0.1)
    grads = torch.autograd.grad(loss, [h_NC, head.weight, head.bias])
    assert abs(float(loss.detach() - ref.detach())) <= levers.FP32_TOL
    assert all(float((g - r).abs().max() / r.abs().max()) <= levers.FP32_TOL for g, r in zip(grads, ref_grads))
    assert torch.equal(pred_N, head(h_NC).argmax(-1))


def test_chunked_loss_in_the_training_step_equals_the_plain_step():
    out = levers.check_chunked_ce("cpu")
    assert out["tol"] == levers.FP32_TOL and out["predictions_equal"] and out["ok"], out


def test_static_kv_cache_sampler_gives_todays_tokens():
    out = levers.check_static_cache("cpu")
    assert out["tokens_equal"] and out["raw_logits"] <= levers.FP32_TOL and out["ok"], out


def test_prefetcher_hands_out_the_same_batches_and_the_consumed_position():
    assert levers.check_prefetch("cpu")["ok"]


def test_compiled_training_step_equals_eager():
    out = levers.check_compile("cpu")
    assert out["tol"] == levers.KERNEL_TOL and out["logits"] <= out["tol"] and out["grads_rel"] <= out["tol"], out


@pytest.mark.parametrize("which", ["golden_tiny", "demo"])
def test_channels_last_and_bf16_vqvae(which):
    """Channels-last keeps fp32 images within 1e-4 and the codes; bf16 encode agrees with fp32 on most codes
    (reported, never the default: the golden tokenizer's figure is in the closing note of issue 17)."""
    if which == "golden_tiny":
        vqvae = load_official_vqvae(gr.rule_state_dict(gr.official_param_shapes("vqvae"), gr.VQVAE_SEED_BASE),
                                    "golden_tiny")
        img = torch.from_numpy(gr.load("input_images.npy"))
    else:
        torch.manual_seed(0)
        vqvae = build_vqvae("demo")
        img = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = levers.check_vqvae(vqvae, img)
    assert out["ok"] and out["channels_last_index_agreement"] == 1.0, out
    assert out["bf16_index_agreement"] > 0.8 and out["bf16_decode_max_abs"] < 0.2, out
    assert vqvae.memory_format == torch.contiguous_format  # left as given


def test_channels_last_code_encoder_gives_the_default_codes():
    """The tokenize job's ``channels_last`` switch (CodeEncoder) keeps the codes of the default layout here."""
    from nextscale.tokenize.encode import CodeEncoder

    views = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    plain, nhwc = (CodeEncoder("demo", preset="demo", device="cpu", channels_last=cl) for cl in (False, True))
    assert nhwc.model.memory_format == torch.channels_last
    assert (plain.encode_views(views.numpy()) == nhwc.encode_views(views.numpy())).all()
