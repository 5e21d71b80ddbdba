"""A user's mistake reads as an error, not a crash: ``nextscale`` as a subprocess exits 2 with one message that
names the thing and the fix, without a traceback (unless --debug), and before any Ray worker starts."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from nextscale.cli import main

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nextscale(args: list[str], cwd: Path, **env: str | None) -> subprocess.CompletedProcess:
    """``nextscale ARGS`` in ``cwd``; ``env`` sets variables (None: removes them)."""
    environ = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "NEXTSCALE_DEBUG")}
    environ.update(env)
    environ = {k: v for k, v in environ.items() if v is not None}
    return subprocess.run([sys.executable, "-m", "nextscale.cli", *args], cwd=cwd, env=environ, capture_output=True,
                          text=True, timeout=120)


def _case(name: str, tmp: Path) -> tuple[list[str], dict[str, str | None], list[str]]:
    """(arguments, environment, fragments the message must hold) of each mistake."""
    (tmp / "images" / "cat").mkdir(parents=True)
    (tmp / "images" / "cat" / "a.jpg").write_bytes(b"\xff\xd8 not really a photo")
    tokenize = ["tokenize", f"input={tmp / 'images'}", "tokenizer=golden_tiny", f"output={tmp / 'codes'}"]
    no_keys = {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_SESSION_TOKEN": None, "AWS_PROFILE": None,
               "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "none"), "AWS_CONFIG_FILE": str(tmp / "none"),
               "AWS_EC2_METADATA_DISABLED": "true", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_free_port()}"}
    if name == "yaml_syntax":
        (tmp / "bad.yaml").write_text("input: data/images\noutput: [runs/codes\nviews: 2\n")
        return ["tokenize", str(tmp / "bad.yaml")], {}, ["bad.yaml", "is not valid YAML at line 3, column 6"]
    if name == "missing_input":
        return [*tokenize[:1], f"input={tmp / 'nope'}", *tokenize[2:]], {}, [f"input={tmp / 'nope'} does not exist"]
    if name == "images_as_codes":
        return (["train-prior", f"data.url={tmp / 'images'}", f"output={tmp / 'prior'}", "steps=1"], {},
                ["holds images, not code shards", f"nextscale tokenize input={tmp / 'images'}"])
    if name == "truncated_manifest":
        (tmp / "codes").mkdir()
        (tmp / "codes" / "manifest.json").write_text('{"format": "nextscale-codes", "num_samples": 12, "sha')
        return (["train-prior", f"data.url={tmp / 'codes'}", f"output={tmp / 'prior'}", "steps=1"], {},
                ["manifest.json is not valid JSON", "nextscale tokenize"])
    if name == "no_credentials":
        return ([*tokenize[:1], "input=s3://bucket/images", *tokenize[2:]], no_keys,
                ["no credentials for input=s3://bucket/images", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"])
    if name == "unreachable_endpoint":
        env = {**no_keys, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
        return ([*tokenize[:3], "output=s3://bucket/codes"], env,
                ["cannot reach the object store http://127.0.0.1:", "output=s3://bucket/codes", "storage.endpoint_url"])
    if name == "not_a_checkpoint":
        (tmp / "notes.pt").write_text("these are my notes, not weights\n")
        return (["sample", f"models.prior_url={tmp / 'notes.pt'}", f"models.tokenizer_url={tmp / 'notes.pt'}",
                 f"output={tmp / 'pictures'}", "device=cpu"], {},
                [f"cannot load prior {tmp / 'notes.pt'}", "not a PyTorch checkpoint"])
    if name == "output_not_creatable":
        (tmp / "file").write_text("")
        return [*tokenize[:3], f"output={tmp / 'file' / 'codes'}"], {}, [f"cannot create output={tmp / 'file' / 'codes'}"]
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["yaml_syntax", "missing_input", "images_as_codes", "truncated_manifest",
                                  "no_credentials", "unreachable_endpoint", "not_a_checkpoint",
                                  "output_not_creatable"])
def test_a_users_mistake_is_one_message_and_exit_status_2(name, tmp_path):
    args, env, fragments = _case(name, tmp_path)
    proc = _nextscale(args, tmp_path, **env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    message = [line for line in proc.stderr.splitlines() if line.startswith(f"nextscale {args[0]}: error: ")]
    assert len(message) == 1, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in message[0], message[0]
    assert "weights_only" not in proc.stderr  # never the advice to unpickle a file from a storage location
    assert "Started a local Ray instance" not in proc.stderr and not list(tmp_path.glob("codes/*.tar"))


def test_debug_shows_the_traceback_and_a_bug_keeps_its_traceback(tmp_path):
    args, _, _ = _case("yaml_syntax", tmp_path)
    proc = _nextscale(["--debug", *args], tmp_path)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr
    assert _nextscale(args, tmp_path, NEXTSCALE_DEBUG="1").returncode == 1


# ------------------------------------------------------------------------------------------------
# Mistakes found once a stage runs (a tokenizer's weights, the codes' classes, a resumed output): the same one
# line and status 2. ``nextscale.cli.main`` in this process (no Ray, one torch import for all the cases).


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """Tokenizer A and 16 codes made with it; B (A's shapes, other weights), C (another vocabulary); a prior
    trained on the codes for 2 steps."""
    import torch
    from prior_codes import write_codes

    from nextscale.tokenize.loader import save_tokenizer
    from nextscale.tokenize.vqvae import build_vqvae

    root = tmp_path_factory.mktemp("made")
    for name, seed, overrides in (("A", 0, {}), ("B", 1, {}), ("C", 2, {"vocab_size": 32})):
        torch.manual_seed(seed)
        save_tokenizer(build_vqvae("golden_tiny", **overrides), str(root / f"{name}.pt"))
    write_codes(str(root / "codes"), str(root / "A.pt"), num_samples=16, views=1, seed=0)
    with _root_logging():
        assert main(_prior(root, f"output={root / 'prior'}")) == 0
    return root


def _prior(root: Path, *extra: str) -> list[str]:
    return ["train-prior", f"data.url={root / 'codes'}", "model.preset=golden_tiny", "data.batch_size=8", "steps=2",
            "ckpt_every=2", "workers.count=0", *extra]


def _sample(root: Path, *extra: str) -> list[str]:
    return ["sample", f"models.prior_url={root / 'prior' / 'prior.pt'}", f"models.tokenizer_url={root / 'A.pt'}",
            "classes=[1]", "samples_per_class=1", "coarse_to_fine=0", "device=cpu", f"output={root / 'pictures'}",
            *extra]


@contextlib.contextmanager
def _root_logging():
    """The root logger as it was: the command sets up its own handler on the captured stderr."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        root.handlers[:], root.level = handlers, level


RUNNING = {  # name: (arguments, fragments of the message)
    "tokenizer_with_other_weights": (lambda r: _prior(r, f"data.tokenizer_url={r / 'B.pt'}", f"output={r / 'x'}"),
                                     ["tokenizer", "B.pt", "is not the one the codes in", "point data.tokenizer_url"]),
    "tokenizer_with_other_vocabulary": (lambda r: _prior(r, f"data.tokenizer_url={r / 'C.pt'}", f"output={r / 'x'}"),
                                        ["C.pt", "is not the one the codes in", "re-run `nextscale tokenize`"]),
    "override_against_the_tokenizer": (lambda r: _prior(r, "model.overrides.vocab_size=99", f"output={r / 'x'}"),
                                       ["model.overrides.vocab_size=99 disagrees with the tokenizer's 64"]),
    "fewer_classes_than_the_codes": (lambda r: _prior(r, "model.overrides.num_classes=2", f"output={r / 'x'}"),
                                     ["the codes hold 10 classes", "set model.overrides.num_classes=10"]),
    "batch_larger_than_the_codes": (lambda r: _prior(r, "data.batch_size=32", f"output={r / 'x'}"),
                                    ["fewer samples than data.batch_size"]),
    "other_family_in_the_output": (lambda r: _prior(r, "model.preset=mvar_golden_tiny", "steps=4",
                                                    f"output={r / 'prior'}"),
                                   ["holds a VAR (model.preset=golden_tiny)", "resume with model.preset=golden_tiny"]),
    "class_the_prior_lacks": (lambda r: _sample(r, "classes=[99]"), ["99 is not a class of this prior"]),
    "prior_of_another_tokenizer": (lambda r: _sample(r, f"models.tokenizer_url={r / 'C.pt'}"),
                                   ["does not fit the tokenizer", "use the tokenizer the prior was trained with"]),
    "missing_tokenizer_preset": (lambda r: _sample(r, "models.tokenizer_url=golden_tinyy"),
                                 ["tokenizer 'golden_tinyy' does not exist", "a preset name"]),
    "edit_image_not_an_image": (lambda r: _sample(r, f"edit.image={r / 'A.pt'}"),
                                ["cannot use image", "A.pt", "not an image", "remove or replace the file"]),
    "cuda_without_a_gpu": (lambda r: _sample(r, "device=cuda"), ["device=cuda but no CUDA device is visible"]),
}


@pytest.mark.parametrize("name", list(RUNNING))
def test_a_mistake_found_while_a_stage_runs_is_one_message_and_exit_status_2(name, made, capsys):
    import torch

    if name == "cuda_without_a_gpu" and torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    args, fragments = RUNNING[name]
    args = args(made)
    with _root_logging():
        code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    message = [line for line in err.splitlines() if line.startswith(f"nextscale {args[0]}: error: ")]
    assert len(message) == 1 and "Traceback" not in err, err[-3000:]
    for fragment in fragments:
        assert fragment in message[0], message[0]
