"""A model folder to share: ``config.json`` (what to build) + ``model.safetensors`` (the weights).

:func:`write_folder` writes one to any storage location (a local folder, ``s3://``, ``gs://``, or
``hf://<user>/<repo>`` with write access) and :func:`read_folder` reads it back; safetensors holds tensors
only, so reading a folder runs no code, whoever wrote it. The loaders of the models read these folders
(``nextscale.tokenize.loader.load_tokenizer``, ``nextscale.prior.loader.load_prior``), and the Python API's
``save_pretrained`` / ``from_pretrained`` write and read them for either model. Upload a local folder to the
Hub with ``hf upload <user>/<repo> <folder>``; load it anywhere as ``hf://<user>/<repo>``.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save

from nextscale import __version__, storage
from nextscale.checkpoint import CheckpointError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "nextscale-pretrained/1"
KINDS = {"var": "a prior", "vqvae": "a tokenizer"}


def write_folder(url: str, kind: str, config: dict, state_dict: dict[str, torch.Tensor]) -> None:
    """Write ``url/model.safetensors`` (the tensors, contiguous on CPU) and then ``url/config.json``."""
    state = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    storage.makedirs(url)
    storage.write_bytes(storage.join(url, WEIGHTS_NAME), save(state, metadata={"format": FORMAT}))
    meta = {"format": FORMAT, "model": kind, "nextscale_version": __version__, "config": config}
    storage.write_text(storage.join(url, CONFIG_NAME), json.dumps(meta, indent=1, sort_keys=True) + "\n")


def is_pretrained(url: str) -> bool:
    """Whether ``url`` is a folder written by :func:`write_folder`."""
    try:
        return storage.exists(storage.join(url, CONFIG_NAME))
    except (OSError, ValueError, RuntimeError):
        return False


def read_config(url: str) -> dict:
    """The parsed ``config.json`` of a pretrained folder (a CheckpointError naming the file if it is not one)."""
    where = storage.join(url, CONFIG_NAME)
    try:
        config = json.loads(storage.read_text(where))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{where} is not JSON ({e}); re-save the model with save_pretrained") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT or config.get("model") not in KINDS:
        raise CheckpointError(f"{where} is not a nextscale model config (expected format {FORMAT!r} and model "
                         "'var' or 'vqvae'); save the model with nextscale.save_pretrained")
    return config


def read_folder(url: str, kind: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(model config, state dict) of the folder at ``url``, which must hold a ``kind`` model ("var" | "vqvae")."""
    config = read_config(url)
    if config["model"] != kind:
        raise CheckpointError(f"{url} holds a {config['model']} model, not {KINDS[kind]}")
    return config["config"], load_file(storage.local_copy(storage.join(url, WEIGHTS_NAME)))
