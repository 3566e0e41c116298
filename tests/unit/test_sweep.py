"""`dapt sweep`: the `sweep:` section, the runs it designs, the fit and proposal (real sweeps run in
integration/test_sweep_runs.py)."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from dapt.base import DaptError
from dapt.experiment import load_experiment
from dapt.launch.mix_fit import fit_domain, propose
from dapt.launch.sweep import run_sweep
from dapt.launch.sweep_design import design, proxy_yaml, run_dir, sweep_dir
from dapt.launch.sweep_results import write_results
from tests.conftest import reusing, write_experiment
from tests.helpers import assert_one_line_error, dapt_here

TASK_FILE = Path(__file__).parents[2] / "configs" / "tasks" / "headline_sentiment.yaml"
TINY_PROXY = {
    "model": {"config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2,
                         "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 128,
                         "tie_word_embeddings": False}},
    "train": {"steps": 40, "warmup_steps": 5, "global_batch_size": 16, "micro_batch_size": 8, "eval_every": 0,
              "eval_max_tokens": 5000, "log_every": 10},
}


def sweep_experiment(folder, sweep: dict, built=None, **sections):
    """The demo experiment with a `sweep:` section; with `built`, reading its tokenizer and stores."""
    overrides = {"sweep": sweep, **sections}
    if built is not None:
        overrides |= reusing(built)
    return write_experiment(folder, overrides)


@pytest.mark.parametrize("sweep, message", [
    ({"mixes": [{"weights": {"filings": 1, "bonds": 1}}]},
     r"experiment.yaml:\d+: sweep.mixes\[0\].weights.bonds: unknown corpus 'bonds'; known: filings, news"),
    ({"mixes": [{"weights": {"filings": 1}}, {"weights": {"news": -1, "web": 2}}]},
     r"sweep.mixes\[1\]: weights.news: must be >= 0, got -1"),
    ({"mixes": [{"group_weights": {"financial": 0, "public": 0}}]},
     r"sweep.mixes\[0\]: group_weights: all weights are zero"),
    ({"mixes": [{"weights": {"filings": 1}}, {"group_weights": {"public": 1}}]},
     r"sweep: mixes\[1\]: all mixes must use the same kind of weights"),
    ({"grid": {"group": "finance", "shares": [0.1, 0.9]}},
     r"sweep.grid.group: unknown group 'finance'; known: financial, public"),
    ({"grid": {"group": "financial", "shares": [0.1, 1.5]}}, r"sweep.grid: shares\[1\]: a share must lie in \[0, 1\]"),
    ({"grid": {"group": "financial", "shares": [0.331, 0.334]}}, r"sweep.grid: shares: each share once, at least 0.01 apart"),
    ({"grid": {"group": "financial", "shares": [0.1, 0.9]}, "random": {"count": 3}},
     r"sweep: give exactly one of `mixes`, `grid` or `random`, got grid, random"),
    ({"random": {"count": 3}, "proxy": {"train": {"stesp": 10}}},
     r"sweep.proxy.train.stesp: unknown key; did you mean `steps`\?"),
    ({"random": {"count": 3}, "proxy": {"train": {"steps": 10, "warmup_steps": 20}}},
     r"sweep.proxy.train: warmup_steps \(20\) must be smaller than steps \(10\)"),
    ({"random": {"count": 3}, "objective": {"minimise": "finance"}},
     r"sweep.objective.minimise: unknown group or corpus 'finance'"),
])
def test_bad_sweep_section_is_one_line_naming_the_field(tmp_path, sweep, message):
    with pytest.raises(DaptError, match=message):
        load_experiment(sweep_experiment(tmp_path, sweep))


def test_dapt_sweep_reports_bad_input_in_one_line(tmp_path):
    path = sweep_experiment(tmp_path, {"mixes": [{"weights": {"filings": 1, "bonds": 1}}]})
    assert_one_line_error(dapt_here("sweep", str(path)), "sweep.mixes[0].weights.bonds: unknown corpus 'bonds'")
    assert_one_line_error(dapt_here("sweep", str(write_experiment(tmp_path))), "no `sweep:` section; add one")
    path = sweep_experiment(tmp_path, {"grid": {"group": "financial", "shares": [0.2, 0.8]}, "tasks": ["sentiment.yaml"]})
    assert_one_line_error(dapt_here("sweep", str(path)), f"sweep.tasks: task file {tmp_path / 'sentiment.yaml'} does not exist")


def test_grid_keeps_the_other_groups_proportions_and_random_mixes_follow_the_seed(tmp_path):
    grid, _ = load_experiment(sweep_experiment(tmp_path, {"grid": {"group": "financial", "shares": [0.1, 0.9]}}))
    runs = design(grid, {"financial": 0.5, "public": 0.5})
    assert [(r.name, r.weights) for r in runs] == [("financial-0.10", {"financial": 0.1, "public": 0.9}),
                                                  ("financial-0.90", {"financial": 0.9, "public": 0.1})]
    base = {"filings": 0.4, "news": 0.1, "encyclopedia": 0.5, "web": 0.0}
    random, _ = load_experiment(sweep_experiment(tmp_path, {"random": {"count": 50, "concentration": 20}, "seed": 3}))
    draws = design(random, base)
    assert design(random, base) == draws and len({tuple(r.weights.values()) for r in draws}) == 50
    shares = np.array([list(r.weights.values()) for r in draws])
    assert np.allclose(shares.sum(axis=1), 1, atol=1e-5) and np.all(shares[:, 3] == 0), "a corpus left out stays out"
    assert np.allclose(shares.mean(axis=0), list(base.values()), atol=0.05), "draws centre on the base mix"


def test_proxy_run_is_a_complete_experiment_on_the_shared_tokenizer_and_stores(tmp_path):
    sweep = {"mixes": [{"weights": {"filings": 3, "web": 1}}], "proxy": TINY_PROXY}
    experiment, _ = load_experiment(sweep_experiment(tmp_path, sweep, wandb={"project": "p", "mode": "offline"}))
    run = design(experiment, dict.fromkeys(experiment.corpus_names(), 0.25))[0]
    path = run_dir(experiment, run) / "experiment.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(proxy_yaml(experiment, run))
    proxy, _ = load_experiment(path)
    assert proxy.mix.weights == {"filings": 0.75, "news": 0.0, "encyclopedia": 0.0, "web": 0.25}
    assert proxy.tokenizer_dir == experiment.tokenizer_dir and proxy.stores_dir == experiment.stores_dir
    assert proxy.workpath == sweep_dir(experiment) / "runs" / "mix-00" and proxy.sweep is None
    assert proxy.train.steps == 40 and proxy.train.lr == experiment.train.lr, "proxy overrides, the rest kept"
    assert proxy.model.config["hidden_size"] == 64
    assert (proxy.wandb.group, proxy.wandb.project) == (f"{experiment.name}-sweep", "p")


def test_proxy_runs_of_a_carried_over_model_share_one_carried_over_folder(tmp_path):
    """A sweep carries its base model over once, into the sweep's folder, not once per proxy run."""
    sweep = {"mixes": [{"weights": {"filings": 3, "web": 1}}, {"weights": {"filings": 1, "web": 3}}]}
    model = {"path": str(tmp_path), "embeddings": "transplant", "fit_new_rows": 20}
    experiment, _ = load_experiment(sweep_experiment(tmp_path, sweep, model=model))
    carried = set()
    for run in design(experiment, dict.fromkeys(experiment.corpus_names(), 0.25)):
        path = run_dir(experiment, run) / "experiment.yaml"
        path.parent.mkdir(parents=True)
        path.write_text(proxy_yaml(experiment, run))
        carried.add(load_experiment(path)[0].carried_over_dir)
    assert carried == {sweep_dir(experiment) / "carried-over"}


