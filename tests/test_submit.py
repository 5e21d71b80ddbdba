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
    inside = sub.plan("train-tokenizer", str(REPO / "configs" / "tokenizer_demo.yaml"), ["optim.steps=3"])
    assert inside.entrypoint == "python -m nextscale.cli train-tokenizer configs/tokenizer_demo.yaml optim.steps=3"
    assert sub.plan("tokenize", None, ["output=o"]).entrypoint == "python -m nextscale.cli tokenize output=o"


def test_working_dir_holds_the_package_the_configs_and_the_submitted_file(tmp_path):
    config = _yaml(tmp_path / "tok.yaml", {"output": "o"})
    staging = tmp_path / "staging"
    staging.mkdir()
    sub.stage_working_dir(str(staging), config)
    assert (staging / "nextscale" / "cli.py").read_text() == (REPO / "nextscale" / "cli.py").read_text()
    assert (staging / "configs" / "tokenizer_demo.yaml").is_file()
    assert (staging / "submitted" / "tok.yaml").read_text() == (tmp_path / "tok.yaml").read_text()
    assert not list(staging.rglob("__pycache__")) and not (staging / "tests").exists()
    env = sub.plan("tokenize", config).runtime_env(str(staging), pip=["x==1"])
    assert env["working_dir"] == str(staging) and env["pip"] == ["x==1"]


def test_forwarded_environment():
    env = sub.forwarded_env({"AWS_ENDPOINT_URL": "http://e", "AWS_SECRET_ACCESS_KEY": "s", "WANDB_API_KEY": "k",
                             "WANDB_MODE": "offline", "GOOGLE_APPLICATION_CREDENTIALS": "/k.json", "HOME": "/root",
                             "PYTHONPATH": "/work", "WANDB_DIR": "/tmp/w", "RAY_AUTH_TOKEN": "t"})
    assert env == {"AWS_ENDPOINT_URL": "http://e", "AWS_SECRET_ACCESS_KEY": "s", "WANDB_API_KEY": "k",
                   "WANDB_MODE": "offline", "GOOGLE_APPLICATION_CREDENTIALS": "/k.json", "NEXTSCALE_IN_RAY_JOB": "1",
                   "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}


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
    with RayHead(num_cpus=2, token=token) as head:
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
def test_missing_token_is_a_clear_error(ray_head, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with pytest.raises(sub.SubmitError, match="RAY_AUTH_TOKEN"):
        sub.client(ray_head.address)


@pytest.mark.slow
def test_submit_runs_the_stage_and_resubmission_attaches_then_starts_a_new_attempt(cluster_env, s3_bucket, tmp_path):
    args = ["stages=[]", f"data={tmp_path}/demo", f"results={s3_bucket}/demo/results.json"]
    job = sub.plan("demo", None, args)
    client = sub.client()
    first, attached = sub.submit_or_attach(client, job, None)
    again, attached_again = sub.submit_or_attach(client, job, None)  # while it is pending/running
    assert (first, attached, again, attached_again) == (f"{job.id_prefix}-1", False, first, True)
    out = io.StringIO()
    assert sub.submit("demo", None, args, out=out) == 0, out.getvalue()[-3000:]  # attaches, streams the logs
    assert [j.submission_id for j in client.list_jobs() if j.submission_id.startswith(job.id_prefix)] == [first]
    results = json.loads(storage.read_text(f"{s3_bucket}/demo/results.json"))  # written through forwarded AWS_*
    assert results["dataset"]["counts"] == {"train": 300, "val": 50}
    assert _summary(out.getvalue())["dataset"] == results["dataset"]
    info = client.get_job_info(first)
    assert info.runtime_env["env_vars"]["NEXTSCALE_IN_RAY_JOB"] == "1"
    assert info.runtime_env["env_vars"]["AWS_ENDPOINT_URL"] == os.environ["AWS_ENDPOINT_URL"]
    # finished: the same submission again is a new attempt
    assert sub.submit("demo", None, args, wait=False) == 0
    assert sorted(j.submission_id for j in client.list_jobs() if j.submission_id.startswith(job.id_prefix)) == [
        first, f"{job.id_prefix}-2"]
    assert sub.follow(client, f"{job.id_prefix}-2", io.StringIO()) == "SUCCEEDED"


@pytest.mark.slow
def test_a_failing_job_returns_its_exit_status(cluster_env, tmp_path):
    out = io.StringIO()
    code = sub.submit("demo", None, ["stages=[]", f"data={tmp_path}/demo", "results=s3://no-such-bucket-here/r.json"],
                      out=out)
    assert code != 0
    assert "no-such-bucket-here" in out.getvalue() or "NoSuchBucket" in out.getvalue()
