"""Held-out bits-per-byte at step 0 of a base model carried over to a domain tokenizer
(`model.embeddings: transplant`), against the same model with its new rows drawn at random.

For each setting, on financial held-out text, before any training:
  base         the base model with its own tokenizer
  transplant   carried over by dapt: shared pieces copied, new rows the mean of their pieces' base rows
  random       the same, but the new rows drawn as the model's initializer draws them (N(0, initializer_range²))
  resize draw  the same, but the new rows drawn as `resize_token_embeddings` draws them by default
               (a normal with the trained rows' mean and covariance)
  ratio        (transplant − base) ÷ (random − base): the share of the random rows' loss the carry-over keeps
               (and the same against the resize draw)
  fitted       (with --base-model) the carried-over model after `model.fit_new_rows: 20`: its new rows alone
               fitted on 20 × 8 windows of 256 tokens of the financial training text, and its ratio to base

Without arguments it builds its settings from the demo corpora: a general base tokenizer and a
small Llama trained on public text with a little finance (the tests' stand-in for a pretrained
model), and a domain tokenizer trained on the demo's mix, for two tokenizer models and two
model sizes. With `--base-model`, it measures one real model instead, carried over to each
tokenizer given (a domain tokenizer for `transplant`, a grown one for `extend`):

    python bench/transplant.py
    python bench/transplant.py --base-model DIR [--domain-tokenizer DIR ...] [--texts held_out.txt] [--window 2048]

(`--texts`: one document per line, by default the demo corpora's financial held-out documents;
the base tokenizer is read from the model's folder. Without `--domain-tokenizer`, dapt's
tokenizer stage makes two on the demo corpora, as `dapt tokenizer train` does for an experiment
with that base model: a domain tokenizer (`transplant`) and the base one grown on the financial
corpora (`extend`).)
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dapt.data_mix.demo_corpora import write_demo_corpora  # noqa: E402
from tests.conftest import write_experiment  # noqa: E402
from tests.test_transplant import draw_new_rows, heldout_bpb, tiny_llama, train_base_model  # noqa: E402
from dapt.tokenizer.config import TokenizerTrainConfig  # noqa: E402
from dapt.pretrain.new_rows import FIT_BATCH, fit_new_rows  # noqa: E402
from dapt.tokenizer.transplant import carry_over  # noqa: E402

FIT_STEPS, FIT_WINDOW = 20, 256  # model.fit_new_rows: 20, mix.seq_len: 256


@dataclass
class Setting:
    name: str
    tokenizer: dict
    base_financial_weight: float  # each financial corpus's weight in the base tokenizer's and model's text (public: 0.4 each)
    hidden: int
    layers: int
    steps: int


SETTINGS = [
    Setting("test's setting: unigram 800, Llama 64x2, 150 steps", {"vocab_size": 800}, 0.05, 64, 2, 150),
    Setting("unigram 800, Llama 256x4, 300 steps", {"vocab_size": 800}, 0.05, 256, 4, 300),
    Setting("BPE 1500, Llama 64x2, 600 steps", {"vocab_size": 1500, "model": "bpe"}, 0.03, 64, 2, 600),
    Setting("BPE 1500, Llama 256x4, 600 steps", {"vocab_size": 1500, "model": "bpe"}, 0.03, 256, 4, 600),
]


def resize_draw(base_model, count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` new input and output rows as transformers' `resize_token_embeddings` draws them by default."""
    grown = copy.deepcopy(base_model)
    torch.manual_seed(seed)
    grown.resize_token_embeddings(base_model.get_input_embeddings().num_embeddings + count)
    return grown.get_input_embeddings().weight[-count:].detach(), grown.get_output_embeddings().weight[-count:].detach()


def text_windows(tokenizer, lines: list[str], steps: int = FIT_STEPS, length: int = FIT_WINDOW) -> torch.Tensor:
    """Random windows of the training text, as `fit_windows` cuts them from the stores."""
    ids = torch.tensor([i for line in lines for i in [*tokenizer(line, add_special_tokens=False)["input_ids"],
                                                      tokenizer.eos_token_id]])
    starts = torch.randint(0, len(ids) - length - 1, (steps * FIT_BATCH,), generator=torch.Generator().manual_seed(0))
    return torch.stack([ids[s:s + length + 1] for s in starts])