@pytest.mark.parametrize("law, model", [(lambda x: 1.0 + x @ [2.0, -1.0, 0.5], "linear"),
                                        (lambda x: np.exp(x @ [1.2, 0.1, 0.6]), "log-linear"),
                                        (lambda x: 2.0 * (x[:, 0] + 1e-3) ** -0.3 * (x[:, 1] + 1e-3) ** 0.1, "log-log")])
def test_fit_picks_the_law_the_runs_follow_and_predicts_held_out_runs(law, model):
    shares = np.random.default_rng(0).dirichlet(np.ones(3), size=8)
    fit = fit_domain("d", shares, law(shares))
    assert fit.model == model and fit.loo_mae < 1e-9 and fit.loo_r2 > 0.999999
    fresh = np.random.default_rng(1).dirichlet(np.ones(3), size=5)
    assert np.allclose(fit.predict(fresh), law(fresh))


def test_proposal_lowers_the_objective_within_the_tolerance():
    # financial BPB falls and public BPB rises with the financial share f (two groups: shares f, 1 - f)
    f = np.linspace(0.1, 0.9, 5)
    shares = np.stack([f, 1 - f], axis=1)
    fits = {"financial": fit_domain("financial", shares, 3.0 - 1.0 * f), "public": fit_domain("public", shares, 2.0 + 0.5 * f)}
    base = np.array([0.5, 0.5])
    proposal = propose(fits, shares, base, "financial", ["public"], tolerance=0.02, seed=0)
    # public may rise by 2% of 2.25 = 0.045, i.e. f by 0.09 over the base's 0.5
    assert proposal["shares"][0] == pytest.approx(0.59, abs=2e-3)
    assert proposal["predicted_bpb"]["public"] <= proposal["limits"]["public"] + 1e-12
    assert proposal["predicted_bpb"]["financial"] < proposal["base_predicted_bpb"]["financial"]
    assert propose(fits, shares, base, "public", ["financial"], 0.0, 0)["shares"][0] == pytest.approx(0.5, abs=2e-3)


