"""No secret in any file a run writes: a tokenize job as its own driver process starting its own local Ray,
reading and writing the moto S3 server with credentials from its environment only.

Ray writes every runtime env in plain text to its session logs (``runtime_env_agent.log``...): the test
greps the whole session folder of that Ray instance, the driver's output and the bucket.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from test_tokenize_job import TOKENIZER, _photo

from nextscale import storage
from nextscale.pipelines.common import FORWARDED_ENV, is_secret

REPO = Path(__file__).resolve().parent.parent


def test_forwarded_settings_are_no_secrets():
    assert not [k for k in FORWARDED_ENV if is_secret(k)]
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "WANDB_API_KEY", "HF_TOKEN",
                 "RAY_AUTH_TOKEN", "DB_PASSWORD"):
        assert is_secret(name), name
    assert not is_secret("GOOGLE_APPLICATION_CREDENTIALS") and not is_secret("AWS_ENDPOINT_URL")


def _files_holding(root: Path, needles: list[bytes]) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                data = path.read_bytes()
            except OSError:  # sockets, files removed meanwhile
                continue
            found += [f"{path}: {n.decode()[:6]}..." for n in needles if n in data]
    return found


@pytest.mark.slow
def test_a_local_job_leaves_no_secret_in_ray_logs_outputs_or_the_bucket(s3_bucket, tmp_path):
    import io

    for i in range(4):
        buf = io.BytesIO()
        _photo(i).save(buf, format="JPEG")
        storage.write_bytes(f"{s3_bucket}/images/c{i % 2}/img{i}.jpg", buf.getvalue())
    secret_key, wandb_key = f"nsk-{secrets.token_hex(12)}", f"nsw-{secrets.token_hex(12)}"
    ray_tmp = tempfile.mkdtemp(prefix="nssec", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(AWS_SECRET_ACCESS_KEY=secret_key, WANDB_API_KEY=wandb_key, RAY_TMPDIR=ray_tmp)
    cmd = [sys.executable, "-m", "nextscale.cli", "tokenize", f"input={s3_bucket}/images", f"tokenizer={TOKENIZER}",
           f"output={s3_bucket}/codes", "samples_per_shard=2", "batch_size=2", "num_encoders=1", "device=cpu",
           "ray.num_cpus=2"]
    try:
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, timeout=300)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, log.decode()[-4000:]
        # the workers read the images and wrote the shards with the credentials they inherited
        assert storage.exists(f"{s3_bucket}/codes/manifest.json")
        assert len(storage.listdir(f"{s3_bucket}/codes", ".tar")) == 2
        sessions = list(Path(ray_tmp).rglob("runtime_env_agent.log"))
        assert sessions, f"no Ray session under {ray_tmp}"
        # Ray did log the runtime env (with the settings that are forwarded): the place a secret would be
        assert any(b"AWS_ENDPOINT_URL" in p.read_bytes() for p in sessions)
        needles = [secret_key.encode(), wandb_key.encode()]
        assert not [n for n in needles if n in log]
        assert _files_holding(Path(ray_tmp), needles) == []
        assert _files_holding(tmp_path, needles) == []
        fs, path = storage.filesystem(s3_bucket)
        leaked = [p for p in fs.find(path) if any(n in fs.cat_file(p) for n in needles)]
        assert leaked == []
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
