"""`launcher=stacked`: the jobs of a sweep (of each batch an Optuna sweeper hands over) that differ only
in numbers, trained as one stacked model in this process (aelab.cli.stacking, aelab.training.stacked).
Hydra sets up each job as its basic launcher does (its dir, .hydra files, callbacks); aelab builds it
there and trains the group together once all its jobs are set up. A job's on_job_end callback thus runs
when the job is set up, before it trains; on_multirun_end runs after every job has its results."""

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from omegaconf import open_dict

log = logging.getLogger(__name__)


@dataclass
class StackedLauncherConf:
    _target_: str = "hydra_plugins.aelab_launchers.stacked.StackedLauncher"
    stack_size: int = 32  # at most this many jobs in one stacked model


ConfigStore.instance().store(group="hydra/launcher", name="stacked", node=StackedLauncherConf, provider="aelab")


class StackedLauncher(BasicLauncher):
    def __init__(self, stack_size: int = 32) -> None:
        super().__init__()
        self.stack_size = stack_size

    def setup(self, **kwargs) -> None:
        """Hydra sets the launcher up before the sweep writes anything: a bad stack_size stops it here."""
        if isinstance(self.stack_size, bool) or not isinstance(self.stack_size, int) or self.stack_size < 1:
            from aelab import console
            console.error(f"hydra.launcher.stack_size: must be a whole number >= 1, got {self.stack_size!r}")
            sys.exit(2)
        super().setup(**kwargs)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from aelab.cli import stacking

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        configs = []
        for idx, overrides in enumerate(job_overrides, initial_job_idx):
            config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(config):
                config.hydra.job.id = idx
                config.hydra.job.num = idx
            configs.append(config)
        groups = stacking.groups(configs, self.stack_size)
        log.info(f"Launching {len(job_overrides)} jobs locally, stacked in {len(groups)} group(s)")
        returns: list[JobReturn] = [None] * len(configs)
        for group in groups:
            for index in group:
                log.info(f"\t#{configs[index].hydra.job.num} : {' '.join(filter_overrides(job_overrides[index]))}")
            with stacking.collect(sweep_dir) as collector:
                for index in group:
                    returns[index] = run_job(hydra_context=self.hydra_context, task_function=self.task_function,
                                             config=configs[index], job_dir_key="hydra.sweep.dir",
                                             job_subdir_key="hydra.sweep.subdir")
                    configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
                values = collector.train()
            for index in group:
                num = configs[index].hydra.job.num
                if num in values:
                    returns[index].return_value = values[num]
        return returns