def test_results_table_csv_plot_and_a_proposal_that_loads(tmp_path):
    experiment, _ = load_experiment(sweep_experiment(tmp_path, {"random": {"count": 7, "concentration": 4}}))
    base = dict.fromkeys(experiment.corpus_names(), 0.25)
    runs = design(experiment, base)
    own_share_gain = {"filings": 1.0, "news": 0.8, "encyclopedia": 0.6, "web": 0.9}
    for run in runs[:6]:  # six finished runs (4 weights + 2), one failed
        folder = run_dir(experiment, run)
        folder.mkdir(parents=True)
        corpora = {name: {"bpb_after": 3.0 - gain * run.weights[name]} for name, gain in own_share_gain.items()}
        (folder / "results.json").write_text(json.dumps({"corpora": corpora}))
    scored = {"tasks": [{"task": "sentiment", "accuracy": 0.75, "macro_f1": 0.5}]}
    (run_dir(experiment, runs[0]) / "eval_tasks.json").write_text(json.dumps(scored))
    run_dir(experiment, runs[6]).mkdir(parents=True)
    (run_dir(experiment, runs[6]) / "train.log").write_text("torchrun: exit code 1\n")

    summary = write_results(experiment, runs, base)
    folder = sweep_dir(experiment)
    rows = list(csv.DictReader(open(folder / "results.csv")))
    assert [r["status"] for r in rows] == ["done"] * 6 + ["failed"] and rows[6]["bpb:web"] == ""
    assert (rows[0]["task:sentiment/accuracy"], rows[0]["task:sentiment/macro_f1"]) == ("0.75", "0.5")
    assert rows[1]["task:sentiment/accuracy"] == "", "a run not scored has an empty cell"
    assert float(rows[0]["bpb:financial"]) == pytest.approx(
        3.0 - (1.0 * runs[0].weights["filings"] + 0.8 * runs[0].weights["news"]) / 2)
    assert (folder / "bpb_vs_share.png").stat().st_size > 10_000
    fits = summary["fit"]["fits"]
    assert fits["filings"]["model"] == "linear" and fits["filings"]["loo_mae"] < 1e-4  # shares rounded to 1e-6
    proposal, _ = load_experiment(folder / "proposal.yaml")
    weights = summary["fit"]["proposal"]["weights"]
    assert proposal.mix.weights == weights and proposal.train == experiment.train and proposal.sweep is None
    assert weights["filings"] + weights["news"] > 0.5, "the fit moves the mix towards the financial corpora"
    assert json.loads((folder / "results.json").read_text())["runs"][6]["status"] == "failed"


def test_a_run_whose_plan_is_refused_fails_alone_and_the_sweep_reports_it(tmp_path, built_experiment, capsys):
    # web is tiny at this scale: a mix of only web repeats it far past one epoch, filings alone does not
    sweep = {"mixes": [{"weights": {"web": 1}}, {"weights": {"filings": 1}}],
             "proxy": {"train": {"steps": 2000}} | {k: v for k, v in TINY_PROXY.items() if k != "train"}}
    mix = {"seq_len": 128, "group_weights": {"financial": 0.5, "public": 0.5}, "max_epochs": {"web": 1, "filings": 1}}
    path = sweep_experiment(tmp_path, sweep, built_experiment, mix=mix)
    with pytest.raises(DaptError, match=r"2 of 2 proxy run\(s\) failed \(mix-00, mix-01\); logs: .*mix-00/train.log"):
        run_sweep(path)
    experiment, _ = load_experiment(path)
    log = (sweep_dir(experiment) / "runs" / "mix-00" / "train.log").read_text()
    assert "mix.max_epochs.web: the plan repeats 'web'" in log
    assert "[2/2] mix-01" in capsys.readouterr().out, "the sweep went on after the first failure"
    assert [r["status"] for r in json.loads((sweep_dir(experiment) / "results.json").read_text())["runs"]] == ["failed"] * 2


def test_slurm_array_runs_each_proxy_run_with_its_own_launch_script(tmp_path, built_experiment):
    from dapt.launch.sweep import prepare_proxy
    from dapt.launch.sweep_slurm import array_script, run_script

    proxy = TINY_PROXY | {"slurm": {"partition": "cpu", "time": "0:30:00"}, "nproc": 2}
    path = sweep_experiment(tmp_path, {"grid": {"group": "financial", "shares": [0.2, 0.8]}, "proxy": proxy}, built_experiment)
    experiment, _ = load_experiment(path)
    scripts = [run_script(prepare_proxy(experiment, run)) for run in design(experiment, {"financial": 0.5, "public": 0.5})]
    text = array_script(experiment, scripts)
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    assert "#SBATCH --array=0-1" in text and "#SBATCH --partition=cpu" in text and "#SBATCH --time=0:30:00" in text
    assert text.count("#SBATCH --output=") == 1 and "/sweep/slurm/%A_%a.out" in text
    assert "#SBATCH --signal=B:USR1@" in text and "#SBATCH --requeue" in text, "each run checkpoints and requeues"
    assert 'exec bash "${scripts[$SLURM_ARRAY_TASK_ID]}"' in text
    for script, name in zip(scripts, ["financial-0.20", "financial-0.80"]):
        assert str(script) in text and script.parent.name == name
        assert f"runs/{name}/experiment.yaml" in script.read_text() and "--nproc-per-node=2" in script.read_text()
