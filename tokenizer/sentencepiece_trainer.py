"""sentencepiece training, in this process or in a fresh interpreter of its own.

`dapt tokenizer train` trains here; split-and-merge (`split_merge`) trains each chunk in a
child process started as `python -m dapt.tokenizer.sentencepiece_trainer SAMPLE CONFIG MODEL
THREADS`, so that a chunk's memory is the child's alone and is measured by its own peak.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from dapt.base import DaptError
from dapt.tokenizer.config import SPECIAL_TOKENS, TokenizerTrainConfig

MAX_SENTENCE_BYTES = 1 << 16


def train_sentencepiece(lines: Iterable[str], config: TokenizerTrainConfig, threads: int = 2) -> bytes:
    """The serialized sentencepiece model trained on `lines` (one sentence each)."""
    import sentencepiece as spm

    model = io.BytesIO()
    ids = {name: index for index, name in enumerate(SPECIAL_TOKENS)}
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            model_type=config.model,
            vocab_size=config.vocab_size,
            # Small samples cannot fill a large vocabulary; take what the data supports.
            hard_vocab_limit=False,
            split_digits=config.split_digits,
            byte_fallback=config.byte_fallback,
            character_coverage=0.9995 if config.byte_fallback else 1.0,
            # Lossless round trip: no whitespace folding, no dummy prefix (and no normalisation unless asked).
            normalization_rule_name="nfkc" if config.normalization == "nfkc" else "identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            user_defined_symbols=["\n", *config.user_symbols, *config.special_tokens],
            max_sentence_length=MAX_SENTENCE_BYTES,
            unk_id=ids["unk"], bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"],
            num_threads=threads,
            minloglevel=2,
        )
    except RuntimeError as err:
        needed = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", str(err))
        if needed:
            raise DaptError(f"tokenizer.train.vocab_size: {needed.group(1)} is too small; this sample's characters, "
                            f"byte pieces and special tokens need at least {needed.group(2)}") from None
        raise DaptError(f"tokenizer.train: sentencepiece refused the settings: {err}") from None
    return model.getvalue()


def train_in_subprocess(sample: Path, config: Path, threads: int) -> tuple[bytes, int]:
    """Train on a text file (one sentence a line) in a fresh interpreter: the model and the
    process's peak resident memory in bytes (its VmHWM, which a fork's inherited pages do not inflate)."""
    model = sample.with_suffix(".model")
    result = subprocess.run([sys.executable, "-m", "dapt.tokenizer.sentencepiece_trainer", str(sample), str(config), str(model),
                             str(threads)], capture_output=True, text=True)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or ["no message"]
        raise DaptError(f"tokenizer.train.chunk_bytes: training on {sample.name} failed: {lines[-1]}")
    return model.read_bytes(), int(result.stdout.split()[-1])


def _train_file(sample: Path, config: Path, model: Path, threads: int) -> None:
    """The child's work: train on one text file, write the serialized model, print the peak memory."""
    settings = TokenizerTrainConfig.model_validate_json(config.read_text())
    with open(sample, encoding="utf-8") as lines:
        model.write_bytes(train_sentencepiece((line.rstrip("\n") for line in lines), settings, threads=threads))
    status = Path("/proc/self/status").read_text()
    print(int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024)


if __name__ == "__main__":
    try:
        _train_file(*map(Path, sys.argv[1:4]), threads=int(sys.argv[4]))
    except DaptError as err:  # the parent reports the last line of stderr
        sys.exit(str(err))
