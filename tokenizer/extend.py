"""`model.embeddings: extend`: the base model's tokenizer, grown by pieces for the domain.

The base tokenizer must still cut every other text as it did, since the base model
learnt that segmentation: a new piece may only make a text shorter. So pieces join
the tokenizer's own model, never as added tokens (those are matched before
pre-tokenisation, anywhere, and cut ` Selling` at ` Sell`):

- a BPE base (byte-level as GPT-2, Llama 3, SmolLM2; or sentencepiece-style as Llama 2)
  continues its BPE training on the domain text: starting from the base's segmentation
  of each domain word, the pair that occurs most often (the merge that saves the most
  tokens) is merged, `pieces` times. The merges are appended after the base's, so on any
  text every base merge applies first and the base segmentation is reached before a
  new merge can shorten it further.
- a unigram base takes the domain tokenizer's pieces it lacks, ranked by the tokens they
  save on the domain text, with their log-frequency as score.

Merges stay inside a word: the right side of a new merge never starts with the space
marker, as in the base vocabularies. And a base that keeps every digit a piece of its own
(Llama, SmolLM2: numbers read digit by digit) gets no piece holding a digit.
"""

from __future__ import annotations

import heapq
import json
import math
import re
import shutil
from collections import Counter, defaultdict
from pathlib import Path

from dapt.base import DaptError
from dapt.tokenizer.evaluate import ENCODE_BATCH, SPACE_MARKERS, load_tokenizer
from dapt.tokenizer.files import TOKENIZER_SETTINGS, copy_tokenizer_files
from dapt.tokenizer.transplant import piece_bytes, piece_keys

DIGITS = "0123456789"


def extend_tokenizer(base_dir: Path, lines: list[str], pieces: int, out_dir: Path,
                     domain_dir: Path | None = None) -> list[str]:
    """The base tokenizer grown by up to `pieces` pieces learnt from the domain text `lines`,
    written to `out_dir` (base ids unchanged); returns the pieces added, as text. A unigram
    base draws them from the domain tokenizer at `domain_dir`."""
    from tokenizers import Tokenizer

    base = load_tokenizer(base_dir)
    state = json.loads(base.backend_tokenizer.to_str())
    kind = state["model"]["type"]
    if kind == "BPE":
        added = _grow_bpe(state, base.backend_tokenizer, lines, pieces)
    elif kind == "Unigram":
        if domain_dir is None:
            raise DaptError("model.embeddings: extend on a unigram base tokenizer adds the domain tokenizer's pieces; "
                            "give `tokenizer.train` (or `tokenizer.path`) for the domain tokenizer")
        added = _grow_unigram(state, base, load_tokenizer(domain_dir), lines, pieces)
    else:
        raise DaptError(f"model.embeddings: extend grows BPE and unigram tokenizers; {base_dir} is a {kind} tokenizer: "
                        f"use `transplant` instead")
    # The base folder as it is (special tokens, settings) with the grown tokenizer.json; a
    # sentencepiece model beside it would describe the old vocabulary, so it is left out.
    shutil.rmtree(out_dir, ignore_errors=True)
    copy_tokenizer_files(Path(base_dir), out_dir, TOKENIZER_SETTINGS)
    Tokenizer.from_str(json.dumps(state)).save(str(out_dir / "tokenizer.json"))
    return added


def domain_words(backend, lines: list[str]) -> Counter:
    """The domain text's pre-tokenised words as the base tokenizer sees them, counted."""
    words: Counter = Counter()
    for line in lines:
        text = backend.normalizer.normalize_str(line) if backend.normalizer else line
        if backend.pre_tokenizer is not None:
            words.update(word for word, _ in backend.pre_tokenizer.pre_tokenize_str(text))
        else:  # sentencepiece-style: the whole text is one sequence whose words start at ▁
            words.update(word for word in re.split("(?=▁)", text) if word)
    return words


