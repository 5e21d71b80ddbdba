"""Official VAR and M-VAR checkpoints (``var_d16.pth`` ..., M-VAR's) -> nextscale, with strict key and shape checks.

nextscale's VAR uses the official state-dict names, so conversion is a check, not a rename: every key
the model expects must be present with the expected shape, and nothing may be left over. A wrong file
gets an error naming the offending key and, where it can be told, the preset the file looks like.
The model is built on the meta device and the checkpoint tensors are assigned to it, so loading costs
no memory beyond the checkpoint itself. The derived buffers (``lvl_1L``, ``attn_bias_for_masking``,
``zero_k_bias``, M-VAR's ``attn.patch_nums``) must be present (the official files have them) but are
recomputed from the config. An M-VAR file given to a VAR preset (or the reverse) is named as such.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping

import torch
from torch import Tensor

from nextscale import storage
from nextscale.errors import NotFound
from nextscale.prior.families import PRESETS, build_prior, config_from_dict, family_of, family_of_state_dict
from nextscale.prior.model import ModelFamily, NextScalePrior, VARConfig, level_index
from nextscale.tokenize import convert as tokenizer_convert
from nextscale.tokenize.convert import CheckpointMismatch, read_checkpoint

log = logging.getLogger(__name__)


def read_state_dict(path_or_url: str | os.PathLike) -> dict[str, Tensor]:
    """A VAR state dict from a local path or storage URL.

    Accepts a bare state dict (the released ``var_d*.pth``), one under "state_dict"/"model", and the
    official trainer checkpoints (``ar-ckpt-*.pth``: ``ckpt["trainer"]["var_wo_ddp"]``).
    """
    obj = read_checkpoint(storage.read_bytes(str(path_or_url)), str(path_or_url))
    return unwrap_state_dict(obj, str(path_or_url))


def unwrap_state_dict(obj: object, what: str = "the checkpoint") -> dict[str, Tensor]:
    if isinstance(obj, Mapping) and isinstance(obj.get("trainer"), Mapping) and "var_wo_ddp" in obj["trainer"]:
        obj = obj["trainer"]["var_wo_ddp"]
    return tokenizer_convert.read_state_dict(what, obj)


def _looks_like(state_dict: Mapping[str, Tensor]) -> str:
    """A hint naming the preset (or model kind) a state dict seems to be, or ''."""
    if any(k.startswith(("encoder.", "decoder.", "quantize.")) for k in state_dict):
        return ("this looks like a VQVAE checkpoint; load it with "
                "nextscale.tokenize.convert.load_official_vqvae")
    signature = _signature(state_dict)
    if signature is None:
        return ""
    family, depth, width, _ = signature
    l2 = any(k.endswith("attn.scale_mul_1H11") for k in state_dict)
    name = matching_preset(state_dict)
    if name:
        l2_note = "" if PRESETS[name].attn_l2_norm == l2 else f" with model.overrides.attn_l2_norm={str(l2).lower()}"
        return (f"this looks like {family.title} {family.file_prefix}{name} (depth {depth}, width {width}), use "
                f"preset {name}{l2_note}")
    return (f"this looks like {family.title} of depth {depth} and width {width}; build a "
            f"{family.config.__name__} with those sizes")


def _signature(state_dict: Mapping[str, Tensor]) -> tuple[ModelFamily, int, int, bool] | None:
    """(family, depth, width, shared AdaLN) of a prior state dict, or None if it is not one."""
    blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
    family = family_of_state_dict(state_dict)
    if not blocks or "pos_start" not in state_dict or family is None:
        return None
    shared = any(k.startswith("shared_ada_lin.") for k in state_dict)
    return family, max(blocks) + 1, state_dict["pos_start"].shape[-1], shared


def matching_preset(state_dict: Mapping[str, Tensor]) -> str:
    """The first preset whose family, depth, width and AdaLN sharing the state dict has, or ''."""
    signature = _signature(state_dict)
    return next((name for name, cfg in PRESETS.items()
                 if (family_of(cfg), cfg.depth, cfg.width, cfg.shared_aln) == signature), "")


def check_state_dict(state_dict: Mapping[str, Tensor], model: NextScalePrior, preset: str = "") -> None:
    """Raise CheckpointMismatch naming the first missing, unexpected or mis-shaped key."""
    what = f"{family_of(model.cfg).title} ({f'preset {preset}' if preset else 'this config'})"
    expected = model.state_dict(keep_vars=True)
    hint = _looks_like(state_dict)
    hint = f": {hint}" if hint else ""
    unexpected = [k for k in state_dict if k not in expected]
    if unexpected:
        m = re.match(r"(blocks\.\d+)\.", unexpected[0])
        name = f"{m.group(1)}.*" if m else unexpected[0]
        raise CheckpointMismatch(f"{name} unexpected ({len(unexpected)} unexpected keys for {what}){hint}")
    for key, ref in expected.items():
        if key not in state_dict:
            raise CheckpointMismatch(f"missing key {key} (shape {list(ref.shape)}) for {what}{hint}")
        if tuple(state_dict[key].shape) != tuple(ref.shape):
            raise CheckpointMismatch(f"key {key} has shape {list(state_dict[key].shape)}, {what} expects "
                                     f"{list(ref.shape)}{hint}")


def load_official_var(path_or_state_dict: str | os.PathLike | Mapping[str, Tensor],
                      preset: str | VARConfig = "d16") -> NextScalePrior:
    """Build ``preset`` and load an official VAR state dict (path, URL or mapping) strictly, in eval mode.

    The model takes the checkpoint's tensors without a copy (cast to float32 where they are not), on
    their device; a state dict of meta tensors gives a meta model, a free shape check. Gradients stay
    enabled, so the result can be fine-tuned.
    """
    if isinstance(path_or_state_dict, Mapping):
        state_dict = unwrap_state_dict(path_or_state_dict)
    else:
        state_dict = read_state_dict(path_or_state_dict)
    with torch.device("meta"):
        model = build_prior(preset)
    check_state_dict(state_dict, model, preset if isinstance(preset, str) else "")
    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    _warn_on_foreign_layout(state_dict, model)
    # derived buffers come from the config, not the file
    derived = model.derived_buffers(state_dict["pos_start"].device)
    for name, _ in model.named_buffers():
        state_dict[name] = derived[name]
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


def _warn_on_foreign_layout(state_dict: Mapping[str, Tensor], model: NextScalePrior) -> None:
    lvl = state_dict["lvl_1L"]
    if lvl.device.type == "meta":
        return
    if not torch.equal(lvl.cpu(), level_index(model.patch_nums).view(1, -1)):
        log.warning("checkpoint lvl_1L differs from the scale layout of patch_nums %s; using the config's",
                    model.patch_nums)


def to_official_state_dict(model: NextScalePrior) -> dict[str, Tensor]:
    """The official-format state dict of a nextscale VAR (same names; float32, contiguous, on CPU)."""
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).contiguous().cpu()
            for k, v in model.state_dict().items()}


def load_prior(url: str, preset: str | None = "d16") -> NextScalePrior:
    """prior.pt written by train-prior ({"config": VARConfig fields, "state_dict"}), a folder written by
    ``nextscale.save_pretrained``, or an official state dict built as ``preset`` (None: the preset whose sizes
    the file has); eval mode, gradients off."""
    from nextscale import pretrained

    if pretrained.is_pretrained(url):
        return pretrained.from_pretrained(url, "var")
    try:
        obj = read_checkpoint(storage.read_bytes(url), f"prior {url}")
    except FileNotFoundError:
        raise NotFound(f"prior checkpoint {url} does not exist: run `make train-prior` first or set "
                       "models.prior_url") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("config"), Mapping) and "state_dict" in obj:
        cfg = config_from_dict(obj["config"].get("var", obj["config"]), prefix=f"{url}: config.")
        var = load_official_var(obj["state_dict"], cfg)
    else:
        if preset is None:
            preset = matching_preset(unwrap_state_dict(obj, url))
            if not preset:
                raise CheckpointMismatch(f"{url} matches no VAR preset ({_looks_like(unwrap_state_dict(obj, url))}); "
                                         "give the preset or load it with load_official_var and a VARConfig")
        var = load_official_var(obj, preset)
    return var.eval().requires_grad_(False)
