"""`dapt launch slurm`: an sbatch script that trains on every node, checkpoints before the
time limit and requeues itself; and its submission.

In: the experiment file and its `launch.slurm` section (flags override it). Out: the
script, written to `<workdir>/slurm/job-<id>.sbatch` for the record (printed only with
`--dry-run`), and the job id. The script runs one `srun` task per node, each a torchrun
with c10d rendezvous on the first node of the allocation, so a node count is the only
thing that changes between one node and many. Every value that comes from the user is
shell-quoted, and line breaks are refused by the config, so no value can run a command.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from pydantic import ValidationError

from dapt.base import DaptError
from dapt.config_file import config_error
from dapt.launch.config import SlurmConfig
from dapt.experiment import Experiment
from dapt.launch.local import FORWARDED_SIGNALS
from dapt.pretrain.checkpoint import LATEST, tag_for

q = shlex.quote


def slurm_options(experiment: Experiment, overrides: dict) -> SlurmConfig:
    """`launch.slurm` with the command line's flags (those given) on top, validated as one."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return SlurmConfig.model_validate(experiment.launch.slurm.model_dump() | given)
    except ValidationError as err:
        # The file's own launch.slurm passed when it was loaded, so a flag made this: named in the message.
        flags = " ".join(f"--{key.replace('_', '-')} {q(str(value))}" for key, value in given.items())
        raise DaptError(f"{config_error(err, SlurmConfig, within=('launch', 'slurm'))} (with {flags})") from None


def processes_per_node(experiment: Experiment, slurm: SlurmConfig) -> int:
    """One per GPU; on CPU nodes `launch.nproc_per_node`, or 2."""
    return slurm.gpus_per_node or experiment.launch.nproc_per_node or 2


def render_script(experiment: Experiment, config_path: Path, slurm: SlurmConfig) -> str:
    """The sbatch script: a pure function of the experiment and the options, so tests read it."""
    workdir = experiment.workpath
    nproc = processes_per_node(experiment, slurm)
    directives = [
        f"--job-name={q(slurm.job_name or experiment.name)}",
        f"--nodes={slurm.nodes}",
        "--ntasks-per-node=1",  # one torchrun per node; it starts the training processes
        *([f"--gpus-per-node={slurm.gpus_per_node}"] if slurm.gpus_per_node else []),
        *([f"--cpus-per-task={slurm.cpus_per_task}"] if slurm.cpus_per_task else []),
        *([f"--partition={q(slurm.partition)}"] if slurm.partition else []),
        *([f"--account={q(slurm.account)}"] if slurm.account else []),
        *([f"--time={q(slurm.time)}"] if slurm.time else []),
        # sbatch expands %j (the job id) in file names, so a % of the path itself is doubled.
        f"--output={q(str(workdir / 'slurm').replace('%', '%%') + '/%j.out')}",
        "--open-mode=append",  # a requeued attempt adds to the output instead of replacing it
        "--requeue",
        f"--signal=B:USR1@{slurm.signal_lead_seconds}",
        *(q(option) for option in slurm.sbatch_options),
    ]
    broken = next((d for d in directives if "\n" in d or "\r" in d), None)
    if broken is not None:  # a line break would end the #SBATCH comment and start a command
        raise DaptError(f"#SBATCH {broken!r}: a line break cannot go into an sbatch option; rename the experiment "
                        "(name:) or its workdir")
    header = "\n".join(f"#SBATCH {d}" for d in directives)
    srun_cpus = f" --cpus-per-task={slurm.cpus_per_task}" if slurm.cpus_per_task else ""
    cpus_note = "\n# srun repeats --cpus-per-task: Slurm 22.05 to 23.02 do not pass it on from sbatch." if srun_cpus else ""
    carry_over = "" if experiment.model.embeddings is None else (
        "# The base model is carried over to the experiment's tokenizer here, on this node and its GPU, before any\n"
        "# rank starts (kept while nothing it depends on changes): ranks waiting for it would time out.\n"
        '"$python" -m dapt model carry-over "$config" || { echo "dapt: carrying the base model over failed" >&2; exit 1; }\n'
        "# A USR1 that came meanwhile found no training to stop: requeue now, before the time limit.\n"
        'if [ "$stop_requested" = 1 ]; then scontrol requeue "$SLURM_JOB_ID" && exit 0; exit 1; fi\n\n')
    return f"""#!/bin/bash
# Written by `dapt launch slurm` for experiment {q(experiment.name)}: {slurm.nodes} node(s) x {nproc} training processes.
# Kept for the record; `sbatch` this file to run the same job again.
{header}
#
# Why B:USR1 (the batch shell, not the job step): this shell must know that the stop was
# asked for, to requeue the job instead of reporting a failure. It forwards the signal to
# srun, srun to the torchrun on every node, torchrun (told by --signals-to-handle) to every
# training process; all ranks agree to stop after the same step, save a checkpoint and exit.
# A requeued job resumes from that checkpoint with the same W&B run id.

set -uo pipefail
config={q(str(config_path.resolve()))}
python={q(sys.executable)}
latest={q(str(experiment.checkpoints_dir / LATEST))}
final_checkpoint={q(tag_for(experiment.train.steps))}
logs={q(str(workdir / 'logs'))}/slurm-$SLURM_JOB_ID/attempt-${{SLURM_RESTART_COUNT:-0}}
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
rdzv_port=$((20000 + SLURM_JOB_ID % 10000))  # jobs sharing a node must not share a port
echo "dapt: $(date -u +%FT%TZ) job $SLURM_JOB_ID attempt $((${{SLURM_RESTART_COUNT:-0}} + 1)) on $SLURM_JOB_NUM_NODES node(s);" \\
  "rendezvous at $head_node:$rdzv_port; per-rank logs under $logs"

stop_requested=0
srun_pid=
ask_training_to_stop() {{
  stop_requested=1
  echo "dapt: SIGUSR1 (time limit near or preemption): training saves a checkpoint and stops"
  [ -n "$srun_pid" ] && kill -USR1 "$srun_pid"
}}
trap ask_training_to_stop USR1

{carry_over}# Each node's log folder is named after the node, so the name is expanded on the node.
# torchrun waits --shutdown-timeout seconds for the ranks to save before it kills them.{cpus_note}
srun --ntasks-per-node=1{srun_cpus} --kill-on-bad-exit=1 \\
  bash -c 'exec "$0" -m torch.distributed.run --log-dir="$1/$SLURMD_NODENAME" "${{@:2}}"' "$python" "$logs" \\
  --nnodes="$SLURM_JOB_NUM_NODES" --nproc-per-node={nproc} \\
  --rdzv-backend=c10d --rdzv-endpoint="$head_node:$rdzv_port" --rdzv-id="$SLURM_JOB_ID" \\
  --redirects=3 --tee=3 --signals-to-handle={FORWARDED_SIGNALS} --shutdown-timeout={slurm.signal_lead_seconds} \\
  -m dapt train "$config" &
srun_pid=$!
wait "$srun_pid"
status=$?
while kill -0 "$srun_pid" 2>/dev/null; do  # the trap interrupts `wait`: wait for the end itself
  wait "$srun_pid"
  status=$?
done

# The outcome is read from the checkpoints, not from srun's status: torchrun exits 1 after
# forwarding a signal even when every rank saved its checkpoint and exited 0.
if [ "$(cat "$latest" 2>/dev/null)" = "$final_checkpoint" ]; then
  echo "dapt: $(date -u +%FT%TZ) training finished: checkpoint $final_checkpoint"
  exit 0
fi
if [ "$stop_requested" = 1 ]; then
  echo "dapt: $(date -u +%FT%TZ) stopped with checkpoint $(cat "$latest" 2>/dev/null || echo '(none yet)'); requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID" && exit 0
  echo "dapt: scontrol requeue failed; resubmit this script to resume" >&2
  exit 1
fi
# srun's status may be 0 here: a node lost with its ranks ends the job step without an error of its own.
echo "dapt: $(date -u +%FT%TZ) training ended before its last step (srun exit status $status); the last checkpoint," \
  "$(cat "$latest" 2>/dev/null || echo '(none yet)'), is where a resubmitted job resumes; see $logs" >&2
exit $((status == 0 ? 1 : status))
"""


