"""Tuning records: text in segments that the loss covers or not, their tokens, and their windows.

A record is a prompt and its completion (`record_format: prompt_completion`) or a chat
(`messages`, rendered with the tokenizer's chat template): segments of text in order, each
trained on (the completion, an assistant turn) or not (the prompt, the other turns). Its
tokens are each segment's, encoded apart as a model meets them when it generates (the
prompt encoded, the completion produced after it), then EOS, trained on after a trained
segment so that the model learns to stop. A store of records keeps beside its tokens
which of them are trained targets.

Records are packed whole into windows of `seq_len + 1` tokens, in store order (a record
starts a new window when it does not fit the current one), and the rest of a window is
padding that nothing is trained on. A record's positions start at 0, and a token attends
only to the tokens of its own record (see `window`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dapt.base import DaptError

# What `encode_records` did with each record.
KEPT, TRUNCATED, OVER_LENGTH = 0, 1, 2


@dataclass(frozen=True)
class Record:
    """A tuning record: (text, trained) segments in order."""

    segments: tuple[tuple[str, bool], ...]

    @property
    def text(self) -> str:
        return "".join(text for text, _ in self.segments)

    @property
    def prompt(self) -> str:
        """The text before the first trained segment: what the record asks."""
        prompt = []
        for text, trained in self.segments:
            if trained:
                break
            prompt.append(text)
        return "".join(prompt)

    @property
    def completion(self) -> str:
        return self.text[len(self.prompt):]


def trained_text_bytes(record: Record) -> int:
    """The UTF-8 bytes of the text the loss covers: what a record's bits per byte are counted over."""
    return sum(len(text.encode("utf-8", "surrogatepass")) for text, trained in record.segments if trained)


def prompt_completion(record: dict, prompt_template: str | None = None, completion_template: str | None = None
                      ) -> Record | str | None:
    """The record of a `{prompt, completion}` mapping, or of the templates filled from its fields;
    None when a field is missing, or the rejection reason when one is not text."""
    try:
        prompt = record.get("prompt") if prompt_template is None else prompt_template.format_map(record)
        completion = (record.get("completion") if completion_template is None
                      else completion_template.format_map(record))
    except KeyError:
        return None
    if prompt is None or completion is None:
        return None
    if not (isinstance(prompt, str) and isinstance(completion, str)):
        return "not_a_string"
    return Record(((prompt, False), (completion, True)))


class ChatRenderer:
    """Chat records rendered with a tokenizer's chat template, the assistant turns trained on.

    Each assistant turn is found by rendering the conversation up to it with the generation
    prompt and then with the turn: the difference is what the model writes, and the text between
    turns (roles, the template's markers, the other turns) is what it reads. A template whose
    renderings do not extend one another cannot be split so and is refused."""

    def __init__(self, tokenizer_dir: Path):
        from transformers import AutoTokenizer

        self.tokenizer_dir = tokenizer_dir
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        if not self.tokenizer.chat_template:
            raise DaptError(f"tokenizer {tokenizer_dir} has no chat template, which `record_format: messages` renders "
                            "records with; give a tokenizer with one (`chat_template` in its tokenizer_config.json, "
                            "or chat_template.jinja), or write the records as `prompt_completion`")

    def render(self, messages: list[dict], **options) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, **options)

    def record(self, messages: object) -> Record | str | None:
        """The record of a `messages` list; the rejection reason when it is not a list of
        `{role, content}` mappings holding text, or holds no assistant turn."""
        if messages is None:
            return None
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            return "malformed_record"
        if not any(m["role"] == "assistant" for m in messages):
            return "no_assistant_turn"
        segments, rendered = [], ""
        for end, message in enumerate(messages, 1):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:end - 1], add_generation_prompt=True)
            after = self.render(messages[:end])
            if not (before.startswith(rendered) and after.startswith(before)):
                raise DaptError(f"the chat template of {self.tokenizer_dir} renders a conversation so that its "
                                "beginning changes as turns are added, so the assistant turns cannot be told apart; "
                                "write the records as `prompt_completion`")
            segments += [(before[len(rendered):], False), (after[len(before):], True)]
            rendered = after
        whole = self.render(messages)
        if len(whole) > len(rendered) and whole.startswith(rendered):
            segments.append((whole[len(rendered):], False))
        return Record(tuple((text, trained) for text, trained in segments if text))


