import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from dapt.pretrain.metrics import flops_per_token, mfu, peak_flops


def test_flops_per_token_and_mfu_follow_the_documented_formula():
    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4)
    model = LlamaForCausalLM(config)
    parameters = sum(p.numel() for p in model.parameters())
    assert flops_per_token(model, seq_len=256) == 6 * parameters + 12 * 2 * 64 * 256
    assert mfu(1000.0, 1e9, 1e12, devices=2) == pytest.approx(0.5)
    assert mfu(1000.0, 1e9, None, devices=2) is None, "no peak known: no MFU rather than a guess"
    assert peak_flops(2.5e14) == 2.5e14
