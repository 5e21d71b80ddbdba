"""Token layout of next-scale prediction: scale-major codes, per-scale slices, the Phi selection table.

A code sequence ``codes_BL`` concatenates the token maps of all scales from coarse to fine; scale k
holds ``pn_k * pn_k`` tokens in row-major (h, w) order, so ``L = sum(pn_k ** 2)`` (680 for VAR's
``(1, 2, 3, 4, 5, 6, 8, 10, 13, 16)``). Pure functions, no model state.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor

# Official VAR: PhiPartiallyShared with K=4 picks argmin |ticks - si/9| in float64, where scales 2 and 7
# are exact ties in real arithmetic and numpy's rounding breaks them toward 1 and 3 (float32 gives 2
# for scale 7). The checkpoint was trained with this table, so it is pinned rather than recomputed.
_OFFICIAL_PHI_TABLE_10x4 = [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]


def num_tokens(patch_nums: Sequence[int]) -> int:
    """L = sum of pn^2 over the scales."""
    return sum(pn * pn for pn in patch_nums)


def scale_slices(patch_nums: Sequence[int]) -> list[tuple[int, int]]:
    """(begin, end) of every scale inside a length-L code sequence."""
    out, begin = [], 0
    for pn in patch_nums:
        out.append((begin, begin + pn * pn))
        begin += pn * pn
    return out


def split_codes(codes_BL: Tensor, patch_nums: Sequence[int]) -> list[Tensor]:
    """(B, L) -> [(B, pn*pn)] per scale (views, no copy)."""
    L = num_tokens(patch_nums)
    if codes_BL.ndim != 2 or codes_BL.shape[1] != L:
        raise ValueError(
            f"codes must have shape (B, {L}) for patch_nums {tuple(patch_nums)}, got {tuple(codes_BL.shape)}"
        )
    return [codes_BL[:, b:e] for b, e in scale_slices(patch_nums)]


def phi_index_table(num_scales: int, num_phi: int = 4) -> list[int]:
    """Which of the ``num_phi`` shared Phi convs each scale uses (official VAR selection rule).

    The official rule: r = si / (num_scales - 1), ticks = linspace(1/(3K), 1 - 1/(3K), K) when K == 4,
    else linspace(1/(2K), 1 - 1/(2K), K); pick the nearest tick (float64, numpy argmin = first minimum).
    """
    if num_scales < 1 or num_phi < 1:
        raise ValueError(f"phi_index_table needs num_scales >= 1 and num_phi >= 1, got {num_scales}, {num_phi}")
    if (num_scales, num_phi) == (10, 4):
        return list(_OFFICIAL_PHI_TABLE_10x4)
    K = num_phi
    ticks = np.linspace(1 / 3 / K, 1 - 1 / 3 / K, K) if K == 4 else np.linspace(1 / 2 / K, 1 - 1 / 2 / K, K)
    denom = max(num_scales - 1, 1)  # a single scale sits at r = 0 (the official code divides by zero there)
    return [int(np.argmin(np.abs(ticks - si / denom))) for si in range(num_scales)]