def encode_records(encoder, eos: int, records: list[Record], max_tokens: int, truncate: bool
                   ) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray, np.ndarray]:
    """Per record its ids (EOS last) and which are trained targets (uint8), what was done with it
    (KEPT, TRUNCATED: its untrained beginning cut from the left to `max_tokens`; OVER_LENGTH: longer
    than `max_tokens`, and not truncated or still too long), and its prompt's and completion's tokens."""
    texts = [text for record in records for text, _ in record.segments]
    encoded = iter(encoder.encode_batch_fast(texts, add_special_tokens=False))
    ids, trained, status = [], [], np.zeros(len(records), dtype=np.int8)
    lengths = np.zeros((len(records), 2), dtype=np.int64)
    for index, record in enumerate(records):
        pieces = [(next(encoded).ids, flag) for _, flag in record.segments]
        tokens = np.array([t for piece, _ in pieces for t in piece] + [eos], dtype=np.int64)
        mask = np.array([flag for piece, flag in pieces for _ in piece] + [record.segments[-1][1]], dtype=np.uint8)
        prompt_tokens = int(np.argmax(mask)) if mask.any() else len(mask)
        lengths[index] = prompt_tokens, len(mask) - prompt_tokens
        excess = len(tokens) - max_tokens
        if excess > 0:
            if truncate and excess <= prompt_tokens - 1:  # at least one prompt token stays
                tokens, mask, status[index] = tokens[excess:], mask[excess:], TRUNCATED
            else:
                status[index] = OVER_LENGTH
        ids.append(tokens)
        trained.append(mask)
    return ids, trained, status, lengths


def account_records(report, documents: list, status: np.ndarray) -> list:
    """Count in the corpus's `SourceReport` the records `encode_records` truncated or found over
    length; the documents kept."""
    for document, done in zip(documents, status):
        if done == OVER_LENGTH:
            report.reject_kept(document, "longer_than_max_tokens")
        elif done == TRUNCATED:
            report.note("prompt_truncated", document.where)
    return [document for document, done in zip(documents, status) if done != OVER_LENGTH]


def pack(doc_ends: np.ndarray, seq_len: int) -> np.ndarray:
    """Window boundaries in documents: window w holds documents [bounds[w], bounds[w + 1]), as many
    whole ones as fit in `seq_len + 1` tokens, in order."""
    starts = np.concatenate([[0], doc_ends[:-1]])
    bounds, first = [0], 0
    while first < len(doc_ends):
        last = int(np.searchsorted(doc_ends, starts[first] + seq_len + 1, side="right"))
        if last == first:
            raise DaptError(f"a record of {int(doc_ends[first] - starts[first])} tokens does not fit a window of "
                            f"{seq_len + 1}; rebuild the store with a `max_tokens` of at most that")
        bounds.append(last)
        first = last
    return np.array(bounds, dtype=np.int64)


def window(tokens: np.ndarray, trained: np.ndarray, doc_ends: np.ndarray, bounds: np.ndarray, index: int,
           seq_len: int, pad: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Window `index` of a record store: its `seq_len + 1` ids (padded with `pad`), whether each of
    its `seq_len` targets is trained on, and each input's position in its record (the padding
    counts as a record of its own). Positions that restart mark where a record begins, which is
    how a causal LM keeps each token's attention inside its record (transformers builds the
    block-diagonal mask from them)."""
    first, last = bounds[index], bounds[index + 1]
    start = int(doc_ends[first - 1]) if first else 0
    end = int(doc_ends[last - 1])
    ids = np.full(seq_len + 1, pad, dtype=np.int64)
    ids[: end - start] = tokens[start:end]
    targets = np.zeros(seq_len + 1, dtype=bool)
    targets[: end - start] = trained[start:end]
    record_starts = np.concatenate([[0], doc_ends[first:last] - start])  # the padding starts at the last end
    lengths = np.diff(np.append(record_starts, seq_len + 1))
    positions = np.arange(seq_len + 1) - np.repeat(record_starts, lengths)
    return ids, targets[1:], positions[:-1]


def record_statistics(lengths: np.ndarray) -> dict:
    """Percentiles of the prompts' and completions' tokens of the records kept ([records, 2])."""
    def percentiles(values: np.ndarray) -> dict:
        if not len(values):
            return {}
        return {f"p{p}": int(np.percentile(values, p)) for p in (50, 90, 99)} | {"max": int(values.max())}

    return {"records": len(lengths), "prompt_tokens": percentiles(lengths[:, 0]),
            "completion_tokens": percentiles(lengths[:, 1])}
