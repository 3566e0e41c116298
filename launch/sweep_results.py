"""What a sweep found: per run and domain held-out BPB as a table (terminal, CSV, JSON),
a plot of BPB against the shares, and, with enough runs, a fitted model of BPB on the
weights and the mix it proposes as a ready-to-run experiment file.

Everything is read back from the runs' own `results.json`, so rerunning `dapt sweep`
(or reading `<workdir>/sweep/` with `dapt report`) needs no training. Layout under
`<workdir>/sweep/`: `results.csv`, `results.json`, `bpb_vs_share.png`, `proposal.yaml`,
`runs/<run>/`.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import yaml

from dapt.experiment import Experiment, load_experiment
from dapt.figures import pyplot, save_figure
from dapt.launch.mix_fit import enough_runs, fit_domain, propose
from dapt.launch.sweep_design import ProxyRun, components, run_dir, sweep_dir, with_mix


def domains(experiment: Experiment) -> dict[str, list[str]]:
    """Every domain BPB is reported for, with the corpora averaged into it: each corpus,
    each group of two or more corpora, and the average over all corpora."""
    out = {name: [name] for name in experiment.corpus_names()}
    for group, members in experiment.groups().items():
        if len(members) > 1 or group not in out:
            out[group] = members
    out["average"] = experiment.corpus_names()
    return out


def collect(experiment: Experiment, runs: list[ProxyRun], statuses: dict[str, str] | None = None) -> list[dict]:
    """One row per run: its status (from `statuses` where this sweep trained it, else from its
    files), weights and BPB per domain (none unless it finished)."""
    rows = []
    for run in runs:
        folder = run_dir(experiment, run)
        results = folder / "results.json"
        row = {"run": run.name, "weights": run.weights, "bpb": {}, "tasks": task_scores(folder), "dir": str(folder),
               "log": str(folder / "train.log")}
        if results.exists():
            corpora = json.loads(results.read_text())["corpora"]
            row["bpb"] = {domain: float(np.mean([corpora[name]["bpb_after"] for name in members]))
                          for domain, members in domains(experiment).items()}
            row["status"] = "done"
        else:
            row["status"] = (statuses or {}).get(run.name) or ("failed" if (folder / "train.log").exists() else "not run")
        rows.append(row)
    return rows


def task_scores(folder: Path) -> dict[str, float]:
    """`<task>/accuracy` and `<task>/macro_f1` of a run scored on the sweep's tasks (none if not scored)."""
    scored = folder / "eval_tasks.json"
    if not scored.exists():
        return {}
    rows = json.loads(scored.read_text())["tasks"]
    return {f"{row['task']}/{metric}": row[metric] for row in rows for metric in ("accuracy", "macro_f1")}


def task_columns(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(name for row in rows for name in row["tasks"]))


def format_table(rows: list[dict], weight_names: list[str], domain_names: list[str]) -> str:
    tasks = task_columns(rows)
    width = max(10, *(len(n) + 4 for n in weight_names + domain_names + tasks))
    name_width = max(6, *(len(row["run"]) + 2 for row in rows))
    header = f"{'run':<{name_width}}{'status':<9}" + "".join(f"{'w:' + n:>{width}}" for n in weight_names)
    lines = [header + "".join(f"{n:>{width}}" for n in domain_names + tasks)]
    for row in rows:
        line = f"{row['run']:<{name_width}}{row['status']:<9}" + "".join(f"{row['weights'][n]:>{width}.3f}" for n in weight_names)
        line += "".join(f"{row['bpb'][d]:>{width}.4f}" if row["bpb"] else f"{'-':>{width}}" for d in domain_names)
        lines.append(line + "".join(f"{row['tasks'][t]:>{width}.3f}" if t in row["tasks"] else f"{'-':>{width}}"
                                    for t in tasks))
    return "\n".join(lines)


def write_csv(rows: list[dict], weight_names: list[str], domain_names: list[str], path: Path) -> Path:
    tasks = task_columns(rows)
    with open(path, "w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(["run", "status", *(f"weight:{n}" for n in weight_names), *(f"bpb:{d}" for d in domain_names),
                         *(f"task:{t}" for t in tasks)])
        for row in rows:
            writer.writerow([row["run"], row["status"], *(row["weights"][n] for n in weight_names),
                             *(row["bpb"].get(d, "") for d in domain_names), *(row["tasks"].get(t, "") for t in tasks)])
    return path


def plot(rows: list[dict], x_names: list[str], domain_names: list[str], corpus_names: list[str], path: Path) -> Path:
    """BPB per domain against each varied weight (one panel per weight); corpora solid, groups dashed."""
    plt = pyplot()

    done = [row for row in rows if row["bpb"]]
    figure, axes = plt.subplots(1, len(x_names), figsize=(5.5 * len(x_names), 4), squeeze=False)
    for ax, x_name in zip(axes[0], x_names):
        ordered = sorted(done, key=lambda row: row["weights"][x_name])
        x = [row["weights"][x_name] for row in ordered]
        for domain in domain_names:
            style = "-" if domain in corpus_names else "--"
            ax.plot(x, [row["bpb"][domain] for row in ordered], marker="o", linestyle=style, label=domain)
        ax.set_xlabel(f"share of {x_name}")
        ax.set_ylabel("held-out bits per byte")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1))
    figure.suptitle("held-out BPB per domain against the mix")
    return save_figure(figure, path)


