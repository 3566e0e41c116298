"""Near-duplicate detection with datatrove's MinHash stages: signatures of every document (in the
read tasks, as they tokenise), then buckets (one task per band) that write the candidate pairs
`dedup.py` clusters. Words are split by a plain Unicode rule here rather than datatrove's
language tokenizers (spaCy), so that no language model is needed: shingles of words are what
MinHash compares, and a financial filing and its syndicated copy split alike either way."""

from __future__ import annotations

import regex
from datatrove.utils.word_tokenizers import WordTokenizer

from dapt.data_mix.build_steps import BuildLayout
from dapt.data_mix.config import NearDedupConfig

WORD = regex.compile(r"\w+|[^\w\s]+")


class UnicodeWords(WordTokenizer):
    """Words and runs of punctuation, by Unicode classes; sentences by line breaks."""

    def word_tokenize(self, text: str) -> list[str]:
        return WORD.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [line for line in text.split("\n") if line.strip()]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        spans, start = [], 0
        for line in text.split("\n"):
            if line.strip():
                spans.append((start, start + len(line)))
            start += len(line) + 1
        return spans


def minhash_config(near: NearDedupConfig):
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.utils.hashing import HashConfig

    bands, rows = near.lsh()
    return MinhashConfig(n_grams=near.shingle, num_buckets=bands, hashes_per_bucket=rows,
                         hash_config=HashConfig(precision=64, hash_fc="xxhash"))


def signature_step(layout: BuildLayout, near: NearDedupConfig):
    from datatrove.pipeline.dedup.minhash import MinhashDedupSignature

    return MinhashDedupSignature(output_folder=str(layout.signatures), config=minhash_config(near),
                                 language=UnicodeWords())


def bucket_stage(layout: BuildLayout, near: NearDedupConfig) -> tuple[str, int, list]:
    from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets

    bands, _ = near.lsh()
    return ("buckets", bands, [MinhashDedupBuckets(input_folder=str(layout.signatures), output_folder=str(layout.buckets),
                                                   config=minhash_config(near))])