def _grow_bpe(state: dict, backend, lines: list[str], pieces: int) -> list[str]:
    model = state["model"]
    vocab: dict[str, int] = model["vocab"]
    words = domain_words(backend, lines)
    digits_apart = not any(len(piece) > 1 and any(c in DIGITS for c in piece) for piece in vocab)
    merges = learn_merges([([t.value for t in backend.model.tokenize(w)], n) for w, n in words.items()],
                          pieces, known=set(vocab) | {t["content"] for t in state.get("added_tokens", [])},
                          unmerged=set(DIGITS) if digits_apart else set())
    next_id = 1 + max([*vocab.values(), *(t["id"] for t in state.get("added_tokens", []))])
    as_strings = bool(model["merges"]) and isinstance(model["merges"][0], str)  # "a b" in older files, [a, b] in newer
    for offset, (left, right) in enumerate(merges):
        vocab[left + right] = next_id + offset
        model["merges"].append(f"{left} {right}" if as_strings else [left, right])
    to_bytes = piece_bytes(state)
    return [to_bytes(left + right).decode("utf-8", errors="replace") for left, right in merges]


def learn_merges(words: list[tuple[list[str], int]], count: int, known: set[str],
                 unmerged: set[str] = frozenset()) -> list[tuple[str, str]]:
    """Up to `count` BPE merges continuing from `words` (each a symbol sequence and its count):
    each time the most frequent adjacent pair, whose merge saves that many tokens; ties by the
    pair's text, so the result is deterministic. Skipped: a pair whose merged text is `known` (a
    piece the vocabulary has, reached by other merges), whose right side starts a word, or that
    holds a character of `unmerged`."""
    symbols = [list(w) for w, _ in words]
    frequency = [n for _, n in words]
    pair_count: Counter = Counter()
    holders: defaultdict[tuple[str, str], set[int]] = defaultdict(set)

    def pairs(index: int):
        word = symbols[index]
        return [(a, b) for a, b in zip(word, word[1:])
                if b[:1] not in SPACE_MARKERS and a + b not in known and not unmerged.intersection(a + b)]

    for index in range(len(symbols)):
        for pair in pairs(index):
            pair_count[pair] += frequency[index]
            holders[pair].add(index)
    heap = [(-n, pair) for pair, n in pair_count.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while heap and len(merges) < count:
        negative, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -negative or pair[0] + pair[1] in known:  # a stale entry
            continue
        if -negative < 2:  # the best merge left saves one token: it would only learn the sample by heart
            break
        merges.append(pair)
        merged, touched = pair[0] + pair[1], set()
        known.add(merged)
        for index in holders.pop(pair):
            for old in pairs(index):
                pair_count[old] -= frequency[index]
                touched.add(old)
            symbols[index] = _merge(symbols[index], pair, merged)
            for new in pairs(index):
                pair_count[new] += frequency[index]
                holders[new].add(index)
                touched.add(new)
        del pair_count[pair]
        for other in touched - {pair}:
            if pair_count[other] > 0:
                heapq.heappush(heap, (-pair_count[other], other))
    return merges


def _merge(word: list[str], pair: tuple[str, str], merged: str) -> list[str]:
    out, index = [], 0
    while index < len(word):
        if index + 1 < len(word) and (word[index], word[index + 1]) == pair:
            out.append(merged)
            index += 2
        else:
            out.append(word[index])
            index += 1
    return out


def _grow_unigram(state: dict, base, domain, lines: list[str], pieces: int) -> list[str]:
    model = state["model"]
    if any(token["id"] >= len(model["vocab"]) for token in state.get("added_tokens", [])):
        raise DaptError("model.embeddings: extend: the base unigram tokenizer has added tokens after its vocabulary, "
                        "so new pieces cannot follow it; use `transplant` instead")
    counts: Counter = Counter()
    for start in range(0, len(lines), ENCODE_BATCH):
        for encoding in domain.backend_tokenizer.encode_batch_fast(lines[start:start + ENCODE_BATCH],
                                                                   add_special_tokens=False):
            counts.update(encoding.ids)
    known, domain_keys, total = set(piece_keys(base).values()), piece_keys(domain), sum(counts.values())
    candidates = {}
    for index, count in counts.items():
        kind, value = domain_keys.get(index, ("special", None))
        if kind == "text" and len(value) >= 2 and (kind, value) not in known:
            candidates[value.decode("utf-8", errors="replace")] = count
    texts = sorted(candidates)
    base_lengths = [len(e.ids) for e in base.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    # Tokens a piece saves on the domain text: each use replaces its text's base pieces by one.
    saved = {text: candidates[text] * (length - 1) for text, length in zip(texts, base_lengths)}
    chosen = sorted((text for text in texts if saved[text] > 0), key=lambda t: (-saved[t], t))[:pieces]
    model["vocab"].extend([text.replace(" ", "▁"), math.log(candidates[text] / total)] for text in chosen)
    return chosen
