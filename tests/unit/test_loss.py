"""The chunked loss: the same per-token losses and gradients as the whole logits give, tied and
untied heads, in fp32 and the low precisions, while no chunk's logits outlive it; a model that
changes its logits after the head is found by the probe and keeps the whole logits."""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from dapt.pretrain.loss import (ChunkedLossHead, check_chunked_loss, cross_entropy, install_chunked_loss,
                               next_token_loss)

VOCAB = 503  # not a multiple of anything the chunks are


def tiny_llama(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tied)
    return LlamaForCausalLM(config).float()


def losses_and_gradients(model, tokens, scale=2.5):
    model.zero_grad()
    loss, per_token = next_token_loss(model, tokens)
    (loss * scale).backward()  # a factor after the loss (accumulation, a loss scale) reaches the gradients
    return per_token, {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_loss_equals_the_whole_logits_loss_and_its_gradients(tied, chunk):
    tokens = torch.randint(0, VOCAB, (3, 41), generator=torch.Generator().manual_seed(1))
    model = tiny_llama(tied)
    plain_losses, plain_grads = losses_and_gradients(model, tokens)
    assert install_chunked_loss(model, chunk)
    head = model.get_output_embeddings()
    assert isinstance(head, ChunkedLossHead)
    assert (head.weight is model.get_input_embeddings().weight) == tied  # the tie, and the parameter, kept
    assert set(model.state_dict()) == set(tiny_llama(tied).state_dict())  # checkpoints keep their keys
    chunked_losses, chunked_grads = losses_and_gradients(model, tokens)
    torch.testing.assert_close(chunked_losses, plain_losses, rtol=1e-5, atol=1e-5)
    assert chunked_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)
    # Outside the loss the head is the head: generation and plain logits are unchanged.
    torch.testing.assert_close(model(input_ids=tokens).logits, tiny_llama(tied)(input_ids=tokens).logits)


def test_no_logits_are_kept_for_the_backward_pass():
    """What autograd saves for the backward pass besides the weights, by size: with the whole logits a
    [positions, vocab] tensor; chunked, nothing of that size (the gradients of the hidden states and
    of the head, computed in the forward pass, are what the loss keeps)."""
    tokens = torch.randint(0, VOCAB, (2, 201), generator=torch.Generator().manual_seed(2))
    positions = tokens.shape[0] * (tokens.shape[1] - 1)

    def largest_saved(model) -> int:
        weights, sizes = {p.data_ptr() for p in model.parameters()}, []

        def saved(tensor):
            if tensor.data_ptr() not in weights:
                sizes.append(tensor.numel())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(saved, lambda tensor: tensor):
            next_token_loss(model, tokens)
        return max(sizes)

    model = tiny_llama(tied=True)
    assert largest_saved(model) >= positions * VOCAB
    install_chunked_loss(model, 16)
    assert largest_saved(model) < positions * VOCAB // 5  # the model's own activations are what is left


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_chunked_loss_in_low_precision_is_as_accurate_as_the_whole_logits(dtype):
    """Each gradient's error against fp32 is no larger than the whole logits' in the same precision,
    under fp16's loss scale (DeepSpeed's dynamic scale starts at 2**16). It would be, several times
    over, if fp16 gradients computed before the scale reaches them stayed in fp16 (a position's
    share of a mean over 4,096 positions sinks into its subnormals), or if the head's gradient were
    a running bf16 sum over the chunks."""
    tokens = torch.randint(0, VOCAB, (8, 513), generator=torch.Generator().manual_seed(4))
    _, exact = losses_and_gradients(tiny_llama(tied=False), tokens, scale=1.0)
    plain_losses, plain_grads = losses_and_gradients(tiny_llama(tied=False).to(dtype), tokens, scale=2**16)
    model = tiny_llama(tied=False).to(dtype)
    install_chunked_loss(model, 100)
    chunked_losses, chunked_grads = losses_and_gradients(model, tokens, scale=2**16)
    torch.testing.assert_close(chunked_losses, plain_losses, rtol=2e-2, atol=2e-2)
    for name, grad in exact.items():
        assert plain_grads[name].dtype == chunked_grads[name].dtype == dtype
        error = {way: (grads[name].float() / 2**16 - grad).norm() / grad.norm()
                 for way, grads in (("plain", plain_grads), ("chunked", chunked_grads))}
        assert error["chunked"] <= 1.25 * error["plain"], (name, error)


def test_the_loss_is_as_exact_as_fp32_allows_on_a_real_vocabulary():
    """Over 49,152 logits (SmolLM2's vocabulary) the per-position loss has no drift against float64;
    torch's CPU cross_entropy with the vocabulary in the middle drifts by ~7e-5 a position."""
    logits = torch.randn(2, 64, 49_152, generator=torch.Generator().manual_seed(5)) * 4
    targets = torch.randint(0, 49_152, (2, 64), generator=torch.Generator().manual_seed(6))
    exact = F.cross_entropy(logits.double().flatten(0, 1), targets.flatten(), reduction="none").view(2, 64)
    assert abs((cross_entropy(logits, targets).double() - exact).mean()) < 1e-6
    assert abs((F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").double() - exact).mean()) > 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_whole_logits_loss_has_torchs_gradient(dtype):
    logits = torch.randn(3, 17, VOCAB, generator=torch.Generator().manual_seed(7)).to(dtype).requires_grad_()
    targets = torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(8))
    scale = torch.rand(3, 17, generator=torch.Generator().manual_seed(9))
    (cross_entropy(logits, targets) * scale).sum().backward()
    ours, logits.grad = logits.grad, None
    (F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none") * scale).sum().backward()
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, logits.grad, rtol=1e-5, atol=1e-6)


class SoftCapped(LlamaForCausalLM):
    """A model that transforms its logits after the head, as Gemma 2 soft-caps them."""

    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        output.logits = 30.0 * torch.tanh(output.logits / 30.0)
        return output


def test_a_model_that_changes_its_logits_after_the_head_keeps_the_whole_logits():
    model = tiny_llama(tied=True)
    soft = SoftCapped(model.config)
    soft.load_state_dict(model.state_dict())
    tokens = torch.randint(0, VOCAB, (2, 33), generator=torch.Generator().manual_seed(3))
    expected = F.cross_entropy(soft(input_ids=tokens[:, :-1]).logits.transpose(1, 2), tokens[:, 1:], reduction="none")
    install_chunked_loss(soft, 8)
    assert "changes its logits after the output head" in check_chunked_loss(soft, VOCAB, 32, torch.device("cpu"))
    torch.testing.assert_close(next_token_loss(soft, tokens)[1], expected)
    install_chunked_loss(model, 8)
    assert check_chunked_loss(model, VOCAB, 32, torch.device("cpu")) is None
    assert model.get_output_embeddings().chunk == 8
