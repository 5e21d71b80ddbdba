"""AdamW with the official VAR parameter groups (the lr / weight-decay schedules are ``nextscale.schedule``).

Parameter groups (``utils/misc.filter_params``): no weight decay for 1-D parameters, names ending in
``bias`` and names containing one of :data:`NO_DECAY_KEYS`; everything else (class embedding, word
embedding, every Linear weight incl. AdaLN and head) is decayed; each group's ``wd_sc`` tells the
schedule whether it decays.
"""

from __future__ import annotations

import torch
from torch import nn

NO_DECAY_KEYS = ("cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start",
                 "start_pos", "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul")


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim == 1 or name.endswith("bias") or any(k in name for k in NO_DECAY_KEYS)


def param_groups(model: nn.Module) -> list[dict]:
    """[decay group, no-decay group]; each carries ``wd_sc`` (1 or 0) that the schedule multiplies in."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # DDP / FSDP1 / torch.compile wrappers add path components the official names do not have
        for wrapper in ("module.", "_fsdp_wrapped_module.", "_orig_mod."):
            name = name.replace(wrapper, "")
        (no_decay if is_no_decay(name, p) else decay).append((name, p))
    return [
        {"name": "decay", "params": [p for _, p in decay], "param_names": [n for n, _ in decay], "wd_sc": 1.0},
        {"name": "no_decay", "params": [p for _, p in no_decay], "param_names": [n for n, _ in no_decay], "wd_sc": 0.0},
    ]


def build_optimizer(model: nn.Module, *, lr: float, betas: tuple[float, float], eps: float = 1e-8,
                    fused: bool = True) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`, weight decay 0 until the schedule sets it.

    ``fused``: the single-kernel update where torch has one (CUDA and CPU; 2.4x faster than the foreach
    update on CPU); parameters elsewhere (e.g. meta) get the default implementation.
    """
    groups = param_groups(model)
    fusable = all(p.device.type in ("cuda", "cpu") for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=0.0,
                             fused=bool(fused and fusable) or None)
