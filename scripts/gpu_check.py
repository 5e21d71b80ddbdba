"""``make gpu-check``: golden parity, every lever's numerics and the benchmarks on one device, into one JSON file.

    python scripts/gpu_check.py --device cuda --out gpu_check.json            # the real thing (<= 8 min, one GPU)
    python scripts/gpu_check.py --device cpu --out rehearsal.json             # the same steps with tiny presets
    python scripts/gpu_check.py --prepare-images SRC DST [--num-images N]     # 256-px JPEGs to carry there

Steps, each recorded in the JSON under ``steps`` with ``ok``, ``seconds`` and its results (or the error's
last lines: one failing step never hides the others); the file is rewritten after every step, so a run
cut short keeps what it measured:
- ``env``: torch, Python, device, Ray;
- ``golden``: parity with the official VAR code on the device in fp32 (tests/golden): VQVAE indices,
  VAR teacher-forcing logits, and the sampler's logits with the official sampled tokens forced (the
  token draws themselves come from the device's RNG stream, which differs between CPU and CUDA);
- ``levers``: ``nextscale.levers`` checks of each fast path against the plain path on the device;
- ``bench.<preset>``: ``nextscale bench`` train (each lever on / off and all on), sample, decode and
  encode at d16 and d20 (rehearsal: debug + golden_tiny), with peak memory and MFU per figure;
- ``bench.loader_tokenize``: the code loader and the tokenize job on real 256-px JPEGs.
A step that would start after ``--budget-s`` is skipped and recorded as such.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # golden_rule and the golden state dict of test_prior_golden

import numpy as np  # noqa: E402
import torch  # noqa: E402

GPU_SIZES = {"presets": ("d16", "d20"), "tokenizer": "vae_ch160v4096z32", "batch": 64, "steps": 6, "warmup": 2}
CPU_SIZES = {"presets": ("debug",), "tokenizer": "golden_tiny", "batch": 2, "steps": 1, "warmup": 1}
DEFAULT_IMAGES = REPO / ".gpu-check" / "imagenet256"


def golden_parity(device: torch.device) -> dict:
    import golden_rule as gr
    from test_prior_golden import official_tiny_state_dict

    from nextscale.levers import exact_fp32
    from nextscale.prior.loader import load_official_var
    from nextscale.prior.sample import SamplingConfig, sample_codes
    from nextscale.tokenize.loader import load_official_vqvae

    out: dict = {}
    with exact_fp32(), torch.no_grad():
        vqvae = load_official_vqvae(gr.rule_state_dict(gr.official_param_shapes("vqvae"), gr.VQVAE_SEED_BASE),
                                    "golden_tiny").to(device)
        codes = vqvae.encode(torch.from_numpy(gr.load("input_images.npy")).to(device)).cpu().numpy()
        ref_codes = gr.load("vae_idx_BL.npy")
        out["vqvae_index_agreement"] = float((codes == ref_codes).mean())
        var = load_official_var(official_tiny_state_dict(), "golden_tiny").to(device)
        x = torch.from_numpy(gr.load("var_x_BLCv_wo_first_l.npy")).to(device)
        for name, labels in (("cond", [3, 7]), ("null", [10, 10])):
            logits = var(torch.tensor(labels, device=device), x).double().cpu().numpy()
            out[f"var_logits_{name}_max_abs"] = float(np.abs(logits - gr.load(f"var_logits_{name}.npy")).max())
        kw = gr.tiny_config()["sampling"]
        official = torch.from_numpy(gr.load("sample_idx_BL.npy")).to(device)
        record: dict[str, list[torch.Tensor]] = {}
        forced = sample_codes(var, vqvae.quantize, torch.tensor(kw["label_B"], device=device),
                              generator=torch.Generator(device).manual_seed(kw["g_seed"]), sampling=SamplingConfig(guidance=kw["cfg"], top_k=kw["top_k"], top_p=kw["top_p"], more_smooth=kw["more_smooth"]),
                              record=record,
                              known_codes_BL=official, known_mask_BL=torch.ones_like(official, dtype=torch.bool))
        assert torch.equal(forced, official)
        for kind in ("raw", "guided", "filtered"):
            got = torch.cat(record[f"logits_{kind}"], dim=1).double().cpu()
            ref = torch.from_numpy(gr.load(f"sample_logits_{kind}.npy")).double()
            kept = torch.isfinite(ref)
            out[f"sample_logits_{kind}_same_tokens_kept"] = bool(torch.equal(torch.isfinite(got), kept))
            out[f"sample_logits_{kind}_max_abs"] = float((got[kept] - ref[kept]).abs().max())
    from tolerances import VAR_TOL

    from nextscale.levers import KERNEL_TOL

    tol = VAR_TOL if device.type == "cpu" else max(VAR_TOL, KERNEL_TOL)
    out["tol"] = tol
    out["ok"] = (out["vqvae_index_agreement"] == 1.0 and all(v <= tol for k, v in out.items() if k.endswith("max_abs"))
                 and all(v for k, v in out.items() if k.endswith("tokens_kept")))
    return out


def lever_numerics(device: torch.device, tokenizer_images: Path | None) -> dict:
    import golden_rule as gr

    from nextscale import levers
    from nextscale.tokenize.loader import load_official_vqvae
    from nextscale.tokenize.vqvae import build_vqvae

    out = {"flex": levers.check_flex(device), "compile": levers.check_compile(device),
           "chunked_ce": levers.check_chunked_ce(device), "static_cache": levers.check_static_cache(device),
           "prefetch": levers.check_prefetch(device)}
    if device.type == "cuda":
        out["static_cache_graphs"] = levers.check_static_cache(device, graphs=True)
    golden = load_official_vqvae(gr.rule_state_dict(gr.official_param_shapes("vqvae"), gr.VQVAE_SEED_BASE),
                                 "golden_tiny")
    out["vqvae_golden_tiny"] = levers.check_vqvae(golden, torch.from_numpy(gr.load("input_images.npy")), device)
    torch.manual_seed(0)
    demo = build_vqvae("demo")
    out["vqvae_demo_random_init"] = levers.check_vqvae(demo, _images(tokenizer_images, 16, 32), device)
    if device.type == "cuda":  # the official-size tokenizer (random init: no weights travel) on real images
        torch.manual_seed(0)
        out["vqvae_ch160_random_init"] = levers.check_vqvae(build_vqvae("vae_ch160v4096z32"),
                                                            _images(tokenizer_images, 16, 256), device)
    out["ok"] = all(v.get("ok", True) for v in out.values())
    return out


def _images(folder: Path | None, n: int, size: int) -> torch.Tensor:
    """(n, 3, size, size) in [-1, 1]: real JPEGs (centre crops) when a folder is given, else seeded noise."""
    if folder is None or not folder.is_dir():
        return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    from PIL import Image

    files = sorted(folder.rglob("*.JPEG")) + sorted(folder.rglob("*.jpg"))
    out = []
    for f in files[:n]:
        im = Image.open(f).convert("RGB")
        s = min(im.size)
        im = im.crop(((im.width - s) // 2, (im.height - s) // 2, (im.width + s) // 2, (im.height + s) // 2))
        im = im.resize((size, size), Image.Resampling.LANCZOS)
        out.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 127.5 - 1)
    return torch.stack(out)


def bench(device: torch.device, sizes: dict, preset: str, what: tuple[str, ...], levers: tuple[str, ...],
          images: Path | None) -> dict:
    from nextscale.pipelines.bench import BenchConfig, run

    cfg = BenchConfig(what=what, device=device.type, prior_presets=(preset,), tokenizer_preset=sizes["tokenizer"],
                      levers=levers, batch_size=sizes["batch"], steps=sizes["steps"], warmup=sizes["warmup"],
                      tokenize_images=8 if device.type == "cpu" else 64,
                      tokenize_images_dir=str(images) if images and images.is_dir() else "")
    figures = run(cfg)["figures"]
    return {"figures": figures, "ok": True}


def prepare_images(src: Path, dst: Path, num: int) -> None:
    """The first ``num`` class folders of ``src`` as JPEGs with shorter side 256 (quality 90) under ``dst``."""
    from PIL import Image

    folders = sorted(p for p in src.iterdir() if p.is_dir())[:num]
    for folder in folders:
        for f in sorted(folder.iterdir()):
            im = Image.open(f).convert("RGB")
            scale = 256 / min(im.size)
            im = im.resize((max(256, round(im.width * scale)), max(256, round(im.height * scale))),
                           Image.Resampling.LANCZOS)
            (dst / folder.name).mkdir(parents=True, exist_ok=True)
            im.save(dst / folder.name / (f.stem + ".JPEG"), quality=90)
    print(f"wrote {len(folders)} images under {dst}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--images", default=str(DEFAULT_IMAGES), help="ImageFolder of 256-px JPEGs (--prepare-images)")
    ap.add_argument("--levers", default="flex,compile,chunked_ce,prefetch,fused_adamw",
                    help="training levers the bench times")
    ap.add_argument("--steps", default="env,golden,levers,bench,loader_tokenize", help="steps to run, in order")
    ap.add_argument("--budget-s", type=float, default=450.0, help="no step starts after this many seconds")
    ap.add_argument("--prepare-images", nargs=2, metavar=("SRC", "DST"))
    ap.add_argument("--num-images", type=int, default=128)
    args = ap.parse_args(argv)
    if args.prepare_images:
        prepare_images(Path(args.prepare_images[0]), Path(args.prepare_images[1]), args.num_images)
        return 0

    logging_setup()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu-check: --device cuda but torch sees no GPU; use DEVICE=cpu for the rehearsal", file=sys.stderr)
        return 2
    sizes = GPU_SIZES if device.type == "cuda" else CPU_SIZES
    images = Path(args.images) if Path(args.images).is_dir() else None
    lever_list = tuple(x for x in args.levers.split(",") if x)
    t0 = time.time()
    result: dict = {"device": args.device, "sizes": sizes, "images": str(images) if images else None, "steps": {}}

    def env() -> dict:
        info = {"torch": torch.__version__, "python": platform.python_version(), "ok": True,
                "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()}
        try:
            import ray
            info["ray"] = ray.__version__
        except ImportError as e:
            info["ray"] = f"missing: {e}"
        return info

    plan: list[tuple[str, callable]] = []
    for step in args.steps.split(","):
        if step == "env":
            plan.append(("env", env))
        elif step == "golden":
            plan.append(("golden", lambda: golden_parity(device)))
        elif step == "levers":
            plan.append(("levers", lambda: lever_numerics(device, images)))
        elif step == "bench":
            for preset in sizes["presets"]:
                plan.append((f"bench.{preset}", lambda p=preset: bench(device, sizes, p, ("train", "sample", "encode"),
                                                                      lever_list, images)))
        elif step == "loader_tokenize":
            plan.append(("bench.loader_tokenize", lambda: bench(device, sizes, sizes["presets"][0],
                                                                ("loader", "tokenize"), (), images)))
        else:
            print(f"gpu-check: unknown step {step!r}", file=sys.stderr)
            return 2
    for name, fn in plan:
        if time.time() - t0 > args.budget_s:
            result["steps"][name] = {"ok": False, "skipped": f"time budget of {args.budget_s:.0f} s spent"}
        else:
            t = time.time()
            try:
                result["steps"][name] = fn()
            except Exception:  # one failing step must not hide the others' figures
                result["steps"][name] = {"ok": False, "error": traceback.format_exc()[-3000:]}
            result["steps"][name]["seconds"] = round(time.time() - t, 1)
            if device.type == "cuda":
                result["steps"][name]["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                torch.cuda.empty_cache()
        result["seconds"] = round(time.time() - t0, 1)
        result["ok"] = all(s.get("ok") for s in result["steps"].values())
        Path(args.out).write_text(json.dumps(result, indent=1, default=str) + "\n")
        print(f"gpu-check: {name}: {'ok' if result['steps'][name].get('ok') else 'NOT ok'} "
              f"({result['seconds']:.0f} s so far)", flush=True)
    print(f"gpu-check: wrote {args.out} ({'all ok' if result['ok'] else 'some steps NOT ok'})")
    return 0 if result["ok"] else 1


def logging_setup() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("WANDB_MODE", "disabled")


if __name__ == "__main__":
    sys.exit(main())
