"""Train a sentencepiece tokenizer on a mix-weighted sample and save it for Hugging Face.

In: the experiment's corpora, their target mix shares and `tokenizer.train`.
Out: a folder with `tokenizer.json` + `tokenizer_config.json` (loadable by
`AutoTokenizer` in transformers 4.x and 5.x as `PreTrainedTokenizerFast`) and the
sentencepiece model beside it. The sample excludes held-out documents so that
held-out bits-per-byte is measured on text the tokenizer never saw.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np

from data_mix.config import CorpusConfig, HeldoutConfig
from data_mix.sources import CorpusReader
from data_mix.split import content_hash, heldout_threshold
from launch.base import DaptError
from tokenizer.config import SPECIAL_TOKENS, TokenizerTrainConfig

SPM_FILE = "sentencepiece.model"
# sentencepiece drops training sentences longer than this many bytes; documents are fed line by line.
MAX_SENTENCE_BYTES = 1 << 16


def draw_sample(corpora: list[CorpusConfig], shares: dict[str, float], heldout: HeldoutConfig, sample_bytes: float) -> list[str]:
    """Lines of training documents; each corpus contributes its mix share of `sample_bytes`.

    Documents are taken by content hash (the lowest hashes above the held-out
    threshold first), so the sample does not depend on file order.
    """
    lines: list[str] = []
    for corpus in corpora:
        budget = shares[corpus.name] * sample_bytes
        if budget <= 0:
            continue
        documents = list(CorpusReader(corpus).documents())
        hashes = np.array([content_hash(d) for d in documents])
        threshold = heldout_threshold(hashes, heldout)
        taken = 0
        for index in np.argsort(hashes):
            if hashes[index] < threshold:
                continue
            if taken >= budget:
                break
            text = documents[index]
            taken += len(text.encode("utf-8"))
            lines.extend(line for line in text.split("\n") if line)
    return lines


def train_sentencepiece(lines: list[str], config: TokenizerTrainConfig, out_dir: Path) -> Path:
    """Train, then write the Hugging Face folder; returns `out_dir`."""
    import sentencepiece as spm

    if not lines:
        raise DaptError("tokenizer.train: the sample is empty; check the corpora and mix weights")
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
            # Lossless round trip: no normalisation, no whitespace folding, no dummy prefix.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            user_defined_symbols=["\n", *config.user_symbols],
            max_sentence_length=MAX_SENTENCE_BYTES,
            unk_id=ids["unk"], bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"],
            num_threads=2,
            minloglevel=2,
        )
    except RuntimeError as err:
        raise DaptError(f"tokenizer.train: sentencepiece refused the settings: {err}") from None
    temporary = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    (temporary / SPM_FILE).write_bytes(model.getvalue())
    save_hf_tokenizer(temporary / SPM_FILE, temporary)
    shutil.rmtree(out_dir, ignore_errors=True)
    temporary.rename(out_dir)
    return out_dir


def save_hf_tokenizer(spm_path: Path, out_dir: Path) -> None:
    """The sentencepiece model as a `tokenizers` Unigram pipeline with the same pieces and scores."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    processor = spm.SentencePieceProcessor(model_file=str(spm_path))
    vocab = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    byte_fallback = any(processor.is_byte(i) for i in range(processor.get_piece_size()))
    backend = Tokenizer(models.Unigram(vocab, unk_id=processor.unk_id(), byte_fallback=byte_fallback))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.add_special_tokens([AddedToken(token, special=True) for token in SPECIAL_TOKENS.values()])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        clean_up_tokenization_spaces=False,
        **{f"{role}_token": token for role, token in SPECIAL_TOKENS.items()},
    )
    tokenizer.save_pretrained(out_dir)
    # transformers 5 writes its own backend class name, which 4.x cannot load.
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2))
