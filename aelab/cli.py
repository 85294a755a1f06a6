"""`aelab COMMAND ...`: argv → the command; `aelab train` is a Hydra app over aelab's config groups."""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from . import console
from .registry import ConfigError

USAGE = """usage: aelab COMMAND [ARGS]

commands:
  train    train an autoencoder (Hydra app: GROUP=OPTION overrides, -m sweeps, --help, --cfg job)

examples:
  aelab train loss=bce reg=kl model=sparse_kl
  aelab train -m reg=l1 reg.weight=1e-4,1e-3,1e-2,1e-1,1
  aelab train --help
"""


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def train(cfg: DictConfig) -> float:
    """One job; returns validation total loss (the value a sweeper would minimise)."""
    from .train import run  # torch is imported only once a job runs: --help stays fast

    try:
        record = run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except ConfigError as e:
        console.error(str(e))
        sys.exit(2)
    return record["val"]["total"]


COMMANDS = {"train": train}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    command = COMMANDS.get(args[0])
    if command is None:
        console.error(f"unknown command '{args[0]}'; choose from: {', '.join(COMMANDS)}")
        return 2
    sys.argv = [f"aelab {args[0]}", *args[1:]]
    command()
    return 0


if __name__ == "__main__":
    sys.exit(main())
