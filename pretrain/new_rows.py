"""Fitting a carried-over model's new rows before training (`model.fit_new_rows`).

The mean of a new piece's base rows is a poor stand-in where it matters most: the model
reads a new token through its input row, and the mean of a word's pieces is not what the
model makes of reading them one after another, so the text after each new token is
predicted worse (on SmolLM2 grown by 82 financial merges: +4.8% held-out BPB on the
financial corpora at step 0). So, with `fit_new_rows: N`, the new rows alone (input rows,
and output rows of an untied head) take N Adam steps on the next-token loss over windows of
the domain's training text, every other weight frozen: the model learns what its new tokens
mean from how it already reads the text around them (the same case: −1.4%, public text
unchanged). It runs once, on the process that carries the model over, and is kept with
the carried-over folder.
"""

from __future__ import annotations

import numpy as np
import torch

from dapt.data_mix.store import TokenStore
from dapt.pretrain.loss import next_token_loss
from dapt.pretrain.progress import Progress

FIT_BATCH = 8  # windows a step
FIT_LR = 1e-3


def fit_windows(stores: list[TokenStore], seq_len: int, steps: int, seed: int) -> torch.Tensor:
    """`steps × FIT_BATCH` windows of `seq_len + 1` tokens drawn evenly over the stores'
    training streams (each store its share by length), the same for the same seed."""
    rng = np.random.default_rng(seed)
    lengths = np.array([len(store.tokens) - seq_len - 1 for store in stores])
    usable = [store for store, length in zip(stores, lengths) if length > 0]
    lengths = lengths[lengths > 0]
    if not usable:
        return torch.empty(0, seq_len + 1, dtype=torch.long)
    picks = rng.choice(len(usable), size=steps * FIT_BATCH, p=lengths / lengths.sum())
    windows = [np.asarray(usable[i].tokens[s : s + seq_len + 1], dtype=np.int64)
               for i, s in ((i, int(rng.integers(0, lengths[i]))) for i in picks)]
    return torch.from_numpy(np.stack(windows))


def fit_new_rows(model, new_ids: list[int], windows: torch.Tensor) -> tuple[float, float]:
    """Adam on the rows `new_ids` only, one step per `FIT_BATCH` windows; the first and last loss."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval()  # no dropout: the frozen body is read as it is
    inputs, outputs = model.get_input_embeddings().weight, model.get_output_embeddings()
    matrices = [inputs] + ([outputs.weight] if outputs is not None and outputs.weight is not inputs else [])
    mask = torch.zeros(inputs.shape[0], 1, dtype=inputs.dtype, device=device)
    mask[new_ids] = 1
    frozen = [p for p in model.parameters() if p.requires_grad]
    for parameter in frozen:
        parameter.requires_grad_(False)
    for matrix in matrices:
        matrix.requires_grad_(True)
    hooks = [matrix.register_hook(lambda grad: grad * mask) for matrix in matrices]
    optimizer = torch.optim.Adam(matrices, lr=FIT_LR)
    losses = []
    batches = windows.to(device).split(FIT_BATCH)
    # A 7B model's fit runs for many minutes: a bar on a terminal, a line every tenth in a log.
    progress = Progress(len(batches), 0, max(1, len(batches) // 10), enabled=True, what="fitting new rows")
    try:
        for step, batch in enumerate(batches, 1):
            loss, _ = next_token_loss(model, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            progress.update(step, {"loss": f"{losses[-1]:.4f}"})
    finally:
        progress.close()
        for hook in hooks:
            hook.remove()
        for parameter in frozen:
            parameter.requires_grad_(True)
        model.to("cpu")
    return losses[0], losses[-1]
