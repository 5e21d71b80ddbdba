"""A model folder to share: ``config.json`` (what to build) + ``model.safetensors`` (the weights).

``save_pretrained(model, url)`` writes one for a nextscale VAR prior or VQVAE tokenizer to any storage
location (a local folder, ``s3://``, ``gs://``, or ``hf://<user>/<repo>`` with write access), and
``from_pretrained(url)`` builds the model back from it, bitwise identical. safetensors holds tensors only,
so loading a folder runs no code, whoever wrote it. Upload a local folder to the Hub with
``hf upload <user>/<repo> <folder>``; load it anywhere as ``hf://<user>/<repo>``.
"""

from __future__ import annotations

import json

from torch import nn

from nextscale import storage
from nextscale.checkpoint import CheckpointError
from nextscale.config import from_dict, to_dict

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "nextscale-pretrained/1"


def _kind(model: nn.Module) -> str:
    from nextscale.prior.model import NextScalePrior
    from nextscale.tokenize.vqvae import VQVAE

    if isinstance(model, NextScalePrior):
        return "var"
    if isinstance(model, VQVAE):
        return "vqvae"
    raise TypeError(f"save_pretrained takes a nextscale VAR or VQVAE, not {type(model).__name__}")


def save_pretrained(model: nn.Module, url: str) -> None:
    """Write ``url/config.json`` and ``url/model.safetensors`` (float32 weights on CPU; the config last)."""
    from safetensors.torch import save

    from nextscale import __version__

    kind = _kind(model)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    storage.makedirs(url)
    storage.write_bytes(storage.join(url, WEIGHTS_NAME), save(state, metadata={"format": FORMAT}))
    config = {"format": FORMAT, "model": kind, "nextscale_version": __version__, "config": to_dict(model.cfg)}
    storage.write_json(storage.join(url, CONFIG_NAME), config, sort_keys=True)


def is_pretrained(url: str) -> bool:
    """Whether ``url`` is a folder written by :func:`save_pretrained`."""
    try:
        return storage.exists(storage.join(url, CONFIG_NAME))
    except (OSError, ValueError, RuntimeError):
        return False


def read_config(url: str) -> dict:
    """The parsed ``config.json`` of a pretrained folder (a ValueError naming the file if it is not one)."""
    where = storage.join(url, CONFIG_NAME)
    try:
        config = json.loads(storage.read_text(where))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{where} is not JSON ({e}); re-save the model with save_pretrained") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT or config.get("model") not in ("var", "vqvae"):
        raise CheckpointError(f"{where} is not a nextscale model config (expected format {FORMAT!r} and model "
                         "'var' or 'vqvae'); save the model with nextscale.save_pretrained")
    return config


def from_pretrained(url: str, kind: str = "") -> nn.Module:
    """The model saved at ``url`` (eval mode, gradients off); ``kind`` ("var" | "vqvae") refuses the other."""
    from safetensors.torch import load_file

    from nextscale.prior.convert import load_official_var
    from nextscale.prior.families import config_from_dict
    from nextscale.tokenize.convert import check_state_dict
    from nextscale.tokenize.vqvae import VQVAE, VQVAEConfig

    config = read_config(url)
    if kind and config["model"] != kind:
        want = {"var": "a prior", "vqvae": "a tokenizer"}[kind]
        raise CheckpointError(f"{url} holds a {config['model']} model, not {want}")
    state_dict = load_file(storage.local_copy(storage.join(url, WEIGHTS_NAME)))
    if config["model"] == "var":
        model = load_official_var(state_dict, config_from_dict(config["config"], prefix=f"{url}: config."))
    else:
        model = VQVAE(from_dict(VQVAEConfig, config["config"], prefix=f"{url}: config."))
        model.load_state_dict(check_state_dict(state_dict, model), strict=True)
    return model.eval().requires_grad_(False)

