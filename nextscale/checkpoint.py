"""One checkpoint layer for both training loops (tokenizer and prior): save, verify, restore.

A loop describes what it trains as a :class:`TrainState` (model, optimizer, step and named components)
and calls :func:`save` every ``ckpt_every`` steps and :func:`restore` once at the start; the
:class:`~nextscale.runtime.TrainContext` only moves checkpoint folders to and from storage.

A checkpoint is a folder with one file ``state.pt``: the model's state dict taken from the unwrapped
module (no ``module.`` / ``_orig_mod.`` prefixes, so it loads into a bare model), the optimizer, the
step, each component (EMA, GradScaler, discriminator...), every rank's data position and RNG states
(torch CPU and CUDA, numpy, python) and plain values such as the metric history and the resolved
config. With FSDP nothing is gathered: every rank writes its shards of the model and optimizer with
``torch.distributed.checkpoint`` under ``shards/``, and ``state.pt`` holds the rest. Either form
resumes under DDP, FSDP or in one process (DCP reshards on load; full states are scattered under
FSDP). Beside them, ``checksums.json`` holds the sha256 and size of every file. The weights users
take away are the single-file ``prior.pt`` / ``tokenizer.pt`` the loops export at the end.

Damage: :func:`restore` takes the newest checkpoint whose files match their checksums and load; a
truncated or altered one is skipped with a warning naming it and why, and if none verifies the
error names them all. Security: checkpoints live in the run's output location, which others may be
able to write to, so they are read with ``torch.load(weights_only=True)``: a planted pickle cannot
run code. Everything saved is therefore tensors and plain Python values.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import pickle
import random
import tempfile
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn

from nextscale import storage
from nextscale.errors import UserError

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
CHECKSUMS_FILE = "checksums.json"
SHARDS_DIR = "shards"  # FSDP: torch.distributed.checkpoint's files of every rank
FORMAT = 2  # 1: state.pt alone (numpy / python RNG states as pickled objects); 2: + checksums.json, tensor RNG


def run_id(kind: str, output: str) -> str:
    """A stable id of the ``kind`` run writing to ``output`` (Ray run name, wandb id): a rerun finds the same one."""
    return f"{kind}-" + hashlib.sha1(storage.filesystem(output)[1].encode()).hexdigest()[:10]


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


@dataclasses.dataclass
class TrainState:
    """What a checkpoint saves and :func:`restore` sets back: the live training objects of one rank."""

    model: nn.Module  # the bare model (it may be sharded in place by FSDP); wrappers are looked through
    optimizer: torch.optim.Optimizer
    step: int = 0
    components: dict[str, Stateful] = dataclasses.field(default_factory=dict)  # the same on every rank: EMA, scaler...
    per_rank: dict[str, Stateful] = dataclasses.field(default_factory=dict)  # each rank's own: data position
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # plain values, saved and restored (history)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)  # plain values for readers, saved only (config)


class GeneratorState:
    """A ``torch.Generator`` as a :class:`Stateful` component."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any] | torch.Tensor) -> None:
        # format 1 stored the bare state tensor
        self.generator.set_state(state["state"] if isinstance(state, dict) else state)


class CheckpointContext(Protocol):
    """The part of :class:`~nextscale.runtime.TrainContext` this layer uses."""

    rank: int
    world_size: int

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None = None) -> None: ...

    def checkpoints(self) -> Iterator[tuple[str, str]]: ...


# ------------------------------------------------------------------------------------------------
# Save and restore (collective: every rank calls them)


def save(ctx: CheckpointContext, state: TrainState, metrics: dict[str, float]) -> None:
    """Checkpoint ``state`` and report ``metrics`` with it (the context persists the folder).

    DDP / one process: rank 0 writes everything into one ``state.pt``. FSDP: every rank writes its own
    shards of the model and optimizer with ``torch.distributed.checkpoint`` under ``shards/`` (nothing is
    gathered to rank 0) and reports its folder; the context merges the ranks' folders into one checkpoint,
    whose ``state.pt`` holds the rest and whose ``checksums.json`` covers every rank's files.
    """
    rngs = gather_from_ranks(rng_state(), ctx.world_size)
    per_rank = {name: gather_from_ranks(obj.state_dict(), ctx.world_size) for name, obj in state.per_rank.items()}
    sharded = is_sharded(state.model)
    with tempfile.TemporaryDirectory(prefix="nextscale-ckpt-") as tmp:
        model_sd = optim_sd = None
        files: dict[str, dict] = {}
        if sharded:
            _save_shards(state.model, state.optimizer, os.path.join(tmp, SHARDS_DIR))
            for rank_files in gather_from_ranks(_checksums(tmp), ctx.world_size):
                files.update(rank_files)
        elif ctx.rank == 0:
            model_sd, optim_sd = model_and_optimizer_state(state.model, state.optimizer)
        if ctx.rank == 0:
            write(tmp, {"format": FORMAT, "step": state.step, "world_size": ctx.world_size, "model": model_sd,
                        "optimizer": optim_sd, "shards": SHARDS_DIR if sharded else None, "rng": rngs, **per_rank,
                        **{name: obj.state_dict() for name, obj in state.components.items()}, **state.extra,
                        **state.info}, files)
        ctx.report(metrics, checkpoint_dir=tmp if sharded or ctx.rank == 0 else None)


