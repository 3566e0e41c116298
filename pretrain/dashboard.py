"""`dapt wandb dashboard`: a saved W&B workspace laid out for domain-adaptive pretraining runs.

Built with W&B's own `wandb-workspaces` library from the metric groups the tracker
logs (`pretrain.tracking.METRIC_GROUPS`), so a new group gets its section here too:
held-out BPB per corpus (curves, and the final value per run as bars), training loss
per corpus, the mix, throughput and MFU. The spec needs no network; only saving it
to W&B does, so offline (or with `--dry-run`) the same spec is written as JSON.
"""

from __future__ import annotations

from pathlib import Path

from dapt.base import DaptError
from dapt.pretrain.tracking import METRIC_GROUPS

# Section title and panels per metric group: (title, metric regex, log scale).
SECTIONS = {
    "eval/bpb/*": ("Held-out bits per byte", [("Held-out BPB per corpus", r"eval/bpb/.*", True)]),
    "train/*": ("Training", [("Training loss per corpus", r"train/loss/.*", True), ("Training loss", r"train/loss$", True),
                             ("Learning rate", r"train/lr", False), ("Gradient norm", r"train/grad_norm", False)]),
    "mix/*": ("Mix", [("Realised share per corpus", r"mix/share/.*", False),
                      ("Tokens drawn per corpus", r"mix/tokens/.*", False)]),
    "perf/*": ("Throughput and MFU", [("Tokens per second", r"perf/tokens_per_s", False),
                                      ("Samples per second", r"perf/samples_per_s", False),
                                      ("Model FLOPs utilisation", r"perf/mfu", False)]),
}


def build_workspace(project: str, entity: str | None, corpora: list[str], name: str = "dapt: domain-adaptive pretraining"):
    """The workspace: one open section per metric group; per-corpus panels where corpora are known."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    sections = []
    for group in METRIC_GROUPS:
        title, plots = SECTIONS[group]
        panels = [wr.LinePlot(title=plot_title, metric_regex=regex, log_y=log_y or None)
                  for plot_title, regex, log_y in plots]
        if group == "eval/bpb/*":
            # Bars compare the runs of a sweep on each corpus at their last evaluation.
            panels.append(wr.BarPlot(title="Final held-out BPB per corpus", metrics=[f"eval/bpb/{c}" for c in corpora]))
            panels += [wr.LinePlot(title=f"Held-out BPB: {c}", y=[f"eval/bpb/{c}"], log_y=True) for c in corpora]
        sections.append(ws.Section(name=title, panels=panels, is_open=True))
    return ws.Workspace(entity=entity or "", project=project, name=name, sections=sections)


def workspace_spec(workspace) -> str:
    """The spec W&B stores for a saved workspace, as JSON."""
    return workspace._to_model().model_dump_json(by_alias=True, indent=1)


def save_workspace(workspace) -> str:
    """Save to W&B (needs a network and `wandb login`); returns the workspace's URL."""
    import wandb
    from wandb.errors import AuthenticationError, UsageError

    try:
        api = wandb.Api()
    except (UsageError, AuthenticationError) as err:
        raise DaptError(f"cannot save to W&B ({str(err).splitlines()[0]}): run `wandb login` (or set WANDB_API_KEY), "
                        f"or pass --dry-run to write the dashboard spec without saving it") from None
    if not workspace.entity:
        workspace.entity = api.default_entity
    try:
        return workspace.save().url
    except Exception as err:  # network, permission or project errors all come back as plain exceptions
        raise DaptError(f"W&B refused to save the workspace for {workspace.entity}/{workspace.project}: "
                        f"{str(err).splitlines()[0]}") from None


def dashboard(project: str, entity: str | None, corpora: list[str], output: Path | None, dry_run: bool) -> str:
    """Save the workspace unless `dry_run`; write its spec to `output` when given. Returns what was done."""
    workspace = build_workspace(project, entity, corpora)
    done = []
    if output is not None or dry_run:
        output = output or Path(f"wandb-dashboard-{project}.json")
        output.write_text(workspace_spec(workspace), encoding="utf-8")
        done.append(f"dashboard spec written to {output}")
    if not dry_run:
        done.append(f"workspace saved: {save_workspace(workspace)}")
    return "; ".join(done)
