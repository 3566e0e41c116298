"""Downstream few-shot tasks through lm-evaluation-harness: a known answer, the split, bad task files."""

import json
import random
from pathlib import Path

import pytest
import torch

from dapt.base import DaptError
from dapt.pretrain.tasks import load_task, read_examples, split_examples

EXAMPLE_TASK = Path(__file__).resolve().parents[2] / "configs" / "tasks" / "headline_sentiment.yaml"
TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 256}


def teach_the_mapping(model, tokenizer, task, train: list[dict], steps: int) -> None:
    """A plain torch loop on 3-shot strings of the train split, the loss on the label words only."""
    words = list(task.label_words.values())
    rng = random.Random(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small gains nothing from more, and loses much on a busy machine
    for _ in range(steps):
        sequences = []
        for _ in range(16):
            ids, labels = [], []
            for index, example in enumerate(rng.sample(train, 3)):
                prompt = tokenizer(("\n\n" if index else "") + task.prompt.format(text=example["text"]),
                                   add_special_tokens=False).input_ids
                answer = tokenizer(" " + words[example["label"]], add_special_tokens=False).input_ids
                ids += prompt + answer
                labels += [-100] * len(prompt) + answer
            sequences.append((ids, labels))
        width = max(len(ids) for ids, _ in sequences)
        input_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids, _ in sequences])
        labels = torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in sequences])
        model(input_ids=input_ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    torch.set_num_threads(threads)


def test_the_split_follows_the_text_not_the_file_order(tmp_path):
    task = load_task(EXAMPLE_TASK)
    examples = read_examples(task)
    shuffled = tmp_path / "shuffled.jsonl"
    lines = Path(task.data).read_text().splitlines()
    random.Random(3).shuffle(lines)
    shuffled.write_text("\n".join(lines) + "\n")
    moved = task.model_copy(update={"data": str(shuffled)})
    train, test = split_examples(task, examples)
    assert split_examples(moved, read_examples(moved)) == (train, test)
    assert {e["text"] for e in train}.isdisjoint(e["text"] for e in test)
    assert len({e["label"] for e in test}) == 3  # a file sorted by label still gives every label to test


def write_task(folder: Path, rows: str, suffix: str = ".jsonl", **fields) -> Path:
    (folder / f"rows{suffix}").write_text(rows)
    task = {"name": "toy", "data": f"rows{suffix}", "label_words": {"up": "up", "down": "down"}, **fields}
    path = folder / "task.yaml"
    path.write_text(json.dumps(task, indent=1))  # one field a line (JSON is YAML), so errors name lines
    return path


@pytest.mark.parametrize("rows, suffix, message", [
    ('{"text": "shares rose", "label": "up"}\n{"text": "shares fell"}\n', ".jsonl",
     r"rows.jsonl:2: missing label \(field 'label'\)"),
    ('{"text": "shares rose", "label": "up"}\n\n{"text": "flat", "label": "flat"}\n', ".jsonl",
     r"rows.jsonl:3: label 'flat' has no label words; label_words covers up, down"),
    ("text,label\nshares rose,up\n\"shares\nfell\",\n", ".csv", r"rows.csv:4: missing label"),
    ('{"text": "shares rose", "label": "up"}\n{"text": "", "label": "up"}\n', ".jsonl", r"rows.jsonl:2: no text"),
])
def test_a_bad_row_is_one_error_naming_file_and_line(tmp_path, rows, suffix, message):
    task = load_task(write_task(tmp_path, rows, suffix))
    with pytest.raises(DaptError, match=message):
        read_examples(task)


def test_a_bad_task_file_names_the_field(tmp_path):
    with pytest.raises(DaptError, match=r"task.yaml:8: shots: Input should be greater than or equal to 0"):
        load_task(write_task(tmp_path, "", shots=-1))
    with pytest.raises(DaptError, match=r"task.yaml:8: label_word: unknown key; did you mean `label_words`\?"):
        load_task(write_task(tmp_path, "", label_word="x"))


def test_two_tasks_of_one_name_are_refused(tmp_path):
    from dapt.pretrain.tasks import evaluate_tasks

    rows = "".join(json.dumps({"text": f"shares {verb} {n}%", "label": label}) + "\n"
                   for n in range(10) for verb, label in (("rose", "up"), ("fell", "down")))
    task = write_task(tmp_path, rows, shots=1)
    with pytest.raises(DaptError, match=r"task.yaml: name: 'toy' is already the name of another task given"):
        evaluate_tasks([task, task], tmp_path, tmp_path)


def test_dapt_eval_tasks_reports_a_bad_row_as_one_line(tmp_path, capsys):
    from dapt.launch.cli import main
    from tests.conftest import shipped_config

    task = write_task(tmp_path, '{"text": "shares rose", "label": "up"}\n{"text": "shares fell", "label": "sideways"}\n')
    assert main(["eval", str(shipped_config(tmp_path)), "--tasks", str(task), "--model", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"{tmp_path / 'rows.jsonl'}:2: label 'sideways' has no label words" in error


def test_task_scores_join_the_experiments_wandb_run(tmp_path):
    """Offline, a folder with the run's id whose summary holds the scores."""
    from dapt.experiment import load_experiment
    from dapt.pretrain.tasks import log_tasks
    from tests.conftest import offline_run_records, write_experiment

    experiment, _ = load_experiment(write_experiment(tmp_path, {"workdir": "run"}))  # which makes the workdir
    experiment.results_file.write_text(json.dumps({"wandb_run_id": "abc123"}))
    log_tasks(experiment, {"model": "m", "tasks": [{"task": "toy", "shots": 2, "items": 10, "accuracy": 0.8,
                                                   "macro_f1": 0.75, "chance": 0.5}]})
    run_dir = next((experiment.workpath / "wandb").glob("offline-run-*-abc123"))
    summary = {}
    for record in offline_run_records(run_dir):
        if record["type"] == "summary":
            summary |= record["summary"]["update"]
    assert summary["tasks/toy/accuracy"] == 0.8 and summary["tasks/toy/macro_f1"] == 0.75
