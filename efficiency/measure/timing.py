"""Device synchronisation for timing windows (the latency measurements themselves are phases: phases/latency.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def make_sync(device: str) -> Callable[[], None]:
    """A function that waits for all queued work on ``device`` (a no-op on the CPU, which runs eagerly)."""
    if device.startswith("cuda"):
        dev = torch.device(device)
        return lambda: torch.cuda.synchronize(dev)
    return lambda: None
