"""The typed config loader, and every file in configs/ loads into its stage's dataclass."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import pytest
import yaml

from nextscale.config import ConfigError, describe, doc, dump_yaml, load_config, require
from nextscale.stages import STAGES


@dataclasses.dataclass(frozen=True, kw_only=True)
class Optim:
    lr: float = doc(1e-4, "learning rate")
    betas: tuple[float, float] = doc((0.9, 0.95), "AdamW betas")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Toy:
    depth: int = doc(16, "blocks")
    name: str = doc("x", "a name")
    patch_nums: tuple[int, ...] = doc((1, 2, 3), "scales")
    precision: Literal["fp32", "bf16"] = doc("fp32", "precision")
    compile: bool = doc(False, "torch.compile")
    resume: str | None = doc(None, "checkpoint")
    resources: dict[str, float] = doc({}, "custom Ray resources")
    optim: Optim = doc(Optim(), "optimizer")

    def __post_init__(self):
        require(self.depth > 0, f"depth must be positive, got {self.depth}")


def test_defaults_file_and_overrides_in_order_of_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("depth: 20\noptim:\n  lr: 3.0e-4\n")
    cfg = load_config(Toy, str(path), ["optim.lr=2e-4", "patch_nums=1,2,4", "compile=true", "precision=bf16"])
    assert cfg.depth == 20 and cfg.optim.lr == 2e-4 and cfg.optim.betas == (0.9, 0.95)
    assert cfg.patch_nums == (1, 2, 4) and cfg.compile is True and cfg.precision == "bf16"
    assert load_config(Toy, None, ["patch_nums=[4, 5]", "resume=none"]).patch_nums == (4, 5)
    assert load_config(Toy, None, ["resources={decode: 1}"]).resources == {"decode": 1}


def test_override_values_are_coerced_by_declared_type_not_guessed():
    cfg = load_config(Toy, None, ["name=123", "optim.lr=1", "resume=s3://b/ckpt"])
    assert cfg.name == "123" and isinstance(cfg.optim.lr, float) and cfg.resume == "s3://b/ckpt"


@pytest.mark.parametrize("override, message", [
    (["optim.lrr=1"], "unknown config key 'optim.lrr'; did you mean 'optim.lr'? (allowed keys here: betas, lr)"),
    (["zzz=1"], "unknown config key 'zzz' (allowed keys here: compile, depth, name"),
    (["depth=deep"], "'depth' must be an integer, got 'deep'"),
    (["precision=fp8"], "'precision' must be one of 'fp32', 'bf16'"),
    (["compile=maybe"], "'compile' must be true or false"),
    (["optim.betas=0.9"], "'optim.betas' needs 2 values, got 1"),
    (["depth=0"], "depth must be positive, got 0"),
    (["optim=3"], "'optim' is a section"),
    (["depth"], "must look like key.sub=value"),
])
def test_bad_keys_and_values_name_the_key_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(Toy, None, override)
    assert message in str(e.value)


def test_yaml_type_errors_and_missing_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("depth: 2.5\n")
    with pytest.raises(ConfigError, match="'depth' must be an integer, got 2.5"):
        load_config(Toy, str(path))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Toy, str(tmp_path / "nope.yaml"))


def test_dump_round_trips_and_describe_lists_every_leaf():
    cfg = load_config(Toy, None, ["optim.lr=5e-4", "patch_nums=1,2"])
    assert load_config(Toy, None, []) != cfg
    again = Toy(**{**yaml.safe_load(dump_yaml(cfg)), "optim": Optim(lr=5e-4)} | {"patch_nums": (1, 2)})
    assert again == cfg
    keys = [row[0] for row in describe(Toy)]
    assert keys == ["depth", "name", "patch_nums", "precision", "compile", "resume", "resources", "optim.lr", "optim.betas"]


CONFIGS = sorted((Path(__file__).parent.parent / "nextscale" / "configs").glob("*.yaml"))
# a config file is loaded by the stage named by its file name prefix
PREFIX_TO_STAGE = {"tokenize": "tokenize", "tokenizer": "train-tokenizer", "prior": "train-prior",
                   "sample": "sample", "fid": "fid", "demo": "demo", "bench": "bench"}


@pytest.mark.parametrize("path", [p for p in CONFIGS if "cluster" not in p.parts], ids=lambda p: p.name)
def test_every_config_file_loads_into_its_stage_config(path):
    stage = PREFIX_TO_STAGE[path.stem.split("_")[0]]
    cfg = load_config(STAGES[stage].config, str(path))
    assert dataclasses.is_dataclass(cfg)


def test_docs_config_reference_is_current():
    from nextscale.cli import config_reference

    committed = (Path(__file__).parent.parent / "docs" / "configs.md").read_text()
    assert committed == config_reference(), "docs/configs.md is stale: run `make docs`"


@pytest.mark.parametrize("stage, override, guess", [
    ("train-prior", "model.depthh=3", "model.overrides.depth"),     # a typo of a key inside a dict of overrides
    ("train-prior", "depth=3", "model.overrides.depth"),            # a leaf given at the wrong depth
    ("train-prior", "model.overrides.embed_dm=3", "model.overrides.embed_dim"),
    ("train-tokenizer", "model.vocab_sise=3", "model.overrides.vocab_size"),
    ("train-prior", "data.batchsize=8", "data.batch_size"),
])
def test_unknown_keys_get_a_did_you_mean(stage, override, guess):
    with pytest.raises(ConfigError) as e:
        load_config(STAGES[stage].config, None, [override, "steps=1"] if stage == "train-prior" else [override])
    assert f"did you mean {guess!r}?" in str(e.value)


def test_cli_help_lists_each_stage_once_and_teaches_choices(capsys):
    import re

    from nextscale.cli import _stage_help, main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in [*STAGES, "submit", "make-demo-data", "config-docs"]:
        assert len(re.findall(rf"^\s+{re.escape(name)}(\s|$)", out, re.M)) == 1, (name, out)
    text = _stage_help("train-prior", width=60)
    words = " ".join(text.split())
    assert "[one of fp32, bf16, fp16, default \"bf16\"]" in words and "one of ddp, fsdp" in words
    assert max(len(line) for line in text.splitlines()) <= 60
    assert _stage_help("train-prior", width=60) != _stage_help("train-prior", width=140)


def test_cli_print_config_prints_the_resolved_config_and_exits(capsys, tmp_path):
    from nextscale.cli import main

    path = tmp_path / "p.yaml"
    path.write_text("steps: 7\noptim:\n  lr: 0.01\n")
    assert main(["train-prior", str(path), "--print-config", "optim.lr=0.02", "output=" + str(tmp_path / "o")]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["steps"] == 7 and printed["optim"]["lr"] == 0.02 and printed["optim"]["betas"] == [0.9, 0.95]
    assert not (tmp_path / "o").exists()  # nothing ran
    assert main(["train-prior", "model.depthh=3", "--print-config"]) == 2
    assert "did you mean 'model.overrides.depth'?" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# One vocabulary for "which device": a `device` key with the values auto / cpu / cuda in every stage that computes


def _device_keys(cls: type, prefix: str = "") -> list[str]:
    import typing

    from nextscale.config import Device

    hints, out = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += _device_keys(hints[f.name], f"{prefix}{f.name}.")
        elif f.name == "device" or "gpu" in f.name:
            assert hints[f.name] == Device, f"{prefix}{f.name}"
            out.append(prefix + f.name)
    return out


def test_every_stage_names_its_device_with_the_same_key_and_values():
    keys = {name: _device_keys(stage.config) for name, stage in STAGES.items()}
    assert keys == {"tokenize": ["device"], "train-tokenizer": ["workers.device"], "train-prior": ["workers.device"],
                    "sample": ["device"], "fid": ["device"], "demo": [], "bench": ["device"]}


@pytest.mark.parametrize("stage, old, new_key, value", [
    ("tokenize", "use_gpu=auto", "device", "auto"),
    ("tokenize", "use_gpu=true", "device", "cuda"),
    ("tokenize", "use_gpu=false", "device", "cpu"),
    ("train-prior", "use_gpu=true", "workers.device", "cuda"),  # the key before the workers section
    ("train-prior", "workers.use_gpu=false", "workers.device", "cpu"),
    ("train-tokenizer", "workers.use_gpu=true", "workers.device", "cuda"),
])
def test_the_old_gpu_keys_load_as_device_with_a_warning_naming_it(stage, old, new_key, value, caplog):
    extra = ["steps=1"] if stage == "train-prior" else []
    cfg = load_config(STAGES[stage].config, None, [old, *extra])
    section = cfg.workers if new_key.startswith("workers.") else cfg
    assert section.device == value
    assert f"config key {old.partition('=')[0]!r} is deprecated, use {new_key!r}" in caplog.text


def test_an_old_gpu_key_from_a_yaml_file_and_its_mistakes(tmp_path):
    path = tmp_path / "prior.yaml"
    path.write_text("steps: 1\nworkers:\n  count: 2\n  use_gpu: true\n")
    assert load_config(STAGES["train-prior"].config, str(path)).workers.device == "cuda"
    with pytest.raises(ConfigError, match="'workers.use_gpu' and 'workers.device' are both set"):
        load_config(STAGES["train-prior"].config, str(path), ["workers.device=cpu"])
    with pytest.raises(ConfigError, match="'use_gpu' must be true or false, got 'maybe'"):
        load_config(STAGES["tokenize"].config, None, ["use_gpu=maybe"])


@pytest.mark.parametrize("stage", ["sample", "fid"])
def test_the_old_top_level_sampling_keys_load_into_the_sampling_section(stage, caplog):
    cfg = load_config(STAGES[stage].config, None, ["cfg=2.5", "top_k=10"])
    assert (cfg.sampling.guidance, cfg.sampling.top_k) == (2.5, 10)
    assert "config key 'cfg' is deprecated, use 'sampling.guidance'" in caplog.text
    cfg = load_config(STAGES[stage].config, None, ["sampling.cfg=3"])  # the section's own old name of guidance
    assert cfg.sampling.guidance == 3.0
    assert "config key 'sampling.cfg' is deprecated, use 'sampling.guidance'" in caplog.text


def test_pick_device_is_the_one_rule_for_this_process_and_for_a_ray_cluster():
    import torch

    from nextscale.devices import pick_device

    assert pick_device("cpu", cluster_gpus=4) == torch.device("cpu")
    assert pick_device("auto", cluster_gpus=0) == torch.device("cpu")
    assert pick_device("auto", cluster_gpus=2) == torch.device("cuda")  # a job's actors, wherever the GPUs are
    with pytest.raises(ConfigError, match="workers.device=cuda but the Ray cluster has no GPUs; set "
                                          "workers.device=auto or run on a cluster with GPUs"):
        pick_device("cuda", key="workers.device", cluster_gpus=0)
    assert pick_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device=cuda but no CUDA device is visible here; set device=auto or "
                                              "device=cpu"):
            pick_device("cuda")
