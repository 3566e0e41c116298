"""`dapt report PATH`: one self-contained HTML page of a run or a sweep, from local files only.

In: a run workdir (`metrics.jsonl`, `results.json`, and when present `mix_plan.png`,
`tokenizer_eval.png`, `eval_tasks.json`) or a sweep folder (`results.csv`,
`bpb_vs_share.png`, `proposal.yaml`, `runs/<run>/metrics.jsonl`). Out: `report.html`
with every plot embedded as a data URI, so that it can be mailed or archived and
still opens after the W&B run is gone, and the same PNGs beside it.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from dapt.base import DaptError
from dapt.figures import pyplot, save_figure

@dataclass
class Section:
    key: str
    title: str
    body: str


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a line cut short by a killed process is skipped, not fatal."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def series(records: list[dict], prefix: str) -> dict[str, tuple[list[int], list[float]]]:
    """Per metric under `prefix` (e.g. `eval/bpb/`): its steps and values, in metrics.jsonl order."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for record in records:
        for key, value in record.items():
            if key.startswith(prefix) and "/" not in key[len(prefix):]:
                steps, values = out.setdefault(key[len(prefix):], ([], []))
                steps.append(record["step"])
                values.append(value)
    return out


def plot_curves(curves: dict[str, tuple[list, list]], path: Path, title: str, ylabel: str,
                total: tuple[list, list] | None = None, log_y: bool = False) -> Path:
    """One line per corpus (or run) over steps; `total` drawn dashed in black (e.g. the overall loss)."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(8, 4.2))
    for index, (name, (steps, values)) in enumerate(curves.items()):
        axis.plot(steps, values, color=f"C{index}", label=name, marker="o" if len(steps) < 12 else None)
    if total is not None:
        axis.plot(*total, color="black", linestyle="--", linewidth=1, label="all corpora")
    if log_y:  # losses and BPB fall by orders of magnitude; plain numbers on the ticks, not powers of ten
        from matplotlib.ticker import FuncFormatter

        axis.set_yscale("log")
        for ticks in (axis.yaxis.set_major_formatter, axis.yaxis.set_minor_formatter):
            ticks(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set(xlabel="training step", ylabel=ylabel, title=title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return save_figure(figure, path)


def plot_shares(planned: dict[str, float], realised: dict[str, float],
                over_steps: dict[str, tuple[list, list]], path: Path) -> Path:
    """Planned vs realised share per corpus, and the realised share as training went."""
    plt = pyplot()
    figure, (bars, lines) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [2, 3]})
    names = list(planned)
    positions = range(len(names))
    bars.bar([p - 0.2 for p in positions], [planned[n] for n in names], 0.4, label="planned", color="lightgrey",
             edgecolor="grey")
    bars.bar([p + 0.2 for p in positions], [realised.get(n, 0.0) for n in names], 0.4, label="realised",
             color=[f"C{i}" for i in positions])
    bars.set_xticks(list(positions), names, rotation=20)
    bars.set(ylabel="share of training tokens", title="Planned vs realised share")
    bars.legend(fontsize=8)
    for index, name in enumerate(names):
        if name in over_steps:
            lines.plot(*over_steps[name], color=f"C{index}", label=name)
        lines.axhline(planned[name], color=f"C{index}", linestyle=":", linewidth=1)
    lines.set(xlabel="training step", ylabel="share of tokens so far", title="Realised share over training (dotted: plan)")
    lines.grid(alpha=0.3)
    lines.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return save_figure(figure, path)


def plot_throughput(records: list[dict], path: Path) -> Path:
    """Tokens/s per step, and MFU beside it where the peak FLOP/s was known."""
    plt = pyplot()
    perf = series(records, "perf/")
    has_mfu = "mfu" in perf
    figure, axes = plt.subplots(1, 2 if has_mfu else 1, figsize=(12 if has_mfu else 8, 4), squeeze=False)
    steps, values = perf.get("tokens_per_s", ([], []))
    axes[0][0].plot(steps, values, color="C0")
    axes[0][0].set(xlabel="training step", ylabel="tokens/s (all processes)", title="Throughput")
    axes[0][0].grid(alpha=0.3)
    if has_mfu:
        steps, values = perf["mfu"]
        axes[0][1].plot(steps, [100 * v for v in values], color="C1")
        axes[0][1].set(xlabel="training step", ylabel="MFU (%)", title="Model FLOPs utilisation")
        axes[0][1].grid(alpha=0.3)
    return save_figure(figure, path)


def _image(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _table(header: list[str], rows: list[list]) -> str:
    def cell(value) -> str:
        return f"{value:,.4f}" if isinstance(value, float) else html.escape(str(value))

    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure_or_note(path: Path | None, caption: str, missing: str) -> str:
    return _image(path, caption) if path is not None else f"<p class=note>{html.escape(missing)}</p>"


def run_sections(workdir: Path, out: Path) -> list[Section]:
    """The sections of one run's report; its PNGs are written into `out`."""
    records = read_metrics(workdir / "metrics.jsonl")
    results = json.loads((workdir / "results.json").read_text()) if (workdir / "results.json").exists() else None
    sections = []
    if results is not None:
        rows = [[name, r["bpb_before"], r["bpb_after"], f"{r['tokens_seen']:,}", f"{r['planned_share']:.2%}",
                 f"{r['realised_share']:.2%}"] for name, r in results["corpora"].items()]
        headline = f"<p>training loss {results['first_loss']:.3f} → {results['final_loss']:.3f}; " \
                   f"checkpoint {html.escape(str(results['checkpoint']))}; W&B run {html.escape(str(results['wandb_run_id']))}</p>"
        sections.append(Section("summary", "Summary", headline + _table(
            ["corpus", "held-out BPB before", "held-out BPB after", "tokens seen", "planned share", "realised share"], rows)))
    else:
        sections.append(Section("summary", "Summary", "<p class=note>no results.json: the run has not finished; "
                                                       "the plots show what metrics.jsonl holds so far.</p>"))

    losses = series(records, "train/loss/")
    total = series(records, "train/").get("loss")
    loss_png = plot_curves(losses, out / "train_loss.png", "Training loss per corpus", "loss (nats/token)",
                           total=total, log_y=True) if losses else None
    sections.append(Section("train-loss", "Training loss per domain",
                            _figure_or_note(loss_png, "Mean token loss of each corpus's samples in each step.",
                                            "no training steps recorded yet")))
    bpb = series(records, "eval/bpb/")
    bpb_png = plot_curves(bpb, out / "heldout_bpb.png", "Held-out bits per byte per corpus",
                          "bits per byte", log_y=True) if bpb else None
    sections.append(Section("heldout-bpb", "Held-out bits per byte per domain",
                            _figure_or_note(bpb_png, "Evaluated on each corpus's held-out split every eval_every steps.",
                                            "no evaluation recorded yet")))

    shares = series(records, "mix/share/")
    if results is not None:
        planned = {n: r["planned_share"] for n, r in results["corpora"].items()}
        realised = {n: r["realised_share"] for n, r in results["corpora"].items()}
    else:  # unfinished run: the plan is not recorded, so compare with the latest realised share
        realised = {n: values[-1] for n, (_, values) in shares.items()}
        planned = dict(realised)
    shares_png = plot_shares(planned, realised, shares, out / "shares.png") if planned else None
    mix_body = _figure_or_note(shares_png, "Token shares per corpus: the plan against what the loader delivered.",
                               "no mix recorded yet")
    if (workdir / "mix_plan.png").exists():  # drawn by `dapt mix plan` before training
        mix_body += _image(_copy(workdir / "mix_plan.png", out / "mix_plan.png"),
                           "The mix plan made before training: shares over training, epochs per corpus.")
    sections.append(Section("mix", "Planned vs realised mix", mix_body))

    perf = series(records, "perf/")
    perf_png = plot_throughput(records, out / "throughput.png") if perf else None
    mfu_note = "" if "mfu" in perf else \
        "<p class=note>MFU not recorded: the device's peak FLOP/s is unknown (set train.peak_flops_per_device).</p>"
    sections.append(Section("throughput", "Throughput and MFU",
                            _figure_or_note(perf_png, "Tokens per second over all processes.", "no throughput recorded")
                            + mfu_note))

    tokenizer_png = workdir / "tokenizer_eval.png"
    if tokenizer_png.exists():
        sections.append(Section("tokenizer", "Tokenizer comparison",
                                _image(_copy(tokenizer_png, out / "tokenizer_eval.png"),
                                       "Tokenizers side by side on held-out text (dapt tokenizer eval).")))
    tasks_file = workdir / "eval_tasks.json"
    if tasks_file.exists():
        sections.append(Section("tasks", "Downstream few-shot tasks", tasks_table(json.loads(tasks_file.read_text()))))
    return sections


