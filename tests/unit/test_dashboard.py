"""W&B views without a network: the dashboard's workspace spec, and the metric declarations of a run."""

import json
import subprocess
import sys

from dapt.pretrain.dashboard import SECTIONS, build_workspace, workspace_spec
from dapt.pretrain.tracking import METRIC_GROUPS
from tests.conftest import offline_run_records, shipped_config

CORPORA = ["filings", "news", "encyclopedia", "web"]


def panels_by_section(spec: dict) -> dict[str, list[dict]]:
    sections = spec["spec"]["section"]["panelBankConfig"]["sections"]
    return {section["name"]: section["panels"] for section in sections}


def test_the_spec_holds_a_panel_for_every_metric_group_and_corpus():
    spec = json.loads(workspace_spec(build_workspace("dapt-demo", None, CORPORA)))
    sections = panels_by_section(spec)
    assert list(sections) == [SECTIONS[group][0] for group in METRIC_GROUPS]
    regexes = {p["config"]["metricRegex"] for panels in sections.values() for p in panels if p["config"].get("useMetricRegex")}
    assert {"eval/bpb/.*", "train/loss/.*", "train/loss$", "train/lr", "train/grad_norm", "mix/share/.*", "mix/tokens/.*",
            "perf/tokens_per_s", "perf/samples_per_s", "perf/mfu"} == regexes
    heldout = sections["Held-out bits per byte"]
    bars = [p for p in heldout if p["viewType"] == "Bar Chart"]
    assert len(bars) == 1 and bars[0]["config"]["metrics"] == [f"eval/bpb/{c}" for c in CORPORA]
    per_corpus = [p["config"]["metrics"] for p in heldout if p["viewType"] == "Run History Line Plot" and p["config"]["metrics"]]
    assert per_corpus == [[f"eval/bpb/{c}"] for c in CORPORA]
    assert spec["project"] == "dapt-demo"


def test_dapt_wandb_dashboard_dry_run_writes_the_spec_of_the_experiments_corpora(tmp_path):
    output = tmp_path / "spec.json"
    config = shipped_config(tmp_path)
    result = subprocess.run([sys.executable, "-m", "dapt", "wandb", "dashboard", "--config", str(config),
                             "--entity", "team", "--dry-run", "--output", str(output)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    spec = json.loads(output.read_text())
    assert (spec["entity"], spec["project"]) == ("team", "dapt-demo")
    assert sum(len(panels) for panels in panels_by_section(spec).values()) == 10 + 1 + len(CORPORA)


def test_saving_without_a_login_is_one_error_that_says_what_to_do(tmp_path, monkeypatch, capsys):
    from dapt.launch.cli import main

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path))
    assert main(["wandb", "dashboard", "--project", "p"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "run `wandb login`" in error and "--dry-run" in error


def test_an_offline_run_declares_its_step_axis_and_best_bpb(tmp_path):
    """The run's own record holds the declarations."""
    from dapt.pretrain.config import WandbConfig
    from dapt.pretrain.tracking import Tracker

    tracker = Tracker(tmp_path, WandbConfig(project="p", mode="offline"), "r", {}, is_main=True)
    tracker.log({"eval/bpb/news": 3.0}, step=0)
    tracker.log({"train/loss": 2.0, "perf/tokens_per_s": 10.0}, step=1)
    tracker.log({"eval/bpb/news": 2.5}, step=1)
    tracker.close()
    records = offline_run_records(next((tmp_path / "wandb").glob("offline-run-*")))
    metrics = {r["metric"].get("glob_name") or r["metric"]["name"]: r["metric"] for r in records if r["type"] == "metric"}
    assert set(METRIC_GROUPS) <= set(metrics) and "step" in metrics
    assert all(metrics[group]["step_metric"] == "step" for group in METRIC_GROUPS)
    assert metrics["eval/bpb/*"]["summary"] == {"min": True, "last": True}
    summaries = [r["summary"]["update"] for r in records if r["type"] == "summary" and "eval/bpb/news" in r["summary"]["update"]]
    assert summaries[-1]["eval/bpb/news"] == {"min": 2.5, "last": 2.5}
