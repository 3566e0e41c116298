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

A piece may also span up to `phrase_words` words (multi-word tokens: ` net sales`,
` compared to the`), on a byte-level BPE base whose pre-tokenizer is a regex (GPT-2's, as in
SmolLM2; Llama 3's). Its pre-tokenizer cuts every word apart, so no merge could join two: the
runs of words that save the most base tokens on the domain text are put in front of its
regex, as one alternation matched only where a word ends, so each such run stays one
pre-token and every other text is pre-tokenised as before. The merges are then learnt as
above, across the words of those runs too; runs that end up with no piece spanning words are
taken out of the regex again. Elsewhere merges stay inside a word: the right side of a new
merge never starts with the space marker, as in the base vocabularies. And a base that keeps
every digit a piece of its own (Llama, SmolLM2: numbers read digit by digit) gets no piece
holding a digit, nor do the runs of words, which hold letters only.
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
# The `tokenizers` ByteLevel pre-tokenizer's regex (GPT-2's), which it applies when `use_regex` is set.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
WORD_END = r"(?!\p{L})"  # a run of words kept whole must end where the base's last word ends


def extend_tokenizer(base_dir: Path, lines: list[str], pieces: int, out_dir: Path,
                     domain_dir: Path | None = None, phrase_words: int = 1) -> list[str]:
    """The base tokenizer grown by up to `pieces` pieces learnt from the domain text `lines`,
    written to `out_dir` (base ids unchanged); returns the pieces added, as text. A unigram
    base draws them from the domain tokenizer at `domain_dir`. A byte-level BPE base with a
    regex pre-tokenizer may get pieces spanning up to `phrase_words` words."""
    from tokenizers import Tokenizer

    base = load_tokenizer(base_dir)
    state = json.loads(base.backend_tokenizer.to_str())
    kind = state["model"]["type"]
    if phrase_words > 1 and (kind != "BPE" or phrase_pre_tokenizer(state.get("pre_tokenizer"), ["x"]) is None):
        described = json.dumps(state.get("pre_tokenizer"))[:200] if kind == "BPE" else f"a {kind} tokenizer"
        raise DaptError(f"model.extend_phrase_words: {phrase_words} needs a byte-level BPE base tokenizer whose "
                        f"pre-tokenizer is a regex (GPT-2, SmolLM2, Llama 3) to keep runs of words whole; {base_dir}'s "
                        f"is {described}: set `extend_phrase_words: 1` (pieces inside words)")
    if kind == "BPE":
        added = _grow_bpe(state, base.backend_tokenizer, lines, pieces, phrase_words)
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


def _grow_bpe(state: dict, backend, lines: list[str], pieces: int, phrase_words: int) -> list[str]:
    from tokenizers import Tokenizer

    model = state["model"]
    vocab: dict[str, int] = model["vocab"]
    base_pre_tokenizer, phrases = state.get("pre_tokenizer"), []
    if phrase_words > 1:
        phrases = frequent_phrases(backend, lines, phrase_words, limit=pieces)
        state["pre_tokenizer"] = phrase_pre_tokenizer(base_pre_tokenizer, phrases)
        backend = Tokenizer.from_str(json.dumps(state))
    words = list(domain_words(backend, lines).items())
    kept_whole = {backend.pre_tokenizer.pre_tokenize_str(phrase)[0][0] for phrase in phrases}
    digits_apart = not any(len(piece) > 1 and any(c in DIGITS for c in piece) for piece in vocab)
    merges = learn_merges([([t.value for t in backend.model.tokenize(w)], n) for w, n in words],
                          pieces, known=set(vocab) | {t["content"] for t in state.get("added_tokens", [])},
                          unmerged=set(DIGITS) if digits_apart else set(),
                          across_words={index for index, (word, _) in enumerate(words) if word in kept_whole})
    next_id = 1 + max([*vocab.values(), *(t["id"] for t in state.get("added_tokens", []))])
    as_strings = bool(model["merges"]) and isinstance(model["merges"][0], str)  # "a b" in older files, [a, b] in newer
    for offset, (left, right) in enumerate(merges):
        vocab[left + right] = next_id + offset
        model["merges"].append(f"{left} {right}" if as_strings else [left, right])
    if phrases:  # a run no piece spans would only slow the pre-tokenizer down
        grown = Tokenizer.from_str(json.dumps(state))
        spanned = [phrase for phrase in phrases
                   if any(any(c in SPACE_MARKERS for c in token.value[1:])
                          for token in grown.model.tokenize(grown.pre_tokenizer.pre_tokenize_str(phrase)[0][0]))]
        state["pre_tokenizer"] = phrase_pre_tokenizer(base_pre_tokenizer, spanned) if spanned else base_pre_tokenizer
    to_bytes = piece_bytes(state)
    return [to_bytes(left + right).decode("utf-8", errors="replace") for left, right in merges]


def phrase_pre_tokenizer(pre_tokenizer: dict | None, phrases: list[str]) -> dict | None:
    """The byte-level pre-tokenizer `pre_tokenizer` keeping each of `phrases` (runs of words) whole,
    cutting all other text as before; None for a pre-tokenizer this cannot be done to. Its regex is
    GPT-2's inside the ByteLevel step (GPT-2, SmolLM2) or a Split step's before it (Llama 3, Qwen 2);
    steps before those (dapt's own digit split) cut first, as they did."""
    if not phrases:
        return pre_tokenizer
    steps = (pre_tokenizer or {}).get("pretokenizers", [pre_tokenizer]) if pre_tokenizer else []
    kept_whole = phrases_pattern(phrases) + "|"
    last = steps[-1] if steps else {}
    if last.get("type") != "ByteLevel" or last["add_prefix_space"]:  # a prefix space would go before every run
        return None
    if last["use_regex"]:
        split = {"type": "Split", "pattern": {"Regex": kept_whole + GPT2_PATTERN}, "behavior": "Isolated", "invert": False}
        steps = [*steps[:-1], split, {**last, "use_regex": False}]
    elif len(steps) > 1 and steps[-2]["type"] == "Split" and "Regex" in steps[-2]["pattern"] \
            and steps[-2]["behavior"] == "Isolated" and not steps[-2]["invert"]:
        split = {**steps[-2], "pattern": {"Regex": kept_whole + steps[-2]["pattern"]["Regex"]}}
        steps = [*steps[:-2], split, last]
    else:
        return None
    return {"type": "Sequence", "pretokenizers": steps}


def phrases_pattern(phrases: list[str]) -> str:
    """A regex matching any of `phrases` where a word ends, the longest first: the trie of their
    characters, so that matching does not try thousands of alternatives in turn."""
    trie: dict = {}
    for phrase in phrases:
        node = trie
        for char in phrase:
            node = node.setdefault(char, {})
        node[""] = {}

    def pattern(node: dict) -> str:
        branches = [re.escape(char) + pattern(child) for char, child in sorted(node.items()) if char]
        if "" in node:  # after the longer phrases that go on from here
            branches.append(WORD_END)
        return branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
    return pattern(trie)


def frequent_phrases(backend, lines: list[str], max_words: int, limit: int) -> list[str]:
    """Runs of 2 to `max_words` words of the domain text (each a space and letters, as the base
    pre-tokenizer cuts them), those that would save the most base tokens as one piece first, at
    most `limit`; a run seen once is left out (a piece for it would learn the sample by heart)."""
    counts: Counter = Counter()
    for line in lines:
        text = backend.normalizer.normalize_str(line) if backend.normalizer else line
        run: list[str] = []
        for start, end in [offsets for _, offsets in backend.pre_tokenizer.pre_tokenize_str(text)] + [(0, 0)]:
            word = text[start:end]
            if len(word) > 1 and word[0] == " " and word[1:].isalpha():
                run.append(word)
                continue
            for size in range(2, max_words + 1):
                counts.update("".join(run[i:i + size]) for i in range(len(run) - size + 1))
            run = []
    candidates = sorted(phrase for phrase, count in counts.items() if count > 1)
    lengths = [len(e.ids) for e in backend.encode_batch(candidates, add_special_tokens=False)]
    saved = {phrase: counts[phrase] * (length - 1) for phrase, length in zip(candidates, lengths)}
    return sorted(candidates, key=lambda phrase: (-saved[phrase], phrase))[:limit]


def learn_merges(words: list[tuple[list[str], int]], count: int, known: set[str],
                 unmerged: set[str] = frozenset(), across_words: set[int] = frozenset()) -> list[tuple[str, str]]:
    """Up to `count` BPE merges continuing from `words` (each a symbol sequence and its count):
    each time the most frequent adjacent pair, whose merge saves that many tokens; ties by the
    pair's text, so the result is deterministic. Skipped: a pair whose merged text is `known` (a
    piece the vocabulary has, reached by other merges), whose right side starts a word (except, in
    the words whose index is in `across_words`, runs of words kept whole, a pair of whole words or
    runs of them), or that holds a character of `unmerged`."""
    symbols = [list(w) for w, _ in words]
    frequency = [n for _, n in words]
    pair_count: Counter = Counter()
    holders: defaultdict[tuple[str, str], set[int]] = defaultdict(set)

    def pairs(index: int):
        word = symbols[index]
        return [(a, b) for a, b, after in zip(word, word[1:], [*word[2:], " "])
                if (b[:1] not in SPACE_MARKERS or joins_whole_words(index, a, after))
                and a + b not in known and not unmerged.intersection(a + b)]

    def joins_whole_words(index: int, left: str, after: str) -> bool:
        # Across words only whole words meet (` net` and ` sales`, never `pects` and ` f` of ` expects full`).
        return index in across_words and left[:1] in SPACE_MARKERS and after[:1] in SPACE_MARKERS

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
