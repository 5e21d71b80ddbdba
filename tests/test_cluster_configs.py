"""configs/cluster/: the launcher YAMLs validate against the installed Ray's autoscaler schema, the KubeRay
manifests have the fields the operator needs, and every nextscale command and config they name exists."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from nextscale.config import load_config, locate_config, split_config_args
from nextscale.pipelines.common import is_secret
from nextscale.stages import STAGES

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "configs" / "cluster"
LAUNCHER = ["aws.yaml", "gcp.yaml"]
GPU_NODE = {"aws.yaml": ("InstanceType", "p5.48xlarge"), "gcp.yaml": ("machineType", "a3-highgpu-8g")}


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _check_nextscale_command(command: str) -> str:
    """``python -m nextscale.cli <stage> [CONFIG] overrides``: the stage exists and the config loads; returns the stage."""
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "nextscale.cli"], command
    stage, args = argv[3], argv[4:]
    assert stage in STAGES, f"{stage!r} is not a nextscale stage"
    path, overrides = split_config_args(args)
    load_config(STAGES[stage].config, locate_config(path) if path else None, overrides)
    return stage


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_validates_against_the_installed_ray_schema(name):
    import jsonschema
    import ray
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = _load(name)
    jsonschema.validate(config, schema)  # raw file: no unknown top-level or docker keys
    validate_config(prepare_config(copy.deepcopy(config)))  # with Ray's defaults filled in, as `ray up` does

    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}, "the head must not take tasks"
    key, machine = GPU_NODE[name]
    assert types["gpu"]["node_config"][key] == machine
    assert types["cpu"]["resources"]["decode"] > 0
    # stages with device "auto" look at the GPUs present when they start: keep one GPU node up
    assert types["gpu"]["min_workers"] >= 1
    # the image runs the Ray version this project is tested with (client and cluster must match)
    assert config["docker"]["image"].split(":")[1].startswith(ray.__version__ + "-")
    # the setup installs this checkout, synced to the nodes by file_mounts (run `ray up` from the repo root)
    target, source = next(iter(config["file_mounts"].items()))
    assert (REPO / source / "pyproject.toml").is_file()
    assert any(target in c and "pip install" in c for c in config["setup_commands"])
    assert {".venv", ".git", "data", "runs"} <= set(config["rsync_exclude"])
    # safe by default: token auth in every container, the token on every node, the job API on loopback only
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert config["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    assert "--dashboard-host=127.0.0.1" in config["head_start_ray_commands"][-1]
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert not [c for c in starts if "0.0.0.0" in c or "RAY_AUTH_MODE=disabled" in c]


def _pod_groups(cluster_spec: dict) -> list[dict]:
    return [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]


def _check_ray_cluster_spec(spec: dict) -> None:
    import ray

    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"] == {"mode": "token"}, "the dashboard listens on 0.0.0.0 in the pod: token auth on"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert spec["workerGroupSpecs"], "no worker groups"
    for group in _pod_groups(spec):
        assert isinstance(group["rayStartParams"], dict)
        containers = group["template"]["spec"]["containers"]
        assert containers and all(c["image"] for c in containers)
    gpu = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu"]
    assert gpu and gpu[0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        resources = group["rayStartParams"].get("resources")
        if resources:  # KubeRay passes it to `ray start --resources`, a quoted JSON object
            assert isinstance(json.loads(json.loads(resources)), dict)


def test_kuberay_raycluster_manifest():
    doc = _load("kuberay-raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster" and doc["metadata"]["name"]
    _check_ray_cluster_spec(doc["spec"])


def test_kuberay_rayjob_manifest_runs_a_real_stage_with_a_valid_runtime_env():
    from ray.runtime_env import RuntimeEnv

    doc = _load("kuberay-rayjob.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob" and doc["metadata"]["name"]
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["submitterConfig"]["backoffLimit"] >= 1
    _check_ray_cluster_spec(spec["rayClusterSpec"])
    assert _check_nextscale_command(spec["entrypoint"]) == "train-prior"
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == "/home/ray/nextscale"  # where configs/cluster/Dockerfile puts the repo
    assert runtime_env["env_vars"]["NEXTSCALE_IN_RAY_JOB"] == "1"
    assert runtime_env["env_vars"]["RAY_OVERRIDE_JOB_RUNTIME_ENV"] == "1"  # else init_ray's env_vars conflict
    assert not [k for k in runtime_env["env_vars"] if is_secret(k)], "secrets belong in the pods' Secret"
    RuntimeEnv(**{**runtime_env, "working_dir": str(REPO)})  # every field is one Ray knows, with valid values
    # the job asks for as many Train workers as the worker groups have GPUs
    argv = shlex.split(spec["entrypoint"])
    workers = int(next(a for a in argv if a.startswith("workers.count=")).partition("=")[2])
    gpus = sum(g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
               for g in spec["rayClusterSpec"]["workerGroupSpecs"])
    assert workers == gpus


def test_dockerfile_copies_what_exists_and_pins_the_ray_version():
    import ray

    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray.__version__)}-", text, re.M)
    for line in re.findall(r"^COPY .*$", text, re.M):
        for source in line.split()[1:-1]:
            if not source.startswith("--"):
                assert (REPO / source).exists(), f"Dockerfile copies {source}, which does not exist"
    assert "nextscale" in text and "/home/ray/nextscale" in text


def test_docs_name_only_existing_configs_and_stages():
    texts = [(CLUSTER / "README.md").read_text(), (REPO / "docs" / "cluster.md").read_text()]
    for text in texts:
        for path in sorted(set(re.findall(r"configs/[\w/.-]+\.ya?ml", text))):
            assert (REPO / path).is_file(), f"{path} is named in the docs but does not exist"
            if not path.startswith("configs/cluster/"):
                load_config(STAGES[_stage_of(path)].config, str(REPO / path))
        for stage in re.findall(r"nextscale submit ([a-z][a-z-]*)", text):
            assert stage in STAGES, stage
    # every `make submit-<stage> CONFIG=... ARGS="..."` of the guide loads with its overrides
    guide = (REPO / "docs" / "cluster.md").read_text().replace("\\\n", " ").replace("$BUCKET", "s3://bucket")
    commands = re.findall(r'make submit-([a-z-]+) CONFIG=(\S+) ARGS="([^"]*)"', guide)
    assert {stage for stage, *_ in commands} == {"tokenize", "train-prior", "fid"}
    for stage, config, args in commands:
        load_config(STAGES[stage].config, locate_config(config), args.split())


def _stage_of(path: str) -> str:
    name = Path(path).stem
    for prefix, stage in (("tokenizer", "train-tokenizer"), ("tokenize", "tokenize"), ("prior", "train-prior"),
                          ("fid", "fid"), ("sample", "sample"), ("bench", "bench"), ("demo", "demo")):
        if name.startswith(prefix):
            return stage
    raise AssertionError(f"cannot tell the stage of {path}")
