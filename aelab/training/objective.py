"""The training objective on a batch and averaged over a split: the terms every part of aelab logs."""
from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import Tensor

from ..build import Parts
from ..models import eval_mode

TERMS = ("total", "recon", "reg")


def loss_terms(parts: Parts, clean: Tensor, generator: Optional[torch.Generator] = None) -> dict[str, Tensor]:
    """{total, recon, reg}: the encoder sees the corrupted batch, the loss compares to the clean one."""
    inputs = parts.corruption(clean, generator)
    if parts.input_grad:
        inputs = inputs.detach().requires_grad_(True)
    fwd = parts.model(inputs, trace=parts.trace)
    recon = parts.loss(fwd, clean)
    reg = parts.penalty(fwd, parts.model)
    total = recon if parts.penalty.zero else recon + parts.penalty.weight * reg  # two kernels fewer
    return {"total": total, "recon": recon, "reg": reg}


def stacked(terms: dict[str, Tensor]) -> Tensor:
    """The detached terms as one (total, recon, reg) vector, for sums kept on the device."""
    return torch.stack([terms[name].detach() for name in TERMS])


def batches(x: Tensor, batch_size: int, device: torch.device, order: Optional[Tensor] = None,
            start: int = 0) -> Iterator[Tensor]:
    """Batches gathered where the data lives (on the device when it fits), from batch `start` on."""
    for begin in range(start * batch_size, len(x), batch_size):
        chunk = x[begin:begin + batch_size] if order is None else x[order[begin:begin + batch_size]]
        yield chunk.to(device, non_blocking=True)


def evaluate(parts: Parts, x: Tensor) -> dict[str, float]:
    """Mean {total, recon, reg} of the training objective, corruption drawn from a fixed seed."""
    generator = torch.Generator(parts.device).manual_seed(parts.trainer.seed)
    sums = torch.zeros(len(TERMS), device=parts.device)
    with eval_mode(parts.model), torch.set_grad_enabled(parts.input_grad):
        for clean in batches(x, parts.trainer.batch_size, parts.device):
            terms = loss_terms(parts, clean, generator)
            sums += stacked(terms) * len(clean)
    return dict(zip(TERMS, (sums / len(x)).tolist()))
