"""Device selection: `auto` picks CUDA when present."""
from __future__ import annotations

import torch

from .errors import UserError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    """Turn `auto` / `cpu` / `cuda[:n]` into a torch.device, checking availability."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r} asked for but CUDA is not available here; use 'auto' or 'cpu'")
        return torch.device(name)
    raise UserError(f"unknown device {name!r}; valid choices: {', '.join(DEVICE_CHOICES)} (or cuda:N)")


def describe_device(device: torch.device) -> str:
    """A human label such as 'cpu (2 threads)' or 'cuda:0 (NVIDIA H200)'."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return f"cpu ({torch.get_num_threads()} threads)"