def restore(ctx: CheckpointContext, state: TrainState,
            check: Callable[[dict[str, Any], str], None] | None = None) -> bool:
    """Set ``state`` from the newest checkpoint that verifies; False on a fresh start (no checkpoint).

    Damaged checkpoints are skipped with a warning; :class:`CheckpointError` if there are checkpoints
    but none verifies. ``check(saved, where)`` may refuse the chosen checkpoint (e.g. another model family)
    before anything is loaded.
    """
    payload, where, skipped = None, "", []
    for where, folder in ctx.checkpoints():
        try:
            payload = load(folder)
            break
        except (CheckpointError, OSError) as e:
            log.warning("skipping checkpoint %s: %s", where, e)
            skipped.append(f"{where} ({e})")
    # every rank chose on its own: they must agree before anyone loads (or all start fresh)
    chosen = set(gather_from_ranks(where if payload is not None else "(none)", ctx.world_size))
    if len(chosen) > 1:
        raise CheckpointError(f"the workers found different latest checkpoints ({', '.join(sorted(chosen))}); "
                              "is a storage location unreachable from some nodes?")
    if payload is None:
        if skipped:
            raise CheckpointError("no checkpoint of this run verifies, so training cannot resume: "
                                  + "; ".join(skipped) + ". Delete them to start over")
        return False
    saved_world = payload.get("world_size", len(payload["rng"]))
    if state.per_rank and saved_world != ctx.world_size:
        raise CheckpointError(f"the checkpoint {where} was written by {saved_world} workers; resume with "
                         f"workers.count={saved_world} (data positions are per worker)")
    if check is not None:
        check(payload, where)
    if "opt" in payload and "optimizer" not in payload:  # format 1 of the tokenizer
        payload["optimizer"] = payload.pop("opt")
    if payload.get("shards"):
        _load_shards(state.model, state.optimizer, os.path.join(folder, payload["shards"]))
    else:
        load_model_and_optimizer_state(state.model, state.optimizer, payload["model"], payload["optimizer"])
    for name, obj in state.components.items():
        if payload.get(name) is not None:
            obj.load_state_dict(payload[name])
    for name, obj in state.per_rank.items():
        obj.load_state_dict(payload[name][ctx.rank])
    for name in state.extra:
        if name in payload:
            state.extra[name] = payload[name]
    state.step = int(payload["step"])
    set_rng_state(payload["rng"][min(ctx.rank, len(payload["rng"]) - 1)])
    log.info("resumed from checkpoint %s at step %d%s", where, state.step,
             f" (skipped {len(skipped)} damaged: {'; '.join(skipped)})" if skipped else "")
    return True


# ------------------------------------------------------------------------------------------------
# Model, optimizer and RNG states


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
    """Load full state dicts (of :func:`model_and_optimizer_state`) into a plain, DDP or FSDP model."""
    model = unwrap_model(model)
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        if optimizer is not None and optim_sd is not None and any(isinstance(k, int) for k in optim_sd["state"]):
            optim_sd = _optimizer_state_by_name(model, optimizer, optim_sd)  # written without FSDP (DDP)
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                       options=StateDictOptions(full_state_dict=True))
        return
    model.load_state_dict(model_sd, strict=True)
    if optimizer is not None and optim_sd is not None:
        optimizer.load_state_dict(optim_sd)


