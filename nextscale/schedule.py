"""Learning-rate and weight-decay schedules of both training loops, as pure functions of the step.

The official VAR schedules (``utils/lr_control.lr_wd_annealing``): the lr ratio rises linearly from
``start_ratio`` to 1 over the warm-up; after it, with progress p in [0, 1] over the remaining steps,
'lin0' keeps 1 while p < 0.05 and then falls linearly to ``final_ratio``, 'cos' follows a cosine to
``final_ratio``, 'const' stays at 1; weight decay follows a cosine from ``wd`` to ``wd_end`` over the
whole run. The prior uses them as the official recipe does; the tokenizer uses 'cos' with a constant
weight decay.
"""

from __future__ import annotations

import dataclasses
import math

import torch


@dataclasses.dataclass(frozen=True, kw_only=True)
class Schedule:
    """The resolved schedule of one run (all in optimizer steps)."""

    peak_lr: float
    warmup_steps: int
    total_steps: int
    start_ratio: float = 0.005
    final_ratio: float = 0.01
    kind: str = "lin0"
    wd: float = 0.05
    wd_end: float = 0.05

    def lr_at(self, step: int) -> float:
        return lr_at(step, peak_lr=self.peak_lr, warmup_steps=self.warmup_steps, total_steps=self.total_steps,
                     start_ratio=self.start_ratio, final_ratio=self.final_ratio, kind=self.kind)

    def wd_at(self, step: int) -> float:
        return wd_at(step, start=self.wd, end=self.wd_end, total_steps=self.total_steps)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> tuple[float, float]:
        """Write this step's lr and (group-scaled) weight decay into the optimizer; returns (lr, wd)."""
        lr, wd = self.lr_at(step), self.wd_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_sc", 1.0)
            group["weight_decay"] = wd * group.get("wd_sc", 1.0)
        return lr, wd


def lr_at(step: int, *, peak_lr: float, warmup_steps: int, total_steps: int, start_ratio: float = 0.005,
          final_ratio: float = 0.01, kind: str = "lin0") -> float:
    """Learning rate of (0-based) ``step`` as the official ``lr_wd_annealing``."""
    if step < warmup_steps:
        ratio = start_ratio + (1 - start_ratio) * step / warmup_steps
    else:
        span = max(1, total_steps - 1 - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        if kind == "lin0":
            flat = 0.05
            ratio = 1.0 if progress < flat else final_ratio + (1 - final_ratio) * (1 - progress) / (1 - flat)
        elif kind == "cos":
            ratio = final_ratio + (1 - final_ratio) * (0.5 + 0.5 * math.cos(math.pi * progress))
        elif kind == "const":
            ratio = 1.0
        else:
            raise ValueError(f"unknown lr schedule {kind!r}; choose lin0, cos or const")
    return peak_lr * ratio


def wd_at(step: int, *, start: float, end: float, total_steps: int) -> float:
    """Weight decay of ``step``: cosine from ``start`` (step 0) to ``end`` (the last step)."""
    progress = min(1.0, step / max(1, total_steps - 1))
    return end + (start - end) * (0.5 + 0.5 * math.cos(math.pi * progress))
