"""The tokenizer loader: :func:`load_tokenizer`, the one way every stage gets its VQVAE, :func:`save_tokenizer`, and
the strict converter of the official VAR VQVAE checkpoints (``vae_ch160v4096z32.pth``).

nextscale's module paths are the official state-dict names, so conversion is a check, not a rename:
every key the model expects must be present with the expected shape and no unknown key may be left
over. The one tolerated difference is the official behaviour for ``quantize.ema_vocab_hit_SV`` (usage
statistics only): absent or of another shape, the model keeps its own buffer. Every file is read with
``torch.load(weights_only=True)``: a checkpoint never runs code.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from nextscale import pretrained, storage
from nextscale.checkpoint import CheckpointMismatch, read_checkpoint, state_dict_in
from nextscale.config import from_dict, to_dict
from nextscale.errors import NotFound
from nextscale.tokenize.vqvae import VQVAE, VQVAE_PRESETS, VQVAEConfig, build_vqvae

log = logging.getLogger(__name__)

OPTIONAL_KEYS = ("quantize.ema_vocab_hit_SV",)


def read_state_dict(path_or_url: str | os.PathLike) -> dict[str, Tensor]:
    """A state dict from a local path or storage URL (a bare state dict or one under "state_dict"/"model")."""
    obj = read_checkpoint(storage.read_bytes(str(path_or_url)), str(path_or_url))
    return state_dict_in(obj, str(path_or_url))


def check_state_dict(state_dict: Mapping[str, Tensor], model: VQVAE, preset: str = "") -> dict[str, Tensor]:
    """The state dict to load into ``model``, or a CheckpointMismatch naming the first offending key."""
    what = f"a {preset} checkpoint" if preset else "a checkpoint for this VQVAE config"
    expected = model.state_dict()
    out = dict(state_dict)
    for key in OPTIONAL_KEYS:
        if key not in out or tuple(out[key].shape) != tuple(expected[key].shape):
            out[key] = expected[key]
    for key, ref in expected.items():
        if key not in out:
            raise CheckpointMismatch(f"missing key {key} (expected shape {list(ref.shape)}): is this {what}?")
        if tuple(out[key].shape) != tuple(ref.shape):
            raise CheckpointMismatch(
                f"key {key} has shape {list(out[key].shape)}, expected {list(ref.shape)}: is this {what}?"
            )
    unexpected = sorted(set(out) - set(expected))
    if unexpected:
        raise CheckpointMismatch(f"unexpected key {unexpected[0]} ({len(unexpected)} in all): is this {what}?")
    return out


def load_official_vqvae(path_or_state_dict: str | os.PathLike | Mapping[str, Tensor],
                        preset: str | VQVAEConfig = "vae_ch160v4096z32") -> VQVAE:
    """Build ``preset`` and load an official VQVAE state dict (path, URL or mapping) strictly, in eval mode."""
    if isinstance(path_or_state_dict, Mapping):
        state_dict = dict(path_or_state_dict)
    else:
        state_dict = read_state_dict(path_or_state_dict)
    model = build_vqvae(preset)
    state_dict = check_state_dict(state_dict, model, preset if isinstance(preset, str) else "")
    model.load_state_dict(state_dict, strict=True)
    return model.eval().requires_grad_(False)


def to_official_state_dict(model: VQVAE) -> dict[str, Tensor]:
    """The official-format state dict of a nextscale VQVAE (same names; float32, contiguous, on CPU)."""
    return {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}


def save_tokenizer(model: VQVAE, url: str) -> None:
    """Write ``{"config": ..., "state_dict": ...}`` (what :func:`load_tokenizer` reads) atomically to ``url``."""
    buf = io.BytesIO()
    torch.save({"config": to_dict(model.cfg), "state_dict": to_official_state_dict(model)}, buf)
    storage.write_bytes(url, buf.getvalue())


def is_preset(source: str) -> bool:
    """A bare preset name (not a file that happens to share it)."""
    return source in VQVAE_PRESETS and not os.path.exists(source)


def weights_sha256(weights: VQVAE | Mapping[str, Tensor]) -> str:
    """sha256 over a state dict's names, shapes and float32 bytes (identity of weights without a file)."""
    state_dict = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
    h = hashlib.sha256()
    for k, v in sorted(state_dict.items()):
        t = v.detach().float().contiguous().cpu()
        h.update(f"{k}:{list(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def read_tokenizer(source: str) -> str | bytes:
    """What :func:`load_tokenizer` needs from ``source``: a preset name as it is, else the file's bytes (read once,
    so a driver can hand the same bytes to its workers)."""
    if is_preset(source):
        return source
    try:
        return storage.read_bytes(source)
    except FileNotFoundError:
        raise NotFound(
            f"tokenizer {source!r} does not exist: give a tokenizer.pt from `nextscale train-tokenizer`, an "
            f"official .pth, or a preset name ({', '.join(VQVAE_PRESETS)})") from None


def load_tokenizer(source: str | bytes, *, preset: str = "vae_ch160v4096z32", seed: int = 0, name: str = "",
                   device: str | torch.device = "cpu") -> tuple[VQVAE, dict[str, Any]]:
    """(tokenizer in eval mode with gradients off, its identity) from one of:

    - a tokenizer.pt written by train-tokenizer (``{"config", "state_dict"}``, carries its architecture);
    - an official VQVAE ``.pth`` (a bare state dict), built as ``preset`` and checked strictly;
    - a folder written by ``nextscale.save_pretrained`` (``config.json`` + ``model.safetensors``);
    - a preset name: seeded random weights, identical in every process (tests, benchmarks);

    given as a URL / path, or as the file's bytes (``name`` then says where they came from). The identity
    (recorded in the manifest) holds ``url``, ``kind`` (file | pretrained | random_init), ``preset``, ``sha256``
    (of the file, or of the weights for a folder or random init), ``seed`` (random init) and ``config``. ``device="meta"`` gives
    the architecture only, checked against the file's keys and shapes without loading or initialising
    weights: what a driver needs to plan a job.
    """
    if isinstance(source, str) and is_preset(source):
        with torch.random.fork_rng(devices=[]):  # the caller's RNG stream stays untouched
            torch.manual_seed(seed)
            model = build_vqvae(source)
        ident = {"url": "", "kind": "random_init", "preset": source, "seed": seed, "sha256": weights_sha256(model)}
    elif isinstance(source, str) and pretrained.is_pretrained(source):
        config, state_dict = pretrained.read_folder(source, "vqvae")
        with torch.device("meta" if str(device) == "meta" else "cpu"):
            model = build_vqvae(from_dict(VQVAEConfig, config, prefix=f"{source}: config."))
        state_dict = check_state_dict(state_dict, model)
        if str(device) != "meta":
            model.load_state_dict(state_dict, strict=True)
        ident = {"url": source, "kind": "pretrained", "preset": preset, "sha256": weights_sha256(state_dict)}
    else:
        url = source if isinstance(source, str) else name
        label = url or "the tokenizer bytes"
        data = read_tokenizer(source) if isinstance(source, str) else source
        obj = read_checkpoint(data, f"tokenizer {label}")
        if isinstance(obj, Mapping) and isinstance(obj.get("config"), Mapping) and "state_dict" in obj:
            cfg, state_dict, what = from_dict(VQVAEConfig, obj["config"], prefix="config."), obj["state_dict"], ""
        else:
            cfg, state_dict, what = preset, state_dict_in(obj, label), preset
        with torch.device("meta" if str(device) == "meta" else "cpu"):
            model = build_vqvae(cfg)
        state_dict = check_state_dict(state_dict, model, what)
        if str(device) != "meta":
            model.load_state_dict(state_dict, strict=True)
        ident = {"url": url, "kind": "file", "preset": preset, "sha256": hashlib.sha256(data).hexdigest()}
    ident["config"] = to_dict(model.cfg)
    return model.to(device).eval().requires_grad_(False), ident
