"""Benchmark of the tokenizer trainer on the demo corpora, in one run:

1. `dapt tokenizer train`'s code (sentencepiece unigram, then the Hugging Face folder)
   against calling `SentencePieceTrainer.train` directly with the same settings on the
   same sample: the overhead of the sample handling, conversion and saving.
2. Bytes per token on financial held-out text of the domain tokenizer (trained on the
   mix) against a tokenizer of the same size trained on the public corpora alone.
3. Split-and-merge (`chunk_bytes`) against one sentencepiece run on the whole sample:
   bytes per token on all held-out text, peak resident memory of the training
   process (for split-and-merge: the largest chunk process), wall time.

    python bench/tokenizer_training.py [--scale 4] [--vocab 800] [--chunks 4]

Each ratio is dapt ÷ the baseline named on its row, both measured in this run.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import tempfile
import time
from pathlib import Path

from dapt.data_mix.blend import target_shares
from dapt.data_mix.demo_corpora import write_demo_corpora
from dapt.data_mix.sources import CorpusReader
from dapt.launch.demo import DEMO_CONFIG
from dapt.experiment import load_experiment
from dapt.tokenizer.config import SPECIAL_TOKENS, TokenizerTrainConfig
from dapt.tokenizer.evaluate import heldout_texts, load_tokenizer, tokenizer_statistics
from dapt.tokenizer.sentencepiece_trainer import MAX_SENTENCE_BYTES, train_in_subprocess
from dapt.tokenizer.split_merge import train_split_merge
from dapt.tokenizer.train import draw_sample, train_from_sample


def timed(function):
    started = time.perf_counter()
    result = function()
    return result, time.perf_counter() - started


def direct_sentencepiece(lines: list[str], config: TokenizerTrainConfig) -> bytes:
    """The baseline: the backend called by hand with the settings dapt passes."""
    import sentencepiece as spm

    model = io.BytesIO()
    ids = {name: index for index, name in enumerate(SPECIAL_TOKENS)}
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type=config.model, vocab_size=config.vocab_size,
        hard_vocab_limit=False, split_digits=True, byte_fallback=True, character_coverage=0.9995,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True, user_defined_symbols=["\n"], max_sentence_length=MAX_SENTENCE_BYTES,
        unk_id=ids["unk"], bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"], num_threads=2, minloglevel=2)
    return model.getvalue()


def spm_bytes_per_token(model: bytes, texts: list[str]) -> tuple[float, int]:
    """Bytes per token on `texts`, and the model's number of pieces."""
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_proto=model)
    return sum(len(t.encode("utf-8")) for t in texts) / sum(len(ids) for ids in processor.encode(texts)), len(processor)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=4.0, help="size of the demo corpora (1: about 5 MB)")
    parser.add_argument("--vocab", type=int, default=800, help="below the ~940 pieces the demo corpora support")
    parser.add_argument("--chunks", type=int, default=4, help="split-and-merge chunks of the sample")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder)
        written = write_demo_corpora(scratch / "data", seed=0, scale=args.scale)
        shutil.copy(DEMO_CONFIG, scratch / "demo.yaml")
        experiment, _ = load_experiment(scratch / "demo.yaml")
        sizes = {c.name: sum(len(d.encode("utf-8")) for d in CorpusReader(c).documents()) for c in experiment.corpora}
        shares = target_shares(experiment.mix, experiment.corpora, sizes, experiment.mix.temperature)
        sample_bytes = sum(written.values())
        lines = draw_sample(experiment.corpora, shares, experiment.heldout, sample_bytes)
        size = sum(len(line.encode("utf-8")) + 1 for line in lines)
        config = TokenizerTrainConfig(vocab_size=args.vocab)

        # 1. overhead over the backend (libraries imported beforehand, as in a running `dapt`)
        import sentencepiece  # noqa: F401
        import transformers  # noqa: F401

        # Best of two each, alternated, so that neither gains from running second.
        direct_seconds = dapt_seconds = float("inf")
        for _ in range(2):
            direct_seconds = min(direct_seconds, timed(lambda: direct_sentencepiece(lines, config))[1])
            domain_dir, seconds = timed(lambda: train_from_sample(lines, config, scratch / "domain"))
            dapt_seconds = min(dapt_seconds, seconds)

        # 2. domain against public-only, same size, same sample budget
        public = [c for c in experiment.corpora if c.group == "public"]
        public_shares = {c.name: shares[c.name] / sum(shares[p.name] for p in public) for c in public}
        public_lines = draw_sample(public, public_shares, experiment.heldout, size)
        public_dir = train_from_sample(public_lines, config, scratch / "public")
        financial = [t for c in experiment.corpora if c.group == "financial" for t in heldout_texts(c, experiment.heldout)]
        domain_bpt = tokenizer_statistics(load_tokenizer(domain_dir), financial)["bytes_per_token"]
        public_bpt = tokenizer_statistics(load_tokenizer(public_dir), financial)["bytes_per_token"]

        # 3. split-and-merge against one run on the whole sample, each training process measured alone
        sample = scratch / "sample.txt"
        sample.write_text("\n".join(lines) + "\n", encoding="utf-8")
        settings = scratch / "config.json"
        settings.write_text(config.model_dump_json())
        (single, single_peak), single_seconds = timed(lambda: train_in_subprocess(sample, settings, threads=2))
        chunked = config.model_copy(update={"chunk_bytes": size / args.chunks + 1})
        (merged, merged_peak), merged_seconds = timed(lambda: train_split_merge(lines, chunked))
        heldout = [t for c in experiment.corpora for t in heldout_texts(c, experiment.heldout)]
        (single_bpt, single_pieces), (merged_bpt, merged_pieces) = (spm_bytes_per_token(m, heldout) for m in (single, merged))

    print(f"\ntokenizer benchmark on {os.cpu_count()} cores: demo corpora at scale {args.scale:g}, "
          f"sample {size / 1e6:.1f} MB, vocab {args.vocab:,}, sentencepiece unigram")
    print(f"{'what':<58}{'dapt':>12}{'baseline':>12}{'dapt ÷ it':>11}")
    rows = [
        ("training time, s (baseline: SentencePieceTrainer direct)", dapt_seconds, direct_seconds, "{:.1f}"),
        ("financial held-out bytes/token (baseline: public-only tok.)", domain_bpt, public_bpt, "{:.3f}"),
        (f"split-and-merge ({args.chunks} chunks) bytes/token (baseline: one run)", merged_bpt, single_bpt, "{:.4f}"),
        ("split-and-merge peak RSS, MB (baseline: one run)", merged_peak / 1e6, single_peak / 1e6, "{:.0f}"),
        ("split-and-merge time, s (baseline: one run, 2 threads)", merged_seconds, single_seconds, "{:.1f}"),
    ]
    for label, ours, theirs, number in rows:
        print(f"{label:<58}{number.format(ours):>12}{number.format(theirs):>12}{ours / theirs:>10.3f}x")
    print(f"pieces: merged {merged_pieces:,}, one run {single_pieces:,}; other processes on the machine share its cores")


if __name__ == "__main__":
    main()