def fit_and_propose(experiment: Experiment, rows: list[dict], weight_names: list[str], base: dict[str, float]) -> dict:
    """Fits per domain and the proposed mix, or why there are none."""
    done = [row for row in rows if row["bpb"]]
    needed = enough_runs(len(weight_names))
    if len(done) < needed:
        return {"skipped": f"a fit needs at least {needed} finished runs ({len(weight_names)} weights + 2), have {len(done)}"}
    shares = np.array([[row["weights"][n] for n in weight_names] for row in done])
    fits = {d: fit_domain(d, shares, np.array([row["bpb"][d] for row in done])) for d in done[0]["bpb"]}
    objective = experiment.sweep.objective
    base_shares = np.array([base[n] for n in weight_names])
    proposal = propose(fits, shares, base_shares, objective.minimise, objective.no_worse, objective.tolerance,
                       experiment.sweep.seed)
    out = {"fits": {d: vars(f) for d, f in fits.items()}, "objective": objective.model_dump(),
           "base_weights": base, "proposal": None}
    if proposal is not None:
        weights = {n: round(s, 4) for n, s in zip(weight_names, proposal.pop("shares"))}
        out["proposal"] = {"weights": weights, **proposal,
                           "file": str(write_proposal(experiment, weights))}
    else:  # a proposal from an earlier state of the sweep no longer holds
        (sweep_dir(experiment) / "proposal.yaml").unlink(missing_ok=True)
    return out


def write_proposal(experiment: Experiment, weights: dict[str, float]) -> Path:
    """The full experiment (not the proxy) with the proposed mix, reading the sweep's
    tokenizer and stores; checked by loading it as `dapt run` will."""
    path = sweep_dir(experiment) / "proposal.yaml"
    data = with_mix(experiment, weights, f"{experiment.name}-proposed-mix", sweep_dir(experiment) / "proposal")
    header = (f"# The mix proposed by the sweep in {sweep_dir(experiment)} for the full experiment.\n"
              f"# Run it with: dapt run {path}\n")
    path.write_text(header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    load_experiment(path)
    return path


def format_fit(summary: dict, weight_names: list[str]) -> str:
    if "skipped" in summary:
        return f"fit: {summary['skipped']}"
    lines = [f"{'domain':<14}{'model':<12}{'LOO MAE':>10}{'LOO R²':>9}"]
    for domain, fit in summary["fits"].items():
        r2 = "-" if math.isnan(fit["loo_r2"]) else f"{fit['loo_r2']:.3f}"
        lines.append(f"{domain:<14}{fit['model']:<12}{fit['loo_mae']:>10.4f}{r2:>9}")
    objective, proposal = summary["objective"], summary["proposal"]
    goal = (f"objective: minimise {objective['minimise']} BPB with {', '.join(objective['no_worse']) or 'nothing'} "
            f"at most {objective['tolerance']:.1%} worse than the base mix")
    if proposal is None:
        return "\n".join(lines + [goal, "proposal: no mix within the runs' range meets the objective"])
    shares = ", ".join(f"{n} {proposal['weights'][n]:.3f}" for n in weight_names)
    predicted = ", ".join(f"{d} {proposal['base_predicted_bpb'][d]:.4f} → {proposal['predicted_bpb'][d]:.4f}"
                          for d in [objective["minimise"], *objective["no_worse"]])
    return "\n".join(lines + [goal, f"proposal: {shares}", f"predicted BPB, base → proposal: {predicted}",
                              f"ready to run: {proposal['file']}"])


def write_results(experiment: Experiment, runs: list[ProxyRun], base: dict[str, float],
                  statuses: dict[str, str] | None = None) -> dict:
    """Table, CSV, JSON, plot and fit of the sweep as it stands; printed and written."""
    folder = sweep_dir(experiment)
    folder.mkdir(parents=True, exist_ok=True)
    weight_names = components(experiment)
    domain_names = list(domains(experiment))
    rows = collect(experiment, runs, statuses)
    grid = experiment.sweep.grid
    varied = [grid.group] if grid is not None else [n for n in weight_names if len({r["weights"][n] for r in rows}) > 1]
    table = format_table(rows, weight_names, domain_names)
    figure = None
    if any(row["bpb"] for row in rows):
        figure = plot(rows, varied or weight_names, domain_names, experiment.corpus_names(), folder / "bpb_vs_share.png")
    fit = fit_and_propose(experiment, rows, weight_names, base)
    summary = {"experiment": experiment.name, "level": experiment.sweep.level, "weights": weight_names,
               "domains": domains(experiment), "base_weights": base, "runs": rows, "fit": fit,
               "plot": str(figure) if figure else None}
    (folder / "results.json").write_text(json.dumps(summary, indent=1))
    csv_path = write_csv(rows, weight_names, domain_names, folder / "results.csv")
    print(f"\nheld-out bits per byte per mix ({experiment.sweep.level} weights):\n{table}\n\n{format_fit(fit, weight_names)}")
    print(f"\ntable: {csv_path}\nplot: {figure}\nall: {folder / 'results.json'}")
    return summary
