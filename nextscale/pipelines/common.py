"""What every Ray job shares: connecting to (or starting) Ray, and shipping the package to workers.

Secrets never travel in a runtime env: Ray writes every runtime env in plain text to its logs
(``runtime_env_agent.log``) and the job API returns it. Workers of a local instance inherit the
driver's environment (the instance is started by this process); nodes of a cluster have their own
(instance profile, workload identity, the Kubernetes secret of configs/cluster, a key file path).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import ray

import nextscale
from nextscale import storage
from nextscale.config import Device, RayConfig
from nextscale.devices import pick_device
from nextscale.pipelines import watchdog

log = logging.getLogger(__name__)

# Settings a job passes to its workers: endpoints, regions, modes and file paths, never a secret
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_EC2_METADATA_DISABLED",
    "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "GOOGLE_APPLICATION_CREDENTIALS",
    "WANDB_MODE", "WANDB_DIR", "TORCH_HOME", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
)
# Credentials: what a variable holding one is called (GOOGLE_APPLICATION_CREDENTIALS is a path, not one)
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|API_KEY|ACCESS_KEY")


# Ray's own info lines in this process (instance started, packages pushed, execution plans, Ray Data's progress
# logged every 10 s where stderr is no terminal, which our progress lines replace) are not the user's business;
# its warnings and errors still show
RAY_LOG_LEVEL = logging.WARNING


def is_secret(name: str) -> bool:
    """Whether the environment variable ``name`` holds a credential (AWS keys, WANDB_API_KEY, tokens...)."""
    return bool(SECRET_NAME.search(name))


def init_ray(cfg: RayConfig) -> None:
    """Connect to ``cfg.address`` / ``$RAY_ADDRESS`` if given, else start a local instance.

    The ``nextscale`` package travels to the workers as a ``py_modules`` entry (unless this process is
    itself running inside a Ray job that already ships it), with the storage and wandb settings of
    :data:`FORWARDED_ENV`; credentials stay in the environment (see the module docstring).
    """
    if ray.is_initialized():
        return
    # Ray Data has a logger of its own: set here in this process, from this variable in its workers (a user's wins)
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", logging.getLevelName(RAY_LOG_LEVEL))
    logging.getLogger("ray.data").setLevel(os.environ["RAY_DATA_LOG_LEVEL"])
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ and not is_secret(k)}
    runtime_env: dict = {"env_vars": env}
    if not os.environ.get("NEXTSCALE_IN_RAY_JOB"):
        runtime_env["py_modules"] = [os.path.dirname(nextscale.__file__)]
    address = cfg.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True, logging_level=RAY_LOG_LEVEL)
    else:
        # workers of a local instance share this machine: relative local paths resolve against our cwd; they
        # inherit this process's environment (Ray's processes are its children), credentials included
        env[storage.DRIVER_CWD_ENV] = os.getcwd()
        # Ray Train's preemption watcher (an actor) polls for nodes a cloud drains: a local instance has none
        env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
        # address="local": never attach to some other Ray instance that happens to run on this machine
        kwargs = {"address": "local", "include_dashboard": False, "runtime_env": runtime_env,
                  "logging_level": RAY_LOG_LEVEL}
        if cfg.num_cpus:
            kwargs["num_cpus"] = cfg.num_cpus
        if cfg.object_store_memory_mb:
            kwargs["object_store_memory"] = cfg.object_store_memory_mb * 1024**2
        # Ray >= 2.5x turns token authentication on for a new local instance and announces it at every start
        logging.getLogger(RAY_AUTH_LOGGER).addFilter(_not_the_auth_default_notice)
        log.info("starting a local Ray instance")
        _start_watchdog()
        ray.init(**kwargs)
        _start_autoscaling_coordinator()


RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def _not_the_auth_default_notice(record: logging.LogRecord) -> bool:
    """Drops only the notice that Ray chose its default (token authentication on); its other warnings pass."""
    return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster.")


def _start_autoscaling_coordinator() -> None:
    """Start the actor Ray Train and Ray Data send their resource requests to, and wait until it runs.

    Ray Train's first request waits 5 s for it; on a busy 2-core machine a cold actor (a new process importing
    Ray Data) takes longer, and the request fails with a warning and a traceback in the user's log.
    """
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator,
    )

    ray.get(get_or_create_autoscaling_coordinator().__ray_ready__.remote())


def dashboard_url() -> str:
    """The connected Ray's dashboard address; "" when it runs none (a local instance: no state API either)."""
    try:
        return ray._private.worker.get_dashboard_url() or ""
    except Exception:  # noqa: BLE001 - not connected, or an older Ray without it: no dashboard known
        return ""


def _start_watchdog() -> None:
    """The local instance must not outlive this driver, even a SIGKILLed one: see ``watchdog.py``."""
    global _WATCHDOG
    # its own session: a Ctrl-C in the terminal reaches the driver, not the one who cleans up after it
    _WATCHDOG = subprocess.Popen([sys.executable, watchdog.__file__, str(os.getpid())], stdin=subprocess.DEVNULL,
                                 start_new_session=True)


_WATCHDOG: subprocess.Popen | None = None


def use_gpus(device: Device, key: str) -> bool:
    """Whether a Ray job's actors or workers take a GPU each, from the stage's ``device`` setting and the cluster's
    GPUs (``devices.pick_device``: a cluster without GPUs is an error for ``cuda``, naming ``key``)."""
    gpus = ray.cluster_resources().get("GPU", 0) if device != "cpu" else 0
    return pick_device(device, key=key, cluster_gpus=gpus).type == "cuda"