def tasks_table(results: dict) -> str:
    rows = [[t["task"], t["shots"], t["items"], t["accuracy"], t["macro_f1"], t["chance"]] for t in results["tasks"]]
    cut = results.get("truncated_prompts")
    note = f"<p class=note>{cut} scored options had a prompt longer than the model's context, cut from the left.</p>"
    return (f"<p>model {html.escape(str(results['model']))}</p>"
            + _table(["task", "shots", "test items", "accuracy", "macro-F1", "chance (majority label)"], rows)
            + (note if cut else ""))


def sweep_sections(sweep_dir: Path, out: Path) -> list[Section]:
    """The results table, the sweep's own plots and proposal, and held-out BPB per run over steps."""
    with open(sweep_dir / "results.csv", newline="", encoding="utf-8") as handle:
        table = list(csv.reader(handle))
    rows = [[_number(value) for value in row] for row in table[1:]]
    body = _table(table[0], rows) if table else "<p class=note>results.csv is empty</p>"
    summary = json.loads((sweep_dir / "results.json").read_text()) if (sweep_dir / "results.json").exists() else {}
    fits = (summary.get("fit") or {}).get("fits")
    if fits:  # how well a model of BPB on the weights predicts runs it was not fitted on
        body += "<h3>Fit of BPB on the weights (leave one run out)</h3>" + _table(
            ["domain", "model", "LOO MAE", "LOO R²"], [[d, f["model"], f["loo_mae"], f["loo_r2"]] for d, f in fits.items()])
    sections = [Section("sweep-results", "Sweep results", body)]
    figures = "".join(_image(_copy(png, out / png.name), png.stem.replace("_", " "))
                      for png in sorted(sweep_dir.glob("*.png")))
    runs = sorted(p for p in (sweep_dir / "runs").glob("*") if (p / "metrics.jsonl").exists())
    average = {}
    for run in runs:
        per_corpus = series(read_metrics(run / "metrics.jsonl"), "eval/bpb/")
        if per_corpus:
            steps = next(iter(per_corpus.values()))[0]
            average[run.name] = (steps, [sum(v[i] for _, v in per_corpus.values()) / len(per_corpus)
                                         for i in range(len(steps))])
    if average:
        figures += _image(plot_curves(average, out / "sweep_heldout_bpb.png", "Average held-out BPB per run",
                                      "bits per byte (mean over corpora)", log_y=True),
                          "Each proxy run's held-out BPB, averaged over corpora, as it trained.")
    sections.append(Section("sweep-plots", "Sweep plots", figures or "<p class=note>no plots in the sweep folder</p>"))
    proposal = sweep_dir / "proposal.yaml"
    if proposal.exists():
        sections.append(Section("proposal", "Proposed mix", f"<pre>{html.escape(proposal.read_text())}</pre>"))
    return sections


