"""The prior loader: :func:`load_prior` (every stage's way to a trained prior) and :func:`save_prior`, the pair of
``nextscale.tokenize.loader``'s ``load_tokenizer`` / ``save_tokenizer``; official VAR and M-VAR checkpoints
(``var_d16.pth`` ..., M-VAR's) convert with strict key and shape checks.

nextscale's VAR uses the official state-dict names, so conversion is a check, not a rename: every key
the model expects must be present with the expected shape, and nothing may be left over. A wrong file
gets an error naming the offending key and, where it can be told, the preset the file looks like.
The model is built on the meta device and the checkpoint tensors are assigned to it, so loading costs
no memory beyond the checkpoint itself. The derived buffers (``lvl_1L``, ``attn_bias_for_masking``,
``zero_k_bias``, M-VAR's ``attn.patch_nums``) must be present (the official files have them) but are
recomputed from the config. An M-VAR file given to a VAR preset (or the reverse) is named as such.
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from nextscale import pretrained, storage
from nextscale.checkpoint import CheckpointMismatch, read_checkpoint, state_dict_in
from nextscale.config import to_dict
from nextscale.errors import NotFound
from nextscale.prior.families import PRESETS, build_prior, config_from_dict, family_of, family_of_state_dict
from nextscale.prior.model import ModelFamily, NextScalePrior, VARConfig, level_index

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
    return state_dict_in(obj, what)


def _looks_like(state_dict: Mapping[str, Tensor]) -> str:
    """A hint naming the preset (or model kind) a state dict seems to be, or ''."""
    if any(k.startswith(("encoder.", "decoder.", "quantize.")) for k in state_dict):
        return ("this looks like a VQVAE checkpoint; load it with "
                "nextscale.tokenize.loader.load_official_vqvae")
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


def load_prior(source: str, preset: str | None = None, *, seed: int = 0,
               device: str | torch.device = "cpu") -> tuple[NextScalePrior, dict[str, Any]]:
    """(prior in eval mode with gradients off, its identity) from one of:

    - a prior.pt written by train-prior (``{"config", "state_dict"}``, carries its architecture);
    - a folder written by ``nextscale.save_pretrained`` (``config.json`` + ``model.safetensors``);
    - an official state dict (``var_d16.pth``, M-VAR's), built as ``preset`` (None: the preset whose family and
      sizes the file has) and checked strictly;
    - a preset name: seeded random weights, identical in every process (tests, trying the API offline).

    The identity holds ``url``, ``kind`` (file | pretrained | random_init), ``preset``, ``seed`` (random init)
    and ``config``, as :func:`nextscale.tokenize.loader.load_tokenizer`'s does.
    """
    if source in PRESETS and not os.path.exists(source) and not pretrained.is_pretrained(source):
        with torch.random.fork_rng(devices=[]):  # the caller's RNG stream stays untouched
            torch.manual_seed(seed)
            model = build_prior(source)
        ident = {"url": "", "kind": "random_init", "preset": source, "seed": seed}
    elif pretrained.is_pretrained(source):
        config, state_dict = pretrained.read_folder(source, "var")
        model = load_official_var(state_dict, config_from_dict(config, prefix=f"{source}: config."))
        ident = {"url": source, "kind": "pretrained", "preset": preset or ""}
    else:
        model, preset = _load_file(source, preset)
        ident = {"url": source, "kind": "file", "preset": preset or ""}
    ident["config"] = to_dict(model.cfg)
    return model.to(device).eval().requires_grad_(False), ident


def _load_file(url: str, preset: str | None) -> tuple[NextScalePrior, str | None]:
    try:
        obj = read_checkpoint(storage.read_bytes(url), f"prior {url}")
    except FileNotFoundError:
        raise NotFound(f"prior checkpoint {url} does not exist: run `make train-prior` first or set "
                       "models.prior_url") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("config"), Mapping) and "state_dict" in obj:
        cfg = config_from_dict(obj["config"].get("var", obj["config"]), prefix=f"{url}: config.")
        return load_official_var(obj["state_dict"], cfg), preset
    if preset is None:
        preset = matching_preset(unwrap_state_dict(obj, url))
        if not preset:
            raise CheckpointMismatch(f"{url} matches no prior preset ({_looks_like(unwrap_state_dict(obj, url))}); "
                                     "give the preset or load it with load_official_var and a config")
    return load_official_var(obj, preset), preset


def save_prior(model: NextScalePrior, url: str, *, state_dict: Mapping[str, Tensor] | None = None, **extra: Any) -> None:
    """Write ``{"config": the model's config, "state_dict": ...}`` (+ ``extra`` keys: what :func:`load_prior`
    reads) atomically to ``url``; ``state_dict``: the full state gathered from a sharded model."""
    buf = io.BytesIO()
    torch.save({"config": to_dict(model.cfg), "state_dict": dict(state_dict or to_official_state_dict(model)),
                **extra}, buf)
    storage.write_bytes(url, buf.getvalue())
