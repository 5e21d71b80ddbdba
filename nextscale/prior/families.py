"""The table of model families: the one place that maps a config's ``arch`` to the code that builds it.

Each family module (``nextscale.prior.var``, ``nextscale.prior.mvar``) declares a
:class:`~nextscale.prior.model.ModelFamily`; :data:`FAMILIES` lists them and :func:`register` adds one (a
plug-in, or a test's toy family). Whatever depends on the family asks here: building a model, the presets,
config keys, parameter count, FLOPs (and so MFU), which family an official state dict holds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from nextscale.config import ConfigError, from_dict, preset
from nextscale.prior import mvar, var
from nextscale.prior.model import ModelFamily, NextScalePrior, VARConfig

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (var.FAMILY, mvar.FAMILY)}
PRESETS: dict[str, VARConfig] = {name: cfg for f in FAMILIES.values() for name, cfg in f.presets.items()}


def register(family: ModelFamily) -> None:
    """Add a family (and its presets) to the table; its name and preset names must be new."""
    taken = sorted(set(family.presets) & set(PRESETS))
    if family.name in FAMILIES or taken:
        raise ValueError(f"family {family.name!r} or its presets {taken} are registered already")
    FAMILIES[family.name] = family
    PRESETS.update(family.presets)


def family_of(arch_or_cfg: str | VARConfig) -> ModelFamily:
    """The family of an ``arch`` name or of a config."""
    arch = arch_or_cfg if isinstance(arch_or_cfg, str) else arch_or_cfg.arch
    if arch not in FAMILIES:
        raise ConfigError(f"arch={arch!r} is no model family; choose one of {', '.join(FAMILIES)}")
    return FAMILIES[arch]


def config_from_dict(data: Mapping[str, Any], prefix: str = "") -> VARConfig:
    """The config of the family ``data["arch"]`` names (default var), keys and values checked.

    Keys that only other families have are dropped: checkpoints written while every family shared one
    config class carry them (a VAR's ``mamba_d_state``).
    """
    arch = str(data.get("arch", "var"))
    if arch not in FAMILIES:
        raise ConfigError(f"{prefix}arch={arch!r} is no model family; choose one of {', '.join(FAMILIES)}")
    family = FAMILIES[arch]
    own = {f.name for f in dataclasses.fields(family.config)}
    foreign = {f.name for other in FAMILIES.values() for f in dataclasses.fields(other.config)} - own
    return from_dict(family.config, {k: v for k, v in data.items() if k not in foreign}, prefix=prefix)


def build_prior(preset_or_cfg: str | VARConfig, *, init: bool = True, **overrides) -> NextScalePrior:
    """The model of a preset name or config (plus field overrides) of any family, initialised as the official
    ``init_weights``. Build under ``torch.device("meta")`` for shapes only (init is skipped there)."""
    cfg = preset(PRESETS, preset_or_cfg, "prior", **overrides)
    model = family_of(cfg).build(cfg)
    if init and model.pos_start.device.type != "meta":
        model.init_weights()
    return model


def num_params(cfg: VARConfig) -> int:
    """Parameter count without building the model's weights."""
    return family_of(cfg).num_params(cfg)


def flops_per_image(cfg: VARConfig, training: bool = True) -> float:
    """Matmul FLOPs of one teacher-forced image (x3 for forward + backward), as the family counts them."""
    return family_of(cfg).flops_per_image(cfg, training)


def family_of_state_dict(state_dict: Mapping[str, Any]) -> ModelFamily | None:
    """The family whose signature keys (under ``blocks.0.``) the state dict holds, the most specific one where
    several match; None if it holds no prior's blocks."""
    matching = [f for f in FAMILIES.values() if all(f"blocks.0.{k}" in state_dict for k in f.signature)]
    return max(matching, key=lambda f: len(f.signature), default=None)
