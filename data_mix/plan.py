"""The mix plan, made before a GPU hour is spent: per corpus, what the run will draw.

Target share, tokens available, tokens drawn, epochs (repetitions), and the step at
which the corpus is first exhausted (its second epoch begins). A plan that repeats a
corpus past its `max_epochs` is refused; past 4 epochs it is flagged, since returns
from repeated data diminish there (Muennighoff et al. 2023, "Scaling Data-Constrained
Language Models"). `plot_plan` draws the shares over training and the epochs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dapt.data_mix.batches import BatchSizes
from dapt.data_mix.blend import MixSchedule
from dapt.data_mix.config import CorpusConfig, MixConfig
from dapt.base import DaptError
from dapt.figures import pyplot, save_figure

DIMINISHING_EPOCHS = 4.0


@dataclass
class PlanRow:
    corpus: str
    group: str
    share: float  # of the whole run
    available_samples: int
    samples: int
    first_exhausted_step: int | None

    @property
    def epochs(self) -> float:
        return self.samples / self.available_samples if self.available_samples else 0.0


def plan(schedule: MixSchedule, corpora: list[CorpusConfig], mix: MixConfig, batches: BatchSizes, steps: int) -> list[PlanRow]:
    """Samples and epochs per corpus for the whole run; refuses repetition past `max_epochs`."""
    total = batches.first_sample(steps)
    counts = schedule.counts_before(total)
    rows = []
    for index, corpus in enumerate(corpora):
        available = schedule.samples_per_corpus[index]
        exhausted = None
        if counts[index] > available:
            exhausted = batches.step_of(_first_sample_past(schedule, index, available, total))
        rows.append(PlanRow(corpus.name, corpus.group, int(counts[index]) / total, available, int(counts[index]), exhausted))
    for row in rows:
        cap = mix.max_epochs.get(row.corpus)
        if cap is not None and row.epochs > cap:
            raise DaptError(
                f"mix.max_epochs.{row.corpus}: the plan repeats '{row.corpus}' {row.epochs:.2f} times "
                f"but at most {cap:g} are allowed; lower its weight, shorten the run or raise the cap"
            )
    return rows


def _first_sample_past(schedule: MixSchedule, corpus: int, available: int, total: int) -> int:
    """The global index of the corpus's (available+1)-th draw: bisection on its monotone count."""
    low, high = 0, total  # counts_before(low) <= available < counts_before(high)
    while high - low > 1:
        middle = (low + high) // 2
        if schedule.counts_before(middle)[corpus] > available:
            high = middle
        else:
            low = middle
    return low


def worst_prefix_deviation(corpus_ids: np.ndarray, shares: np.ndarray, chunk: int = 100_000) -> float:
    """max over prefixes n and corpora i of |count_i(n) − share_i·n|, in bounded memory."""
    shares = np.asarray(shares, dtype=np.float64)
    counts = np.zeros(len(shares))
    worst = 0.0
    for start in range(0, len(corpus_ids), chunk):
        ids = np.asarray(corpus_ids[start : start + chunk], dtype=np.int64)
        cumulative = counts + np.cumsum(np.eye(len(shares))[ids], axis=0)
        targets = np.outer(np.arange(start + 1, start + len(ids) + 1), shares)
        worst = max(worst, float(np.abs(cumulative - targets).max()))
        counts = cumulative[-1]
    return worst


def format_plan(rows: list[PlanRow], seq_len: int) -> str:
    lines = [f"{'corpus':<14}{'group':<12}{'share':>8}{'tokens avail.':>15}{'tokens drawn':>15}{'epochs':>8}  exhausted at step"]
    for row in rows:
        lines.append(
            f"{row.corpus:<14}{row.group:<12}{row.share:>8.2%}{row.available_samples * seq_len:>15,}"
            f"{row.samples * seq_len:>15,}{row.epochs:>8.2f}  {'-' if row.first_exhausted_step is None else f'{row.first_exhausted_step:,}'}"
        )
    for row in rows:
        if row.epochs > DIMINISHING_EPOCHS:
            lines.append(f"warning: '{row.corpus}' is repeated {row.epochs:.1f} times; returns diminish past "
                         f"{DIMINISHING_EPOCHS:g} epochs (Muennighoff et al. 2023)")
    return "\n".join(lines)


def plot_plan(schedule: MixSchedule, rows: list[PlanRow], batches: BatchSizes, steps: int, path: Path,
              learning_rates: np.ndarray | None = None) -> Path:
    """The mix over training (with the learning rate of every step over it, where given) and each
    corpus's repetition."""
    plt = pyplot()

    figure, (shares_axis, epochs_axis) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    starts = [batches.step_of(stage.start) for stage in schedule.stages] + [steps]
    bottom = [0.0] * len(schedule.stages)
    for index, name in enumerate(schedule.names):
        heights = [float(stage.shares[index]) for stage in schedule.stages]
        for stage_index in range(len(schedule.stages)):
            shares_axis.fill_between(starts[stage_index : stage_index + 2], bottom[stage_index],
                                     bottom[stage_index] + heights[stage_index], color=f"C{index}",
                                     label=name if stage_index == 0 else None, step="post")
        bottom = [b + h for b, h in zip(bottom, heights)]
    shares_axis.set(xlim=(0, steps), ylim=(0, 1), xlabel="training step", ylabel="share of tokens", title="Mix over training")
    handles, labels = shares_axis.get_legend_handles_labels()
    if learning_rates is not None:  # step s over [s - 1, s], as the shares are drawn
        lr_axis = shares_axis.twinx()
        line = lr_axis.stairs(learning_rates, np.arange(steps + 1), color="black", linewidth=1.5, baseline=None)
        lr_axis.set(ylim=(0, learning_rates.max() * 1.05), ylabel="learning rate")
        handles, labels = [*handles, line], [*labels, "learning rate"]
    shares_axis.legend(handles, labels, loc="center left", fontsize=8,
                       bbox_to_anchor=(1.16 if learning_rates is not None else 1.0, 0.5))
    epochs_axis.barh([row.corpus for row in rows], [row.epochs for row in rows], color=[f"C{i}" for i in range(len(rows))])
    epochs_axis.axvline(DIMINISHING_EPOCHS, color="grey", linestyle="--", label=f"{DIMINISHING_EPOCHS:g} epochs")
    epochs_axis.invert_yaxis()
    epochs_axis.set(xlabel="epochs (times each corpus is seen)", title="Repetition per corpus")
    epochs_axis.legend(fontsize=8)
    return save_figure(figure, path)
