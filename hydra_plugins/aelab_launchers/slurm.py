"""`launcher=slurm`'s launcher: hydra-submitit-launcher's, with a submission sbatch refuses reported
in one line (the key to change, sbatch's own message, the refused script) instead of submitit's
traceback. configs/launcher/slurm.yaml names it; without hydra-submitit-launcher (pip install
'aelab[sweep]') this module defines nothing, and `launcher=slurm` says what to install."""
from __future__ import annotations

import sys
from contextlib import redirect_stderr
from pathlib import Path
from typing import Sequence

from hydra.core.utils import JobReturn

from aelab import console

try:
    from hydra_plugins.hydra_submitit_launcher import submitit_launcher
except ImportError:
    submitit_launcher = None

# words of sbatch's refusals → the launcher key that sets what it refused
REFUSED = (("gres", "gpus_per_node"), ("generic resource", "gpus_per_node"), ("partition", "partition"),
           ("account", "account"), ("association", "account"), ("qos", "qos"), ("time limit", "timeout_min"),
           ("memory", "mem_gb"), ("cpu", "cpus_per_task"), ("node", "nodes"))


def refused_key(message: str) -> str:
    """The hydra.launcher key an sbatch error message points at (hydra.launcher itself if none)."""
    lower = message.lower()
    return next((f"hydra.launcher.{key}" for words, key in REFUSED if words in lower), "hydra.launcher")


class WithoutRefusals:
    """sys.stderr while the sweep is launched, less a refused sbatch's own message, which submitit prints
    (only when sbatch fails) just before it raises the error this launcher reports in one line."""

    def __init__(self, stream):
        self.stream, self.dropping = stream, False

    def write(self, text: str) -> int:
        if text.startswith("sbatch:"):
            self.dropping = True
        elif not (self.dropping and text == "\n"):
            self.dropping = False
            return self.stream.write(text)
        return len(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


if submitit_launcher is not None:
    class SlurmLauncher(submitit_launcher.SlurmLauncher):
        def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
            from submitit.core.utils import FailedJobError

            try:
                with redirect_stderr(WithoutRefusals(sys.stderr)):
                    return super().launch(job_overrides, initial_job_idx)
            except FailedJobError as e:
                message = console.first_line(e)
                key = refused_key(message)
                folder = Path(str(self.params["submitit_folder"]).split("%j")[0])
                scripts = sorted(folder.glob(".submission_file_*.sh"), key=lambda p: p.stat().st_mtime)
                script = scripts[-1] if scripts else folder
                console.error(f"{key}: sbatch refused the sweep's jobs ({message}); no job was submitted: change "
                              f"{key} and run the sweep again (the refused script: {script})")
                sys.exit(2)
            except RuntimeError as e:
                if "srun" not in str(e):
                    raise
                console.error("launcher=slurm: no SLURM here (no srun on PATH); run the sweep where SLURM's commands "
                              "are, or on this machine with launcher=local or launcher=parallel")
                sys.exit(2)
