"""Cross-entropy over the output head, whole or in row chunks that never hold the batch's fp32 logits.

The plain path builds logits (B, l, V) in float32 and calls ``F.cross_entropy``: at d16, batch 64 that is
64 * 680 * 4096 * 4 bytes = 713 MB of logits plus as much again for their gradient. The chunked path runs
the head and the loss on ``chunk`` rows at a time under activation checkpointing, so only one chunk's
logits exist in the forward and one chunk's are recomputed at a time in the backward; the head's weight
gradient accumulates over the chunks. The loss is the same mean per-token cross-entropy, and the
per-token argmax comes out too (what the accuracy metrics need, so nobody has to keep the logits).

Shape legend: N rows (B * l tokens), C width, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def head_cross_entropy(head: nn.Linear, h_NC: Tensor, target_N: Tensor, *, chunk: int = 0,
                       label_smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
    """(mean cross-entropy of ``head(h)`` float32 logits against ``target_N``, argmax (N,) int64).

    ``chunk`` <= 0 or >= N: one full-size pass (the plain path). The head runs in the autocast dtype if
    any, like ``VAR.logits``; the softmax and the loss run in float32.
    """
    N = h_NC.shape[0]
    if chunk <= 0 or chunk >= N:
        logits_NV = head(h_NC).float()
        loss = F.cross_entropy(logits_NV, target_N, label_smoothing=label_smoothing)
        return loss, logits_NV.detach().argmax(-1)
    total = h_NC.new_zeros((), dtype=torch.float32)
    preds = []
    for b in range(0, N, chunk):
        loss_sum, pred_n = checkpoint(_chunk_loss, head.weight, head.bias, h_NC[b:b + chunk], target_N[b:b + chunk],
                                      label_smoothing, use_reentrant=False)
        total = total + loss_sum
        preds.append(pred_n)
    return total / N, torch.cat(preds)


def _chunk_loss(weight_VC: Tensor, bias_V: Tensor | None, h_nC: Tensor, target_n: Tensor,
                label_smoothing: float) -> tuple[Tensor, Tensor]:
    logits_nV = F.linear(h_nC, weight_VC, bias_V).float()
    loss_sum = F.cross_entropy(logits_nV, target_n, reduction="sum", label_smoothing=label_smoothing)
    return loss_sum, logits_nV.detach().argmax(-1)
