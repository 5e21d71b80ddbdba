"""Measure the float32 noise floors that tests/tolerances.py cites, on this CPU (issue 20).

    python tests/noise_floor.py            # one JSON object: this process's code path
    python tests/noise_floor.py --paths    # every path this machine reaches, 1 and 2 threads: a table + maxima

Per family and array: ``err`` = |ours fp32 - official|, ``ours`` = |ours fp32 - ours fp64|, ``official`` =
|official - ours fp64| (max abs). ``margins`` are the smallest distances to a tie of the discrete decisions
(sampled tokens, top-k / top-p sets, nearest codes), see tests/tolerances.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

import golden_rule as gr  # noqa: E402
import test_mvar_golden  # noqa: E402
import test_prior_golden  # noqa: E402
from tolerances import float64, nearest_code_margins, token_margins  # noqa: E402

from nextscale.levers import tiny_var  # noqa: E402
from nextscale.prior.loader import load_official_var  # noqa: E402
from nextscale.prior.sample import SamplingConfig, sample_codes  # noqa: E402
from nextscale.tokenize.loader import load_official_vqvae  # noqa: E402
from nextscale.tokenize.scales import split_codes  # noqa: E402

PATHS = {  # environment of each CPU code path reachable without another machine
    "default": {},
    "mkl_compatible": {"MKL_CBWR": "COMPATIBLE"},
    "aten_default": {"ATEN_CPU_CAPABILITY": "default"},
    "onednn_sse41": {"ONEDNN_MAX_CPU_ISA": "SSE41"},
    "all_conservative": {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"},
}


def _abs(a, b) -> float:
    a = a.detach().double().numpy() if isinstance(a, torch.Tensor) else a
    b = b.detach().double().numpy() if isinstance(b, torch.Tensor) else b
    keep = np.isfinite(b)
    return float(np.abs(a[keep] - b[keep]).max())


def _row(ours32, ours64, official) -> dict:
    return {"err": _abs(ours32, official), "ours": _abs(ours32, ours64), "official": _abs(official, ours64)}


def _twice(fn, model, *inputs):
    """fn(model, *inputs) in float32, then with a float64 copy of everything."""
    with torch.no_grad():
        out32 = fn(model, *inputs)
        with float64():
            out64 = fn(model.double(), *[x.double() if x.is_floating_point() else x for x in inputs])
        model.float()
    return out32, out64


def _guided(raw_2BLV: torch.Tensor, patch_nums, cfg: float) -> torch.Tensor:
    B, S = raw_2BLV.shape[0] // 2, len(patch_nums)
    t = torch.cat([torch.full((pn * pn,), cfg * si / (S - 1), dtype=raw_2BLV.dtype) for si, pn in enumerate(patch_nums)])
    return (1 + t[None, :, None]) * raw_2BLV[:B] - t[None, :, None] * raw_2BLV[B:]


def prior_family(module, preset: str, sub: str, tf_names: list[str]) -> dict:
    """Teacher forcing and sampling of the golden VAR (sub "") or M-VAR (sub "mvar/")."""
    model = load_official_var(module.official_tiny_state_dict(), preset)
    x = torch.from_numpy(gr.load(f"{sub}{'mvar_' if sub else 'var_'}x_BLCv_wo_first_l.npy"))
    arch = "mvar" if sub else "var"
    out32, out64 = _twice(lambda m, x: (m(module.LABELS, x), m(module.NULL, x)), model, x)
    rows = {f"{arch}_logits_cond": _row(out32[0], out64[0], gr.load(f"{sub}{arch}_logits_cond.npy")),
            f"{arch}_logits_null": _row(out32[1], out64[1], gr.load(f"{sub}{arch}_logits_null.npy"))}

    vqvae = load_official_vqvae(gr.rule_state_dict(gr.official_param_shapes("vqvae"), gr.VQVAE_SEED_BASE),
                                "golden_tiny")
    kw = json.loads(((gr.GOLDEN_MVAR if sub else gr.GOLDEN) / "tiny_config.json").read_text())["sampling"]
    record: dict = {}
    codes = sample_codes(model, vqvae.quantize, torch.tensor(kw["label_B"]), generator=torch.Generator().manual_seed(
        kw["g_seed"]), sampling=SamplingConfig(guidance=kw["cfg"], top_k=kw["top_k"], top_p=kw["top_p"], more_smooth=kw["more_smooth"]), record=record)
    x_tf = vqvae.quantize.teacher_forcing_input(split_codes(codes, model.patch_nums))
    labels = torch.tensor(kw["label_B"])
    null = torch.full_like(labels, model.num_classes)
    _, tf64 = _twice(lambda m, x: torch.cat((m(labels, x), m(null, x))), model, x_tf)
    raw32 = torch.cat(record["logits_raw"], 1)
    guided32 = torch.cat(record["logits_guided"], 1)
    rows[f"{arch}_sample_logits_raw"] = _row(raw32, tf64, gr.load(f"{sub}sample_logits_raw.npy"))
    rows[f"{arch}_sample_logits_guided"] = _row(guided32, _guided(tf64, model.patch_nums, kw["cfg"]),
                                                gr.load(f"{sub}sample_logits_guided.npy"))
    rows[f"{arch}_sample_raw_vs_teacher_forcing"] = {"err": _abs(raw32, tf64.float())}
    margins = token_margins(record, codes, kw["g_seed"], kw["top_k"], kw["top_p"])
    return {"rows": rows, "margins": margins, "tokens_equal_official": bool(
        np.array_equal(codes.numpy(), gr.load(f"{sub}sample_idx_BL.npy")))}


def mamba_family() -> dict:
    from nextscale.prior.mamba2 import Mamba2, ssd_scan

    sd = gr.rule_state_dict(gr.official_param_shapes("mvar"), gr.MVAR_SEED_BASE)
    mixer = Mamba2(128, d_state=64, d_conv=4, expand=2)
    prefix = "blocks.0.mamba."
    mixer.load_state_dict({k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}, strict=True)
    u = torch.from_numpy(gr.load("mvar/mamba_x.npy"))

    def run(m, u):
        seen = []
        hook = m.norm.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
        y = m(u)
        hook.remove()
        return y, m.projections(u)[2], seen[0]

    out32, out64 = _twice(run, mixer.eval(), u)
    g = torch.Generator().manual_seed(0)  # the random case of test_chunked_scan_equals_the_sequential_recurrence
    B, l, H, P, G, N = 2, 23, 4, 3, 2, 5
    x, B_, C_ = (torch.randn(B, l, *s, generator=g, dtype=torch.float64) for s in ((H, P), (G, N), (G, N)))
    dt = torch.rand(B, l, H, generator=g, dtype=torch.float64)
    A = -torch.rand(H, generator=g, dtype=torch.float64) * 3
    h0 = torch.randn(B, H, P, N, generator=g, dtype=torch.float64)
    scan32 = ssd_scan(x.float(), dt.float(), A.float(), B_.float(), C_.float(), 4, h0.float())
    with float64():
        scan64 = ssd_scan(x, dt, A, B_, C_, 4, h0)
    return {"rows": {"mamba_y": _row(out32[0], out64[0], gr.load("mvar/mamba_y.npy")),
                     "mamba_dt": _row(out32[1], out64[1], gr.load("mvar/mamba_dt.npy")),
                     "mamba_y_scan": _row(out32[2], out64[2], gr.load("mvar/mamba_y_scan.npy")),
                     "ssd_scan_random": {"ours": max(_abs(a, b) for a, b in zip(scan32, scan64))}}}


def vqvae_family() -> dict:
    vae = load_official_vqvae(gr.rule_state_dict(gr.official_param_shapes("vqvae"), gr.VQVAE_SEED_BASE), "golden_tiny")
    x = torch.from_numpy(gr.load("input_images.npy"))
    codes = torch.from_numpy(gr.load("vae_idx_BL.npy"))

    def run(v, x):
        enc = v.encoder(x)
        f_hats = torch.stack(v.quantize.idx_to_fhat(split_codes(codes, v.quantize.patch_nums)))
        return (enc, v.quant_conv(enc), v.decode(codes), f_hats,
                v.quantize.teacher_forcing_input(split_codes(codes, v.quantize.patch_nums)))

    out32, out64 = _twice(run, vae, x)
    with nearest_code_margins(vae.quantize) as gaps, torch.no_grad():
        idx = vae.encode(x)
    names = ("vae_encoder_out", "vae_f", "vae_rec", "vae_fhat_scales", "var_x_BLCv_wo_first_l")
    return {"rows": {name: _row(a, b, gr.load(f"{name}.npy")) for name, a, b in zip(names, out32, out64)},
            "margins": {"nearest_code": min(gaps)},
            "codes_equal_official": bool(np.array_equal(idx.numpy(), codes.numpy()))}


def reorder_family() -> dict:
    """The fp32 floor of the demo-size models that same-machine tests compute two ways."""
    rows = {}
    for preset in ("debug", "demo", "mvar_demo"):
        var = tiny_var(preset, "cpu").eval()
        g = torch.Generator().manual_seed(1)
        label_B = torch.randint(0, var.num_classes, (2,), generator=g)
        x = torch.randn(2, var.L - 1, var.Cv, generator=g)
        y32, y64 = _twice(lambda m, x, label_B=label_B: m(label_B, x), var, x)
        rows[f"{preset}_logits"] = {"ours": _abs(y32, y64)}
    return {"rows": rows}


def measure() -> dict:
    return {"threads": torch.get_num_threads(),
            "var": prior_family(test_prior_golden, "golden_tiny", "", []),
            "mvar": prior_family(test_mvar_golden, "mvar_golden_tiny", "mvar/", []),
            "mamba": mamba_family(), "vqvae": vqvae_family(), "reorder": reorder_family()}


def sweep() -> dict:
    """Run ``measure`` under every path and thread count; print a markdown table; return the maxima."""
    results = {}
    for name, env in PATHS.items():
        for threads in (1, 2):
            proc = subprocess.run([sys.executable, __file__, "--threads", str(threads)], env={**os.environ, **env},
                                  capture_output=True, text=True, check=True)
            results[f"{name}/{threads}"] = json.loads(proc.stdout)
    print("| family | array | " + " | ".join(results) + " |")
    print("|---|---|" + "---|" * len(results))
    maxima: dict[str, float] = {}
    first = next(iter(results.values()))
    for family in ("var", "mvar", "mamba", "vqvae", "reorder"):
        for array in first[family]["rows"]:
            cells = []
            for r in results.values():
                row = r[family]["rows"][array]
                floor = max(row.get("ours", 0.0), row.get("official", 0.0))
                maxima[family] = max(maxima.get(family, 0.0), floor)
                cells.append(f"{row.get('err', float('nan')):.2g} / {floor:.2g}")
            print(f"| {family} | {array} | " + " | ".join(cells) + " |")
        margins = [r[family].get("margins") for r in results.values()]
        if margins[0]:
            for key in margins[0]:
                print(f"| {family} | margin {key} | " + " | ".join(f"{m[key]:.3g}" for m in margins) + " |")
    print("(cells: err vs official / floor = max(ours, official))")
    return maxima


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", action="store_true", help="sweep every reachable CPU path and thread count")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.paths:
        print(json.dumps({"max_floor": sweep()}))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(measure()))


if __name__ == "__main__":
    main()
