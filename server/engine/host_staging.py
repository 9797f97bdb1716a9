"""A step's integer inputs, moved to the device in one copy from pinned host memory."""

from __future__ import annotations

import numpy as np
import torch

MIN_CAPACITY = 4096  # int64 elements (32 KiB); grows to the next power of two a step needs


class HostStaging:
    """One int64 host buffer (pinned on CUDA) and its device twin.

    :meth:`stage` writes a step's arrays (token ids, positions, KV slots, block tables, lengths)
    one after another into the host buffer, copies them to the device in one ``non_blocking``
    copy and hands out views of the device buffer. Separate ``.to(device)`` calls from pageable
    memory cost one driver staging copy each, and the driver may wait for the stream before it
    copies: the host would stall behind the GPU's previous work instead of preparing this step.

    The views stay valid until the next :meth:`stage`. Before writing the host buffer again it
    waits for the event recorded after the previous copy (normally long done: each step reads its
    sampled ids back). On a CPU the same code runs with an ordinary buffer and a plain copy.
    """

    def __init__(self, device: torch.device, capacity: int = MIN_CAPACITY):
        self.device = device
        self._event = None  # a torch.cuda.Event after the last copy (CUDA only)
        self._allocate(capacity)

    def _allocate(self, capacity: int) -> None:
        self.capacity = capacity
        pinned = self.device.type == "cuda"
        self._host = torch.empty(capacity, dtype=torch.int64, pin_memory=pinned)
        self._host_np = self._host.numpy()
        self._dev = torch.empty(capacity, dtype=torch.int64, device=self.device)

    def stage(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """Device int64 tensors with the shapes and contents of ``arrays`` (any integer dtype)."""
        total = sum(a.size for a in arrays)
        if self._event is not None:
            self._event.synchronize()  # the previous copy has left the host buffer
        if total > self.capacity:
            self._allocate(max(MIN_CAPACITY, 1 << (total - 1).bit_length()))
        spans = []
        offset = 0
        for a in arrays:
            self._host_np[offset : offset + a.size] = a.reshape(-1)
            spans.append((offset, a.shape))
            offset += a.size
        if offset:
            self._dev[:offset].copy_(self._host[:offset], non_blocking=True)
            if self.device.type == "cuda":
                self._event = torch.cuda.Event()
                self._event.record()
        return [self._dev[start : start + int(np.prod(shape, dtype=np.int64))].view(shape) for start, shape in spans]
