"""The stages of a store build on one of datatrove's executors.

- local: `LocalPipelineExecutor`, one process per task, `workers` at a time (one per core by
  default); the stages run one after another in this process.
- slurm: `SlurmPipelineExecutor`, one job array per stage chained by `afterok` dependencies,
  submitted from here (which must not itself be a Slurm job: datatrove's executor takes a set
  `SLURM_ARRAY_TASK_ID` to mean it is a task); this process waits for the last stage.
- ray: `RayPipelineExecutor` on the cluster `ray.init` finds (`data.ray_address`).

Every executor skips the tasks of a stage it finds marked finished in the stage's logging
folder, which is what makes a rerun resume. A task that failed is named with its log.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

from dapt.base import DaptError
from dapt.data_mix.build_steps import BuildLayout
from dapt.data_mix.config import DataConfig

SLURM_POLL_SECONDS = 5


def run_stages(stages: list[tuple[str, int, list]], layout: BuildLayout, data: DataConfig,
               slurm_partition: str | None) -> None:
    """Run `stages` ((name, tasks, pipeline) each) in order on the executor `data` names."""
    if data.executor == "local":
        for name, tasks, pipeline in stages:
            _run_local(name, tasks, pipeline, layout, data)
    elif data.executor == "slurm":
        _run_slurm(stages, layout, data, slurm_partition)
    else:
        _run_ray(stages, layout, data)


def _run_local(name: str, tasks: int, pipeline: list, layout: BuildLayout, data: DataConfig) -> None:
    from datatrove.executor import LocalPipelineExecutor

    workers = min(tasks, data.workers or len(os.sched_getaffinity(0)))
    executor = LocalPipelineExecutor(pipeline, tasks=tasks, workers=workers, logging_dir=str(layout.logs(name)),
                                     start_method="spawn")
    finished = tasks - len(executor.get_incomplete_ranks())
    print(f"  {name}: {tasks} task(s)" + (f", {finished} finished before" if finished else "") +
          f", {workers} at a time", flush=True)
    started = time.perf_counter()
    try:
        with quiet_stderr(layout.logs(name) / "stderr.log"), _progress(name, tasks, finished, layout):
            executor.run()
    except Exception as err:
        if isinstance(err, DaptError):
            raise
        raise _task_failure(name, tasks, layout, err) from None
    print(f"  {name}: done in {time.perf_counter() - started:.1f} s", flush=True)


@contextlib.contextmanager
def _progress(stage: str, tasks: int, finished: int, layout: BuildLayout):
    """Tasks finished so far, on a terminal (stdout: stderr is datatrove's log while the stage runs)."""
    import threading

    from tqdm import tqdm

    bar = tqdm(total=tasks, initial=finished, desc=f"  {stage}", unit="task", file=sys.stdout, leave=False,
               disable=None if tasks > 1 else True)
    stop = threading.Event()
    completions = layout.logs(stage) / "completions"

    def poll() -> None:
        while not stop.wait(1.0):
            bar.n = len(list(completions.glob("*"))) if completions.exists() else finished
            bar.refresh()

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
        bar.close()


def _task_failure(stage: str, tasks: int, layout: BuildLayout, err: BaseException | None = None) -> Exception:
    """The first unfinished task of a stage, with its log's last line and path."""
    logs = layout.logs(stage)
    for rank in range(tasks):
        if not (logs / "completions" / f"{rank:05d}").exists():
            log = logs / "logs" / f"task_{rank:05d}.log"
            last = _dapt_error_in(log)
            if last:
                return DaptError(last)
            return DaptError(f"store build: task {rank} of stage '{stage}' failed"
                             f"{f' ({type(err).__name__}: {err})' if err else ''}; its log: {log}; "
                             f"rerun the same command to resume (finished tasks are kept)")
    return DaptError(f"store build: stage '{stage}' failed ({err}); its logs: {logs}")


def _dapt_error_in(log: Path) -> str | None:
    """A DaptError's message in a task's log: the user's to fix, said as it would be without tasks."""
    if not log.exists():
        return None
    marker = "dapt.base.DaptError: "
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if marker in line:
            return line.split(marker, 1)[1]
    return None


def _run_slurm(stages: list[tuple[str, int, list]], layout: BuildLayout, data: DataConfig,
               slurm_partition: str | None) -> None:
    from datatrove.executor import SlurmPipelineExecutor

    if "SLURM_ARRAY_TASK_ID" in os.environ or "SLURM_JOB_ID" in os.environ:
        raise DaptError("`data.executor: slurm` submits job arrays and must run outside a Slurm job (on a login "
                        "node); inside a job, use `data.executor: local`")
    partition = data.slurm.partition or slurm_partition
    if not partition:
        raise DaptError("`data.executor: slurm` needs a partition: set `data.slurm.partition` or `launch.slurm.partition`")
    previous = None
    executors = []
    for name, tasks, pipeline in stages:
        previous = SlurmPipelineExecutor(
            pipeline, tasks=tasks, time=data.slurm.time, partition=partition, cpus_per_task=data.slurm.cpus_per_task,
            mem_per_cpu_gb=data.slurm.mem_per_cpu_gb, workers=data.workers or -1, job_name=f"dapt-build-{name}",
            logging_dir=str(layout.logs(name)), depends=previous, qos="", mail_type="NONE",
            sbatch_args=dict(data.slurm.sbatch_args), env_command=_environment_command(), requeue=False)
        executors.append((name, tasks, previous))
        finished = tasks - len(previous.get_incomplete_ranks())
        print(f"  {name}: {tasks} task(s)" + (f", {finished} finished before" if finished else ""), flush=True)
    print(f"  submitting {len(stages)} Slurm job array(s) to partition {partition}", flush=True)
    with quiet_stderr(layout.logs("submit.log")):
        previous.run()  # submits the chain, dependencies first
    for number, (name, tasks, executor) in enumerate(executors):
        try:
            _wait_for(name, tasks, layout, executor)
        except DaptError:
            # The later stages wait on this one (`afterok`) and would stay queued forever.
            later = [str(e.job_id) for _, _, e in executors[number + 1:] if getattr(e, "job_id", None) not in (None, -1)]
            if later:
                subprocess.run(["scancel", *later], check=False)
            raise


def _environment_command() -> str:
    """What a Slurm task runs first: this interpreter's environment, so that it finds dapt and datatrove."""
    return f"export PATH={Path(sys.executable).parent}:$PATH"


def _wait_for(name: str, tasks: int, layout: BuildLayout, executor) -> None:
    """Until every task of the stage is marked finished; a job that ended without it is a failure."""
    completions = layout.logs(name) / "completions"
    while True:
        done = len(list(completions.glob("*"))) if completions.exists() else 0
        if done >= tasks:
            print(f"  {name}: {tasks} task(s) finished", flush=True)
            return
        job = getattr(executor, "job_id", None)
        queued = subprocess.run(["squeue", "-h", "-j", str(job)], capture_output=True, text=True).stdout.strip() if job else "?"
        if not queued:
            raise _task_failure(name, tasks, layout)
        time.sleep(SLURM_POLL_SECONDS)


def _run_ray(stages: list[tuple[str, int, list]], layout: BuildLayout, data: DataConfig) -> None:
    try:
        import ray
        from datatrove.executor.ray import RayPipelineExecutor
    except ImportError:
        raise DaptError("`data.executor: ray` needs Ray: pip install 'ray[default]'") from None
    if not ray.is_initialized():
        ray.init(address=data.ray_address, log_to_driver=False)
    for name, tasks, pipeline in stages:
        executor = RayPipelineExecutor(pipeline, tasks=tasks, workers=data.workers or -1,
                                       logging_dir=str(layout.logs(name)))
        finished = tasks - len(executor.get_incomplete_ranks())
        print(f"  {name}: {tasks} task(s) on Ray" + (f", {finished} finished before" if finished else ""), flush=True)
        try:
            with quiet_stderr(layout.logs(name) / "stderr.log"):
                executor.run()
        except Exception as err:
            raise _task_failure(name, tasks, layout, err) from None
        if len(list((layout.logs(name) / "completions").glob("*"))) < tasks:
            raise _task_failure(name, tasks, layout)


@contextlib.contextmanager
def quiet_stderr(path: Path):
    """datatrove's task logs go to `path` (and its own log files), not over dapt's output."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
