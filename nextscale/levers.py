"""The fast paths ("levers") checked against the plain path: same weights, same inputs, float32.

Each ``check_*`` function builds a small model, runs the lever and the plain path, and returns a JSON-able
dict with the measured differences, the tolerance it is held to and ``ok``. The unit tests run them on
the CPU; ``scripts/gpu_check.py`` runs the same functions on CUDA. Levers and their switches:

- ``flex``: FlexAttention with a block-causal ``BlockMask`` (``model.overrides.attn_impl=flex``);
- ``compile``: the teacher-forced forward + backward under ``torch.compile`` (``compile=true``);
- ``chunked_ce``: the head + cross-entropy in row chunks, no full fp32 logits (``loss_chunk=N``);
- ``static_cache``: the sampler's preallocated KV cache (``sample_codes(static_cache=True)``), and with
  ``graphs`` its CUDA-graph replay (CUDA only);
- ``prefetch``: the next batch copied to the device during the step (``prefetch=true``);
- ``vqvae``: channels-last and bf16 encode / decode of the tokenizer (``VQVAE.channels_last_``,
  ``amp_dtype``); bf16 changes codes, so it is reported as index agreement, never the default.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from nextscale.prior.engine import step_loss
from nextscale.prior.families import build_prior
from nextscale.prior.model import NextScalePrior, cached_block_mask
from nextscale.prior.prefetch import DevicePrefetcher
from nextscale.prior.sample import SamplingConfig, sample_codes
from nextscale.prior.var import VAR
from nextscale.tokenize.metrics import index_agreement
from nextscale.tokenize.vqvae import VQVAE, MultiScaleQuantizer

D16_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)

# Tolerances of a lever against the plain path, both float32 on one device. The plain path's own float32
# floor (|fp32 - fp64| of the same model) is at most FP32_FLOOR on these presets' logits over every CPU code
# path of one machine (tests/noise_floor.py, tests/tolerances.py); two float32 orders of one computation
# differ by at most twice that, and other CPUs by a few times more, so the tolerance is 20x the floor.
# Compiled (inductor) and CUDA kernels fuse and reorder reductions more freely: KERNEL_TOL.
FP32_FLOOR = 1.4e-6
FP32_TOL = 20 * FP32_FLOOR
KERNEL_TOL = 1e-4
VQVAE_DECODE_FLOOR = 1.3e-5  # the tokenizer's decoded images: deeper, with wider convolutions


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """No TF32 inside: CUDA matmuls and convs in true float32, so a lever's error is its own."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _max_abs(a: Tensor, b: Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


def _max_rel(a: Tensor, b: Tensor) -> float:
    """max |a - b| / max |b|: the error relative to the tensor's scale (grads span decades)."""
    return _max_abs(a, b) / max(float(b.detach().abs().max()), 1e-30)


def _result(tol: float, **diffs: float) -> dict:
    return {**diffs, "tol": tol, "ok": all(v <= tol for v in diffs.values())}


def tiny_var(preset: str, device: torch.device | str, seed: int = 0, **overrides) -> NextScalePrior:
    """A small VAR with visible AdaLN / head effects (larger init than the official one), no randomness in train()."""
    torch.manual_seed(seed)
    return build_prior(preset, init_adaln_gamma=0.5, init_head=1.0, cond_drop_rate=0.0, drop_path_rate=0.0,
                     **overrides).to(device)


