"""Mamba2 mixer (state-spaces/mamba ``mamba_ssm.modules.mamba2.Mamba2``, v2.x) with an explicit recurrent state.

Parameter names, shapes and state-dict order are mamba_ssm's (``dt_bias, A_log, D, in_proj.weight,
conv1d.weight, conv1d.bias, norm.weight, out_proj.weight``), so the mixers of an official M-VAR
checkpoint load as they are. What it computes (per head h, time t; h_{-1} = the carried state, 0 at start):

    z | xBC | dt  = in_proj(u)                 xBC -> causal depthwise conv (kernel d_conv, bias) -> SiLU
    x | B | C     = xBC                        dt = softplus(dt + dt_bias), A = -exp(A_log)
    h_t = exp(dt_t A_h) h_{t-1} + dt_t x_t B_t^T       y_t = h_t C_t + D_h x_t
    out = out_proj(RMSNorm(y * SiLU(z)) * norm.weight)

The reference path is pure PyTorch and runs anywhere: the scan is the chunked "SSD" form (within a chunk
a masked matrix product, across chunks the carried state), always in float32 whatever the autocast dtype.
:class:`Mamba2State` (the last d_conv - 1 conv inputs and the SSM state) makes the mixer resumable:
``mixer(u[:, :n], state)`` then ``mixer(u[:, n:], state)`` equals ``mixer(u)``, which is what a sampler
that feeds one scale at a time needs. On CUDA, mamba_ssm's Triton chunk-scan kernel replaces the
reference scan when it is importable (same function, same state API); otherwise one log line says the
reference path is used.

Only what M-VAR uses is implemented: d_ssm = d_inner, gated RMSNorm with ``norm_before_gate=False``,
scalar D per head, no dt limit, no in/out-projection bias.

Shape legend: B batch, l time steps, C d_model, E d_inner (= H P), H heads, P head dim, G groups,
N d_state, K d_conv, Dc conv channels (E + 2 G N), T chunk length, c chunks.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Mamba2State:
    """Recurrent state of one mixer after the steps seen so far; the mixer replaces its fields in place."""

    conv_BDcK: Tensor  # (B, Dc, K - 1): the last K - 1 inputs of the causal conv (zeros before the start)
    ssm_BHPN: Tensor  # (B, H, P, N) float32


class GatedRMSNorm(nn.Module):
    """RMSNorm(x * SiLU(z)) * weight over groups of ``group_size`` channels, in float32 (mamba_ssm RMSNormGated)."""

    def __init__(self, dim: int, eps: float = 1e-5, group_size: int | None = None):
        super().__init__()
        self.eps, self.group_size = eps, group_size or dim
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x_BlE: Tensor, z_BlE: Tensor) -> Tensor:
        dtype = z_BlE.dtype
        x = x_BlE.float() * F.silu(z_BlE.float())
        x = x.unflatten(-1, (-1, self.group_size))
        x = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps)
        return (x.flatten(-2) * self.weight.float()).to(dtype)


class Mamba2(nn.Module):
    """mamba_ssm's ``Mamba2(d_model, d_state, d_conv, expand, headdim, ngroups, chunk_size)`` (defaults as there).

    ``forward(u, state)``: u (B, l, C) -> (B, l, C). Without ``state`` the sequence starts from zeros;
    with one (from :meth:`empty_state` or a previous call) it continues from there and the state is
    advanced to the end of u.
    """

    def __init__(self, d_model: int, d_state: int = 128, d_conv: int = 4, expand: int = 2, headdim: int = 64,
                 ngroups: int = 1, chunk_size: int = 256, norm_eps: float = 1e-5, A_init_range=(1.0, 16.0),
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4):
        super().__init__()
        E = expand * d_model
        if E % headdim or E // headdim % ngroups:
            raise ValueError(f"d_inner={E} must split into heads of {headdim} in {ngroups} group(s)")
        self.d_model, self.d_state, self.d_conv, self.d_inner = d_model, d_state, d_conv, E
        self.headdim, self.nheads, self.ngroups, self.chunk_size = headdim, E // headdim, ngroups, chunk_size
        self.conv_dim = E + 2 * ngroups * d_state
        H = self.nheads
        # mamba_ssm's init: dt log-uniform in [dt_min, dt_max] stored as softplus^-1; A uniform in A_init_range
        dt = torch.exp(torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.empty(H).uniform_(*A_init_range).log())
        self.D = nn.Parameter(torch.ones(H))
        self.in_proj = nn.Linear(d_model, 2 * E + 2 * ngroups * d_state + H, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1)
        self.norm = GatedRMSNorm(E, eps=norm_eps, group_size=E // ngroups)
        self.out_proj = nn.Linear(E, d_model, bias=False)

    def empty_state(self, batch: int, device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float32) -> Mamba2State:
        """The state before the first step (zeros); ``dtype`` is that of the conv inputs."""
        device = device if device is not None else self.A_log.device
        return Mamba2State(torch.zeros(batch, self.conv_dim, self.d_conv - 1, device=device, dtype=dtype),
                           torch.zeros(batch, self.nheads, self.headdim, self.d_state, device=device))

    def projections(self, u_BlC: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(z (B, l, E), pre-conv x|B|C (B, l, Dc), dt = softplus(dt + dt_bias) (B, l, H) float32)."""
        z_BlE, xBC_BlD, dt_BlH = self.in_proj(u_BlC).split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        return z_BlE, xBC_BlD, F.softplus(dt_BlH.float() + self.dt_bias.float())

    def forward(self, u_BlC: Tensor, state: Mamba2State | None = None) -> Tensor:
        B, l, _ = u_BlC.shape
        H, P, G, N = self.nheads, self.headdim, self.ngroups, self.d_state
        z_BlE, xBC_BlD, dt_BlH = self.projections(u_BlC)
        xBC_BlD = F.silu(self._conv(xBC_BlD, state))
        x_BlE, B_BlGN, C_BlGN = xBC_BlD.split([self.d_inner, G * N, G * N], dim=-1)
        x_BlHP = x_BlE.unflatten(-1, (H, P))
        scan = _kernel_scan() if u_BlC.is_cuda else None
        y_BlHP, ssm_BHPN = (scan or ssd_scan)(
            x_BlHP, dt_BlH, -torch.exp(self.A_log.float()), B_BlGN.unflatten(-1, (G, N)),
            C_BlGN.unflatten(-1, (G, N)), self.chunk_size, None if state is None else state.ssm_BHPN)
        if state is not None:
            state.ssm_BHPN = ssm_BHPN
        y_BlHP = y_BlHP.float() + self.D.float()[:, None] * x_BlHP.float()
        return self.out_proj(self.norm(y_BlHP.flatten(-2), z_BlE))

    def _conv(self, xBC_BlD: Tensor, state: Mamba2State | None) -> Tensor:
        """Causal depthwise conv over time, continuing from (and advancing) the state's last K - 1 inputs."""
        B, l, Dc = xBC_BlD.shape
        x_BDl = xBC_BlD.transpose(1, 2)
        if state is None:
            past_BDk = x_BDl.new_zeros(B, Dc, self.d_conv - 1)
        else:
            past_BDk = state.conv_BDcK.to(x_BDl.dtype)
        full_BDk = torch.cat((past_BDk, x_BDl), dim=-1)  # (B, Dc, K - 1 + l)
        if state is not None:
            state.conv_BDcK = full_BDk[..., full_BDk.shape[-1] - (self.d_conv - 1):]
        out_BDl = F.conv1d(full_BDk, self.conv1d.weight, self.conv1d.bias, groups=Dc)
        return out_BDl.transpose(1, 2)


