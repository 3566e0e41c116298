"""`dapt sweep --slurm`: the sweep's unfinished proxy runs as one Slurm job array.

Each run gets the script `dapt launch slurm` writes for it (`runs/<run>/job.sbatch`,
rendered by `launch.slurm`, which `sbatch` also takes alone), so a proxy run
checkpoints before the time limit and requeues like any dapt job. The array script only
dispatches: task i executes the i-th run's script in the batch shell itself (`exec`),
which therefore receives Slurm's B:USR1 as that script expects. Its `#SBATCH` lines are
those of the runs' scripts (the same options for every run) with the array's own name,
range and output. Results are collected by running `dapt sweep` again once the array
is done: the finished runs are kept.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from dapt.experiment import Experiment, load_experiment
from dapt.launch.slurm import render_script, slurm_options, submit_and_keep
from dapt.launch.sweep_design import sweep_dir

q = shlex.quote
PER_RUN = ("#SBATCH --job-name=", "#SBATCH --output=")


def run_script(config: Path) -> Path:
    """The proxy run's own sbatch script, beside its experiment file."""
    proxy, _ = load_experiment(config)
    script = config.parent / "job.sbatch"
    script.write_text(render_script(proxy, config, slurm_options(proxy, {})), encoding="utf-8")
    return script


def array_script(experiment: Experiment, scripts: list[Path]) -> str:
    """One task per run script; a pure function of its inputs, so tests read it."""
    shared = [line for line in scripts[0].read_text().splitlines()
              if line.startswith("#SBATCH ") and not line.startswith(PER_RUN)]
    output = str(sweep_dir(experiment) / "slurm").replace("%", "%%") + "/%A_%a.out"  # sbatch expands %A, %a
    listing = "\n".join(f"  {q(str(script))}" for script in scripts)
    return f"""#!/bin/bash
# Written by `dapt sweep --slurm` for the sweep in {q(str(sweep_dir(experiment)))}: task i runs proxy run i
# with that run's own script (each can also be submitted alone with sbatch).
#SBATCH --job-name={q(experiment.name + '-sweep')}
#SBATCH --array=0-{len(scripts) - 1}
#SBATCH --output={q(output)}
""" + "\n".join(shared) + f"""
scripts=(
{listing}
)
exec bash "${{scripts[$SLURM_ARRAY_TASK_ID]}}"
"""


def submit_array(experiment: Experiment, configs: list[Path]) -> str:
    """Write every run's script and the array script, submit it; returns the job id."""
    scripts = [run_script(config) for config in configs]
    folder = sweep_dir(experiment) / "slurm"
    job_id, kept = submit_and_keep(array_script(experiment, scripts), folder, "array")
    names = ", ".join(f"{i}: {config.parent.name}" for i, config in enumerate(configs))
    print(f"submitted job array {job_id} ({names}); script {kept}, output {folder}/{job_id}_<task>.out\n"
          f"when it has finished, run `dapt sweep` again to collect the results (finished runs are kept)", flush=True)
    return job_id

