"""``nextscale bench`` without a GPU: the interleaved timing order, the ratio and projection arithmetic, and a real
run of the tokenizer figures on tiny presets (the whole bench on CPU is rehearsed by tests/test_gpu_check.py)."""

from __future__ import annotations

import json

import pytest
import torch

from nextscale.pipelines import bench
from nextscale.pipelines.bench import measure
from nextscale.pipelines.bench.config import BenchConfig


def _setup(steps: int, warmup: int) -> measure.Setup:
    return measure.Setup(device=torch.device("cpu"), prior="debug", tokenizer="golden_tiny", batch=4, steps=steps,
                         warmup=warmup, amp=None)


def test_interleaved_warms_up_each_side_then_alternates_the_order():
    calls = []
    fns = {name: (lambda n=name: calls.append(n)) for name in "AB"}
    times = measure.interleaved(fns, _setup(steps=4, warmup=2))
    assert "".join(calls) == "AABB" + "AB" "BA" "AB" "BA"
    assert [len(t) for t in times.values()] == [4, 4] and all(x >= 0 for t in times.values() for x in t)


def test_rate_and_ratio_come_from_the_medians_and_the_rounds():
    assert measure.rate([0.5, 1.0, 2.0], per_call=4) == {"img_per_s": 4.0, "img_per_s_min": 2.0, "img_per_s_max": 8.0,
                                                          "calls": 3}
    # base / fast: medians 3 / 2, rounds 2/1, 3/2, 8/2
    assert measure.ratio(fast=[1.0, 2.0, 2.0], base=[2.0, 3.0, 8.0]) == {"ratio": 1.5, "ratio_min": 1.5,
                                                                       "ratio_max": 4.0}


def test_projection_scales_the_measured_rates_to_imagenet():
    cfg = BenchConfig(projection_devices=8, projection_views=2, projection_epochs=100)
    figures = {"tokenize.job_steady": {"img_per_s": 100.0}, "train.plain": {"img_per_s": 50.0},
               "train.all": {"img_per_s": 200.0}}  # all levers on is what training would run at
    rows = {r["figure"]: r for r in bench.projection(cfg, figures, _setup(1, 0))}
    assert rows["projection.pretokenize_imagenet"]["hours"] == round(1_281_167 * 2 / 800 / 3600, 2)
    assert rows["projection.train_imagenet"]["hours"] == round(1_281_167 * 100 / 1600 / 3600, 1)
    assert bench.projection(cfg, {}, _setup(1, 0)) == []


def test_run_measures_the_tokenizer_figures_and_appends_them_to_output(tmp_path, capsys, one_thread):
    out = tmp_path / "bench.jsonl"
    cfg = BenchConfig(what=("encode",), device="cpu", prior_presets=("debug",), tokenizer_preset="rehearsal",
                      batch_size=2, steps=2, warmup=1, output=str(out))
    rows = bench.run(cfg)["figures"]
    names = ["encode.fp32", "encode.bf16", "encode.channels_last", "encode.bf16_channels_last"]
    assert [r["figure"] for r in rows] == names
    assert all(r["ratio_vs"] == "encode.fp32" and r["ratio_min"] <= r["ratio"] <= r["ratio_max"] for r in rows[1:])
    assert rows[0]["calls"] == 2 * 3  # the baseline is timed beside each of the three others
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == rows


def test_a_cuda_bench_without_a_gpu_names_the_key():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(Exception, match="device=cuda but no CUDA device"):
        bench.run(BenchConfig(what=("encode",), device="cuda"))
