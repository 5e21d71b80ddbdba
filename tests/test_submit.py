"""``nextscale submit``: job plans (ids, entrypoint, env, shipped files) without a cluster, then real submissions
to a ``ray start --head`` on 127.0.0.1 (token auth on, like Ray 2.60's default) against the moto S3 server.

The head is started without AWS_* variables and without the checkout on its PYTHONPATH: what the jobs
need (code, storage credentials) must travel with the submission. Do not use ``ray_local`` here: this
module talks to its own Ray head only.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import types

import pytest
import yaml
from ray_head import REPO, RayHead, dashboard_deps_path

from nextscale import storage
from nextscale.cli import main as cli_main
from nextscale.config import ConfigError
from nextscale.pipelines import submit as sub


def _yaml(path, data) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


# ------------------------------------------------------------------------------------------------
# Plans: no cluster involved


def test_submission_id_is_keyed_by_stage_output_and_resolved_config(tmp_path):
    base = {"input": "s3://b/images", "tokenizer": "golden_tiny", "output": "s3://b/codes"}
    a = sub.plan("tokenize", _yaml(tmp_path / "a.yaml", base), ["views=2"])
    assert a == sub.plan("tokenize", _yaml(tmp_path / "a.yaml", base), ["views=2"])
    # the same resolved config written differently (file vs override) is the same job
    same = sub.plan("tokenize", _yaml(tmp_path / "b.yaml", {**base, "views": 2}), [])
    assert same.id_prefix == a.id_prefix and same.config_yaml == a.config_yaml
    other_output = sub.plan("tokenize", _yaml(tmp_path / "a.yaml", base), ["views=2", "output=s3://b/codes2"])
    other_config = sub.plan("tokenize", _yaml(tmp_path / "a.yaml", base), ["views=3"])
    assert len({a.id_prefix, other_output.id_prefix, other_config.id_prefix}) == 3
    assert a.id_prefix.startswith("ns-tokenize-s3-b-codes-") and a.id_prefix.endswith(a.config_hash)
    assert other_output.id_prefix.startswith("ns-tokenize-s3-b-codes2-")
    assert a.metadata == {"nextscale_stage": "tokenize", "nextscale_output": "s3://b/codes",
                          "nextscale_config_hash": a.config_hash}


def test_entrypoint_names_the_shipped_config_and_quotes_overrides(tmp_path):
    outside = sub.plan("tokenize", _yaml(tmp_path / "tok.yaml", {"output": "o"}), ["input=a dir/with space"])
    assert outside.entrypoint == "python -m nextscale.cli tokenize submitted/tok.yaml 'input=a dir/with space'"
    inside = sub.plan("train-tokenizer", "tokenizer_demo", ["optim.steps=3"])
    assert inside.entrypoint == \
        "python -m nextscale.cli train-tokenizer nextscale/configs/tokenizer_demo.yaml optim.steps=3"
    assert sub.plan("tokenize", None, ["output=o"]).entrypoint == "python -m nextscale.cli tokenize output=o"


def test_working_dir_holds_the_package_the_configs_and_the_submitted_file(tmp_path):
    config = _yaml(tmp_path / "tok.yaml", {"output": "o"})
    staging = tmp_path / "staging"
    staging.mkdir()
    sub.stage_working_dir(str(staging), config)
    assert (staging / "nextscale" / "cli.py").read_text() == (REPO / "nextscale" / "cli.py").read_text()
    assert (staging / "nextscale" / "configs" / "tokenizer_demo.yaml").is_file()
    assert (staging / "submitted" / "tok.yaml").read_text() == (tmp_path / "tok.yaml").read_text()
    assert not list(staging.rglob("__pycache__")) and not (staging / "tests").exists()
    env = sub.plan("tokenize", config).runtime_env(str(staging), pip=["x==1"])
    assert env["working_dir"] == str(staging) and env["pip"] == ["x==1"]


def test_forwarded_environment():
    environ = {"AWS_ENDPOINT_URL": "http://e", "AWS_SECRET_ACCESS_KEY": "s", "WANDB_API_KEY": "k",
               "WANDB_MODE": "offline", "GOOGLE_APPLICATION_CREDENTIALS": "/k.json", "HOME": "/root",
               "PYTHONPATH": "/work", "WANDB_DIR": "/tmp/w", "RAY_AUTH_TOKEN": "t"}
    settings = {"AWS_ENDPOINT_URL": "http://e", "WANDB_MODE": "offline", "GOOGLE_APPLICATION_CREDENTIALS": "/k.json",
                "NEXTSCALE_IN_RAY_JOB": "1", "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}
    assert sub.forwarded_env(environ) == {**settings, "AWS_SECRET_ACCESS_KEY": "s", "WANDB_API_KEY": "k"}
    assert sub.forwarded_env(environ, credentials=False) == settings
    assert sub.plan("tokenize", None, ["output=o"], environ).credentials == ("AWS_SECRET_ACCESS_KEY", "WANDB_API_KEY")
    no_keys = sub.plan("tokenize", None, ["output=o"], environ, credentials=False)
    assert no_keys.credentials == () and no_keys.env_vars == settings


def test_auth_headers(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert sub.auth_headers({"RAY_AUTH_TOKEN": "abc"}) == {"Authorization": "Bearer abc"}
    assert sub.auth_headers({"RAY_AUTH_TOKEN": "abc", "RAY_AUTH_MODE": "disabled"}) == {}
    assert sub.auth_headers({}) == {}
    (tmp_path / "tok").write_text("fromfile\n")
    assert sub.auth_headers({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "tok")}) == {"Authorization": "Bearer fromfile"}
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("default")
    assert sub.auth_headers({}) == {"Authorization": "Bearer default"}


def test_attempt_numbers_and_live_attempts():
    jobs = [types.SimpleNamespace(submission_id=i, status=s) for i, s in
            [("ns-x-1", "FAILED"), ("ns-x-3", "RUNNING"), ("ns-x-2", "SUCCEEDED"), ("ns-xy-4", "RUNNING"),
             (None, "RUNNING"), ("raysubmit_abc", "PENDING")]]
    assert [n for n, _ in sub._attempts(jobs, "ns-x")] == [1, 2, 3]


class FakeJobs:
    """A JobSubmissionClient stand-in: scripted job lists, statuses and logs."""

    def __init__(self, listings=(), statuses=(), logs="", stream_upto=None):
        self.listings, self.statuses, self.logs, self.stream_upto = list(listings), list(statuses), logs, stream_upto
        self.submitted = []

    def list_jobs(self):
        return self.listings.pop(0) if len(self.listings) > 1 else self.listings[0]

    def submit_job(self, *, entrypoint, submission_id, runtime_env, metadata):
        if self.submitted == [] and self.stream_upto == "race":
            self.submitted.append(None)
            raise RuntimeError(f"Job with submission_id {submission_id} already exists. Please use a different one.")
        assert os.path.isfile(os.path.join(runtime_env["working_dir"], "nextscale", "cli.py"))
        self.submitted.append(submission_id)

    async def tail_job_logs(self, job_id):
        yield self.logs[: self.stream_upto]
        raise RuntimeError("connection closed unexpectedly")

    def get_job_status(self, job_id):
        return self.statuses.pop(0)

    def get_job_logs(self, job_id):
        return self.logs


def test_follow_falls_back_to_polling_without_repeating_lines():
    jobs = FakeJobs(statuses=["RUNNING", "SUCCEEDED"], logs="line 1\nline 2\nline 3\n", stream_upto=7)
    out = io.StringIO()
    assert sub.follow(jobs, "id", out, poll_s=0) == "SUCCEEDED"
    assert out.getvalue() == "line 1\nline 2\nline 3\n"


def test_a_concurrent_submission_of_the_same_attempt_is_joined(tmp_path):
    job = sub.plan("tokenize", None, ["output=o"])
    live = types.SimpleNamespace(submission_id=f"{job.id_prefix}-3", status="PENDING")
    done = types.SimpleNamespace(submission_id=f"{job.id_prefix}-2", status="FAILED")
    jobs = FakeJobs(listings=[[done], [done, live]], stream_upto="race")
    assert sub.submit_or_attach(jobs, job, None) == (f"{job.id_prefix}-3", True)
    jobs = FakeJobs(listings=[[done]])
    assert sub.submit_or_attach(jobs, job, None) == (f"{job.id_prefix}-3", False)
    assert jobs.submitted == [f"{job.id_prefix}-3"]


def test_errors_before_anything_is_sent(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match="views"):
        sub.submit("tokenize", None, ["views=0"], address="http://127.0.0.1:9")
    with pytest.raises(sub.SubmitError, match="unknown stage"):
        sub.submit("nope", None, [])
    with pytest.raises(sub.SubmitError, match="RAY_ADDRESS"):
        sub.submit("tokenize", None, [])
    assert cli_main(["submit", "tokenize", "views=0", "--no-wait"]) == 2
    with pytest.raises(sub.SubmitError, match="cannot reach the Ray dashboard"):
        sub.submit("tokenize", None, [], address="http://127.0.0.1:9")


# ------------------------------------------------------------------------------------------------
# A real Ray head and its job API


@pytest.fixture(scope="module")
def ray_head():
    if dashboard_deps_path() is None:
        pytest.skip("a Ray head with the job API needs ray[default]'s dashboard dependencies: pip install 'ray[default]'")
    token = secrets.token_hex(16)
    with RayHead(num_cpus=4, token=token) as head:
        yield types.SimpleNamespace(address=head.address, token=token)


@pytest.fixture
def cluster_env(ray_head, s3_server, monkeypatch):
    """This process as a user's shell: RAY_ADDRESS + token, storage credentials (AWS_* from s3_server)."""
    monkeypatch.setenv("RAY_ADDRESS", ray_head.address)
    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_head.token)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    return ray_head


