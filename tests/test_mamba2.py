"""The Mamba2 mixer against the official M-VAR's mixer outputs (tests/golden/mvar, block 0 with rule weights).

The reference (golden README §5) runs its recurrence sequentially in float64 from float32 projections; a
correct float32 implementation is ~1e-5 from it (README §6: transformers' chunked scan 1.1e-5). Tolerances
are the M-VAR family's (tests/tolerances.py: 20x the largest floor measured over CPU paths), the same for
whole-sequence, two-piece and token-by-token runs; the scan's intermediates have floors of their own.
"""

from __future__ import annotations

import golden_rule as gr
import numpy as np
import pytest
import torch
from tolerances import MAMBA_DT_TOL, MAMBA_SCAN_TOL, MVAR_TOL, SCAN_TOL

from nextscale.prior.mamba2 import Mamba2, segsum, ssd_scan

TOL = MVAR_TOL


@pytest.fixture(scope="module")
def mixer() -> Mamba2:
    sd = gr.rule_state_dict(gr.official_param_shapes("mvar"), gr.MVAR_SEED_BASE)
    m = Mamba2(128, d_state=64, d_conv=4, expand=2)  # the official Mamba2(d_model=C, d_state=64, d_conv=4, expand=2)
    prefix = "blocks.0.mamba."
    m.load_state_dict({k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}, strict=True)
    return m.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def u() -> torch.Tensor:
    return torch.from_numpy(gr.load("mvar/mamba_x.npy"))  # (2, 300, 128): crosses the 256-token chunk boundary


def max_abs(a: torch.Tensor, name: str) -> float:
    ref = gr.load(f"mvar/{name}")
    assert tuple(a.shape) == ref.shape, name
    return float(np.abs(a.numpy().astype(np.float64) - ref).max())


def test_parameters_are_mamba_ssm_names_shapes_and_order(mixer):
    assert [(k, tuple(v.shape)) for k, v in mixer.state_dict().items()] == [
        ("dt_bias", (4,)), ("A_log", (4,)), ("D", (4,)), ("in_proj.weight", (644, 128)),
        ("conv1d.weight", (384, 1, 4)), ("conv1d.bias", (384,)), ("norm.weight", (256,)),
        ("out_proj.weight", (128, 256))]


@pytest.mark.parametrize("chunk_size", [256, 32, 1000])
def test_output_matches_official(mixer, u, chunk_size):
    mixer.chunk_size = chunk_size  # the math does not depend on it
    try:
        assert max_abs(mixer(u), "mamba_y.npy") <= TOL
    finally:
        mixer.chunk_size = 256


def test_intermediates_match_official(mixer, u):
    _, _, dt = mixer.projections(u)
    assert max_abs(dt, "mamba_dt.npy") <= MAMBA_DT_TOL
    seen = []
    hook = mixer.norm.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    mixer(u)
    hook.remove()
    assert max_abs(seen[0], "mamba_y_scan.npy") <= MAMBA_SCAN_TOL


def test_state_carries_across_calls(mixer, u):
    state = mixer.empty_state(2)
    y = torch.cat([mixer(u[:, :137], state), mixer(u[:, 137:], state)], dim=1)
    assert max_abs(y, "mamba_y.npy") <= TOL
    # pieces of the sizes a 256-px sampler feeds (pn^2), single tokens among them
    state, b, ys = mixer.empty_state(2), 0, []
    for n in (1, 1, 1, 1, 4, 9, 16, 25, 36, 64, 100, 42):
        ys.append(mixer(u[:, b:b + n], state))
        b += n
    y = torch.cat(ys, dim=1)
    assert b == 300 and max_abs(y, "mamba_y.npy") <= TOL
    # causality: a prefix alone gives the prefix of the output
    assert max_abs(torch.cat([mixer(u[:, :137]), y[:, 137:]], dim=1), "mamba_y.npy") <= TOL


def test_chunked_scan_equals_the_sequential_recurrence_in_float64():
    g = torch.Generator().manual_seed(0)
    B, l, H, P, G, N = 2, 23, 4, 3, 2, 5
    x, B_, C_ = (torch.randn(B, l, *s, generator=g, dtype=torch.float64) for s in ((H, P), (G, N), (G, N)))
    dt = torch.rand(B, l, H, generator=g, dtype=torch.float64)
    A = -torch.rand(H, generator=g, dtype=torch.float64) * 3
    h0 = torch.randn(B, H, P, N, generator=g, dtype=torch.float64)
    h, ys = h0.clone(), []
    for t in range(l):
        Bt, Ct = B_[:, t].repeat_interleave(2, dim=1), C_[:, t].repeat_interleave(2, dim=1)  # (B, H, N)
        h = torch.exp(dt[:, t] * A)[..., None, None] * h + (dt[:, t, :, None] * x[:, t])[..., None] * Bt[:, :, None]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, Ct))
    for chunk in (1, 4, 23, 64):
        y, final = ssd_scan(x.float(), dt.float(), A.float(), B_.float(), C_.float(), chunk, h0.float())
        assert torch.allclose(y.double(), torch.stack(ys, 1), atol=SCAN_TOL) and torch.allclose(final.double(), h, atol=SCAN_TOL)


def test_segsum():
    a = torch.tensor([1.0, 2.0, 4.0])
    assert torch.equal(segsum(a), torch.tensor([[0.0, -torch.inf, -torch.inf], [2.0, 0.0, -torch.inf],
                                                [6.0, 4.0, 0.0]]))


def test_gradients_flow_through_the_reference_path():
    m = Mamba2(16, d_state=8, headdim=8, chunk_size=4)
    m(torch.randn(2, 11, 16)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the mamba_ssm kernel path needs CUDA")
def test_kernel_path_matches_the_reference(mixer, u):
    pytest.importorskip("mamba_ssm")
    m, x = mixer.cuda(), u.cuda()
    try:
        state = m.empty_state(2)
        y = torch.cat([m(x[:, :137], state), m(x[:, 137:], state)], dim=1).cpu()
        assert max_abs(m(x).cpu(), "mamba_y.npy") <= TOL and max_abs(y, "mamba_y.npy") <= TOL
    finally:
        mixer.cpu()


def test_a_missing_kernel_falls_back_with_one_log_line(caplog):
    from nextscale.prior import mamba2

    try:
        import mamba_ssm  # noqa: F401
        pytest.skip("mamba_ssm is importable here")
    except ImportError:
        pass
    mamba2._kernel_scan.cache_clear()
    with caplog.at_level("INFO", logger="nextscale.prior.mamba2"):
        assert mamba2._kernel_scan() is None and mamba2._kernel_scan() is None
    assert len(caplog.records) == 1 and "PyTorch reference scan" in caplog.records[0].getMessage()
