"""`dapt eval --tasks`: downstream few-shot classification, scored the way BloombergGPT did.

In: a task file (YAML) naming a labelled JSONL/CSV file, the prompt and the words each
label reads as; a Hugging Face model directory. Out: accuracy and macro-F1 per task,
a table, and `<workdir>/eval_tasks.json`.

EleutherAI's lm-evaluation-harness does the scoring: each task becomes a generated
lm-eval task (`<workdir>/eval_tasks/<task>/`, rerunnable with `lm_eval --include_path`)
of type multiple_choice, so every label's words are scored by log-likelihood after a
k-shot prompt. Train/test split and test subsample go by a hash of the text, never by
file order (labelled files are often sorted by label); few-shot examples come from
the train split only. lm-eval's `f1` is binary, so the task uses `task_metrics.macro_f1`,
copied into the folder so that lm-eval alone reruns it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import yaml
from pydantic import Field, ValidationError

from dapt.base import DaptError, StrictModel
from dapt.config_file import config_error, read_yaml


class TaskConfig(StrictModel):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_\-]+$")
    """Names the task in tables, W&B and eval_tasks.json."""
    data: str
    """A JSONL or CSV file of labelled examples, relative to the task file."""
    text_field: str = "text"
    label_field: str = "label"
    label_words: dict[str, str] = Field(min_length=2)
    """What each label reads as after the prompt (scored by log-likelihood), e.g. {positive: up}."""
    prompt: str = "{text}\nAnswer:"
    """Put before the label words; `{text}` is the example's text."""
    label_delimiter: str = " "
    """Between the prompt and the label words."""
    shots: int = Field(default=5, ge=0)
    """Examples from the train split shown before each test item."""
    test_fraction: float = Field(default=0.5, gt=0, lt=1)
    """Share of examples (by a hash of the text) scored; the rest supply the shots."""
    max_test_items: int | None = Field(default=None, ge=1)
    """Score at most this many test items (the lowest hashes, so the same ones every time)."""


def load_task(path: Path) -> TaskConfig:
    data, root, _ = read_yaml(path, "task")
    try:
        config = TaskConfig.model_validate(data or {})
    except ValidationError as err:
        raise config_error(err, TaskConfig, path, root) from None
    return config.model_copy(update={"data": str((path.parent / config.data).resolve())})


def read_examples(task: TaskConfig) -> list[dict]:
    """Every example as {text, label (index into label_words)}; a bad row stops with its file and line."""
    path, labels = Path(task.data), list(task.label_words)
    if not path.is_file():
        raise DaptError(f"{task.name}: data file {path} does not exist")
    examples = []
    for line, row in _rows(path):
        text, label = row.get(task.text_field), row.get(task.label_field)
        if not isinstance(text, str) or not text.strip():
            raise DaptError(f"{path}:{line}: no text in field {task.text_field!r}")
        if label is None or str(label).strip() == "":
            raise DaptError(f"{path}:{line}: missing label (field {task.label_field!r})")
        if str(label) not in task.label_words:
            raise DaptError(f"{path}:{line}: label {label!r} has no label words; label_words covers {', '.join(labels)}")
        examples.append({"text": text, "label": labels.index(str(label))})
    if not examples:
        raise DaptError(f"{path}: no examples")
    return examples


def _rows(path: Path):
    """(line number, record) of a JSONL or CSV file."""
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            for row in reader:
                yield reader.line_num, row
        return
    if path.suffix != ".jsonl":
        raise DaptError(f"{path}: task data must be .jsonl or .csv")
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DaptError(f"{path}:{number}: not a JSON record ({err.msg})") from None
                if not isinstance(record, dict):
                    raise DaptError(f"{path}:{number}: not a JSON object")
                yield number, record