def _number(value: str) -> float | str:
    """CSV cells back to numbers, so that the table shows them rounded."""
    try:
        return float(value)
    except ValueError:
        return value


def _copy(source: Path, target: Path) -> Path:
    if source.resolve() != target.resolve():
        shutil.copyfile(source, target)
    return target


STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:.3em .7em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}
figure{margin:1em 0}figcaption{color:#555;font-size:.9em}.note{color:#8a5300}nav a{margin-right:1em}
pre{background:#f6f6f6;padding:1em;overflow-x:auto}"""


def render(title: str, sections: list[Section]) -> str:
    nav = "".join(f'<a href="#{s.key}">{html.escape(s.title)}</a>' for s in sections)
    body = "".join(f'<section id="{s.key}"><h2>{html.escape(s.title)}</h2>{s.body}</section>' for s in sections)
    return (f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1><nav>{nav}</nav>{body}</body></html>")


def build_report(path: Path, out: Path | None = None) -> Path:
    """Write `report.html` and its PNGs for the run or sweep at `path` (default: `<path>/report/`)."""
    path = Path(path)
    if (path / "sweep" / "results.csv").exists() and not (path / "metrics.jsonl").exists():
        path = path / "sweep"  # an experiment's workdir holding a sweep
    is_sweep = (path / "results.csv").exists()
    if not is_sweep and not (path / "metrics.jsonl").exists():
        raise DaptError(f"{path} holds neither metrics.jsonl (a run's workdir) nor results.csv (a sweep folder); "
                        f"give the workdir of a run or a sweep")
    out = Path(out) if out is not None else path / "report"
    out.mkdir(parents=True, exist_ok=True)
    sections = sweep_sections(path, out) if is_sweep else run_sections(path, out)
    title = f"dapt {'sweep' if is_sweep else 'run'} report: {path.resolve()}"
    page = out / "report.html"
    page.write_text(render(title, sections), encoding="utf-8")
    return page
