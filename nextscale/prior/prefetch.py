"""Host-to-device overlap for the training loop: the next batch is copied while the current step runs.

On CUDA the host batch is pinned and copied with ``non_blocking=True`` on a side stream, started as soon
as the previous batch is handed out; the compute stream waits for that copy only when it needs the
batch. Anywhere else the batch is fetched one step ahead and moved synchronously (the same batches, in
the same order). The data position saved in checkpoints is the one of the last batch handed out, not of
the one in flight, so a resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import Tensor


class StatefulBatches(Protocol):
    def __next__(self) -> tuple[Tensor, Tensor]: ...

    def state_dict(self) -> dict: ...


class DevicePrefetcher:
    """``next()`` gives (codes_BL int64, label_B int64) on ``device``; ``state_dict()`` as of that batch."""

    def __init__(self, batches: StatefulBatches | Iterator, device: torch.device, enabled: bool = True):
        self.batches, self.device, self.enabled = batches, device, enabled
        self._cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if enabled and self._cuda else None
        self._next: tuple[Tensor, Tensor, Any] | None = None
        self._state: Any = self._position()

    def _position(self) -> Any:
        return self.batches.state_dict() if hasattr(self.batches, "state_dict") else None

    def _fetch(self) -> tuple[Tensor, Tensor, Any]:
        codes_BL, label_B = next(self.batches)
        position = self._position()
        if self._stream is None:
            return codes_BL.to(self.device).long(), label_B.to(self.device).long(), position
        codes_BL, label_B = codes_BL.pin_memory(), label_B.pin_memory()
        with torch.cuda.stream(self._stream):
            codes_BL = codes_BL.to(self.device, non_blocking=True).long()
            label_B = label_B.to(self.device, non_blocking=True).long()
        return codes_BL, label_B, position

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        if not self.enabled:
            codes_BL, label_B, self._state = self._fetch()
            return codes_BL, label_B
        if self._next is None:
            self._next = self._fetch()
        codes_BL, label_B, self._state = self._next
        if self._stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
            # the tensors were allocated on the side stream: tell the allocator the compute stream uses them
            codes_BL.record_stream(torch.cuda.current_stream(self.device))
            label_B.record_stream(torch.cuda.current_stream(self.device))
        self._next = self._fetch()
        return codes_BL, label_B

    def state_dict(self) -> Any:
        """The wrapped batches' position after the last batch handed out (the one in flight not counted)."""
        return self._state
