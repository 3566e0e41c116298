"""Config section `tokenizer:`: use an existing tokenizer, or train one."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dapt.base import StrictModel

SPECIAL_TOKENS = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}


class TokenizerTrainConfig(StrictModel):
    """A tokenizer trained on a sample of the corpora drawn with the mix weights."""

    backend: Literal["sentencepiece", "huggingface"] = "sentencepiece"
    """sentencepiece (its `.model` is kept beside) or Hugging Face `tokenizers`."""
    model: Literal["unigram", "bpe", "byte_level"] = "unigram"
    """`byte_level` (byte-level BPE, as GPT-2) needs the huggingface backend."""
    vocab_size: int = Field(default=32000, ge=300, le=1_000_000)
    """Number of pieces, including 256 byte pieces when `byte_fallback` is on."""
    split_digits: bool = True
    """Numbers become one piece per digit, as in BloombergGPT and Llama."""
    byte_fallback: bool = True
    """Unseen characters become UTF-8 byte pieces instead of <unk>: decoding stays lossless."""
    sample_bytes: float = Field(default=1e8, gt=0)
    """UTF-8 bytes of text drawn from the corpora to train on."""
    chunk_bytes: float | None = Field(default=None, gt=0)
    """Split-and-merge (BloombergGPT) for samples too large for one sentencepiece run: unigram
    models trained on chunks of about this many bytes, one process per core, merged by
    size-weighted piece probabilities. Peak memory follows the chunk, not the sample."""
    normalization: Literal["none", "nfkc"] = "none"
    """`nfkc` folds compatibility characters (ﬁ → fi, ① → 1); decoding then returns the folded text."""
    user_symbols: list[str] = []
    """Strings always kept whole (tickers, form names)."""
    special_tokens: list[str] = []
    """Extra special tokens beside <unk>, <s>, </s> and <pad> (e.g. document separators)."""

    @model_validator(mode="after")
    def _check(self) -> TokenizerTrainConfig:
        if self.model == "byte_level" and self.backend != "huggingface":
            raise ValueError("model byte_level needs `backend: huggingface`")
        if self.model == "byte_level" and not self.byte_fallback:
            raise ValueError("byte_level covers every byte by construction; leave byte_fallback on")
        if self.chunk_bytes is not None and (self.backend, self.model) != ("sentencepiece", "unigram"):
            raise ValueError("chunk_bytes (split-and-merge) merges unigram piece probabilities: it needs "
                             "`backend: sentencepiece` and `model: unigram`; remove chunk_bytes for other models")
        return self


class TokenizerConfig(StrictModel):
    path: str | None = None
    """A Hugging Face tokenizer directory, relative to the experiment file."""
    train: TokenizerTrainConfig | None = None
    """Train a tokenizer on the corpora (`dapt tokenizer train`); give this or `path`."""

    @model_validator(mode="after")
    def _one_source(self) -> TokenizerConfig:
        if (self.path is None) == (self.train is None):
            raise ValueError("give exactly one of `path` (an existing tokenizer) or `train` (train one)")
        return self
