"""What every Ray job shares: connecting to (or starting) Ray, and shipping the package to workers."""

from __future__ import annotations

import logging
import os

import ray

import nextscale
from nextscale import storage
from nextscale.config import RayConfig

log = logging.getLogger(__name__)

# Environment variables a job forwards to its workers (storage credentials, wandb, Ray Train tuning).
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_EC2_METADATA_DISABLED", "GOOGLE_APPLICATION_CREDENTIALS",
    "WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "TORCH_HOME", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
)


def init_ray(cfg: RayConfig) -> None:
    """Connect to ``cfg.address`` / ``$RAY_ADDRESS`` if given, else start a local instance.

    The ``nextscale`` package travels to the workers as a ``py_modules`` entry (unless this process is
    itself running inside a Ray job that already ships it), with the storage and wandb environment.
    """
    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    runtime_env: dict = {"env_vars": env}
    if not os.environ.get("NEXTSCALE_IN_RAY_JOB"):
        runtime_env["py_modules"] = [os.path.dirname(nextscale.__file__)]
    address = cfg.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        # workers of a local instance share this machine: relative local paths resolve against our cwd
        env[storage.DRIVER_CWD_ENV] = os.getcwd()
        # address="local": never attach to some other Ray instance that happens to run on this machine
        kwargs = {"address": "local", "include_dashboard": False, "runtime_env": runtime_env}
        if cfg.num_cpus:
            kwargs["num_cpus"] = cfg.num_cpus
        if cfg.object_store_memory_mb:
            kwargs["object_store_memory"] = cfg.object_store_memory_mb * 1024**2
        log.info("starting a local Ray instance")
        ray.init(**kwargs)
