"""`dapt report` on a real training run and on a sweep folder, checked in headless chromium."""

import json
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.helpers import experiment_file, train

RUN_SECTIONS = ["summary", "train-loss", "heldout-bpb", "mix", "throughput", "tokenizer", "tasks"]
SWEEP_SECTIONS = ["sweep-results", "sweep-plots", "proposal"]
# Set as the page's last script: after load, how many images decoded to a real size.
IMAGE_CHECK = """<script>window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const loaded = images.filter(image => image.complete && image.naturalWidth > 0).length;
  document.body.setAttribute("data-images-loaded", loaded + "/" + images.length);
});</script>"""


@pytest.fixture(scope="module")
def run_workdir(tmp_path_factory, built_experiment):
    """A 6-step 2-process run evaluated every 3 steps, with a tokenizer comparison and task scores beside it."""
    from dapt.tokenizer.evaluate import evaluate, plot_evaluation

    folder = tmp_path_factory.mktemp("run")
    path = experiment_file(folder, built_experiment, steps=6)
    config = yaml.safe_load(path.read_text())
    config["train"] |= {"eval_every": 3, "peak_flops_per_device": 1.0e11}  # a stated peak: MFU is recorded on CPU too
    path.write_text(yaml.safe_dump(config))
    train(path)
    corpora = built_experiment  # the run reads the session's stores; the sources are beside them
    plot_evaluation(evaluate([corpora.tokenizer_dir], corpora.corpora, corpora.heldout), folder / "tokenizer_eval.png")
    (folder / "eval_tasks.json").write_text(json.dumps({"model": str(folder / "export"), "tasks": [
        {"task": "headline_sentiment", "shots": 3, "items": 34, "accuracy": 0.5, "macro_f1": 0.4, "chance": 0.41,
         "labels": {"positive": "positive", "negative": "negative"}}]}))
    return folder


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found is None:
        pytest.skip("chromium is not installed (apt-get install chromium): the page is not checked in a browser")
    return found


def render_in_browser(page, tmp_path) -> str:
    """The DOM after load as headless chromium built it, with the image check's result on <body>."""
    checked = tmp_path / "checked.html"
    checked.write_text(page.read_text().replace("</body>", IMAGE_CHECK + "</body>"))
    result = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                             "--dump-dom", checked.as_uri()], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def assert_page_renders(page, sections: list[str], tmp_path) -> None:
    html = page.read_text()
    for key in sections:
        assert f'<section id="{key}">' in html, key
    assert "src=\"file:" not in html and "src=\"http" not in html  # self-contained
    dom = render_in_browser(page, tmp_path)
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert loaded, dom[-2000:]
    assert loaded.group(1) == loaded.group(2) == str(html.count("<img ")), loaded.group(0)


def test_run_report_has_every_section_and_its_images_load(run_workdir, tmp_path):
    result = subprocess.run([sys.executable, "-m", "dapt", "report", str(run_workdir)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    page = run_workdir / "report" / "report.html"
    assert_page_renders(page, RUN_SECTIONS, tmp_path)
    for png in ("train_loss", "heldout_bpb", "shares", "throughput", "tokenizer_eval"):
        assert (run_workdir / "report" / f"{png}.png").stat().st_size > 10_000, png
    html = page.read_text()
    results = json.loads((run_workdir / "results.json").read_text())
    for name, row in results["corpora"].items():
        assert f"<td>{name}</td><td>{row['bpb_before']:,.4f}</td><td>{row['bpb_after']:,.4f}</td>" in html
    assert "headline_sentiment" in html and "MFU not recorded" not in html
    records = [json.loads(line) for line in (run_workdir / "metrics.jsonl").read_text().splitlines()]
    assert sum("perf/mfu" in r for r in records) == 6


def test_sweep_report_has_the_table_plots_and_proposal(run_workdir, tmp_path):
    from dapt.launch.sweep_results import plot, write_csv

    sweep = tmp_path / "experiment" / "sweep"
    rows = []
    for name, share in (("financial-0.2", 0.2), ("financial-0.8", 0.8)):
        shutil.copytree(run_workdir, sweep / "runs" / name, ignore=shutil.ignore_patterns("checkpoints", "stores", "report"))
        rows.append({"run": name, "status": "done", "weights": {"financial": share, "public": 1 - share},
                     "bpb": {"financial": 3.0 - share, "public": 2.0 + share, "average": 2.5},
                     "tasks": {"headline_sentiment/accuracy": share}})
    rows.append({"run": "financial-0.5", "status": "failed", "weights": {"financial": 0.5, "public": 0.5}, "bpb": {},
                 "tasks": {}})
    write_csv(rows, ["financial", "public"], ["financial", "public", "average"], sweep / "results.csv")
    plot(rows, ["financial"], ["financial", "public", "average"], [], sweep / "bpb_vs_share.png")
    (sweep / "results.json").write_text(json.dumps({"runs": rows, "fit": {
        "fits": {"financial": {"model": "linear", "loo_mae": 0.01, "loo_r2": 0.97}}}}))
    (sweep / "proposal.yaml").write_text("name: proposed\nmix: {group_weights: {financial: 0.7, public: 0.3}}\n")

    from dapt.pretrain.report import build_report

    page = build_report(tmp_path / "experiment")  # the experiment's workdir: its sweep/ is found
    assert page == sweep / "report" / "report.html"
    assert_page_renders(page, SWEEP_SECTIONS, tmp_path)
    html = page.read_text()
    assert html.count("<tr>") == 1 + 3 + 1 + 1  # results header + 3 runs, fit header + 1 domain
    assert "<td>failed</td>" in html and "financial: 0.7" in html
    assert "task:headline_sentiment/accuracy" in html, "the sweep's task scores are in its table"
    assert (sweep / "report" / "sweep_heldout_bpb.png").exists() and (sweep / "report" / "bpb_vs_share.png").exists()