def _position(text: str) -> float:
    """Where the text falls in [0, 1) by its hash: the same split whatever the file order."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64


def split_examples(task: TaskConfig, examples: list[dict]) -> tuple[list[dict], list[dict]]:
    """(train, test): test is the examples hashing below test_fraction, capped at max_test_items."""
    ranked = sorted(examples, key=lambda e: _position(e["text"]))
    test = [e for e in ranked if _position(e["text"]) < task.test_fraction][: task.max_test_items]
    train = [e for e in ranked if _position(e["text"]) >= task.test_fraction]
    if not test or len(train) < task.shots:
        raise DaptError(f"{task.name}: {len(examples)} examples give {len(test)} test and {len(train)} train items; "
                        f"a test item and {task.shots} shots need more examples or another test_fraction")
    return train, test


def write_lm_eval_task(task: TaskConfig, train: list[dict], test: list[dict], folder: Path) -> str:
    """The lm-eval task folder (YAML, utils.py, the two splits); returns the task's lm-eval name."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, examples in (("train", train), ("test", test)):
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            for example in examples:
                handle.write(json.dumps({**example, "prompt": task.prompt.format(text=example["text"])}) + "\n")
    name = f"dapt_{task.name}"
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {s: str((folder / f"{s}.jsonl").resolve()) for s in ("train", "test")}},
        "training_split": "train",
        "fewshot_split": "train",
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "prompt",
        "doc_to_choice": list(task.label_words.values()),
        "doc_to_target": "label",
        "target_delimiter": task.label_delimiter,
        "num_fewshot": task.shots,
    }
    # `!function` is lm-eval's own YAML tag; it loads utils.py from this folder.
    metrics = ("metric_list:\n  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
               "  - {metric: f1, aggregation: !function utils.macro_f1, higher_is_better: true}\n")
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True) + metrics,
                                         encoding="utf-8")
    shutil.copyfile(Path(__file__).with_name("task_metrics.py"), folder / "utils.py")
    return name


# Completions read as labels when a corpus has at most this many different ones.
MAX_RECORD_LABELS = 50


def record_task(experiment, name: str, shots: int | None) -> tuple[TaskConfig, list[dict], list[dict]]:
    """The held-out records of the experiment's prompt/completion corpus `name`, whose completions are
    labels, as a classification task: each held-out record's prompt, its completion among every
    completion the corpus has (scored by log-likelihood right after the prompt, as trained). The held-out
    records are those its store holds out; shots (default none) come from its training records."""
    from dapt.data_mix.report import kept_records
    from dapt.data_mix.sources import CorpusReader
    from dapt.data_mix.split import heldout_part

    corpus = next((c for c in experiment.corpora if c.name == name), None)
    if corpus is None or corpus.record_format != "prompt_completion":
        known = [c.name for c in experiment.corpora if c.record_format == "prompt_completion"]
        raise DaptError(f"--records {name}: not a corpus of `record_format: prompt_completion` in the experiment "
                        f"(those: {', '.join(known) or 'none'})")
    records = [d for d in kept_records(CorpusReader(corpus), experiment.tokenizer_dir)]
    labels = sorted({d.value.completion for d in records})
    if len(labels) > MAX_RECORD_LABELS:
        raise DaptError(f"--records {name}: its records have {len(labels):,} different completions; records are "
                        f"scored as a classification whose labels are the completions (at most {MAX_RECORD_LABELS})")
    held = set(heldout_part([d.digest for d in records], experiment.heldout))
    examples = [{"text": d.value.prompt, "label": labels.index(d.value.completion)} for d in records]
    task = TaskConfig(name=re.sub(r"[^A-Za-z0-9_\-]", "_", name), data=str(corpus.paths[0] if corpus.paths else name),
                      label_words={label: label for label in labels}, prompt="{text}", label_delimiter="",
                      shots=shots or 0)
    train = [e for i, e in enumerate(examples) if i not in held]
    test = [examples[i] for i in sorted(held)]
    if not test or len(train) < task.shots:
        raise DaptError(f"--records {name}: {len(test)} held-out and {len(train)} training records; a test item and "
                        f"{task.shots} shots need more records or another `heldout.fraction`")
    return task, train, test


