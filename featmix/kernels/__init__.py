"""Per-device implementations of the paste whose contract is ``featmix.functional``.

- ``regions``: the box region of a tensor, and the write-once paste (every element written once);
- ``cpu``: strategies for CPU (a full copy then the box; a gather in place), a few ops whatever the batch;
- ``gpu``: one pass over memory on any accelerator (write-once bands, one gather in place);
- ``graph``: the paste with the box in tensors, for compiled graphs (one gather each way).
The measurements behind each choice are in the documentation's benchmarks page (docs/benchmarks.md).
"""
from types import ModuleType

import torch

from . import cpu, gpu, graph, regions


def for_device(device: torch.device) -> ModuleType:
    """The implementation module for tensors on ``device``."""
    return cpu if device.type == "cpu" else gpu


__all__ = ["cpu", "gpu", "graph", "regions", "for_device"]
