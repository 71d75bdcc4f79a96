"""Host bookkeeping (positions, indices: small int tensors on the CPU) sent to the device.

Selection runs on the host so that it never makes the device wait; its results reach the
device through :func:`to_device`, which never makes the host wait either.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without a host/device sync (pinned, non-blocking copy:
    a copy from pageable memory would first wait for every queued kernel)."""
    if torch.device(device).type != "cuda":
        return index.to(device)
    return index.pin_memory().to(device, non_blocking=True)


def indices_to(indices: Sequence[int], device: torch.device) -> torch.Tensor:
    """A host list of indices as an int64 tensor on ``device`` (through :func:`to_device`)."""
    return to_device(torch.tensor(indices, dtype=torch.int64), device)
