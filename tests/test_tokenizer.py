"""Tokenizer: layout helpers, presets, official key table, quantiser invariants, encode/decode, training."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from golden_rule import GOLDEN, VQVAE_SEED_BASE, official_param_shapes, rule_state_dict

from nextscale import checkpoint
from nextscale.config import ConfigError, load_config, to_dict
from nextscale.images import accepted_images, list_image_folder
from nextscale.runtime import LocalContext
from nextscale.tokenize.config import TokenizerTrainConfig
from nextscale.tokenize.data import ImageFolderDataset
from nextscale.tokenize.loader import (
    CheckpointMismatch,
    check_state_dict,
    load_official_vqvae,
    load_tokenizer,
    save_tokenizer,
    weights_sha256,
)
from nextscale.tokenize.metrics import evaluate_reconstruction, index_agreement
from nextscale.tokenize.scales import num_tokens, phi_index_table, scale_slices, split_codes
from nextscale.tokenize.train import train_tokenizer
from nextscale.tokenize.vqvae import VQVAE_PRESETS, build_vqvae

REPO = Path(__file__).resolve().parent.parent
EXPECTED = {  # preset: (image side, latent side, L, V, Cv)
    "vae_ch160v4096z32": (256, 16, 680, 4096, 32),
    "vae_ch160v4096z32_512": (512, 32, 2240, 4096, 32),  # pairs with var_d36
    "golden_tiny": (64, 4, 30, 64, 8),
    "demo": (32, 8, 130, 512, 16),
    "rehearsal": (16, 4, 30, 256, 8),
}


# ------------------------------------------------------------------------------------------------
# scales.py


def test_layout_helpers():
    pns = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    assert num_tokens(pns) == 680
    sl = scale_slices(pns)
    assert sl[0] == (0, 1) and sl[1] == (1, 5) and sl[-1] == (424, 680)
    codes = torch.randint(0, 4096, (3, 680))
    parts = split_codes(codes, pns)
    assert [p.shape for p in parts] == [(3, pn * pn) for pn in pns]
    assert torch.equal(torch.cat(parts, dim=1), codes)
    with pytest.raises(ValueError, match=r"\(B, 680\)"):
        split_codes(codes[:, :-1], pns)


def test_phi_table():
    assert phi_index_table(10, 4) == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert phi_index_table(4, 4) == [0, 1, 2, 3]
    assert phi_index_table(6, 4) == [0, 0, 1, 2, 3, 3]  # r = 0, .2, .4, .6, .8, 1 vs ticks 1/12, 13/36, 23/36, 11/12
    assert phi_index_table(10, 1) == [0] * 10
    assert phi_index_table(10, 10) == list(range(10))  # non-shared: one Phi per scale
    with torch.device("meta"):
        assert build_vqvae("vae_ch160v4096z32").quantize.phi_idx == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]


# ------------------------------------------------------------------------------------------------
# presets and the official key table


@pytest.mark.parametrize("preset", sorted(VQVAE_PRESETS))
def test_preset_shapes(preset):
    side, latent, L, V, Cv = EXPECTED[preset]
    cfg = VQVAE_PRESETS[preset]
    assert (cfg.image_size, cfg.latent_size, cfg.num_tokens, cfg.vocab_size, cfg.z_channels) == (side, latent, L, V, Cv)
    with torch.device("meta"):
        vae = build_vqvae(preset)
        img = torch.empty(2, 3, side, side)
        f = vae.encode_latent(img)
        codes = vae.encode(img)
        idx = split_codes(codes, cfg.patch_nums)
        tf = vae.quantize.teacher_forcing_input(idx)
        rec = vae.decode(codes)
        rec2 = vae.decode(codes, num_scales=2)
    assert f.shape == (2, Cv, latent, latent) and f.dtype == torch.float32
    assert codes.shape == (2, L) and codes.dtype == torch.int64
    assert tf.shape == (2, L - 1, Cv) and tf.dtype == torch.float32
    assert rec.shape == rec2.shape == (2, 3, side, side)


def test_official_key_table_loads_strictly():
    table = json.loads((GOLDEN / "official_keys_vae_ch160v4096z32.json").read_text())
    with torch.device("meta"):
        vae = build_vqvae("vae_ch160v4096z32")
        sd = {k: torch.empty(shape) for k, shape in table.items()}
    mine = {k: list(v.shape) for k, v in vae.state_dict().items()}
    assert mine == table and list(mine) == list(table)  # same names, shapes and order (324 entries)
    assert sum(p.numel() for p in vae.parameters()) == 108_948_355
    vae.load_state_dict(check_state_dict(sd, vae, "vae_ch160v4096z32"), strict=True)
    # the usage buffer is optional (official behaviour): absent or of another shape, the model's own is kept
    no_buffer = {k: v for k, v in sd.items() if k != "quantize.ema_vocab_hit_SV"}
    assert "quantize.ema_vocab_hit_SV" in check_state_dict(no_buffer, vae)


@pytest.mark.parametrize("change, message", [
    ("drop", "missing key decoder.up.3.block.0.nin_shortcut.weight (expected shape [320, 640, 1, 1]): "
             "is this a vae_ch160v4096z32 checkpoint?"),
    ("shape", "key decoder.up.3.block.0.nin_shortcut.weight has shape [320, 640, 3, 3], expected [320, 640, 1, 1]"),
    ("extra", "unexpected key decoder.up.3.block.0.extra.weight"),
])
def test_wrong_state_dict_names_the_key(change, message):
    table = json.loads((GOLDEN / "official_keys_vae_ch160v4096z32.json").read_text())
    key = "decoder.up.3.block.0.nin_shortcut.weight"
    with torch.device("meta"):
        vae = build_vqvae("vae_ch160v4096z32")
        sd = {k: torch.empty(shape) for k, shape in table.items()}
        if change == "drop":
            del sd[key]
        elif change == "shape":
            sd[key] = torch.empty(320, 640, 3, 3)
        else:
            sd["decoder.up.3.block.0.extra.weight"] = torch.empty(1)
    with pytest.raises(CheckpointMismatch) as e:
        check_state_dict(sd, vae, "vae_ch160v4096z32")
    assert message in str(e.value)


def test_official_file_and_tokenizer_file_round_trip(tmp_path):
    sd = rule_state_dict(official_param_shapes("vqvae"), VQVAE_SEED_BASE)
    torch.save(sd, tmp_path / "official.pth")
    vae = load_official_vqvae(str(tmp_path / "official.pth"), "golden_tiny")
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    assert torch.equal(vae.quantize.embedding.weight, sd["quantize.embedding.weight"])
    with pytest.raises(CheckpointMismatch, match="is this a vae_ch160v4096z32 checkpoint"):
        load_official_vqvae(str(tmp_path / "official.pth"))  # tiny weights into the full-size preset
    # load_tokenizer also reads official files (given the preset)
    again, _ = load_tokenizer(str(tmp_path / "official.pth"), preset="golden_tiny")
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), again.state_dict().values()))


def test_one_tokenizer_loader_for_paths_bytes_presets_and_the_meta_device(tmp_path):
    trained = build_vqvae("golden_tiny")
    save_tokenizer(trained, str(tmp_path / "tokenizer.pt"))
    data = (tmp_path / "tokenizer.pt").read_bytes()
    from_path, ident = load_tokenizer(str(tmp_path / "tokenizer.pt"))
    from_bytes, ident_b = load_tokenizer(data, name="somewhere/tokenizer.pt")
    assert ident == {"url": str(tmp_path / "tokenizer.pt"), "kind": "file", "preset": "vae_ch160v4096z32",
                     "sha256": hashlib.sha256(data).hexdigest(), "config": to_dict(trained.cfg)}
    assert ident_b == {**ident, "url": "somewhere/tokenizer.pt"}
    for model in (from_path, from_bytes):
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), model.state_dict().values()))
    # the architecture alone (what a driver needs), checked against the file without loading weights
    meta, ident_m = load_tokenizer(data, name="t.pt", device="meta")
    assert meta.cfg == trained.cfg and meta.quantize.embedding.weight.is_meta and ident_m["sha256"] == ident["sha256"]
    # a preset: seeded random weights, the same in every process, the caller's RNG untouched
    state = torch.get_rng_state()
    a, ident_a = load_tokenizer("golden_tiny", seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    b, _ = load_tokenizer("golden_tiny", seed=3)
    assert ident_a["kind"] == "random_init" and ident_a["sha256"] == weights_sha256(b) == weights_sha256(a)
    assert ident_a["sha256"] != load_tokenizer("golden_tiny", seed=4)[1]["sha256"]


@pytest.mark.parametrize("content, why", [
    (b"", "empty or truncated"),
    (b"just some text", "not a PyTorch checkpoint"),
    ("truncated", "damaged or truncated"),
    ("pickled object", "holds objects a nextscale checkpoint never holds"),
])
def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path, content, why):
    path = tmp_path / "weights.bin"
    if content == "truncated":
        torch.save({"w": torch.zeros(4)}, path)
        content = path.read_bytes()[:200]
    elif content == "pickled object":
        torch.save({"w": torch.zeros(4), "cfg": argparse.Namespace(depth=16)}, path)
        content = path.read_bytes()
    path.write_bytes(content)
    with pytest.raises((CheckpointMismatch, checkpoint.CheckpointError)) as e:
        load_tokenizer(str(path), preset="golden_tiny")
    assert f"tokenizer {path}" in str(e.value) and why in str(e.value)
    assert "weights_only" not in str(e.value)  # never advise unpickling a file that may run code
    with pytest.raises(FileNotFoundError, match="does not exist: give a tokenizer.pt"):
        load_tokenizer(str(tmp_path / "missing.pt"))


# ------------------------------------------------------------------------------------------------
# quantiser invariants and encode/decode


@pytest.fixture(scope="module")
def tiny():
    """golden_tiny with rule weights, and two smooth images."""
    vae = load_official_vqvae(rule_state_dict(official_param_shapes("vqvae"), VQVAE_SEED_BASE), "golden_tiny")
    img = torch.from_numpy(np.load(GOLDEN / "input_images.npy"))
    return vae, img


def test_contributions_sum_to_quantized_latent(tiny):
    vae, img = tiny
    q = vae.quantize
    with torch.no_grad():
        f = vae.encode_latent(img)
        idx = q.f_to_idx(f)
        total = torch.zeros_like(f)
        for si, pn in enumerate(q.patch_nums):
            h = q.embedding(idx[si]).transpose(1, 2).reshape(2, q.Cv, pn, pn)
            if pn != q.patch_nums[-1]:
                h = F.interpolate(h, size=f.shape[-2:], mode="bicubic", align_corners=False)
            total += q.phi(si)(h)
        f_hats = q.idx_to_fhat(idx)
        f_hat_train, vq_loss, hits = q(f)  # training forward (module is in eval: no usage update)
    assert torch.allclose(total, f_hats[-1], atol=1e-6)
    assert torch.allclose(f_hat_train, f_hats[-1], atol=1e-6)
    assert int(hits.sum()) == 2 * num_tokens(q.patch_nums)
    # each extra scale moves f_hat closer to f (residual quantisation)
    errs = [float((fh - f).square().mean()) for fh in f_hats]
    assert errs[-1] < errs[0]
    expected = sum(0.25 * (fh - f).square().mean() + (fh - f).square().mean() for fh in f_hats) / len(f_hats)
    assert torch.allclose(vq_loss, expected, rtol=1e-5)


def test_training_forward_gradients():
    torch.manual_seed(0)
    vae = build_vqvae("golden_tiny").train()
    img = torch.rand(2, 3, 64, 64) * 2 - 1
    rec, vq_loss, hits = vae(img)
    assert rec.shape == img.shape and vq_loss.ndim == 0 and hits.shape == (64,)
    (rec.square().mean() + vq_loss).backward()
    # straight-through: the encoder gets gradients from the reconstruction; codebook and Phi from the vq loss
    for name in ("encoder.conv_in.weight", "quantize.embedding.weight", "quantize.quant_resi.qresi_ls.0.weight",
                 "decoder.conv_out.weight"):
        assert vae.get_parameter(name).grad.abs().sum() > 0, name
    assert vae.quantize.ema_vocab_hit_SV.sum() > 0  # usage statistics updated in training mode


def test_encode_is_deterministic_and_decode_prefixes(tiny):
    vae, img = tiny
    codes = vae.encode(img)
    assert torch.equal(codes, vae.encode(img.clone()))
    assert int(codes.min()) >= 0 and int(codes.max()) < 64
    partial = vae.decode_scales(codes)
    for k, (_, end) in enumerate(scale_slices(vae.cfg.patch_nums), start=1):
        a = vae.decode(codes, num_scales=k)
        assert torch.equal(a, vae.decode(codes[:, :end]))  # a prefix of whole scales decodes the same
        assert torch.allclose(a, partial[k - 1], atol=1e-6)
    assert torch.equal(vae.decode(codes.to(torch.int32)), vae.decode(codes))  # uint16-style storage is fine
    assert float(vae.decode(codes).abs().max()) <= 1.0
    with pytest.raises(ValueError, match="whole scales"):
        vae.decode(codes[:, :7])
    with pytest.raises(ValueError, match="num_scales=5"):
        vae.decode(codes, num_scales=5)
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\)"):
        vae.encode(img[:, :, :32, :32])


def test_bf16_encode_path(tiny):
    vae, img = tiny
    fast = vae.encode(img, amp_dtype=torch.bfloat16)
    assert fast.shape == (2, 30) and fast.dtype == torch.int64
    assert vae.encode_latent(img, amp_dtype=torch.bfloat16).dtype == torch.float32
    agree = index_agreement(vae, [img])
    assert 0.0 <= agree["agreement"] <= 1.0 and len(agree["agreement_per_scale"]) == 4
    assert agree["agreement"] == pytest.approx(float((fast == vae.encode(img)).float().mean()))


def test_vae_256_on_real_photos(shared_data):
    root = str(shared_data / "imagenet-sample")
    items = accepted_images(list_image_folder(root)[0], root)[:2]
    ds = ImageFolderDataset(items, 256, train=False)
    img = torch.stack([ds[0], ds[1]])
    assert img.shape == (2, 3, 256, 256) and -1.0 <= float(img.min()) and float(img.max()) <= 1.0
    with torch.device("meta"):  # skip the slow default init of 109 M parameters; fan-in scaled normals instead
        vae = build_vqvae("vae_ch160v4096z32")
    vae = vae.to_empty(device="cpu").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, p[0].numel() ** -0.5, generator=g)
            else:
                p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
        vae.quantize.ema_vocab_hit_SV.zero_()
    codes = vae.encode(img)
    assert codes.shape == (2, 680) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < 4096 and len(codes.unique()) > 1
    rec = vae.decode(codes[:1, : num_tokens((1, 2, 3))])
    assert rec.shape == (1, 3, 256, 256) and float(rec.abs().max()) <= 1.0


# ------------------------------------------------------------------------------------------------
# training


def test_demo_config_loads():
    cfg = load_config(TokenizerTrainConfig, "tokenizer_demo")
    assert cfg.vqvae_config().image_size == 32 and cfg.vqvae_config().num_tokens == 130
    cfg = load_config(TokenizerTrainConfig, "tokenizer_demo", ["model.overrides.vocab_size=64"])
    assert cfg.vqvae_config().vocab_size == 64 and cfg.model.overrides == {"ch": 16, "vocab_size": 64}
    with pytest.raises(ConfigError, match="model.overrides.vocab"):
        load_config(TokenizerTrainConfig, None, ["model.overrides.vocab=64"])
    with pytest.raises(ConfigError, match="data.image_size=64"):
        load_config(TokenizerTrainConfig, None, ["data.image_size=64"])
    with pytest.raises(ConfigError, match="perceptual_weights_url"):
        load_config(TokenizerTrainConfig, None, ["loss.perceptual=1"])


@pytest.fixture(scope="module")
def small_images(tmp_path_factory):
    from nextscale.demo_data import make_demo_data

    root = tmp_path_factory.mktemp("demo")
    make_demo_data(str(root), counts={"train": 4, "val": 2})
    return root


def _tiny_cfg(root: Path, out: Path, *extra: str) -> TokenizerTrainConfig:
    return load_config(TokenizerTrainConfig, None, [
        f"data.url={root}/train", f"data.val_url={root}/val", "data.batch_size=8", "data.loader_processes=0",
        # a 16-px model small enough for a few seconds of CPU (latent 4x4, 3 scales)
        "model.overrides.image_size=16", "model.overrides.patch_nums=1,2,4", "model.overrides.vocab_size=32",
        "model.overrides.z_channels=8", "model.overrides.using_sa=false",
        "optim.lr=3e-3", "optim.betas=0.9,0.99", "optim.warmup=5", "ema_decay=0.9", f"output={out}", *extra,
    ])


def test_tiny_tokenizer_learns(small_images, tmp_path):
    torch.manual_seed(0)
    cfg = _tiny_cfg(small_images, tmp_path / "run", "optim.steps=60", "log_every=20", "ckpt_every=60",
                    "loss.dead_code_restart_every=20")
    val = ImageFolderDataset(accepted_images(list_image_folder(f"{small_images}/val")[0], ""), 16, train=False)
    batch = [torch.stack([val[i] for i in range(len(val))])]
    torch.manual_seed(cfg.seed)
    before = evaluate_reconstruction(build_vqvae(cfg.vqvae_config()), batch)
    summary = train_tokenizer(cfg, LocalContext(cfg.output))
    after = json.loads((tmp_path / "run" / "tokenizer_eval.json").read_text())
    assert summary["steps"] == 60 and after["images"] == 20
    # measured: PSNR 11.8 -> 14.8 dB, L1 0.394 -> 0.291 on the held-out images
    assert after["l1"] < 0.8 * before["l1"] and after["psnr_db"] > before["psnr_db"] + 2.5
    vae, _ = load_tokenizer(str(tmp_path / "run" / "tokenizer.pt"))
    assert vae.cfg == cfg.vqvae_config()
    assert evaluate_reconstruction(vae, batch)["psnr_db"] == pytest.approx(after["psnr_db"], abs=1e-4)
    assert (tmp_path / "run" / "config.yaml").exists()


class _Crash(RuntimeError):
    pass


class _CrashAfterCheckpoint(LocalContext):
    """Persists the first checkpoint, then dies (a preempted worker)."""

    def report(self, metrics, checkpoint_dir=None):
        super().report(metrics, checkpoint_dir)
        if checkpoint_dir is not None:
            raise _Crash


def test_resume_from_checkpoint_matches_uninterrupted(small_images, tmp_path):
    args = ("optim.steps=12", "log_every=3", "ckpt_every=6", "loss.dead_code_restart_every=4",
            "loss.dead_code_threshold=0.5")
    straight = _tiny_cfg(small_images, tmp_path / "a", *args)
    train_tokenizer(straight, LocalContext(straight.output))
    resumed = _tiny_cfg(small_images, tmp_path / "b", *args)
    with pytest.raises(_Crash):
        train_tokenizer(resumed, _CrashAfterCheckpoint(resumed.output))
    assert (tmp_path / "b" / "checkpoints" / "step-00000006" / "COMMITTED").exists()
    assert not (tmp_path / "b" / "tokenizer.pt").exists()
    summary = train_tokenizer(resumed, LocalContext(resumed.output))
    assert summary["steps"] == 12
    a = load_tokenizer(str(tmp_path / "a" / "tokenizer.pt"))[0].state_dict()
    b = load_tokenizer(str(tmp_path / "b" / "tokenizer.pt"))[0].state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_gan_path_trains_and_resumes(small_images, tmp_path):
    """The discriminator starts at disc_start, its state is checkpointed, and training resumes with it."""
    cfg = _tiny_cfg(small_images, tmp_path / "gan", "optim.steps=4", "log_every=2", "ckpt_every=2",
                    "loss.disc=0.5", "loss.disc_start=2", "loss.disc_channels=32", "loss.disc_layers=2")
    with pytest.raises(_Crash):
        train_tokenizer(cfg, _CrashAfterCheckpoint(cfg.output))
    summary = train_tokenizer(cfg, LocalContext(cfg.output))
    assert summary["steps"] == 4
    state = checkpoint.load(str(tmp_path / "gan" / "checkpoints" / "step-00000004"))
    assert state["disc"] is not None and state["step"] == 4


def test_losses(tmp_path):
    from torchvision.models import vgg16

    from nextscale.tokenize.losses import PatchDiscriminator, Perceptual, adaptive_weight, hinge_d_loss

    disc = PatchDiscriminator(channels=32, num_layers=2)
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    logits = disc(img)
    assert logits.shape == (2, 1, 6, 6)
    assert float(hinge_d_loss(torch.full((2,), 2.0), torch.full((2,), -2.0))) == 0.0
    w = torch.nn.Parameter(torch.randn(3, 3))
    out = img[:, :, :3, :3].mean((0, 1)) @ w
    assert float(adaptive_weight(out.square().mean(), -out.mean(), w)) > 0
    features = {f"features.{k}": v for k, v in vgg16(weights=None).features.state_dict().items()}
    torch.save(features, tmp_path / "vgg.pt")
    perceptual = Perceptual(str(tmp_path / "vgg.pt"))
    assert float(perceptual(img, img)) == 0.0 and float(perceptual(img, -img)) > 0
    del features["features.28.bias"]
    torch.save(features, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="features.28.bias"):
        Perceptual(str(tmp_path / "bad.pt"))
