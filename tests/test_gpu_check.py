"""The CPU rehearsal of ``make gpu-check``: every step of scripts/gpu_check.py with tiny presets, so that the
run on a GPU machine cannot fail for a reason a CPU run would have caught."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from tolerances import VAR_TOL

REPO = Path(__file__).resolve().parent.parent


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_rehearsal_runs_every_step_and_writes_one_json(ray_local, shared_data, tmp_path, one_thread):
    gpu_check = _gpu_check()
    images = tmp_path / "images"
    gpu_check.prepare_images(shared_data / "imagenet-sample", images, 4)
    out = tmp_path / "rehearsal.json"
    # the compile lever is rehearsed by the numerics step (its kernels are cached by test_levers); timing it
    # in the bench too would add a cold inductor compile of the training step to the suite
    rc = gpu_check.main(["--device", "cpu", "--out", str(out), "--images", str(images),
                         "--levers", "chunked_ce,prefetch,fused_adamw"])
    result = json.loads(out.read_text())
    failed = {k: v.get("error", v) for k, v in result["steps"].items() if not v.get("ok")}
    assert rc == 0 and result["ok"], failed
    assert list(result["steps"]) == ["env", "golden", "levers", "bench.debug", "bench.loader_tokenize"]
    golden = result["steps"]["golden"]
    assert golden["vqvae_index_agreement"] == 1.0 and golden["var_logits_cond_max_abs"] <= golden["tol"] == VAR_TOL
    assert all(result["steps"]["levers"][k]["ok"] for k in ("flex", "compile", "chunked_ce", "static_cache"))
    names = {f["figure"] for f in result["steps"]["bench.debug"]["figures"]}
    assert {"train.plain", "train.chunked_ce", "train.all", "train.encode_plus_step", "sample.codes_plain",
            "sample.static_cache", "decode.bf16_channels_last", "sample.total_fast", "encode.bf16"} <= names
    ratios = [f for f in result["steps"]["bench.debug"]["figures"] if "ratio" in f]
    assert all(f["ratio_min"] <= f["ratio_max"] and f["img_per_s_min"] <= f["img_per_s_max"] for f in ratios)
    tokenize = {f["figure"]: f for f in result["steps"]["bench.loader_tokenize"]["figures"]}
    assert tokenize["tokenize.job"]["img_per_s"] > 0 and tokenize["loader"]["img_per_s"] > 0
