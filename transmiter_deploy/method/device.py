"""Which torch device adapter training runs on: ``auto`` (a CUDA GPU when torch sees one, else
the CPU), ``cpu``, ``cuda`` or ``cuda:N``.

Training draws its shuffling and noise from a CPU generator whatever the device, so a GPU run
sees the same batches and noise as a CPU run and differs only by float rounding; the trained
adapter always comes back to the CPU before it is saved.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ..errors import DependencyError, InputError

if TYPE_CHECKING:
    import torch

DEVICE_HELP = "auto (a CUDA GPU if torch sees one, else the CPU), cpu, cuda or cuda:N"


def resolve_device(name: str) -> "torch.device":
    """The device ``name`` stands for on this machine; asking for a GPU it lacks is an error."""
    import torch  # here, not at the top: the CLI imports this module for its help text only

    choice = str(name).strip().lower()
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", choice)
    if match is None:
        raise InputError(f"unknown device '{name}': use {DEVICE_HELP}")
    if not torch.cuda.is_available():
        raise DependencyError(f"device '{name}' asked for, but torch sees no CUDA GPU on this machine "
                              "(use auto or cpu)")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise DependencyError(f"device '{name}' asked for, but torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    return torch.device("cuda", index)
