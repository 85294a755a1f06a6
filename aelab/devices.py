"""Where training runs: `auto` picks CUDA when present; `cuda` never falls back silently."""
from __future__ import annotations

import torch

from .registry import ConfigError, Registry

DEVICES = Registry("device")


@DEVICES.register
def auto() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@DEVICES.register
def cpu() -> torch.device:
    return torch.device("cpu")


@DEVICES.register
def cuda(index: int = 0) -> torch.device:
    if not torch.cuda.is_available():
        raise ConfigError("no CUDA GPU is visible to torch; use device=cpu or device=auto")
    if not 0 <= int(index) < torch.cuda.device_count():
        raise ConfigError(f"must be in [0, {torch.cuda.device_count() - 1}], got {index}", "index")
    return torch.device("cuda", int(index))