# ------------------------------------------------------------------------------------------------
# The scan


def segsum(a_XT: Tensor) -> Tensor:
    """(..., T) -> (..., T, T): out[i, j] = a[j+1] + ... + a[i] for i >= j, -inf above the diagonal.

    Summed as masked cumulative sums rather than as a difference of prefix sums, which loses precision
    when the prefix sums grow large.
    """
    T = a_XT.shape[-1]
    a_XTT = a_XT[..., None].expand(*a_XT.shape, T)  # [..., k, j] = a[k]
    strict_TT = torch.ones(T, T, dtype=torch.bool, device=a_XT.device).tril(-1)
    s_XTT = a_XTT.masked_fill(~strict_TT, 0).cumsum(dim=-2)
    return s_XTT.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=a_XT.device).tril(), -torch.inf)


def ssd_scan(x_BlHP: Tensor, dt_BlH: Tensor, A_H: Tensor, B_BlGN: Tensor, C_BlGN: Tensor, chunk_size: int,
             state_BHPN: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The Mamba2 recurrence without the D skip: (y (B, l, H, P), final state (B, H, P, N)), both float32.

    Chunked SSD (Dao & Gu 2024, §6): the sequence is cut into chunks of ``chunk_size`` (the last one
    zero-padded: dt = 0 there, so padding neither decays nor feeds the state); inside a chunk the output
    is a masked (C B^T * decay) x product, each chunk's end state is summed in closed form, and the
    states at chunk starts follow from a recurrence over the chunks that starts at ``state_BHPN``.
    """
    with torch.autocast(device_type=x_BlHP.device.type, enabled=False):
        Bsz, l, H, P = x_BlHP.shape
        G = B_BlGN.shape[2]
        rep = H // G  # heads per group share B and C
        x, dt, Bm, Cm = x_BlHP.float(), dt_BlH.float(), B_BlGN.float(), C_BlGN.float()
        T = min(chunk_size, l)
        pad = -l % T
        if pad:
            x, dt, Bm, Cm = (F.pad(t, (0, 0) * (t.ndim - 2) + (0, pad)) for t in (x, dt, Bm, Cm))
        c = (l + pad) // T
        x = x.view(Bsz, c, T, H, P)
        Bm, Cm = Bm.view(Bsz, c, T, G, -1), Cm.view(Bsz, c, T, G, -1)
        dt = dt.view(Bsz, c, T, H)
        xdt = x * dt[..., None]
        a_BHcT = (dt * A_H.float()).permute(0, 3, 1, 2)  # log decay of each step
        acum_BHcT = a_BHcT.cumsum(-1)
        # 1. inside each chunk: y_i = sum_{j <= i} (C_i . B_j) exp(a_{j+1} + ... + a_i) dt_j x_j, C B^T once per group
        CB_BGcTT = torch.einsum("bclgn,bcsgn->bgcls", Cm, Bm)
        scores_BHcTT = CB_BGcTT.repeat_interleave(rep, dim=1) * torch.exp(segsum(a_BHcT))
        y = torch.einsum("bhcls,bcshp->bclhp", scores_BHcTT, xdt)
        Bm, Cm = Bm.repeat_interleave(rep, dim=3), Cm.repeat_interleave(rep, dim=3)  # (B, c, T, H, N)
        # 2. each chunk's own contribution to the state at its end, decayed by exp(a_{j+1} + ... + a_{T-1}):
        # summed from the end (not as acum[-1] - acum[j], which cancels badly once the chunk's decay is large)
        to_end_BHcT = torch.exp(F.pad(a_BHcT[..., 1:], (0, 1)).flip(-1).cumsum(-1).flip(-1))
        chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bm, to_end_BHcT, xdt)
        # 3. the state entering each chunk (and the final one): decayed sums over earlier chunks
        init_BHPN = x.new_zeros(Bsz, H, P, Bm.shape[-1]) if state_BHPN is None else state_BHPN.float()
        states = torch.cat((init_BHPN[:, None], chunk_states), dim=1)  # (B, c + 1, H, P, N)
        chunk_decay_BHzz = torch.exp(segsum(F.pad(acum_BHcT[..., -1], (1, 0))))
        states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay_BHzz, states)
        # 4. what the entering state adds inside each chunk
        y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", Cm, states[:, :-1], torch.exp(acum_BHcT))
        return y.reshape(Bsz, c * T, H, P)[:, :l], states[:, -1]


@functools.cache
def _kernel_scan():
    """mamba_ssm's Triton chunk scan wrapped to :func:`ssd_scan`'s signature, or None (logged once)."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except ImportError as e:
        log.info("mamba_ssm is not importable (%s): the Mamba2 mixers run the PyTorch reference scan", e)
        return None

    def scan(x_BlHP, dt_BlH, A_H, B_BlGN, C_BlGN, chunk_size, state_BHPN=None):
        y, final = mamba_chunk_scan_combined(x_BlHP.contiguous(), dt_BlH.contiguous(), A_H, B_BlGN.contiguous(),
                                             C_BlGN.contiguous(), chunk_size, initial_states=state_BHPN,
                                             return_final_states=True)
        return y, final.float()

    return scan
