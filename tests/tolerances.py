"""Every float tolerance of the numeric tests, each derived from a measured noise floor (issue 20).

The floor of a float32 computation is how far a correct float32 implementation lands from the exact value.
`tests/noise_floor.py` measures it: the same code run in float64 (``float64()`` below) is the exact value
to ~1e-14 (golden/mvar/README.md §6), so for every compared array it reports
  ours     = |ours in float32 - ours in float64|       (our rounding on this CPU path)
  official = |official output - ours in float64|      (the official code's rounding on its machine)
under each CPU code path one machine can reach (MKL's conditional-numerical-reproducibility path, ATen's
and oneDNN's ISA levels; 1 and 2 threads). A test that compares ours with the official output can be off
by ours + official <= 2 x floor; another CPU picks other kernels (an AVX-512/AMX Xeon showed 5x our
largest floor on the M-VAR forward: 1.3e-5), so every tolerance is ``MARGIN`` x the largest floor measured
over all paths, where floor = max(ours, official). A wrong model (a mask, a norm, a missing term) is off
by 1e-2 or more at these sizes, far above every tolerance here.

Floors measured with `make noise-floor` on 2026-12-06, AMD EPYC (AVX2, no AVX-512), torch 2.14.1, paths:
default, MKL_CBWR=COMPATIBLE, ATEN_CPU_CAPABILITY=default, ONEDNN_MAX_CPU_ISA=SSE41 and all three together,
each with 1 and 2 threads (MKL_ENABLE_INSTRUCTIONS changes nothing on this AMD CPU); the table is in
docs/numerics.md. Discrete results (codes, sampled tokens, kept top-k / top-p sets) are compared
exactly, and the tests also check that their decisions are far from a tie: the smallest margin of each
decision must exceed what the tolerance's error could change (``token_margins``, ``nearest_code_margins``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import Tensor

MARGIN = 20

# the largest floor over paths and arrays of each family (the largest |value| in brackets)
FLOOR_VAR = 3.9e-6           # VAR teacher forcing, sampling logits raw / guided           [|logits| 3.5]
FLOOR_MVAR = 2.0e-5          # M-VAR teacher forcing, sampling logits, Mamba2 mixer output  [3.4, |y| 4.6]
FLOOR_MAMBA_DT = 1.1e-6      # the mixer's dt = softplus(x W + dt_bias)
FLOOR_MAMBA_SCAN = 8.2e-5    # the scan's output before the gated norm                      [109]
FLOOR_SCAN = 9.6e-7          # the chunked scan against the float64 recurrence, random inputs
FLOOR_VQVAE_ENCODE = 3.9e-6  # tokenizer encoder, latent, teacher-forcing input
FLOOR_VQVAE_DECODE = 1.3e-5  # f_hat and reconstructions                                    [~1.5]
FLOOR_REORDER = 1.4e-6       # one fp32 model computed two ways on one machine (demo / debug presets)

VAR_TOL = MARGIN * FLOOR_VAR
MVAR_TOL = MARGIN * FLOOR_MVAR
MAMBA_DT_TOL = MARGIN * FLOOR_MAMBA_DT
MAMBA_SCAN_TOL = MARGIN * FLOOR_MAMBA_SCAN
SCAN_TOL = MARGIN * FLOOR_SCAN
VQVAE_ENCODE_TOL = MARGIN * FLOOR_VQVAE_ENCODE
VQVAE_DECODE_TOL = MARGIN * FLOOR_VQVAE_DECODE
REORDER_TOL = MARGIN * FLOOR_REORDER


@contextlib.contextmanager
def float64() -> Iterator[None]:
    """Run code written for float32 in float64: ``.float()`` and new tensors give float64.

    Models take float64 weights with ``.double()``; what they cast with ``.float()`` (the official code's
    casts around norms, heads and scans) stays float64 here, so the whole computation is exact to ~1e-14.
    """
    cast, default = torch.Tensor.float, torch.get_default_dtype()
    torch.Tensor.float = lambda self, *args, **kwargs: self.double()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.Tensor.float = cast
        torch.set_default_dtype(default)


def token_margins(record: dict[str, list[Tensor]], codes_BL: Tensor, seed: int, top_k: int, top_p: float) -> dict:
    """Per discrete decision of a recorded ``sample_codes`` run, the smallest error that could change it.

    Each figure is the smallest per-element error of the guided logits that could flip a decision (half its
    distance to a tie in logit units): a test whose logits are within tolerance d of the reference's draws the
    same tokens wherever every figure exceeds d.
    - ``token``: ``torch.multinomial(p, 1)`` draws q ~ Exp(1) per (row, token) from the generator and takes
      argmax p / q = argmax (logit - log q) over the kept tokens; half the winner's lead. The draws are
      replayed from ``seed`` and must give ``codes_BL`` back (``replay_equal``: the replay is checked).
    - ``top_k``: half the gap between the k-th and (k+1)-th largest guided logit.
    - ``top_p``: half |ln(c / (1 - top_p))| over the ascending cumulative masses c of the tokens top-k kept
      (an error d moves each c by a factor within exp(+-2 d)).
    """
    g = torch.Generator().manual_seed(seed)
    margins = {"token": math.inf, "top_k": math.inf, "top_p": math.inf}
    picked = []
    for guided_BlV, filtered_BlV in zip(record["logits_guided"], record["logits_filtered"]):
        V = guided_BlV.shape[-1]
        guided, filtered = guided_BlV.reshape(-1, V).double(), filtered_BlV.reshape(-1, V)
        q = torch.empty(filtered.shape).exponential_(generator=g).double()
        score = filtered.double() - q.log()
        best2 = score.topk(2, dim=-1).values
        picked.append(score.argmax(-1))
        margins["token"] = min(margins["token"], float((best2[:, 0] - best2[:, 1]).min()) / 2)
        if 0 < top_k < V:
            kth = guided.topk(top_k + 1, dim=-1).values
            margins["top_k"] = min(margins["top_k"], float((kth[:, top_k - 1] - kth[:, top_k]).min()) / 2)
        if top_p > 0:  # on what top-k kept, as the filter runs
            topk_kept = guided if not 0 < top_k < V else guided.masked_fill(
                guided < guided.topk(top_k, dim=-1).values[:, -1:], -math.inf)
            c = topk_kept.sort(dim=-1).values.softmax(-1).cumsum(-1)[:, :-1]  # the most likely is always kept
            ratio = (c[c > 0] / (1 - top_p)).log().abs()
            if ratio.numel():
                margins["top_p"] = min(margins["top_p"], float(ratio.min()) / 2)
    replayed = torch.cat([p.view(codes_BL.shape[0], -1) for p in picked], dim=1)
    margins["replay_equal"] = bool(torch.equal(replayed, codes_BL))
    return margins


@contextlib.contextmanager
def nearest_code_margins(quantizer) -> Iterator[list[float]]:
    """Collect, per nearest-code search of ``quantizer``, the smallest per-element error of its input that
    could change a code.

    The search is an argmin over squared distances d = |z - e|^2. An input error of at most t per element
    (norm <= t sqrt(C)) moves each distance by at most 2 r t sqrt(C) (+ t^2 C), r the largest distance from an
    input to a candidate code, so no code changes where the best-to-second gap exceeds twice that."""
    margins: list[float] = []
    nearest = quantizer._nearest

    def measured(z_NC: Tensor) -> Tensor:
        d_NV = (z_NC.double()[:, None, :] - quantizer.embedding.weight.double()[None]).square().sum(-1)
        best2 = d_NV.topk(2, dim=1, largest=False).values
        r = float(best2[:, 1].sqrt().max())
        margins.append(float((best2[:, 1] - best2[:, 0]).min()) / (4 * r * math.sqrt(z_NC.shape[1])))
        return nearest(z_NC)

    quantizer._nearest = measured
    try:
        yield margins
    finally:
        del quantizer._nearest
