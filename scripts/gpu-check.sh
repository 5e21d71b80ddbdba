#!/usr/bin/env bash
# make gpu-check [DEVICE=cuda|cpu] [GPU_CHECK_OUT=gpu_check.json]: runs as is on a bare GPU machine (torch there,
# no internet). The Ray stack comes from the wheels in .whl (`make gpu-check-prepare` puts them there, with the
# 256-px JPEGs in .gpu-check/); this folder's venv is used where one exists (the CPU rehearsal).
set -euo pipefail
cd "$(dirname "$0")/.."
device=${1:-cuda}
out=${2:-gpu_check.json}
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
if ! $py -c "import ray, webdataset" 2>/dev/null; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/nextscale-site .whl/*.whl
        export PYTHONPATH=/tmp/nextscale-site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "gpu-check: Ray is missing and there are no wheels in .whl (run make gpu-check-prepare first)" >&2
        exit 2
    fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} WANDB_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
exec $py scripts/gpu_check.py --device "$device" --out "$out" "${@:3}"
