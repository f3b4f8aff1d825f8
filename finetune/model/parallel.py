"""What the model needs to know of torch.distributed and DeepSpeed ZeRO-3 to keep the ranks in step.

Under ZeRO-3 every call of a partitioned module gathers its parameters with a collective, so all ranks must make
the same calls in the same order, whatever their own batch holds: the dummy image of a text-only step and the
number of loss chunks follow from these two questions.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def is_distributed() -> bool:
    """Whether this process is one of several ranks of an initialised process group."""
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def is_zero3_partitioned(parameters: Iterable[nn.Parameter]) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions these parameters (it gathers them in each call)."""
    return any(hasattr(parameter, "ds_id") for parameter in parameters)
