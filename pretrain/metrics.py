"""Model FLOPs utilisation (MFU): the share of the hardware's peak that the model's
arithmetic uses.

FLOPs per trained token = 6·N + 12·L·H·S (PaLM, appendix B): 6 per parameter for
the forward and backward matmuls, plus attention scores over a sequence of S tokens
in L layers of width H. Activation recomputation is not counted (it is overhead, not
model FLOPs). MFU = tokens/s × FLOPs per token / (peak FLOP/s per device × devices).
The peak comes from `train.peak_flops_per_device`, else from the table below by the
GPU's name (dense bf16 tensor-core figures from the vendors' data sheets); on an
unknown device MFU is not reported rather than guessed.
"""

from __future__ import annotations

import torch

PEAK_BF16_FLOPS = {  # substring of torch.cuda.get_device_name() → dense bf16 FLOP/s
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
}


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    config = model.config
    parameters = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3 partitions hold ds_numel
    return 6.0 * parameters + 12.0 * config.num_hidden_layers * config.hidden_size * seq_len


def peak_flops(configured: float | None) -> float | None:
    if configured is not None:
        return configured
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def mfu(tokens_per_second: float, per_token: float, peak_per_device: float | None, devices: int) -> float | None:
    if peak_per_device is None:
        return None
    return tokens_per_second * per_token / (peak_per_device * devices)
