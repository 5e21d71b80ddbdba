"""How a model is spread over data-parallel ranks (torchtitan's ``parallelize`` idea): the policy lives with
the models, the runner (``nextscale.pipelines.train``) only says which strategy and where.

- ``ddp``: every rank holds the whole model; gradients are all-reduced.
- ``fsdp`` (FSDP2 ``fully_shard``): weights, gradients and optimizer state are sharded over the ranks, one
  shard unit per transformer block and the embeddings and head in the root unit, so a block's weights are
  gathered only while it runs.
"""

from __future__ import annotations

import inspect
from typing import Literal

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def parallelize(model: nn.Module, strategy: Literal["ddp", "fsdp"], device: torch.device) -> nn.Module:
    """``model`` (already on ``device``) wrapped for data parallelism over the initialised process group."""
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in getattr(model, "blocks", []):
            fully_shard(block)
        return fully_shard(model)
    # the official DDP settings; the buffers (attention mask, level ids) are constants, no need to sync them before
    # every forward (torch >= 2.13 names that forward_sync_buffers and warns about broadcast_buffers)
    no_sync = {"forward_sync_buffers" if FORWARD_SYNC_BUFFERS else "broadcast_buffers": False}
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                   find_unused_parameters=False, **no_sync)


FORWARD_SYNC_BUFFERS = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
