"""Every backend and model trains a tokenizer that AutoTokenizer loads and that decodes
held-out and hostile text back exactly."""

import pytest
from transformers import AutoTokenizer

from dapt.base import DaptError
from dapt.tokenizer.config import TokenizerTrainConfig
from dapt.tokenizer.evaluate import heldout_texts
from dapt.tokenizer.train import train_from_sample
from tests.conftest import assert_loads_alike
from tests.unit.test_tokenizer_and_store import HOSTILE


@pytest.fixture(scope="module")
def sample_and_heldout(built_experiment):
    from dapt.data_mix.sources import CorpusReader

    lines = [line for text in CorpusReader(built_experiment.corpora[0]).documents() for line in text.split("\n") if line]
    heldout = heldout_texts(built_experiment.corpora[1], built_experiment.heldout)
    return lines, heldout


@pytest.mark.parametrize("backend, model", [("sentencepiece", "unigram"), ("sentencepiece", "bpe"),
                                            ("huggingface", "unigram"), ("huggingface", "bpe"),
                                            ("huggingface", "byte_level")])
def test_backend_round_trips_and_loads(tmp_path, sample_and_heldout, backend, model):
    lines, heldout = sample_and_heldout
    config = TokenizerTrainConfig(backend=backend, model=model, vocab_size=700, special_tokens=["<doc>"],
                                  user_symbols=["NYSE:"])
    out = train_from_sample(lines, config, tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert_loads_alike(out)  # transformers 4.x reads it too, into the same ids
    assert (out / "sentencepiece.model").exists() == (backend == "sentencepiece")
    assert tokenizer.eos_token == "</s>" and tokenizer.convert_tokens_to_ids("<doc>") != tokenizer.unk_token_id
    for text in heldout[:20] + HOSTILE:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    assert len(tokenizer("NYSE: ACME", add_special_tokens=False)["input_ids"]) >= 2
    assert "NYSE:" in tokenizer.convert_ids_to_tokens(tokenizer("NYSE: ACME", add_special_tokens=False)["input_ids"])[0]


def test_sentencepiece_bpe_matches_sentencepiece(tmp_path, sample_and_heldout):
    import sentencepiece as spm

    lines, heldout = sample_and_heldout
    out = train_from_sample(lines, TokenizerTrainConfig(model="bpe", vocab_size=700), tmp_path / "tok")
    processor = spm.SentencePieceProcessor(model_file=str(out / "sentencepiece.model"))
    tokenizer = AutoTokenizer.from_pretrained(out)
    for text in heldout[:10]:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == processor.encode(text)


def test_nfkc_folds_compatibility_characters(tmp_path, sample_and_heldout):
    lines, _ = sample_and_heldout
    out = train_from_sample(lines, TokenizerTrainConfig(vocab_size=700, normalization="nfkc"), tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.decode(tokenizer("ﬁnance ①", add_special_tokens=False)["input_ids"]) == "finance 1"


def test_bad_tokenizer_settings_are_named(tmp_path, sample_and_heldout):
    lines, _ = sample_and_heldout
    with pytest.raises(DaptError, match=r"tokenizer.train.vocab_size: 300 is too small; .* need at least \d+"):
        train_from_sample(lines, TokenizerTrainConfig(vocab_size=300), tmp_path / "tok")
    with pytest.raises(DaptError, match=r"the sample is empty"):
        train_from_sample([], TokenizerTrainConfig(), tmp_path / "tok")
    with pytest.raises(ValueError, match=r"byte_level needs `backend: huggingface`"):
        TokenizerTrainConfig(model="byte_level")


def test_a_vocabulary_the_sample_cannot_fill_is_reported(small_corpora, tmp_path, capsys):
    from dapt.experiment import load_experiment
    from dapt.launch.pipeline import train_tokenizer
    from tests.conftest import small_corpora_section, write_experiment

    path = write_experiment(tmp_path, {"corpora": small_corpora_section(small_corpora),
                                       "tokenizer": {"train": {"vocab_size": 20000, "sample_bytes": 2.0e5}}})
    experiment, _ = load_experiment(path)
    out = train_tokenizer(experiment)
    pieces = len(AutoTokenizer.from_pretrained(out))
    assert pieces < 20000
    assert (f"tokenizer: {pieces:,} pieces written to {out} (fewer than the 20,000 of `tokenizer.train.vocab_size`"
            in capsys.readouterr().out)
