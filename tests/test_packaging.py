"""Packaging: the wheel works outside the repository (configs shipped as package data, selectable by name),
the Ray pin agrees with the cluster image, the license matches, and nothing points outside the repository."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from nextscale.config import ConfigError, locate_config, shipped_configs

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


# without the PYTHONPATH the tests set: the repository must not stand in for what the wheel installs
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _run(*cmd, cwd: Path) -> str:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_the_wheel_runs_outside_the_repository_with_its_shipped_configs(tmp_path):
    # build from a copy (setuptools writes build/ and egg-info beside the sources), without build isolation
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "nextscale", src / "nextscale", ignore=shutil.ignore_patterns("__pycache__"))
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist",
         src, cwd=tmp_path)
    wheel, = (tmp_path / "dist").glob("nextscale-*.whl")

    # a fresh environment holding only the wheel; its dependencies come from this one's site-packages
    # (a path in a .pth file: this environment's own nextscale, an editable install, stays invisible)
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel,
         cwd=tmp_path)
    site = _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run(python, "-c", "import nextscale; print(nextscale.__file__, nextscale.__version__)", cwd=elsewhere).split()
    assert where[0].startswith(site) and where[1] == PYPROJECT["project"]["version"]
    assert "train-prior" in _run(venv / "bin" / "nextscale", "--help", cwd=elsewhere)
    printed = yaml.safe_load(_run(venv / "bin" / "nextscale", "train-prior", "prior_d16", "epochs=3",
                                  "--print-config", cwd=elsewhere))
    assert (printed["model"]["preset"], printed["epochs"], printed["data"]["batch_size"]) == ("d16", 3, 768)


def test_stage_configs_ship_in_the_package_and_are_found_by_name(tmp_path, monkeypatch):
    assert sorted(p.name for p in (REPO / "configs").iterdir()) == ["cluster"], \
        "stage configs belong in nextscale/configs (shipped with the package), configs/ holds the cluster files"
    monkeypatch.chdir(tmp_path)
    assert "prior_d16" in shipped_configs() and "fid_imagenet512" in shipped_configs()
    assert locate_config("prior_d16") == locate_config("prior_d16.yaml") == \
        str(REPO / "nextscale" / "configs" / "prior_d16.yaml")
    (tmp_path / "prior_d16.yaml").write_text("epochs: 1\n")  # a file of that name here wins
    assert locate_config("prior_d16.yaml") == "prior_d16.yaml"
    with pytest.raises(ConfigError, match=r"did you mean 'prior_demo'\? give a path or one of: fid_demo, "):
        locate_config("prior_demoo")
    with pytest.raises(ConfigError, match="does not exist"):
        locate_config("configs/prior_d16.yaml")  # a path that does not exist is not silently replaced


def test_the_ray_pin_is_the_cluster_images_ray():
    pins = {re.sub(r"\[.*\]", "", d) for d in PYPROJECT["project"]["dependencies"] if d.startswith("ray")}
    version, = (p.split("==")[1] for p in pins)
    assert PYPROJECT["project"]["optional-dependencies"]["cluster"] == [f"ray[default]=={version}"]
    cluster = REPO / "configs" / "cluster"
    assert re.search(rf"^FROM rayproject/ray:{re.escape(version)}-", (cluster / "Dockerfile").read_text(), re.M)
    for name in ("aws.yaml", "gcp.yaml"):
        assert yaml.safe_load((cluster / name).read_text())["docker"]["image"].startswith(f"rayproject/ray:{version}-")
    for name in ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml"):
        assert f'rayVersion: "{version}"' in (cluster / name).read_text()


def test_license_and_extras():
    assert PYPROJECT["project"]["license"] == "MIT"
    assert (REPO / "LICENSE").read_text().startswith("MIT License")
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert {"cluster", "hub", "gcs", "wandb", "dev"} <= set(extras)
    deps = " ".join(PYPROJECT["project"]["dependencies"])
    assert "torch>=2.6,<2.15" in deps and "braceexpand" in deps and "wandb" not in deps


def test_nothing_points_outside_the_repository():
    tracked = _run("git", "ls-files", cwd=REPO).split()
    # documents users do not have (the shared test data and tools beside a development checkout are
    # developer infrastructure: the tests and make targets that use them say so and skip without them)
    pattern = re.compile(r"DESIGN\.md|(?:var|mvar)_reference|shared/reference")
    allowed = {"tests/test_packaging.py", "tests/golden/README.md"}  # how the golden fixtures were made
    hits = [f"{name}:{i}" for name in tracked if name.endswith((".py", ".md", ".yaml", ".toml", "Makefile"))
            and name not in allowed
            for i, line in enumerate((REPO / name).read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, f"references to files users do not have (put what they need in docs/): {hits}"
