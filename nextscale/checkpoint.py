"""Complete training checkpoints of both training loops: everything needed to continue bit for bit.

One file ``state.pt`` in a local folder (the TrainContext persists the folder): the model's state dict
taken from the unwrapped module (no ``module.`` / ``_orig_mod.`` prefixes, so it loads into a bare VAR),
EMA weights if any, optimizer, GradScaler, step, epoch, every rank's loader position and RNG states
(CPU, CUDA, numpy, python), the metric history and the resolved config. With FSDP the model and
optimizer states are gathered to full (unsharded) tensors, so the weights load anywhere; the FSDP
optimizer state is keyed by parameter name and resumes under FSDP.

Checkpoints live in the run's output location, which others may be able to write to: they are read
with ``torch.load(weights_only=True)``, so a planted pickle cannot run code. Everything saved is
therefore tensors and plain Python values (the numpy and Python RNG states included).
"""

from __future__ import annotations

import io
import os
import pickle
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn

STATE_FILE = "state.pt"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare module under DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def is_sharded(model: nn.Module) -> bool:
    """True for FSDP2 (DTensor parameters) or FSDP1-wrapped models."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters()) or any(
        type(m).__name__ == "FullyShardedDataParallel" for m in model.modules())


def full_model_state(model: nn.Module) -> dict:
    """The unwrapped model's full state dict on the CPU (collective under FSDP: call it on every rank)."""
    model = unwrap_model(model)
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def model_and_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full state dicts of the unwrapped model and its optimizer (collective under FSDP)."""
    model = unwrap_model(model)
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict(), optimizer.state_dict()


def load_model_and_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                                   model_sd: dict, optim_sd: dict | None) -> None:
    model = unwrap_model(model)
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                       options=StateDictOptions(full_state_dict=True))
        return
    model.load_state_dict(model_sd, strict=True)
    if optimizer is not None and optim_sd is not None:
        optimizer.load_state_dict(optim_sd)


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU and CUDA, numpy, python) as tensors and plain values."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached_gaussian)},
             "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (or the numpy / python tuples of checkpoints before it)."""
    torch.set_rng_state(state["torch"])
    numpy_state, python_state = state["numpy"], state["python"]
    if isinstance(numpy_state, dict):
        numpy_state = ("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                       numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    if isinstance(python_state, dict):
        python_state = (python_state["version"], tuple(python_state["state"].tolist()), python_state["gauss_next"])
    np.random.set_state(numpy_state)
    random.setstate(python_state)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_from_ranks(obj: Any, world_size: int) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (a collective when distributed)."""
    if world_size > 1 and tdist.is_available() and tdist.is_initialized():
        out: list[Any] = [None] * world_size
        tdist.all_gather_object(out, obj)
        return out
    return [obj]


def save(directory: str, state: dict[str, Any]) -> str:
    """Write ``state`` to ``{directory}/state.pt``; returns the file path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, STATE_FILE)
    torch.save(state, path)
    return path


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, damaged or holds objects a checkpoint never holds."""


# Checkpoints written before the RNG states were stored as tensors hold numpy's RNG key array; these
# globals rebuild a plain numeric ndarray and nothing else, so they are safe to allow.
_LEGACY_NUMPY_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_file(path: str, data: bytes | None = None, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A ``torch.save``d checkpoint file read with ``weights_only=True``: tensors and plain values only.

    A file holding any other object (a pickle that could run code) is refused with a :class:`CheckpointError`.
    """
    source = io.BytesIO(data) if data is not None else path
    try:
        with torch.serialization.safe_globals(_LEGACY_NUMPY_GLOBALS):
            return torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message suggests weights_only=False: never do that with a file from a storage location
        unsafe = str(e).split("Unsupported global: ")[-1].split(" was not")[0] if "Unsupported global" in str(e) else ""
        raise CheckpointError(
            f"refusing to load {path}: it holds objects a nextscale checkpoint never holds"
            f"{f' ({unsafe})' if unsafe else ''} and loading them could run code; it was not written by "
            "nextscale: delete it (and check who can write to this location)") from None


def load(directory: str) -> dict[str, Any]:
    """The state saved by :func:`save`, tensors on the CPU."""
    path = os.path.join(directory, STATE_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: {directory} is not a nextscale checkpoint")
    return load_file(path)
