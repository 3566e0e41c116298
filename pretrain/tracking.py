"""Where metrics go: Weights & Biases (from rank 0) and `metrics.jsonl` in the workdir.

W&B is the view; the JSONL file is the record that reports and tests read, since a
killed process can lose what W&B still buffers. Offline is the default, so nothing
needs a network; the run lives under `<workdir>/wandb/`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dapt.pretrain.config import WandbConfig

# Metric name prefixes, which W&B groups into panel sections, and the summary each keeps (None: the last value).
METRIC_GROUPS = {"train/*": None, "eval/bpb/*": "min,last", "mix/*": None, "perf/*": "mean,last"}


def _metrics_file(path: Path, resume_step: int | None):
    """The run's metrics.jsonl: on a resume cut back to the checkpoint's step, less any line a killed
    process left torn (counted, and said); otherwise started afresh."""
    if resume_step is not None and path.exists():
        kept, torn = [], 0
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                torn += bool(line.strip())
                continue
            if record["step"] <= resume_step:
                kept.append(line)
        if torn:
            print(f"{path}: {torn} line(s) cut short by an interrupted run left out", flush=True)
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        return open(path, "a", encoding="utf-8")
    return open(path, "w", encoding="utf-8")


_USER_WANDB_DATA_DIR = os.environ.get("WANDB_DATA_DIR")
DEFAULT_WANDB_URL = "https://api.wandb.ai"


def online_problem(timeout: float = 5.0) -> str | None:
    """Why `wandb.mode: online` would fail once the ranks run (no credentials, server out of reach), or None.
    Credentials as wandb finds them: WANDB_API_KEY, an identity token file, or `wandb login`'s netrc entry."""
    import netrc
    import urllib.error
    import urllib.request
    from urllib.parse import urlparse

    url = os.environ.get("WANDB_BASE_URL", DEFAULT_WANDB_URL).rstrip("/")
    host = urlparse(url).hostname or url
    if not (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE")):
        try:
            entry = netrc.netrc(os.environ.get("NETRC")).authenticators(host)
        except (FileNotFoundError, netrc.NetrcParseError):
            entry = None
        if not entry:
            return (f"wandb.mode: online, but no W&B credentials for {host}: run `wandb login` (or set WANDB_API_KEY), "
                    f"or set `wandb.mode: offline` and upload later with `wandb sync`")
    try:
        urllib.request.urlopen(url, timeout=timeout).close()
    except urllib.error.HTTPError:
        pass  # the server answered
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        return (f"wandb.mode: online, but {url} did not answer within {timeout:.0f} s ({reason}); check the network "
                f"(or WANDB_BASE_URL), or set `wandb.mode: offline` and upload later with `wandb sync`")
    return None


def _init_wandb(workdir: Path, settings: WandbConfig, **init):
    # Environment, not init(mode=...): only then does offline W&B make no network call at all.
    os.environ["WANDB_MODE"] = settings.mode
    # Each run's staging folder in its own workdir unless the user chose one: a process that
    # trains several runs (a sweep) must not stage later runs under the first one's folder.
    os.environ["WANDB_DATA_DIR"] = _USER_WANDB_DATA_DIR or str(workdir / "wandb-data")
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    return wandb.init(project=settings.project, entity=settings.entity, group=settings.group, tags=settings.tags,
                      resume="allow", dir=str(workdir), settings=wandb.Settings(console="off"), **init)


def add_to_run(workdir: Path, config: WandbConfig, run_id: str, summary: dict[str, float],
               table: tuple[str, list[str], list[list]]) -> None:
    """Results computed after training (downstream tasks) added to the run's summary and as a
    table; offline, a new folder with the same run id, which `wandb sync` merges into the run."""
    if config.mode == "disabled":
        return
    run = _init_wandb(workdir, config, id=run_id)
    import wandb

    name, columns, rows = table
    run.log({name: wandb.Table(columns=columns, data=rows)})
    run.summary.update(summary)
    run.finish()


class Tracker:
    def __init__(self, workdir: Path, config: WandbConfig, run_name: str, run_config: dict, is_main: bool,
                 run_id: str | None = None, resume_step: int | None = None):
        """`run_id` and `resume_step` continue a run: the same W&B run, and metrics.jsonl cut
        back to the checkpoint's step so that the steps after it are not recorded twice."""
        self.is_main = is_main
        self.run = None
        self.run_id = run_id
        if not is_main:
            return
        self.metrics_file = _metrics_file(workdir / "metrics.jsonl", resume_step)
        if config.mode == "disabled":
            return
        self.run = _init_wandb(workdir, config, name=run_name, id=run_id, config=run_config)
        self.run_id = self.run.id
        # Every group is plotted against the optimizer step, which each record also carries
        # (as in metrics.jsonl); the summary keeps the best (lowest) held-out BPB per corpus
        # beside the last, so runs of a sweep compare on either in W&B's tables.
        self.run.define_metric("step", hidden=True)
        for group, summary in METRIC_GROUPS.items():
            self.run.define_metric(group, step_metric="step", step_sync=True, summary=summary)

    @property
    def run_dir(self) -> str | None:
        # run.dir is the run's files/ folder; users look for the run folder above it.
        return str(Path(self.run.dir).parent) if self.run is not None else None

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.is_main:
            return
        self.metrics_file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.metrics_file.flush()
        if self.run is not None:
            self.run.log({"step": step, **metrics}, step=step)

    def table(self, name: str, columns: list[str], rows: list[list]) -> None:
        """A W&B table (e.g. the mix plan); tables are a view only, so not in metrics.jsonl."""
        if self.run is not None:
            import wandb

            self.run.log({name: wandb.Table(columns=columns, data=rows)}, step=0)

    def close(self, summary: dict | None = None, failed: bool = False) -> None:
        """End the run; a `failed` one is marked so in W&B (a non-zero exit code)."""
        if not self.is_main:
            return
        self.metrics_file.close()
        if self.run is not None:
            if summary:
                self.run.summary.update(summary)
            self.run.finish(exit_code=1 if failed else 0)
