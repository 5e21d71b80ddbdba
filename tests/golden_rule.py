"""The numpy weight rule of tests/golden (see tests/golden/README.md §2), applied through official key names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

GOLDEN = Path(__file__).parent / "golden"
GOLDEN_MVAR = GOLDEN / "mvar"  # the official M-VAR's outputs (tests/golden/mvar/README.md), same rule
VQVAE_SEED_BASE = 10_000
VAR_SEED_BASE = 20_000
MVAR_SEED_BASE = 30_000


def load(name: str) -> np.ndarray:
    return np.load(GOLDEN / name)


def tiny_config() -> dict:
    return json.loads((GOLDEN / "tiny_config.json").read_text())


def rule_state_dict(param_shapes: dict[str, tuple[int, ...]], seed_base: int) -> dict[str, torch.Tensor]:
    """Official parameter names -> tensors by the rule: sorted names, seed = base + position."""
    out = {}
    for i, name in enumerate(sorted(param_shapes)):
        shape = tuple(param_shapes[name])
        z = np.random.default_rng(seed_base + i).standard_normal(shape, dtype=np.float32).astype(np.float64)
        if len(shape) >= 2:
            w = z / np.sqrt(np.prod(shape[1:]))
        elif name.endswith("weight"):
            w = 1 + 0.1 * z
        else:
            w = 0.1 * z
        out[name] = torch.from_numpy(w.astype(np.float32))
    return out


def official_param_shapes(model: str) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the tiny official models ("vqvae", "var" or "mvar"), from tiny_params.json."""
    params = json.loads(((GOLDEN_MVAR if model == "mvar" else GOLDEN) / "tiny_params.json").read_text())[model]
    return {p["name"]: tuple(p["shape"]) for p in params}
