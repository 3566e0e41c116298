"""Split-and-merge: unigram models trained on chunks in separate processes and merged
compress held-out text within 2% of one model trained on the whole sample."""

import math

import pytest
from transformers import AutoTokenizer

from dapt.data_mix.blend import target_shares
from dapt.data_mix.sources import CorpusReader
from dapt.tokenizer.config import TokenizerTrainConfig
from dapt.tokenizer.evaluate import heldout_texts, tokenizer_statistics
from dapt.tokenizer.split_merge import deal_chunks, merge_models
from dapt.tokenizer.sentencepiece_trainer import train_sentencepiece
from dapt.tokenizer.train import draw_sample, train_from_sample


@pytest.fixture(scope="module")
def mixed_sample(built_experiment):
    experiment = built_experiment
    sizes = {c.name: sum(len(d.encode("utf-8")) for d in CorpusReader(c).documents()) for c in experiment.corpora}
    shares = target_shares(experiment.mix, experiment.corpora, sizes, experiment.mix.temperature)
    lines = draw_sample(experiment.corpora, shares, experiment.heldout, 4.0e5)
    heldout = [text for corpus in experiment.corpora for text in heldout_texts(corpus, experiment.heldout)]
    return lines, heldout


def test_merged_tokenizer_compresses_within_two_percent_of_one_run(tmp_path, mixed_sample):
    lines, heldout = mixed_sample
    assert len(deal_chunks(lines, 1.0e5)) == 4
    whole = AutoTokenizer.from_pretrained(train_from_sample(lines, TokenizerTrainConfig(vocab_size=600), tmp_path / "whole"))
    merged = AutoTokenizer.from_pretrained(
        train_from_sample(lines, TokenizerTrainConfig(vocab_size=600, chunk_bytes=1.0e5), tmp_path / "merged"))
    assert len(merged) == len(whole) == 600
    assert merged.eos_token_id == whole.eos_token_id and merged.convert_tokens_to_ids("<0x41>") == whole.convert_tokens_to_ids("<0x41>")
    single, split = (tokenizer_statistics(t, heldout)["bytes_per_token"] for t in (whole, merged))
    assert abs(split - single) / single < 0.02, (split, single)
    for text in heldout[:100]:
        assert merged.decode(merged(text, add_special_tokens=False)["input_ids"]) == text


def test_pieces_learnt_by_fewer_chunks_weigh_less(mixed_sample):
    from sentencepiece import sentencepiece_model_pb2 as pb

    lines, _ = mixed_sample
    full = pb.ModelProto()
    full.ParseFromString(train_sentencepiece(lines[:400], TokenizerTrainConfig(vocab_size=400)))
    normal = [p for p in full.pieces if p.type == pb.ModelProto.SentencePiece.NORMAL and len(p.piece) > 1]
    dropped, kept = normal[0].piece, normal[1].piece
    without = pb.ModelProto()
    without.CopyFrom(full)
    del without.pieces[[p.piece for p in without.pieces].index(dropped)]
    merged = pb.ModelProto()
    merged.ParseFromString(merge_models([full.SerializeToString(), without.SerializeToString()], [3.0, 1.0], 1000))
    scores = {p.piece: p.score for p in merged.pieces}
    before = {p.piece: p.score for p in full.pieces}
    # `dropped` is in the chunk holding 3/4 of the bytes only: it keeps 3/4 of its probability relative to `kept`.
    assert math.exp(scores[dropped] - scores[kept]) == pytest.approx(0.75 * math.exp(before[dropped] - before[kept]))


def test_chunk_bytes_needs_sentencepiece_unigram():
    with pytest.raises(ValueError, match="chunk_bytes .* needs `backend: sentencepiece` and `model: unigram`"):
        TokenizerTrainConfig(model="bpe", chunk_bytes=1e6)