def evaluate_tasks(task_files: list[Path], model_dir: Path, workdir: Path, shots: int | None = None,
                   batch_size: int = 8, record_tasks: list[tuple[TaskConfig, list[dict], list[dict]]] = ()) -> dict:
    """Score every task (those of `task_files`, and `record_tasks` made by `record_task`) on the model
    with lm-eval; writes and returns `eval_tasks.json`'s content."""
    tasks, folders, chances = {}, [], {}
    given = []
    for path in task_files:
        task = load_task(Path(path))
        if shots is not None:
            task = task.model_copy(update={"shots": shots})
        given.append((path, (task, *split_examples(task, read_examples(task)))))
    given += [(f"--records {prepared[0].name}", prepared) for prepared in record_tasks]
    for where, (task, train, test) in given:
        if task.name in chances:
            raise DaptError(f"{where}: name: {task.name!r} is already the name of another task given; names must be unique")
        folder = workdir / "eval_tasks" / task.name
        tasks[write_lm_eval_task(task, train, test, folder)] = task
        folders.append(str(folder))
        chances[task.name] = max(Counter(e["label"] for e in test).values()) / len(test)
    if not (model_dir / "config.json").exists():
        raise DaptError(f"{model_dir} is not a Hugging Face model directory (no config.json); run `dapt export` first")
    # Everything is local; the hub must not be asked about the model or the JSON "dataset".
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    truncated = _TruncationCounter()
    hf_logger = logging.getLogger("lm_eval.models.huggingface")
    hf_logger.addFilter(truncated)
    try:
        output = simple_evaluate(
            model="hf", model_args={"pretrained": str(model_dir), "dtype": "float32"}, tasks=list(tasks),
            device="cuda" if _cuda() else "cpu", batch_size=batch_size, log_samples=False, verbosity="WARNING",
            task_manager=TaskManager(include_path=folders, include_defaults=False),
        )
    finally:
        hf_logger.removeFilter(truncated)
    rows = []
    for name, task in tasks.items():
        scores = output["results"][name]
        rows.append({"task": task.name, "shots": task.shots, "items": output["n-samples"][name]["effective"],
                     "accuracy": scores["acc,none"], "macro_f1": scores["f1,none"], "chance": chances[task.name],
                     "labels": task.label_words})
    results = {"model": str(model_dir), "tasks": rows, "truncated_prompts": truncated.count}
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "eval_tasks.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    return results


class _TruncationCounter(logging.Filter):
    """lm-eval warns once per scored option whose prompt is longer than the model's context
    (and cut from the left); counted here and reported once, instead of a line each."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if "exceeds model's maximum length" in record.getMessage():
            self.count += 1
            return False
        return True


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def log_tasks(experiment, results: dict) -> None:
    """Into the experiment's W&B run, when training has recorded one (results.json)."""
    from dapt.pretrain.tracking import add_to_run

    if not experiment.results_file.exists():
        return
    run_id = json.loads(experiment.results_file.read_text()).get("wandb_run_id")
    if run_id is None:
        return
    summary = {f"tasks/{row['task']}/{metric}": row[metric] for row in results["tasks"] for metric in ("accuracy", "macro_f1")}
    columns = ["task", "shots", "items", "accuracy", "macro_f1", "chance"]
    add_to_run(experiment.workpath, experiment.wandb, run_id, summary,
               ("tasks/results", columns, [[row[c] for c in columns] for row in results["tasks"]]))
    print(f"logged to W&B run {run_id} ({experiment.wandb.mode})")


def format_tasks(results: dict) -> str:
    lines = [f"{'task':<24}{'shots':>6}{'items':>7}{'accuracy':>10}{'macro-F1':>10}{'chance':>8}"]
    for row in results["tasks"]:
        lines.append(f"{row['task']:<24}{row['shots']:>6}{row['items']:>7}{row['accuracy']:>10.3f}"
                     f"{row['macro_f1']:>10.3f}{row['chance']:>8.3f}")
    if results.get("truncated_prompts"):
        lines.append(f"note: {results['truncated_prompts']} scored options had a prompt longer than the model's context; "
                     f"lm-eval cut them from the left (fewer --shots avoids it)")
    return "\n".join(lines)
