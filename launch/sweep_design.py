"""The design of a sweep, pure: its proxy runs (names and mixes), where each run lives, and the
experiment file each run is. What runs them (`sweep`), what reads their results
(`sweep_results`) and the Slurm job array (`sweep_slurm`) all build on this.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from dapt.data_mix.blend import target_shares
from dapt.data_mix.store import experiment_stores
from dapt.experiment import Experiment


@dataclass(frozen=True)
class ProxyRun:
    name: str
    weights: dict[str, float]
    """Normalised shares of the sweep's components (groups or corpora, see `SweepConfig.level`)."""


def sweep_dir(experiment: Experiment) -> Path:
    return experiment.workpath / "sweep"


def run_dir(experiment: Experiment, run: ProxyRun) -> Path:
    return sweep_dir(experiment) / "runs" / run.name


def components(experiment: Experiment) -> list[str]:
    """The names the sweep's weights are given over: groups (in corpus order) or corpora."""
    if experiment.sweep.level == "group":
        return list(experiment.groups())
    return experiment.corpus_names()


def base_weights(experiment: Experiment) -> dict[str, float]:
    """The experiment's own mix as shares of the sweep's components: the reference the
    proposal must not be worse than, and the centre of random mixes. Natural and tempered
    shares are counted on the built training stores, as training does."""
    stores = experiment_stores(experiment, "train")
    sizes = {name: len(store.tokens) for name, store in stores.items()}
    shares = target_shares(experiment.mix, experiment.corpora, sizes, experiment.mix.temperature)
    if experiment.sweep.level == "corpus":
        return shares
    return {group: sum(shares[name] for name in members) for group, members in experiment.groups().items()}


def design(experiment: Experiment, base: dict[str, float]) -> list[ProxyRun]:
    """The proxy runs of the sweep, named so that a rerun finds the same folders."""
    sweep = experiment.sweep
    if sweep.grid is not None:
        group, others = sweep.grid.group, [g for g in base if g != sweep.grid.group]
        rest = sum(base[g] for g in others)
        runs = []
        for share in sweep.grid.shares:  # the other groups keep their proportions of the base mix
            split = {g: (base[g] / rest if rest > 0 else 1 / len(others)) * (1 - share) for g in others}
            runs.append(ProxyRun(f"{group}-{share:.2f}", _normalised({group: share, **split}, base)))
        return runs
    if sweep.mixes is not None:
        return [ProxyRun(f"mix-{i:02d}", _normalised(mix.weights or mix.group_weights, base))
                for i, mix in enumerate(sweep.mixes)]
    names = [name for name, share in base.items() if share > 0]  # a corpus left out of the base mix stays out
    alpha = sweep.random.concentration * np.array([base[n] for n in names]) / sum(base[n] for n in names)
    draws = np.random.default_rng(sweep.seed).dirichlet(alpha, size=sweep.random.count)
    return [ProxyRun(f"random-{i:02d}", _normalised(dict(zip(names, draw.tolist())), base))
            for i, draw in enumerate(draws)]


def _normalised(weights: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    total = sum(weights.values())
    return {name: round(weights.get(name, 0.0) / total, 6) for name in base}


def with_mix(experiment: Experiment, weights: dict[str, float], name: str, workdir: Path) -> dict:
    """The experiment as a plain dict with another mix, reading the sweep's tokenizer and stores."""
    data = experiment.model_dump(mode="json", exclude={"sweep"}, exclude_defaults=True)
    mix = {key: value for key, value in data.get("mix", {}).items()
           if key not in ("weights", "group_weights", "stages", "budgets")}  # this mix holds for the whole run
    mix["group_weights" if experiment.sweep.level == "group" else "weights"] = weights
    return data | {"name": name, "workdir": str(workdir), "tokenizer": {"path": str(experiment.tokenizer_dir)},
                   "stores": str(experiment.stores_dir), "mix": mix}


def proxy_yaml(experiment: Experiment, run: ProxyRun) -> str:
    """The proxy run as a complete experiment file: the experiment with the run's mix and
    the proxy's model and budget, in the sweep's W&B group."""
    proxy, folder = experiment.sweep.proxy, run_dir(experiment, run)
    data = with_mix(experiment, run.weights, f"{experiment.name}-{run.name}", folder)
    data["train"] |= proxy.train
    data["wandb"] = experiment.wandb.model_dump(mode="json") | {"group": wandb_group(experiment)}
    if proxy.model is not None:
        data["model"] = proxy.model.model_dump(mode="json", exclude_defaults=True)
    if data["model"].get("embeddings"):  # one carried-over model for every run, not a copy each
        data["model"]["carried_over"] = str(sweep_dir(experiment) / "carried-over")
    if proxy.deepspeed is not None:
        data["deepspeed"] = proxy.deepspeed
    if proxy.nproc is not None or proxy.slurm is not None:  # where `dapt launch` and `--slurm` read them
        launch = data.setdefault("launch", {})
        if proxy.nproc is not None:
            launch["nproc_per_node"] = proxy.nproc
        if proxy.slurm is not None:
            launch["slurm"] = proxy.slurm.model_dump(mode="json", exclude_defaults=True)
    header = (f"# Proxy run {run.name!r} of the sweep in {sweep_dir(experiment)} (written by `dapt sweep`).\n"
              f"# Rerun it alone with: dapt launch local {folder / 'experiment.yaml'}\n")
    return header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def wandb_group(experiment: Experiment) -> str:
    """All proxy runs of a sweep share one W&B group, so that W&B compares them side by side."""
    return experiment.wandb.group or f"{experiment.name}-sweep"