def _inputs(var: NextScalePrior, B: int, device, seed: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    label_B = torch.randint(0, var.num_classes, (B,), generator=g)
    x_BlCv = torch.randn(B, var.L - 1, var.Cv, generator=g)
    target_BL = torch.randint(0, var.V, (B, var.L), generator=g)
    return label_B.to(device), x_BlCv.to(device), target_BL.to(device)


def _logits_and_grads(net, var: NextScalePrior, label_B: Tensor, x_BlCv: Tensor, target_BL: Tensor) -> tuple[Tensor, list]:
    var.zero_grad(set_to_none=True)
    logits_BLV = net(label_B, x_BlCv)
    F.cross_entropy(logits_BLV.flatten(0, 1), target_BL.flatten()).backward()
    return logits_BLV.detach(), [p.grad.detach().clone() for p in var.parameters()]


# ------------------------------------------------------------------------------------------------
# Prior levers


def check_flex(device: torch.device | str = "cpu", preset: str = "demo", B: int = 2) -> dict:
    """FlexAttention vs SDPA with the dense mask: logits (and, off the CPU, the gradients).

    FlexAttention has no CPU backward, so on the CPU the training path keeps SDPA and only the forward
    (sampling / evaluation) is compared. ``blocks_skipped`` is the share of (query, key) blocks the
    ``BlockMask`` of the full pyramid lets the kernel skip; off the CPU the d16 pyramid's share too.
    """
    device = torch.device(device)
    sdpa = tiny_var(preset, device).train()
    flex = tiny_var(preset, device, attn_impl="flex").train()
    flex.load_state_dict(sdpa.state_dict())
    label_B, x_BlCv, target_BL = _inputs(sdpa, B, device)
    tol = FP32_TOL if device.type == "cpu" else KERNEL_TOL
    with exact_fp32():
        if device.type == "cpu":
            with torch.no_grad():
                out = _result(tol, logits=_max_abs(flex(label_B, x_BlCv), sdpa(label_B, x_BlCv)))
        else:
            ref, ref_grads = _logits_and_grads(sdpa, sdpa, label_B, x_BlCv, target_BL)
            got, got_grads = _logits_and_grads(flex, flex, label_B, x_BlCv, target_BL)
            out = _result(tol, logits=_max_abs(got, ref),
                          grads_rel=max(_max_rel(a, b) for a, b in zip(got_grads, ref_grads)))
    mask = sdpa._block_mask(sdpa.L, device)
    out["blocks_skipped"] = round(mask.sparsity() / 100, 4)
    if device.type != "cpu":  # building the L=680 mask takes seconds on a CPU
        out["blocks_skipped_d16"] = round(cached_block_mask(VAR.attends, D16_PATCH_NUMS, 680, device).sparsity() / 100, 4)
    return out


def check_compile(device: torch.device | str = "cpu", preset: str = "debug", B: int = 2) -> dict:
    """``torch.compile`` (inductor) of the whole model vs eager: logits and every parameter's gradient."""
    device = torch.device(device)
    var = tiny_var(preset, device).train()
    label_B, x_BlCv, target_BL = _inputs(var, B, device)
    with exact_fp32():
        ref, ref_grads = _logits_and_grads(var, var, label_B, x_BlCv, target_BL)
        got, got_grads = _logits_and_grads(torch.compile(var), var, label_B, x_BlCv, target_BL)
    return _result(KERNEL_TOL, logits=_max_abs(got, ref), grads_rel=max(_max_rel(a, b) for a, b in zip(got_grads, ref_grads)))


def check_chunked_ce(device: torch.device | str = "cpu", preset: str = "debug", B: int = 3, chunk: int = 7) -> dict:
    """``step_loss`` with ``loss_chunk`` vs the full-logits loss: loss, gradients, and the argmax predictions."""
    device = torch.device(device)
    var = tiny_var(preset, device).train()
    torch.manual_seed(2)
    quantizer = MultiScaleQuantizer(var.V, var.Cv, var.patch_nums, beta=0.25, quant_resi=0.5, num_phi=4).to(device)
    _, _, codes_BL = _inputs(var, B, device)
    label_B = torch.arange(B, device=device) % var.num_classes
    results = []
    with exact_fp32():
        for loss_chunk in (0, chunk):
            var.zero_grad(set_to_none=True)
            loss, pred_Bl = step_loss(var, quantizer, codes_BL, label_B, var.patch_nums, len(var.patch_nums), None,
                                      label_smoothing=0.1, loss_chunk=loss_chunk)
            loss.backward()
            results.append((loss.detach(), pred_Bl, [p.grad.clone() for p in var.parameters()]))
    (ref_loss, ref_pred, ref_grads), (loss, pred, grads) = results
    out = _result(FP32_TOL, loss=_max_abs(loss, ref_loss), grads_rel=max(_max_rel(a, b) for a, b in zip(grads, ref_grads)))
    out["predictions_equal"] = bool(torch.equal(pred, ref_pred))
    out["ok"] = out["ok"] and out["predictions_equal"]
    return out


def check_static_cache(device: torch.device | str = "cpu", preset: str = "debug", B: int = 4,
                       graphs: bool = False) -> dict:
    """The static-KV-cache sampler (with ``graphs``: CUDA-graph replay) vs today's sampler, one generator seed.

    fp32: the static cache must give the same tokens. CUDA graphs replay compiled kernels whose rounding
    may differ, so they report the token agreement and the raw-logit difference.
    """
    device = torch.device(device)
    var = tiny_var(preset, device).eval()
    torch.manual_seed(2)
    quantizer = MultiScaleQuantizer(var.V, var.Cv, var.patch_nums, beta=0.25, quant_resi=0.5, num_phi=4).to(device)
    label_B = torch.arange(B, device=device) % var.num_classes
    runs = []
    with exact_fp32():
        for kw in ({}, {"static_cache": True, "graphs": graphs}):
            record: dict[str, list[Tensor]] = {}
            codes = sample_codes(var, quantizer, label_B, generator=torch.Generator(device).manual_seed(0),
                                 sampling=SamplingConfig(guidance=1.5, top_k=0, top_p=0.0), autocast=False, record=record, **kw)
            runs.append((codes, torch.cat(record["logits_raw"], dim=1)))
    (ref_codes, ref_raw), (codes, raw) = runs
    agreement = float((codes == ref_codes).float().mean())
    tol = FP32_TOL if not graphs else KERNEL_TOL
    # the raw logits are comparable only while the tokens agree (later scales see the drawn tokens)
    out = _result(tol, raw_logits=_max_abs(raw, ref_raw) if agreement == 1.0 else float("inf"))
    out.update(token_agreement=agreement, tokens_equal=agreement == 1.0, graphs=graphs and device.type == "cuda")
    out["ok"] = out["ok"] and out["tokens_equal"]
    return out


class _Numbered:
    """Batches i = 0, 1, ... with codes = i and a position counter (what the engine's Batches offers)."""

    def __init__(self, B: int, L: int):
        self.i, self.B, self.L = 0, B, L

    def __next__(self) -> tuple[Tensor, Tensor]:
        self.i += 1
        return torch.full((self.B, self.L), self.i - 1, dtype=torch.int16), torch.full((self.B,), self.i - 1)

    def state_dict(self) -> dict:
        return {"batches_read": self.i}


def check_prefetch(device: torch.device | str = "cpu", steps: int = 5) -> dict:
    """The prefetching iterator hands out the same batches, on the device as int64, with the position of
    the last batch handed out (not of the one in flight)."""
    device = torch.device(device)
    got, positions = [], []
    prefetcher = DevicePrefetcher(_Numbered(4, 30), device, enabled=True)
    for _ in range(steps):
        codes_BL, label_B = next(prefetcher)
        got.append((int(codes_BL[0, 0]), codes_BL.dtype, codes_BL.device.type, int(label_B[0])))
        positions.append(prefetcher.state_dict()["batches_read"])
    want = [(i, torch.int64, device.type, i) for i in range(steps)]
    same = got == want and positions == list(range(1, steps + 1))
    return {"same_batches_and_positions": same, "ok": same}


# ------------------------------------------------------------------------------------------------
# Tokenizer levers


@torch.no_grad()
def check_vqvae(vqvae: VQVAE, img_B3HW: Tensor, device: torch.device | str = "cpu") -> dict:
    """Channels-last fp32 (encode indices and decode images vs the default layout) and bf16 (encode index
    agreement with fp32, decode image difference); the model is left as it was given."""
    device = torch.device(device)
    vqvae = vqvae.to(device).eval()
    img_B3HW = img_B3HW.to(device)
    with exact_fp32():
        codes = vqvae.encode(img_B3HW)
        rec = vqvae.decode(codes)
        rec_bf16 = vqvae.decode(codes, amp_dtype=torch.bfloat16)
        bf16 = index_agreement(vqvae, [img_B3HW], amp_dtype=torch.bfloat16, device=device)
        vqvae.channels_last_(True)
        try:
            codes_cl = vqvae.encode(img_B3HW)
            rec_cl = vqvae.decode(codes)
            bf16_cl = index_agreement(vqvae, [img_B3HW], amp_dtype=torch.bfloat16, device=device)
        finally:
            vqvae.channels_last_(False)
    tol = 20 * VQVAE_DECODE_FLOOR
    out = _result(tol, channels_last_decode=_max_abs(rec_cl, rec))
    out.update(channels_last_index_agreement=float((codes_cl == codes).float().mean()),
               bf16_decode_max_abs=_max_abs(rec_bf16, rec), bf16_index_agreement=bf16["agreement"],
               bf16_index_agreement_per_scale=[round(a, 4) for a in bf16["agreement_per_scale"]],
               bf16_channels_last_index_agreement=bf16_cl["agreement"], images=int(img_B3HW.shape[0]))
    return out
