"""Where training runs: `auto` picks CUDA when present; `cuda` never falls back silently."""
from __future__ import annotations

import os
from typing import Optional

import torch

from .registry import ConfigError, Registry, number

DEVICES = Registry("device")


def gpu_for_job(job_num: Optional[int], device_count: int, visible: Optional[str]) -> Optional[int]:
    """GPU index for job `job_num` of a local sweep: k mod n, unless a scheduler already chose the
    GPUs (CUDA_VISIBLE_DEVICES set) or there is nothing to spread over. None: keep the default."""
    if job_num is None or visible is not None or device_count < 2:
        return None
    return job_num % device_count


def _sweep_gpu(job_num: Optional[int]) -> int:
    index = gpu_for_job(job_num, torch.cuda.device_count(), os.environ.get("CUDA_VISIBLE_DEVICES"))
    return 0 if index is None else index


@DEVICES.register
def auto(job_num: Optional[int] = None) -> torch.device:
    return torch.device("cuda", _sweep_gpu(job_num)) if torch.cuda.is_available() else torch.device("cpu")


@DEVICES.register
def cpu() -> torch.device:
    return torch.device("cpu")


@DEVICES.register
def cuda(index: Optional[int] = None, job_num: Optional[int] = None) -> torch.device:
    """`index` null: GPU 0, or spread over the GPUs by job number in a sweep."""
    if not torch.cuda.is_available():
        raise ConfigError("no CUDA GPU is visible to torch; use device=cpu or device=auto")
    if index is None:
        return torch.device("cuda", _sweep_gpu(job_num))
    index = number(index, "index", low=0, high=torch.cuda.device_count() - 1, integer=True)
    return torch.device("cuda", index)
