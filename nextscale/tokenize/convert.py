"""Official VAR VQVAE checkpoints (``vae_ch160v4096z32.pth``) <-> nextscale, with strict key and shape checks.

nextscale's module paths are the official state-dict names, so conversion is a check, not a rename:
every key the model expects must be present with the expected shape and no unknown key may be left
over. The one tolerated difference is the official behaviour for ``quantize.ema_vocab_hit_SV`` (usage
statistics only): absent or of another shape, the model keeps its own buffer.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Mapping

import torch
from torch import Tensor

from nextscale import storage
from nextscale.config import from_dict, to_dict
from nextscale.tokenize.vqvae import VQVAE, VQVAEConfig, build_vqvae

log = logging.getLogger(__name__)

OPTIONAL_KEYS = ("quantize.ema_vocab_hit_SV",)


class CheckpointMismatch(ValueError):
    """A state dict does not fit the requested architecture; the message names the key."""


def _read(path_or_url: str | os.PathLike) -> object:
    return torch.load(io.BytesIO(storage.read_bytes(str(path_or_url))), map_location="cpu", weights_only=True)


def read_state_dict(path_or_url: str | os.PathLike, obj: object = None) -> dict[str, Tensor]:
    """A state dict from a local path or storage URL (a bare state dict or one under "state_dict"/"model")."""
    obj = _read(path_or_url) if obj is None else obj
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise CheckpointMismatch(f"{path_or_url} does not hold a state dict (got {type(obj).__name__})")
    return dict(obj)


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


def load_tokenizer(url: str | os.PathLike, preset: str | VQVAEConfig = "vae_ch160v4096z32") -> VQVAE:
    """A trained nextscale tokenizer file (config + state dict), or an official ``.pth`` built as ``preset``.

    Returned in eval mode with gradients off.
    """
    obj = _read(url)
    if isinstance(obj, Mapping) and isinstance(obj.get("config"), Mapping) and "state_dict" in obj:
        cfg = from_dict(VQVAEConfig, obj["config"], prefix="config.")
        model = VQVAE(cfg)
        model.load_state_dict(check_state_dict(obj["state_dict"], model), strict=True)
        return model.eval().requires_grad_(False)
    return load_official_vqvae(read_state_dict(url, obj), preset)
