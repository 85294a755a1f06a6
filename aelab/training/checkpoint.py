"""Checkpoints that resume bit for bit: model, optimizer, RNG streams and the place in the epoch."""
from __future__ import annotations

import pickle
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from ..build import Parts
from ..registry import ConfigError
from ..runs import write_whole

FILE = "checkpoint.pt"


@dataclass
class Position:
    """Where training stands. `order` is the current epoch's shuffle (None between epochs)."""
    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps taken
    batch: int = 0  # batches of `order` already trained on
    order: Optional[Tensor] = None
    window: Optional[Tensor] = None  # summed (total, recon, reg) since the last train/* log
    epoch_sums: Optional[Tensor] = None  # sample-weighted (total, recon, reg) over this epoch
    seen: int = 0  # samples trained on in this epoch


def save(parts: Parts, cfg: DictConfig, pos: Position, run_dir: Path) -> Path:
    """Written to a temporary file, then renamed: a crash never leaves half a checkpoint in place."""
    state = {"model": parts.model.state_dict(), "optimizer": parts.optimizer.state_dict(),
             "position": asdict(pos), "config": OmegaConf.to_container(cfg, resolve=True),
             "rng": {"cpu": torch.get_rng_state(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}
    path = run_dir / FILE
    write_whole(path, lambda tmp: torch.save(state, tmp))
    return path


def load(parts: Parts, run_dir: Path, key: str = "resume", fix: str = "resume another run or start afresh",
         model_only: bool = False) -> Position | None:
    """Restore a run's state into freshly built parts (only the model's weights for `model_only`: what
    evaluating needs, from a checkpoint of any aelab version); a bad file is a ConfigError (under `key`,
    with `fix`), not a traceback."""
    path = run_dir / FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no {FILE} to resume from; start a new run without resume", "resume")
    try:
        state = torch.load(path, map_location=parts.device, weights_only=True)
        parts.model.load_state_dict(state["model"])
        if model_only:
            return None
        parts.optimizer.load_state_dict(state["optimizer"])
        position = Position(**state["position"])
    except (RuntimeError, EOFError, OSError, KeyError, TypeError, ValueError, pickle.UnpicklingError,
            zipfile.BadZipFile) as e:
        reason = str(e).split(". ")[0].splitlines()[0] if str(e) else type(e).__name__
        if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; torch's own words would be about pickle
            reason = "not a whole file written by torch.save"
        raise ConfigError(f"{path} is unreadable or truncated ({reason}); {fix}", key) from None
    torch.set_rng_state(state["rng"]["cpu"].cpu())
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
    return position