def _summary(logs: str) -> dict:
    """The JSON summary ``nextscale <stage>`` prints last."""
    start = logs.rindex("\n{\n")
    return json.loads(logs[start + 1: logs.index("\n}\n", start) + 2])


@pytest.mark.slow
def test_credentials_are_never_sent_to_a_head_without_auth(monkeypatch):
    """A head started without token auth answers anyone: the submission stops before anything is sent."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    monkeypatch.setenv("WANDB_API_KEY", "k3y")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)  # set by the S3 fixture when other tests ran first
    with RayHead(num_cpus=1) as head:
        assert sub.head_requires_auth(head.address) is False
        with pytest.raises(sub.SubmitError, match="refusing to send AWS_SECRET_ACCESS_KEY, WANDB_API_KEY"):
            sub.submit("tokenize", None, ["output=o"], address=head.address, wait=False)
        assert cli_main(["submit", "tokenize", "output=o", "--address", head.address, "--no-wait"]) == 2
        assert sub.client(head.address).list_jobs() == []
        # with --no-credentials the nodes bring their own: nothing secret in the plan, nothing to refuse
        job = sub.plan("tokenize", None, ["output=o"], credentials=False)
        assert job.credentials == () and "AWS_SECRET_ACCESS_KEY" not in job.env_vars
        sub.check_credentials_go_to_an_authenticated_head(job, head.address)


@pytest.mark.slow
def test_missing_token_is_a_clear_error(ray_head, monkeypatch, tmp_path):
    assert sub.head_requires_auth(ray_head.address) is True
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with pytest.raises(sub.SubmitError, match="RAY_AUTH_TOKEN"):
        sub.client(ray_head.address)


def _images(root: str, classes: int, per_class: int) -> None:
    import numpy as np
    from PIL import Image

    for c in range(classes):
        for j in range(per_class):
            img = Image.fromarray(np.random.default_rng((c, j)).integers(0, 256, (70, 90, 3), dtype=np.uint8))
            buf = io.BytesIO()
            img.save(buf, format="JPEG")
            storage.write_bytes(f"{root}/c{c}/img{j}.jpg", buf.getvalue())


def _run(stage: str, config: str) -> tuple[int, str]:
    out = io.StringIO()
    return sub.submit(stage, config, [], out=out), out.getvalue()


def _attempts(prefix: str) -> list[str]:
    return sorted(j.submission_id for j in sub.client().list_jobs() if j.submission_id.startswith(prefix + "-"))


@pytest.mark.slow
def test_tokenize_train_fid_chain_through_the_job_api_attach_and_resume(cluster_env, s3_bucket, tmp_path):
    """The three stages as jobs on the head, reading and writing only the bucket (the head has no AWS_*:
    the credentials travel with each submission). Submitting a running job again attaches to it;
    resubmitting a finished one starts a new attempt that resumes from the stage's output."""
    import torch

    from nextscale.tokenize.loader import save_tokenizer
    from nextscale.tokenize.vqvae import build_vqvae

    b = s3_bucket
    _images(f"{b}/images", classes=2, per_class=4)
    torch.manual_seed(0)
    save_tokenizer(build_vqvae("golden_tiny"), f"{b}/weights/tokenizer.pt")  # 64 px, V=64, scales (1, 2, 3, 4)
    tok = _yaml(tmp_path / "tokenize.yaml", {
        "input": f"{b}/images", "tokenizer": f"{b}/weights/tokenizer.pt", "output": f"{b}/codes",
        "samples_per_shard": 4, "batch_size": 4, "device": "cpu", "num_encoders": 1})
    prior = _yaml(tmp_path / "prior.yaml", {
        "model": {"preset": "golden_tiny", "overrides": {"num_classes": 2}},
        "data": {"url": f"{b}/codes", "batch_size": 4, "shuffle_buffer": 4},
        "optim": {"lr": 1e-3, "warmup_steps": 1}, "steps": 3, "log_every": 1, "ckpt_every": 2,
        "tensorboard": {"enabled": False},
        "workers": {"count": 1, "max_failures": 0}, "output": f"{b}/prior"})
    fid = _yaml(tmp_path / "fid.yaml", {
        "models": {"prior_url": f"{b}/prior/prior.pt", "tokenizer_url": f"{b}/weights/tokenizer.pt"},
        "num_samples": 8, "num_classes": 2, "samples_per_class": 4, "group_size": 4, "num_sampler_actors": 1,
        "device": "cpu", "feature_extractor": "random-conv-test", "feature_batch_size": 8,
        "reference": {"images": f"{b}/images"}, "inception_score": False, "precision_recall": False,
        "output": f"{b}/fid"})

    job = sub.plan("tokenize", tok)
    first, attached = sub.submit_or_attach(sub.client(), job, tok)
    again, attached_again = sub.submit_or_attach(sub.client(), job, tok)  # while the first is pending/running
    assert (first, attached, again, attached_again) == (f"{job.id_prefix}-1", False, first, True)
    code, logs = _run("tokenize", tok)  # attaches too, streams the logs, returns the exit status
    assert code == 0, logs[-4000:]
    assert _attempts(job.id_prefix) == [first]
    manifest = json.loads(storage.read_text(f"{b}/codes/manifest.json"))
    assert manifest["num_samples"] == 8 and len(manifest["shards"]) == 2
    assert _summary(logs)["shards_made"] == 2

    code, logs = _run("train-prior", prior)
    assert code == 0, logs[-4000:]
    assert storage.exists(f"{b}/prior/prior.pt")
    assert (_summary(logs)["steps"], _summary(logs)["steps_trained"]) == (3, 3)

    code, logs = _run("fid", fid)
    assert code == 0, logs[-4000:]
    result = json.loads(storage.read_text(f"{b}/fid/fid.json"))
    assert result["num_samples"] == 8 and result["fid"] >= 0 and result == _summary(logs)

    # the same submissions again: new attempts that find their work done
    shard_bytes = {n: storage.read_bytes(f"{b}/codes/{n}") for n in storage.listdir(f"{b}/codes", ".tar")}
    code, logs = _run("tokenize", tok)
    assert code == 0, logs[-4000:]
    assert (_summary(logs)["shards_made"], _summary(logs)["shards_skipped"]) == (0, 2)
    assert {n: storage.read_bytes(f"{b}/codes/{n}") for n in storage.listdir(f"{b}/codes", ".tar")} == shard_bytes
    code, logs = _run("train-prior", prior)
    assert code == 0, logs[-4000:]
    assert (_summary(logs)["steps"], _summary(logs)["steps_trained"]) == (3, 0)
    for stage, config in (("tokenize", tok), ("train-prior", prior)):
        prefix = sub.plan(stage, config).id_prefix
        assert _attempts(prefix) == [f"{prefix}-1", f"{prefix}-2"]
        info = sub.client().get_job_info(f"{prefix}-2")
        assert info.runtime_env["env_vars"]["AWS_ENDPOINT_URL"] == os.environ["AWS_ENDPOINT_URL"]


@pytest.mark.slow
def test_a_failing_job_returns_its_exit_status(cluster_env, tmp_path):
    (tmp_path / "file").write_text("")
    out = io.StringIO()
    code = sub.submit("demo", None, ["stages=[]", f"data={tmp_path}/file/demo"], out=out)  # a folder under a file
    assert code == 1, out.getvalue()[-3000:]
    assert "NotADirectoryError" in out.getvalue()
