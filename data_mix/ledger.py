"""The ledger: samples and tokens drawn per corpus, counted as training consumes them.

It answers "how many times did we see the filings?" from what was trained on, not
from the plan; it is saved in every checkpoint and logged as `mix/tokens/<corpus>`.
"""

from __future__ import annotations

import numpy as np


class MixLedger:
    def __init__(self, names: list[str], seq_len: int):
        self.names, self.seq_len = names, seq_len
        self.samples = np.zeros(len(names), dtype=np.int64)

    def record(self, corpus_ids: np.ndarray) -> None:
        self.samples += np.bincount(np.asarray(corpus_ids).ravel(), minlength=len(self.names))

    def tokens(self) -> dict[str, int]:
        return {name: int(count) * self.seq_len for name, count in zip(self.names, self.samples)}

    def shares(self) -> dict[str, float]:
        total = max(1, int(self.samples.sum()))
        return {name: int(count) / total for name, count in zip(self.names, self.samples)}

    def metrics(self) -> dict[str, float]:
        out = {f"mix/tokens/{name}": tokens for name, tokens in self.tokens().items()}
        out.update({f"mix/share/{name}": share for name, share in self.shares().items()})
        return out

    def state_dict(self) -> dict:
        return {"corpora": list(self.names), "samples": self.samples.tolist()}

    def load_state_dict(self, state: dict) -> None:
        if state["corpora"] != self.names:
            raise ValueError(f"ledger corpora {state['corpora']} differ from {self.names}")
        self.samples = np.asarray(state["samples"], dtype=np.int64)