def measure(base_model, base_tokenizer, domain_tokenizer, texts: list[str], window: int | None,
            base_bpb: float | None = None, fit_lines: list[str] | None = None) -> dict:
    """The step-0 figures of one base model, tokenizer pair and held-out text (`base_bpb`: the base
    model's own figure on `texts`, when measured already; `fit_lines`: training text to fit the new
    rows on, as `model.fit_new_rows` does)."""
    figures = {"base": base_bpb or heldout_bpb(base_model, base_tokenizer, texts, window)}
    carried = copy.deepcopy(base_model)
    plan = carry_over(carried, base_tokenizer, domain_tokenizer)
    new = set(plan.averaged)
    tokens = [i for text in texts for i in domain_tokenizer(text, add_special_tokens=False)["input_ids"]]
    figures.update(new_rows=len(new), rows=len(domain_tokenizer), new_share=sum(i in new for i in tokens) / len(tokens))
    figures["transplant"] = heldout_bpb(carried, domain_tokenizer, texts, window)
    if fit_lines:
        fitted = copy.deepcopy(carried)
        fit_new_rows(fitted, plan.averaged, text_windows(domain_tokenizer, fit_lines))
        figures["fitted"] = heldout_bpb(fitted, domain_tokenizer, texts, window)
        del fitted
    drawn_in, drawn_out = resize_draw(base_model, len(plan.averaged))
    with torch.no_grad():
        carried.get_input_embeddings().weight[plan.averaged] = drawn_in
        if carried.get_output_embeddings().weight is not carried.get_input_embeddings().weight:
            carried.get_output_embeddings().weight[plan.averaged] = drawn_out
    figures["resize draw"] = heldout_bpb(carried, domain_tokenizer, texts, window)
    draw_new_rows(carried, plan.averaged, base_model.config.initializer_range)
    figures["random"] = heldout_bpb(carried, domain_tokenizer, texts, window)
    for baseline in ("random", "resize draw"):
        figures[f"ratio to {baseline}"] = (figures["transplant"] - figures["base"]) / (figures[baseline] - figures["base"])
    return figures


def demo_setting(setting: Setting, experiment, folder: Path) -> dict:
    from transformers import AutoTokenizer

    from dapt.tokenizer.evaluate import heldout_texts
    from dapt.tokenizer.train import draw_sample, train_from_sample

    general = {c.name: 0.4 if c.group == "public" else setting.base_financial_weight for c in experiment.corpora}
    general_lines = draw_sample(experiment.corpora, general, experiment.heldout, 4.0e5)
    domain_lines = draw_sample(experiment.corpora, {c.name: 0.25 for c in experiment.corpora}, experiment.heldout, 4.0e5)
    train_from_sample(general_lines, TokenizerTrainConfig(**setting.tokenizer), folder / "base")
    train_from_sample(domain_lines, TokenizerTrainConfig(**setting.tokenizer), folder / "domain")
    base_tokenizer, domain_tokenizer = (AutoTokenizer.from_pretrained(folder / name) for name in ("base", "domain"))
    torch.manual_seed(0)
    model = tiny_llama(base_tokenizer, tied=False, hidden=setting.hidden, layers=setting.layers)
    train_base_model(model, base_tokenizer, general_lines, setting.steps)
    financial = [t for c in experiment.corpora if c.group == "financial" for t in heldout_texts(c, experiment.heldout)[:15]]
    return measure(model, base_tokenizer, domain_tokenizer, financial, window=None)


DEMO_DOMAIN_TOKENIZER = {"model": "bpe", "vocab_size": 8000, "sample_bytes": 4.0e6}
DEMO_EXTEND_PIECES = 4000


def demo_tokenizers(base_model: Path, scratch: Path) -> list[Path]:
    """Made by dapt's tokenizer stage on the demo corpora: a domain tokenizer (`transplant`), and
    `base_model`'s own grown on the financial corpora (`extend`)."""
    from dapt.experiment import load_experiment
    from dapt.launch.pipeline import train_tokenizer

    write_demo_corpora(scratch / "data")
    made = []
    for embeddings in ({"embeddings": "transplant"},
                       {"embeddings": "extend", "extend_pieces": DEMO_EXTEND_PIECES, "extend_domain": ["financial"]}):
        model = {"path": str(base_model.resolve()), **embeddings}
        experiment, _ = load_experiment(write_experiment(scratch, {"tokenizer": {"train": DEMO_DOMAIN_TOKENIZER},
                                                                   "model": model}))
        made.append(train_tokenizer(experiment))
    return made


