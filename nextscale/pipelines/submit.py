"""``nextscale submit <stage> [CONFIG.yaml] [key.sub=value ...]``: run a stage on a Ray cluster via the job API.

What a submission carries (``ray job submit`` semantics, through :class:`JobSubmissionClient`):
- the code: a small staging copy of the ``nextscale`` package, the project's ``configs/`` and the
  submitted config file, shipped as the job's ``working_dir`` (the cluster image already has
  nextscale's dependencies: torch, ray[data,train], webdataset, s3fs…; pass ``pip=`` to add more);
- the environment: storage and wandb settings (``AWS_ENDPOINT_URL``, ``WANDB_MODE``...),
  ``NEXTSCALE_IN_RAY_JOB=1`` so that the job's ``init_ray`` does not ship the package a second time, and
  ``RAY_OVERRIDE_JOB_RUNTIME_ENV=1`` so that its ``env_vars`` may repeat the job's; credentials
  (``AWS_SECRET_ACCESS_KEY``, ``WANDB_API_KEY``... see :func:`nextscale.pipelines.common.is_secret`) only to
  a head that requires a token, and never with ``--no-credentials`` (nodes with an instance profile,
  workload identity or the cluster's own secret need none). A runtime env is visible to whoever can
  read the job API and is logged by Ray on the nodes: a head without auth would hand the keys to
  anyone who reaches its port, so ``submit`` refuses to send them there;
- the entrypoint ``python -m nextscale.cli <stage> <config> <overrides>``.

Idempotence. The submission id is ``ns-<stage>-<output slug>-<config hash>-<attempt>``: the stage,
its output location, and a hash of the *resolved* config (file + overrides, as this machine resolves
it). Submitting the same job again attaches to the attempt still pending or running; once the last
attempt has finished or failed, a new attempt is submitted and the stage resumes from its output
location (tokenize skips finished shards, train-prior restarts from its latest checkpoint).

Auth. The shipped cluster configs turn Ray's token auth on (``RAY_AUTH_MODE=token``). The client sends ``Authorization: Bearer``
with the token from ``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``
(``ray get-auth-token`` on the head prints it), unless ``RAY_AUTH_MODE=disabled``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import nextscale
from nextscale.config import dump_yaml, load_config, locate_config, split_config_args
from nextscale.errors import UserError
from nextscale.pipelines.common import is_secret
from nextscale.stages import STAGES

log = logging.getLogger(__name__)

# Environment forwarded to the job: every variable with one of these prefixes, and these names.
FORWARDED_PREFIXES = ("AWS_",)
FORWARDED_NAMES = (
    "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT", "WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT",
    "WANDB_ENTITY", "WANDB_BASE_URL", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
)
# What the staging copy leaves out of the package and configs
STAGING_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".pytest_cache")
SUBMITTED_DIR = "submitted"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(UserError, RuntimeError):
    """The submission could not be made (no cluster address, refused token, unknown stage...)."""


@dataclass(frozen=True)
class JobPlan:
    """Everything a submission sends, computed without contacting a cluster."""

    stage: str
    output: str
    config_hash: str
    id_prefix: str          # submission ids are f"{id_prefix}-{attempt}"
    entrypoint: str
    env_vars: dict[str, str]
    config_yaml: str        # the resolved config (what the job will resolve too)
    credentials: tuple[str, ...] = ()  # names of the secret variables among env_vars

    def runtime_env(self, working_dir: str, pip: Sequence[str] = ()) -> dict:
        env: dict = {"working_dir": working_dir, "env_vars": dict(self.env_vars)}
        if pip:
            env["pip"] = list(pip)
        return env

    @property
    def metadata(self) -> dict[str, str]:
        return {"nextscale_stage": self.stage, "nextscale_output": self.output,
                "nextscale_config_hash": self.config_hash}


def project_root() -> Path | None:
    """The checkout holding the imported ``nextscale`` package (None for an installed wheel)."""
    root = Path(nextscale.__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    return root if pyproject.is_file() and 'name = "nextscale"' in pyproject.read_text() else None


def forwarded_env(environ: dict[str, str] | None = None, credentials: bool = True) -> dict[str, str]:
    """The job's ``env_vars``: settings from ``environ``, and its credentials only when ``credentials``."""
    environ = dict(os.environ if environ is None else environ)
    env = {k: v for k, v in environ.items() if (k.startswith(FORWARDED_PREFIXES) or k in FORWARDED_NAMES)
           and (credentials or not is_secret(k))}
    env["NEXTSCALE_IN_RAY_JOB"] = "1"
    # init_ray in the job passes the storage/wandb variables again (plus what storage.configure set from the
    # config): let the driver's values win instead of Ray refusing the overlap with the job's runtime env
    env["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"
    return env


def _slug(text: str, limit: int) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[-limit:].strip("-") or "x"


def _job_config_path(config_path: str | None) -> str | None:
    """Where the config file sits inside the staging copy (its project-relative path when it has one)."""
    if not config_path:
        return None
    path = Path(config_path).resolve()
    root = project_root()
    if root is not None and path.is_relative_to(root):
        return path.relative_to(root).as_posix()
    return f"{SUBMITTED_DIR}/{path.name}"


def plan(stage: str, config_path: str | None = None, overrides: Sequence[str] = (),
         environ: dict[str, str] | None = None, credentials: bool = True) -> JobPlan:
    """Resolve the stage's config here (so errors surface before anything is sent) and derive the job."""
    if stage not in STAGES:
        raise SubmitError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    config_path = locate_config(config_path) if config_path else None
    cfg = load_config(STAGES[stage].config, config_path, overrides)
    config_yaml = dump_yaml(cfg)
    output = str(getattr(cfg, "output", "") or "")
    config_hash = hashlib.sha256(f"{stage}\n{config_yaml}".encode()).hexdigest()[:12]
    id_prefix = f"ns-{stage}-{_slug(output, 48)}-{config_hash}"
    job_config = _job_config_path(config_path)
    argv = ["python", "-m", "nextscale.cli", stage, *([job_config] if job_config else []), *overrides]
    env = forwarded_env(environ, credentials)
    return JobPlan(stage=stage, output=output, config_hash=config_hash, id_prefix=id_prefix,
                   entrypoint=shlex.join(argv), env_vars=env, config_yaml=config_yaml,
                   credentials=tuple(sorted(k for k in env if is_secret(k))))


def stage_working_dir(dest: str, config_path: str | None = None) -> str:
    """Fill ``dest`` with what the job needs: the package (with its shipped configs) and the config file."""
    shutil.copytree(Path(nextscale.__file__).resolve().parent, Path(dest, "nextscale"), ignore=STAGING_IGNORE)
    if config_path:
        target = Path(dest, _job_config_path(config_path))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(config_path, target)
    return dest


def auth_headers(environ: dict[str, str] | None = None) -> dict[str, str]:
    """``Authorization: Bearer <token>`` when a Ray auth token is available and auth is not disabled."""
    environ = os.environ if environ is None else environ
    if environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
        if os.path.isfile(path):
            token = Path(path).read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def dashboard_address(address: str | None = None) -> str:
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS", "")
    if not address:
        raise SubmitError("no Ray cluster to submit to: set RAY_ADDRESS=http://<head>:8265 (the dashboard; "
                          "`ray dashboard configs/cluster/aws.yaml` forwards it to http://127.0.0.1:8265)")
    if not address.startswith(("http://", "https://")) and "://" not in address:
        address = f"http://{address}"
    return address


def head_requires_auth(address: str | None = None) -> bool:
    """Whether the head at ``address`` refuses a request without a token (asked without one)."""
    url = dashboard_address(address).rstrip("/") + "/api/version"
    try:
        urllib.request.urlopen(url, timeout=10).close()
    except urllib.error.HTTPError as e:
        return e.code in (401, 403)
    except OSError as e:
        raise SubmitError(f"cannot reach the Ray dashboard at {dashboard_address(address)}: {e}; is the cluster up "
                          "and the port forwarded (`ray dashboard CLUSTER.yaml`)?") from e
    return False


def check_credentials_go_to_an_authenticated_head(job: JobPlan, address: str | None = None) -> None:
    """Refuse to send credentials to a head whose job API answers anyone (they would be readable there)."""
    if job.credentials and not head_requires_auth(address):
        raise SubmitError(
            f"the Ray head at {dashboard_address(address)} answers requests without a token: refusing to send "
            f"{', '.join(job.credentials)} to it (anyone reaching its job API could read them). Turn token auth on "
            "(RAY_AUTH_MODE=token on every node, as configs/cluster/ does; docs/cluster.md) and export "
            "RAY_AUTH_TOKEN, or pass --no-credentials and give the nodes their own access (instance profile, "
            "workload identity, the cluster's secret)")


def client(address: str | None = None):
    """A JobSubmissionClient for ``address`` / ``$RAY_ADDRESS`` with the auth header when a token is set."""
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as e:
        raise SubmitError(f"the Ray job API client is not installed ({e}); pip install 'nextscale[cluster]'") from e

    address = dashboard_address(address)
    try:
        return JobSubmissionClient(address, headers=auth_headers())
    except Exception as e:  # ConnectionError, RuntimeError, ray.exceptions.AuthenticationError
        text = str(e)
        if "ray[default]" in text:
            raise SubmitError(f"{text.splitlines()[0]}: pip install 'nextscale[cluster]'") from e
        if "uthenticat" in text or "401" in text or "403" in text:
            raise SubmitError(f"the cluster at {address} refused the request: {text.splitlines()[0]}; set "
                              "RAY_AUTH_TOKEN to the head's token (`ray get-auth-token` on the head)") from e
        raise SubmitError(f"cannot reach the Ray dashboard at {address}: {text.splitlines()[0] if text else e}; "
                          "is the cluster up and the port forwarded (`ray dashboard CLUSTER.yaml`)?") from e


def _attempts(jobs, id_prefix: str) -> list[tuple[int, object]]:
    """(attempt number, JobDetails) of earlier submissions of the same job, oldest first."""
    out = []
    for job in jobs:
        sid = job.submission_id or ""
        head, _, n = sid.rpartition("-")
        if head == id_prefix and n.isdigit():
            out.append((int(n), job))
    return sorted(out, key=lambda t: t[0])


def submit_or_attach(job_client, job: JobPlan, config_path: str | None, *, pip: Sequence[str] = ()) -> tuple[str, bool]:
    """Submit a new attempt of ``job`` or return the one still pending/running. Returns (id, attached)."""
    for _ in range(3):
        attempts = _attempts(job_client.list_jobs(), job.id_prefix)
        live = [j for _, j in attempts if str(j.status) not in TERMINAL]
        if live:
            return live[-1].submission_id, True
        submission_id = f"{job.id_prefix}-{attempts[-1][0] + 1 if attempts else 1}"
        with tempfile.TemporaryDirectory(prefix="nextscale-submit-") as staging:
            stage_working_dir(staging, config_path)
            try:
                job_client.submit_job(entrypoint=job.entrypoint, submission_id=submission_id,
                                      runtime_env=job.runtime_env(staging, pip), metadata=job.metadata)
            except RuntimeError as e:
                if "already exists" in str(e):  # someone submitted the same attempt a moment ago
                    continue
                raise
        return submission_id, False
    raise SubmitError(f"could not submit {job.id_prefix}: concurrent submissions kept taking the attempt number")


def follow(job_client, submission_id: str, out: TextIO, poll_s: float = 1.0) -> str:
    """Stream the job's logs to ``out`` until it ends; returns the final status."""
    streamed = [0]  # characters written by the log stream

    async def tail() -> None:
        async for chunk in job_client.tail_job_logs(submission_id):
            out.write(chunk)
            out.flush()
            streamed[0] += len(chunk)

    try:
        asyncio.run(tail())
        polling = False
    except Exception as e:  # the websocket can drop (proxy timeouts): poll the log from where the stream stopped
        log.warning("log stream of %s broke (%s); polling", submission_id, e)
        polling = True
    while True:
        status = str(job_client.get_job_status(submission_id))
        if polling:
            text = job_client.get_job_logs(submission_id)
            out.write(text[streamed[0]:])
            out.flush()
            streamed[0] = max(streamed[0], len(text))
        if status in TERMINAL:
            return status
        time.sleep(poll_s)


def submit(stage: str, config_path: str | None = None, overrides: Sequence[str] = (), *, address: str | None = None,
           wait: bool = True, pip: Sequence[str] = (), credentials: bool = True, out: TextIO | None = None) -> int:
    """Run ``nextscale <stage> CONFIG overrides`` as a Ray job on the cluster at ``address`` / ``$RAY_ADDRESS``.

    Attaches to the same job when it is already pending or running. With ``wait`` the job's logs are
    streamed to ``out`` (stdout) and its exit status is returned: 0 when it SUCCEEDED, the driver's
    exit code (or 1) otherwise. Without ``wait`` it returns 0 once the job is accepted. Credentials in
    the environment travel only with ``credentials`` and only to a head that requires a token.
    """
    out = sys.stdout if out is None else out
    config_path = locate_config(config_path) if config_path else None
    job = plan(stage, config_path, overrides, credentials=credentials)
    check_credentials_go_to_an_authenticated_head(job, address)
    job_client = client(address)
    t0 = time.perf_counter()
    submission_id, attached = submit_or_attach(job_client, job, config_path, pip=pip)
    log.info("%s job %s (output %s, config hash %s) on %s", "attached to running" if attached else "submitted",
             submission_id, job.output or "-", job.config_hash, dashboard_address(address))
    if not wait:
        log.info("follow it with: ray job logs -f %s; stop it with: ray job stop %s", submission_id, submission_id)
        return 0
    try:
        status = follow(job_client, submission_id, out)
    except KeyboardInterrupt:
        log.warning("stopped following; the job goes on. Follow: ray job logs -f %s; stop: ray job stop %s",
                    submission_id, submission_id)
        return 130
    info = job_client.get_job_info(submission_id)
    code = 0 if status == "SUCCEEDED" else (getattr(info, "driver_exit_code", None) or 1)
    log.info("job %s %s after %.1f s (exit status %d)%s", submission_id, status, time.perf_counter() - t0, code,
             "" if code == 0 else f": {info.message}")
    return code



def main(argv: Sequence[str]) -> int:
    """``nextscale submit <stage> [CONFIG.yaml] [key.sub=value ...] [--address URL] [--no-wait] [--pip REQ]``."""
    parser = argparse.ArgumentParser(
        prog="nextscale submit", description="Run a stage on the Ray cluster at $RAY_ADDRESS (http://HEAD:8265) "
        "through the job API, stream its logs and exit with its status. Resubmitting the same job attaches to it "
        "while it runs and resumes it from its output location once it has ended.")
    parser.add_argument("stage", choices=list(STAGES))
    parser.add_argument("args", nargs="*", help="[CONFIG.yaml] key.sub=value ...")
    parser.add_argument("--address", default=None, help="dashboard URL http://HEAD:8265 (default: $RAY_ADDRESS)")
    parser.add_argument("--no-wait", action="store_true", help="return once the job is accepted")
    parser.add_argument("--pip", action="append", default=[], help="extra pip requirement for the job (repeatable)")
    parser.add_argument("--no-credentials", action="store_true", help="send no secret variables (AWS keys, "
                        "WANDB_API_KEY...): the nodes have their own (instance profile, workload identity)")
    args = parser.parse_intermixed_args(list(argv))
    path, overrides = split_config_args(args.args)
    return submit(args.stage, path, overrides, address=args.address, wait=not args.no_wait, pip=args.pip,
                  credentials=not args.no_credentials)
