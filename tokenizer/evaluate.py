"""`dapt tokenizer eval`: several tokenizers side by side on each corpus's held-out text.

Per tokenizer and corpus: bytes per token (higher compresses better), fertility
(tokens per whitespace-separated word), the share of words split into more than one
token, and the share of tokens that are <unk> or byte-fallback pieces (text the
vocabulary does not cover). The held-out documents are chosen exactly as the token
stores choose them (content hash), from the sources, so no store is needed and a
tokenizer is never measured on text it was trained on.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from dapt.data_mix.config import CorpusConfig, HeldoutConfig
from dapt.data_mix.sources import CorpusReader
from dapt.data_mix.split import heldout_part
from dapt.base import DaptError
from dapt.figures import pyplot, save_figure

BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
SPACE_MARKERS = " ▁Ġ"  # how sentencepiece-style and byte-level tokenizers write a space
ENCODE_BATCH = 256


def heldout_texts(corpus: CorpusConfig, heldout: HeldoutConfig) -> list[str]:
    """The corpus's held-out documents: lowest content hashes below the fraction, capped."""
    documents = list(CorpusReader(corpus).documents_with_digests())
    return [documents[index].text for index in heldout_part([d.digest for d in documents], heldout)]


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise DaptError(f"{path} is not a tokenizer directory AutoTokenizer can load ({reason}); give a folder written by "
                        f"`save_pretrained` (tokenizer.json, tokenizer_config.json)") from None


def tokenizer_statistics(tokenizer, texts: list[str]) -> dict[str, float]:
    encoder = tokenizer.backend_tokenizer
    fallback = {i for piece, i in encoder.get_vocab().items() if BYTE_PIECE.match(piece)} | {tokenizer.unk_token_id}
    tokens = uncovered = 0
    for start in range(0, len(texts), ENCODE_BATCH):
        for encoding in encoder.encode_batch_fast(texts[start : start + ENCODE_BATCH], add_special_tokens=False):
            tokens += len(encoding.ids)
            uncovered += sum(1 for i in encoding.ids if i in fallback)
    words = Counter(word for text in texts for word in text.split())
    vocabulary = list(words)
    # A word is encoded as it occurs, after a space; a piece that is only the space marker is not the word's.
    encodings = encoder.encode_batch([" " + w for w in vocabulary], add_special_tokens=False)  # _fast has no .tokens
    word_pieces = {w: sum(1 for piece in e.tokens if piece.strip(SPACE_MARKERS)) for w, e in zip(vocabulary, encodings)}
    total_words = sum(words.values())
    return {
        "bytes_per_token": sum(len(t.encode("utf-8")) for t in texts) / max(1, tokens),
        "fertility": sum(word_pieces[w] * c for w, c in words.items()) / max(1, total_words),
        "words_split": sum(c for w, c in words.items() if word_pieces[w] > 1) / max(1, total_words),
        "uncovered": uncovered / max(1, tokens),
    }


def evaluate(tokenizer_dirs: list[Path], corpora: list[CorpusConfig], heldout: HeldoutConfig) -> list[dict]:
    tokenizers = [(str(path), load_tokenizer(path)) for path in tokenizer_dirs]
    rows = []
    for corpus in corpora:
        texts = heldout_texts(corpus, heldout)
        if not texts:
            raise DaptError(f"corpus '{corpus.name}' has no held-out document; raise `heldout.fraction`")
        for name, tokenizer in tokenizers:
            rows.append({"tokenizer": name, "corpus": corpus.name, "documents": len(texts),
                         **tokenizer_statistics(tokenizer, texts)})
    return rows


def tokens_against(rows: list[dict], baseline: str) -> dict[tuple[str, str], float]:
    """(tokenizer, corpus) → its tokens on the corpus's held-out text relative to the `baseline`
    tokenizer's (0.15: 15% more tokens; negative: fewer)."""
    reference = {r["corpus"]: r["bytes_per_token"] for r in rows if r["tokenizer"] == baseline}
    return {(r["tokenizer"], r["corpus"]): reference[r["corpus"]] / r["bytes_per_token"] - 1
            for r in rows if r["tokenizer"] != baseline}


def worse_than_base(rows: list[dict], base: str) -> list[str]:
    """A line for each tokenizer and corpus that the base model's own tokenizer compresses better."""
    return [f"warning: {tokenizer} needs {more:.1%} more tokens than the base model's tokenizer on `{corpus}`; "
            f"`model.embeddings: extend` keeps the base's segmentation and adds pieces for the domain"
            for (tokenizer, corpus), more in tokens_against(rows, base).items() if more > 0]


def format_evaluation(rows: list[dict], base: str | None = None) -> str:
    """The table; with `base` (the base model's tokenizer) a column of tokens relative to it."""
    names = {row["tokenizer"]: f"T{i + 1}" for i, row in enumerate({r["tokenizer"]: r for r in rows}.values())}
    against = tokens_against(rows, base) if base else {}
    lines = [f"{label} = {path}{' (the base model’s own)' if path == base else ''}" for path, label in names.items()]
    lines.append(f"{'corpus':<14}{'tok':<5}{'bytes/token':>12}{'fertility':>11}{'words split':>13}{'unk+bytes':>11}"
                 + (f"{'tokens vs base':>16}" if base else ""))
    for row in rows:
        relative = against.get((row["tokenizer"], row["corpus"]))
        lines.append(f"{row['corpus']:<14}{names[row['tokenizer']]:<5}{row['bytes_per_token']:>12.3f}"
                     f"{row['fertility']:>11.3f}{row['words_split']:>13.1%}{row['uncovered']:>11.2%}"
                     + ((f"{relative:>+16.1%}" if relative is not None else f"{'base':>16}") if base else ""))
    return "\n".join(lines)


def plot_evaluation(rows: list[dict], path: Path) -> Path:
    plt = pyplot()

    corpora = list(dict.fromkeys(r["corpus"] for r in rows))
    tokenizers = list(dict.fromkeys(r["tokenizer"] for r in rows))
    width = 0.8 / len(tokenizers)
    figure, axis = plt.subplots(figsize=(max(6, 1.6 * len(corpora) * len(tokenizers) / 2 + 3), 4))
    for index, name in enumerate(tokenizers):
        values = [next(r["bytes_per_token"] for r in rows if r["corpus"] == c and r["tokenizer"] == name) for c in corpora]
        axis.bar([i + index * width for i in range(len(corpora))], values, width, label=f"T{index + 1} {name}")
    axis.set_xticks([i + width * (len(tokenizers) - 1) / 2 for i in range(len(corpora))], corpora)
    axis.set(ylabel="bytes per token (higher: better compression)", title="Tokenizers on held-out text")
    axis.legend(fontsize=8)
    return save_figure(figure, path)
