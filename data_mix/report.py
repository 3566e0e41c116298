"""What the data is: `dapt data prepare` (the accounting of every record read) and
`dapt data inspect` (statistics of the built stores, and decoded samples)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Iterator

import numpy as np

from dapt.data_mix.config import CorpusConfig
from dapt.data_mix.records import OVER_LENGTH, ChatRenderer, account_records, encode_records, record_statistics
from dapt.data_mix.sources import CorpusReader, Document, SourceReport
from dapt.data_mix.store import TokenStore

PERCENTILES = (10, 50, 90, 99)


def prepare(corpora: list[CorpusConfig], tokenizer_dir: Path | None = None) -> list[SourceReport]:
    """Read and validate every corpus; one report per corpus. Text is not tokenised; tuning records
    are, with `tokenizer_dir` (when it holds a tokenizer), for their length in tokens."""
    reports = []
    tokenizer = tokenizer_dir if tokenizer_dir is not None and (tokenizer_dir / "tokenizer.json").exists() else None
    for corpus in corpora:
        if corpus.record_format != "text" and tokenizer is not None:
            reports.append(_tokenised_records(corpus, tokenizer))
            continue
        reader = CorpusReader(corpus)
        for _ in reader.documents():
            pass
        reports.append(reader.report)
    return reports


def _tokenised_records(corpus: CorpusConfig, tokenizer_dir: Path) -> SourceReport:
    """The report of a corpus of tuning records read and tokenised as `dapt data build` does: over-length
    records rejected or truncated, and the tokens of prompts and completions."""
    reader = CorpusReader(corpus, ChatRenderer(tokenizer_dir) if corpus.record_format == "messages" else None)
    for _ in kept_records(reader, tokenizer_dir):
        pass
    return reader.report


def kept_records(reader: CorpusReader, tokenizer_dir: Path) -> Iterator[Document]:
    """The records of `reader`'s corpus that `dapt data build` keeps, in order: those within `max_tokens`
    (or truncated to it) in the tokenizer's tokens; its report counts the rest, and holds the tokens
    of prompts and completions at the end."""
    from dapt.data_mix.build import load_encoder

    corpus = reader.corpus
    encoder, eos = load_encoder(tokenizer_dir)
    documents, lengths = iter(reader.documents_with_digests()), []
    while batch := list(itertools.islice(documents, 512)):
        _, _, status, token_lengths = encode_records(encoder, eos, [d.value for d in batch], corpus.max_tokens,
                                                     corpus.over_length == "truncate")
        yield from account_records(reader.report, batch, status)
        lengths.append(token_lengths[status != OVER_LENGTH])
    reader.report.records = record_statistics(np.concatenate(lengths) if lengths else np.empty((0, 2), np.int64))


def format_accounting(reports: list[dict]) -> str:
    """A table of read / kept / rejected per corpus, the invariant, and where rejections are."""
    lines = [f"{'corpus':<14}{'files':>6}{'read':>10}{'kept':>10}{'rejected':>10}  read = kept + rejected"]
    for report in reports:
        rejected = sum(report["rejected"].values())
        check = "holds" if report["invariant_holds"] else "BROKEN"
        lines.append(f"{report['corpus']:<14}{report['files']:>6}{report['read']:>10,}{report['kept']:>10,}"
                     f"{rejected:>10,}  {report['read']:,} = {report['kept']:,} + {rejected:,} ({check})")
        for reason, places in report["examples"].items():
            count = report["rejected"].get(reason) or report.get("notes", {}).get(reason, 0)
            kind = "" if reason in report["rejected"] else " (kept)"
            lines.append(f"    {reason}{kind}: {count:,}, first at {'; '.join(places)}")
        records = report.get("records")
        if records:
            for part in ("prompt_tokens", "completion_tokens"):
                figures = ", ".join(f"{key} {value:,}" for key, value in records[part].items())
                lines.append(f"    {part.replace('_', ' ')} of the {records['records']:,} records kept: {figures}")
    return "\n".join(lines)


def store_statistics(folder: Path) -> dict:
    train, heldout = TokenStore(folder, "train"), TokenStore(folder, "heldout")
    lengths = np.diff(np.concatenate([[0], train.doc_ends]))
    return {
        "corpus": train.corpus,
        "documents": len(train.doc_ends), "tokens": len(train.tokens), "bytes": train.total_bytes,
        "bytes_per_token": train.total_bytes / max(1, len(train.tokens)),
        "doc_tokens_percentiles": {f"p{p}": int(np.percentile(lengths, p)) for p in PERCENTILES},
        "heldout_documents": len(heldout.doc_ends), "heldout_tokens": len(heldout.tokens),
    }


def format_statistics(rows: list[dict]) -> str:
    header = "".join(f"{f'p{p}':>8}" for p in PERCENTILES)
    lines = [f"{'corpus':<14}{'documents':>11}{'tokens':>13}{'bytes':>14}{'bytes/tok':>10}{header}"
             f"{'held-out docs':>15}{'held-out tok':>14}", f"{'':<62}{'(document length in tokens)':>32}"]
    for row in rows:
        percentiles = "".join(f"{value:>8,}" for value in row["doc_tokens_percentiles"].values())
        lines.append(f"{row['corpus']:<14}{row['documents']:>11,}{row['tokens']:>13,}{row['bytes']:>14,}"
                     f"{row['bytes_per_token']:>10.2f}{percentiles}{row['heldout_documents']:>15,}{row['heldout_tokens']:>14,}")
    return "\n".join(lines)


def sample_documents(folder: Path, tokenizer, count: int, seed: int, max_chars: int = 500) -> list[str]:
    """`count` training documents of the store, chosen by `seed`, decoded back to text."""
    store = TokenStore(folder, "train")
    starts = np.concatenate([[0], store.doc_ends[:-1]])
    chosen = np.random.default_rng(seed).choice(len(starts), size=min(count, len(starts)), replace=False)
    texts = []
    for index in sorted(chosen):
        ids = np.asarray(store.tokens[starts[index] : store.doc_ends[index] - 1])  # without its EOS
        text = tokenizer.decode(ids.tolist())
        texts.append(text if len(text) <= max_chars else text[:max_chars] + " […]")
    return texts