def _optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer, optim_sd: dict) -> dict:
    """``optimizer.state_dict()`` (parameters numbered in param-group order) keyed by parameter name instead,
    the form ``torch.distributed.checkpoint`` loads into a sharded model."""
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    return {"state": {order[i]: s for i, s in optim_sd["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in optim_sd["param_groups"]]}


def _save_shards(model: nn.Module, optimizer: torch.optim.Optimizer, path: str) -> None:
    """This rank's shards of the model and optimizer states into ``path`` (collective; FSDP)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(unwrap_model(model), optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=path)


def _load_shards(model: nn.Module, optimizer: torch.optim.Optimizer, path: str) -> None:
    """Load sharded states written by :func:`_save_shards` into a model sharded the same way, another way,
    or not at all (``torch.distributed.checkpoint`` reshards on load)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = unwrap_model(model)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.load({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)


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


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, damaged or holds objects a checkpoint never holds."""


# Checkpoints written before the RNG states were stored as tensors hold numpy's RNG key array; these
# globals rebuild a plain numeric ndarray and nothing else, so they are safe to allow.
_LEGACY_NUMPY_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_file(path: str, data: bytes | None = None) -> dict[str, Any]:
    """A ``torch.save``d checkpoint (the file ``path``, or its bytes ``data``) read with ``weights_only=True``:
    tensors and plain values only.

    A file holding any other object (a pickle that could run code) is refused with a :class:`CheckpointError`
    naming ``path``; a damaged file raises torch's own error.
    """
    try:
        with torch.serialization.safe_globals(_LEGACY_NUMPY_GLOBALS):
            return torch.load(io.BytesIO(data) if data is not None else path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message suggests weights_only=False: never do that with a file from a storage location
        unsafe = str(e).split("Unsupported global: ")[-1].split(" was not")[0] if "Unsupported global" in str(e) else ""
        raise CheckpointError(
            f"refusing to load {path}: it holds objects a nextscale checkpoint never holds"
            f"{f' ({unsafe})' if unsafe else ''} and loading them could run code; it was not written by "
            "nextscale: delete it (and check who can write to this location)") from None


class CheckpointMismatch(UserError, ValueError):
    """A state dict does not fit the requested architecture, or a file is no checkpoint; the message names it."""


def read_checkpoint(data: bytes, name: str) -> object:
    """A model file's content (``torch.save``d: nextscale's tokenizer.pt / prior.pt, an official release file)
    read by :func:`load_file` (``weights_only=True``; a pickle that could run code is refused); bytes that are
    no checkpoint at all are a CheckpointMismatch naming ``name`` (torch's own messages are not passed on: some
    suggest unpickling code)."""
    try:
        return load_file(name, data)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - torch.load on foreign bytes raises many types; all mean "not a checkpoint"
        if not data or isinstance(e, EOFError):
            why = "it is empty or truncated"
        elif "PytorchStreamReader" in str(e):
            why = "its archive is damaged or truncated"
        else:
            why = f"it is not a PyTorch checkpoint ({type(e).__name__} while reading it)"
        raise CheckpointMismatch(f"cannot load {name}: {why}; give a checkpoint written by nextscale or an "
                                 "official VAR release file") from None


def state_dict_in(obj: object, what: str) -> dict[str, torch.Tensor]:
    """The state dict a model file holds: a bare one, or one under "state_dict" / "model"."""
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise CheckpointMismatch(f"{what} does not hold a state dict (got {type(obj).__name__})")
    return dict(obj)


def write(directory: str, payload: dict[str, Any], other_files: dict[str, dict] | None = None) -> None:
    """``{directory}/state.pt`` and ``checksums.json`` (of state.pt and ``other_files``), flushed to disk."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, STATE_FILE)
    with open(path, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    files = {**(other_files or {}), STATE_FILE: _checksum(path)}
    with open(os.path.join(directory, CHECKSUMS_FILE), "w") as f:
        json.dump({"format": FORMAT, "files": dict(sorted(files.items()))}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _checksums(directory: str) -> dict[str, dict]:
    """``{relative path: {sha256, bytes}}`` of every file under ``directory``."""
    out = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            out[os.path.relpath(path, directory).replace(os.sep, "/")] = _checksum(path)
    return out


def _checksum(path: str) -> dict:
    return {"sha256": _sha256(path), "bytes": os.path.getsize(path)}


def verify(directory: str) -> None:
    """Raise :class:`CheckpointError` naming the file unless every file matches ``checksums.json``.

    Format-1 checkpoints have no checksums: for them only the loading itself can tell damage.
    """
    sums_path = os.path.join(directory, CHECKSUMS_FILE)
    if not os.path.exists(sums_path):
        return
    try:
        with open(sums_path) as f:
            files = json.load(f)["files"]
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{sums_path} is damaged ({e})") from None
    for name, expected in files.items():
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            raise CheckpointError(f"{name} is missing")
        size = os.path.getsize(path)
        if size != expected["bytes"]:
            raise CheckpointError(f"{name} has {size} bytes, its checksum file says {expected['bytes']} (truncated?)")
        if _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"{name} does not match its sha256 in {CHECKSUMS_FILE} (altered or corrupt)")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load(directory: str) -> dict[str, Any]:
    """The verified state of the checkpoint folder ``directory``, tensors on the CPU."""
    path = os.path.join(directory, STATE_FILE)
    if not os.path.exists(path):
        raise CheckpointError(f"{path} does not exist: {directory} is not a nextscale checkpoint")
    verify(directory)
    try:
        return load_file(path)
    except CheckpointError:
        raise
    except (RuntimeError, EOFError) as e:  # torch's zip reader on a truncated or corrupt file
        raise CheckpointError(f"{STATE_FILE} is damaged (truncated or corrupt): {str(e).splitlines()[0]}") from None