def demo_financial_texts() -> list[str]:
    """The financial held-out documents of the demo corpora (full size), as `dapt demo` splits them."""
    from dapt.experiment import load_experiment
    from dapt.tokenizer.evaluate import heldout_texts

    with tempfile.TemporaryDirectory() as scratch:
        write_demo_corpora(Path(scratch) / "data")
        experiment, _ = load_experiment(write_experiment(Path(scratch)))
        return [t for c in experiment.corpora if c.group == "financial" for t in heldout_texts(c, experiment.heldout)]


def demo_financial_training_lines() -> list[str]:
    """Training text of the demo's financial corpora (the held-out documents left out), to fit new rows on."""
    from dapt.experiment import load_experiment
    from dapt.tokenizer.train import draw_sample

    with tempfile.TemporaryDirectory() as scratch:
        write_demo_corpora(Path(scratch) / "data")
        experiment, _ = load_experiment(write_experiment(Path(scratch)))
        financial = [c for c in experiment.corpora if c.group == "financial"]
        return draw_sample(financial, {c.name: 1 / len(financial) for c in financial}, experiment.heldout, 1.0e6)


def print_table(rows: list[tuple[str, dict]]) -> None:
    print("step-0 held-out BPB after carrying a base model over to a domain tokenizer; "
          "baseline: the same model with its new rows drawn as its initializer draws them")
    print(f"{'setting':52s} {'new rows':>10s} {'new tokens':>10s} {'base':>6s} {'transplant':>10s} "
          f"{'random':>7s} {'resize draw':>11s} {'ratio':>6s} {'ratio to resize draw':>20s} {'fitted':>7s} {'fitted ÷ base':>13s}")
    for name, f in rows:
        fitted = f"{f['fitted']:7.3f} {f['fitted'] / f['base']:13.3f}" if "fitted" in f else f"{'-':>7s} {'-':>13s}"
        print(f"{name:52s} {f['new_rows']:>4}/{f['rows']:<5} {100 * f['new_share']:9.1f}% {f['base']:6.3f} "
              f"{f['transplant']:10.3f} {f['random']:7.3f} {f['resize draw']:11.3f} {f['ratio to random']:6.2f} "
              f"{f['ratio to resize draw']:20.2f} {fitted}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", type=Path, help="a Hugging Face causal LM folder with its tokenizer")
    parser.add_argument("--domain-tokenizer", type=Path, nargs="+", help="tokenizer folder(s) to carry the model over to")
    parser.add_argument("--texts", type=Path, help="held-out text, one document per line")
    parser.add_argument("--window", type=int, default=2048, help="tokens per forward pass for --base-model")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    if args.base_model:
        scratch = tempfile.TemporaryDirectory()
        tokenizers = args.domain_tokenizer or demo_tokenizers(args.base_model, Path(scratch.name))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(args.base_model, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
        texts = ([line for line in args.texts.read_text(encoding="utf-8").splitlines() if line.strip()] if args.texts
                 else demo_financial_texts())
        base_tokenizer, rows, base_bpb = AutoTokenizer.from_pretrained(args.base_model), [], None
        fit_lines = demo_financial_training_lines()
        for folder in tokenizers:
            figures = measure(model.to(device), base_tokenizer, AutoTokenizer.from_pretrained(folder), texts,
                              args.window, base_bpb, fit_lines)
            base_bpb = figures["base"]
            rows.append((f"{args.base_model.name} → {folder.name}", figures))
            print(f"measured: {folder}", flush=True)
        print_table(rows)
        return
    from dapt.experiment import load_experiment

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        write_demo_corpora(root / "data", seed=7, scale=0.1)
        experiment, _ = load_experiment(write_experiment(root))
        rows = []
        for index, setting in enumerate(SETTINGS):
            rows.append((setting.name, demo_setting(setting, experiment, root / f"setting{index}")))
            print(f"measured: {setting.name}", flush=True)
        print_table(rows)


if __name__ == "__main__":
    main()