def submit(script: Path) -> str:
    """Submit with sbatch; returns the job id."""
    try:
        result = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    except FileNotFoundError:
        raise DaptError("sbatch not found: run this on a Slurm login node, or add --dry-run to see the script") from None
    if result.returncode != 0:
        reason = " ".join(result.stderr.split()) or f"exit status {result.returncode}"
        raise DaptError(f"sbatch refused the job: {reason} (`dapt launch slurm CONFIG --dry-run` prints the script)")
    return result.stdout.strip().split(";")[0]  # "<id>" or "<id>;<cluster>"


def submit_and_keep(script: str, folder: Path, kind: str) -> tuple[str, Path]:
    """Submit `script` and keep it as `<folder>/<kind>-<job id>.sbatch`; returns the id and the kept file.
    The id is known only once sbatch has accepted the file, so it is written under a pending name first."""
    folder.mkdir(parents=True, exist_ok=True)
    pending = folder / "submitting.sbatch"
    pending.write_text(script, encoding="utf-8")
    try:
        job_id = submit(pending)
    except DaptError:
        pending.unlink()  # nothing was submitted: keep no record of it
        raise
    return job_id, pending.rename(folder / f"{kind}-{job_id}.sbatch")


def launch_slurm(experiment: Experiment, config_path: Path, slurm: SlurmConfig, dry_run: bool) -> str | None:
    """Print (`dry_run`) or write, submit and keep the script; returns the job id when submitted."""
    script = render_script(experiment, config_path, slurm)
    if dry_run:
        print(script, end="")
        return None
    folder = experiment.workpath / "slurm"
    job_id, kept = submit_and_keep(script, folder, "job")
    print(f"submitted job {job_id}; script {kept}, output {folder / (job_id + '.out')}", flush=True)
    return job_id
