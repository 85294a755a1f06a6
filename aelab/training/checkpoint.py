"""Checkpoints that resume bit for bit: model, optimizer, RNG streams and the place in the epoch."""
from __future__ import annotations

import io
import math
import pickle
import time
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from .. import console
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
    best_val: float = math.inf  # the lowest validation objective after an epoch so far
    best_epoch: int = 0  # the epoch that reached it
    best_model: Optional[dict] = None  # that epoch's weights: what the run's end measures and eval reads
    reference: float = math.inf  # the objective the next epoch must beat by trainer.min_delta to improve
    improved_epoch: int = 0  # the last epoch that did
    stopped_epoch: Optional[int] = None  # the epoch after which trainer.patience stopped the run
    schedule: Optional[dict] = None  # a per-epoch schedule's state (plateau's); per-step ones replay


class Cadence:
    """When an epoch's end writes the checkpoint: after the first epoch and the last (trainer.epochs, or
    an early stop), and otherwise once trainer.checkpoint_every seconds have passed since the last one.
    A digits epoch trains in about 20 ms and its checkpoint (1.7 MB) took 3 to 7 ms to write."""

    def __init__(self, every: float):
        self.every, self.last = every, -math.inf

    def due(self, pos: Position, epochs: int) -> bool:
        now = time.monotonic()
        if self.last == -math.inf or pos.epoch >= epochs or pos.stopped_epoch is not None or now - self.last >= self.every:
            self.last = now
            return True
        return False


def save(parts: Parts, cfg: DictConfig, pos: Position, run_dir: Path) -> Path:
    """Written to a temporary file, then renamed: a crash never leaves half a checkpoint in place."""
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    model = {name: own(value) for name, value in parts.model.state_dict().items()}
    position = {f.name: getattr(pos, f.name) for f in fields(pos)}  # asdict would deep-copy every tensor first
    optimizer = parts.optimizer.state_dict()
    optimizer["state"] = {key: {name: own(value) if isinstance(value, Tensor) else value for name, value in s.items()}
                          for key, s in optimizer["state"].items()}  # a stacked job's step counts: views
    state = {"model": model, "optimizer": optimizer,
             "position": position, "config": OmegaConf.to_container(cfg, resolve=True), "rng": rng}
    path, buffer = run_dir / FILE, io.BytesIO()
    torch.save(state, buffer)  # in memory: torch's own file writer reports a full disk as an "enforce fail"
    write_whole(path, lambda tmp: tmp.write_bytes(buffer.getbuffer()))
    return path


def own(tensor: Tensor) -> Tensor:
    """The tensor in storage of its own: a stacked job's weights (and its optimizer's step counts) are
    views of the stack's, which torch.save would write whole."""
    return tensor.clone() if tensor.untyped_storage().nbytes() > tensor.nbytes else tensor


def load(parts: Parts, run_dir: Path, key: str = "resume", fix: str = "resume another run or start afresh",
         model_only: bool = False) -> Position | None:
    """Restore a run's state into freshly built parts (for `model_only`, only the best epoch's weights:
    what evaluating needs, from a checkpoint of any aelab version); a bad file is a ConfigError (under
    `key`, with `fix`), not a traceback."""
    path = run_dir / FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no {FILE} to resume from; start a new run without resume", "resume")
    try:
        state = torch.load(path, map_location=parts.device, weights_only=True)
        best = (state.get("position") or {}).get("best_model") if model_only else None
        weights = best or state["model"]  # evaluating reads the best epoch's weights, resuming the last
    except (RuntimeError, EOFError, OSError, KeyError, TypeError, ValueError, pickle.UnpicklingError,
            zipfile.BadZipFile) as e:
        raise unreadable(path, e, key, fix) from None
    try:
        parts.model.load_state_dict(weights)
    except RuntimeError as e:  # whole, but another architecture's: missing keys or another shape
        details = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        reason = details[0].split(": copying")[0] if details else console.first_line(e)
        raise ConfigError(f"{path} holds the weights of another model ({reason}), not the one its run's config "
                          f"describes; {fix}", key) from None
    if model_only:
        return None
    try:
        parts.optimizer.load_state_dict(state["optimizer"])
        position = Position(**state["position"])
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        raise unreadable(path, e, key, fix) from None
    torch.set_rng_state(state["rng"]["cpu"].cpu())
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
    return position


def unreadable(path: Path, error: Exception, key: str, fix: str) -> ConfigError:
    """A checkpoint torch cannot read back whole: cut short, or not torch.save's at all."""
    reason = str(error).split(". ")[0].splitlines()[0] if str(error) else type(error).__name__
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; torch's own words would be about pickle
        reason = "not a whole file written by torch.save"
    return ConfigError(f"{path} is unreadable or truncated ({reason}); {fix}", key)
