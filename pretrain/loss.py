"""Next-token cross-entropy without the whole logits.

A causal LM's head turns every position's hidden state into a row of vocabulary logits: at
49,152 pieces and 2,048 positions that is 400 MB of fp32 per sequence, and the softmax and
its gradient as much again, before the loss is one number per token. While training, dapt
puts `ChunkedLossHead` where the model's output head was (same weight Parameter, so the
state-dict keys, a tied embedding and ZeRO-3's partitioning stay as they were): given the
targets of the batch, its forward returns their mean cross-entropy instead of the logits.

`ChunkedCrossEntropy` works a chunk of positions at a time, the head's matmul inside the
chunk. The loss is the model's last operation, so its gradient is known in the forward pass
(as Liger's fused linear cross-entropy does): each chunk's logits are turned into their
gradient in place and folded into the hidden states' and the head's gradients at once, so one
chunk's logits are all that ever exist and nothing is recomputed; the backward pass only
scales those gradients by the one number that reaches it (gradient accumulation, fp16's loss
scale).

Some architectures transform the logits after the head (Gemma's soft-capping, Cohere's
scale): `check_chunked_loss` compares the two ways on a probe batch and turns chunking off,
saying why, where they differ.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from dapt.base import DaptError


class CrossEntropy(torch.autograd.Function):
    """Per-position cross-entropy in fp32 as log-sum-exp minus the target's logit. Over 49,152 logits
    its mean error against float64 is ~5e-8 a position, where torch's CPU `cross_entropy` (its
    log-softmax) drifts low: ~8e-6 with the vocabulary last, ~7e-5 with it in the middle. Its
    backward pass allocates one tensor of the logits' size (autograd's, through log-sum-exp and
    gather, three)."""

    @staticmethod
    def forward(ctx, logits, targets):
        logits32 = logits.float()
        logsumexp = logits32.logsumexp(dim=-1, keepdim=True)
        ctx.save_for_backward(logits, logsumexp, targets)
        return (logsumexp - logits32.gather(-1, targets.unsqueeze(-1))).squeeze(-1)

    @staticmethod
    def backward(ctx, grad_losses):
        logits, logsumexp, targets = ctx.saved_tensors
        grad_logits = torch.sub(logits, logsumexp).exp_()  # the softmax, in fp32
        grad_logits.scatter_add_(-1, targets.unsqueeze(-1), torch.full(targets.unsqueeze(-1).shape, -1.0,
                                                                       device=grad_logits.device))
        return grad_logits.mul_(grad_losses.unsqueeze(-1)).to(logits.dtype), None


cross_entropy = CrossEntropy.apply


class ChunkedCrossEntropy(torch.autograd.Function):
    """`(Σ weights · loss, loss)`: the per-position cross-entropies (fp32, not differentiable) of
    `targets` under the logits `hidden @ weight.T + bias`, computed `chunk` positions at a time, and
    their weighted sum, the one output gradients flow through. `hidden` is [positions, hidden size].
    With `with_grad`, the gradients are computed in the same pass."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, weights, chunk, with_grad):
        losses = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
        # The gradients' matmuls run in the training precision, except fp16: its gradients are
        # computed before the loss scale reaches them (in the backward pass) and would sink into
        # fp16's subnormals. The head's gradient sums every chunk's share in fp32.
        grad_dtype = torch.float32 if weight.dtype == torch.float16 else weight.dtype
        if with_grad:
            grad_hidden = torch.empty(hidden.shape, dtype=grad_dtype, device=hidden.device)
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            grad_bias = None if bias is None else torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
            weight_for_grad = weight.to(grad_dtype)
        for start in range(0, len(targets), chunk):
            end = start + chunk
            logits = F.linear(hidden[start:end], weight, bias).float()
            losses[start:end] = cross_entropy(logits, targets[start:end])
            if not with_grad:
                continue
            rows = torch.arange(len(logits), device=logits.device)
            grad_logits = logits.sub_(logits.logsumexp(dim=-1, keepdim=True)).exp_()  # the softmax, in place
            grad_logits[rows, targets[start:end]] -= 1.0
            grad_logits *= weights[start:end, None]
            if grad_bias is not None:
                grad_bias += grad_logits.sum(dim=0)
            grad_logits = grad_logits.to(grad_dtype)
            torch.mm(grad_logits, weight_for_grad, out=grad_hidden[start:end])
            if grad_dtype == torch.float32:
                grad_weight.addmm_(grad_logits.T, hidden[start:end].float())
            else:  # bf16: one rounding per chunk rather than one per chunk of a running bf16 sum
                grad_weight += grad_logits.T @ hidden[start:end]
        ctx.mark_non_differentiable(losses)
        if with_grad:
            ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
            ctx.dtypes = hidden.dtype, weight.dtype, None if bias is None else bias.dtype
        return (losses * weights).sum(), losses

    @staticmethod
    def backward(ctx, grad_loss, _):
        hidden_dtype, weight_dtype, bias_dtype = ctx.dtypes
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        return ((grad_hidden * grad_loss).to(hidden_dtype), (grad_weight * grad_loss).to(weight_dtype),
                None if grad_bias is None else (grad_bias * grad_loss).to(bias_dtype), None, None, None, None)


class ChunkedLossHead(torch.nn.Module):
    """A linear output head that, inside `targeting(targets, weights)`, returns the weighted sum of
    the targets' cross-entropies (fp32, a scalar) computed `chunk` positions at a time, and keeps
    each position's in `losses`; outside it (or with `chunk` 0), the logits as the head it replaced."""

    def __init__(self, head: torch.nn.Linear, chunk: int):
        super().__init__()
        self.weight, self.bias, self.chunk = head.weight, head.bias, chunk
        self.targets: torch.Tensor | None = None
        self.weights: torch.Tensor | None = None
        self.losses: torch.Tensor | None = None

    @contextmanager
    def targeting(self, targets: torch.Tensor, weights: torch.Tensor):
        self.targets, self.weights = targets, weights
        try:
            yield
        finally:
            self.targets = self.weights = self.losses = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.targets is None or not self.chunk:
            return F.linear(hidden, self.weight, self.bias)
        with_grad = torch.is_grad_enabled() and (hidden.requires_grad or self.weight.requires_grad)
        loss, losses = ChunkedCrossEntropy.apply(hidden.flatten(0, -2), self.weight, self.bias, self.targets.flatten(),
                                                 self.weights.flatten(), self.chunk, with_grad)
        self.losses = losses.view(self.targets.shape)
        return loss


def install_chunked_loss(model: torch.nn.Module, chunk: int) -> bool:
    """Put a `ChunkedLossHead` of `chunk` positions where `model`'s output head is (before the
    engine is built, so that ZeRO-3 hooks it like any module); False where the head is not a
    plain linear layer or `chunk` is 0, and the logits stay whole."""
    head = model.get_output_embeddings()
    if not chunk or type(head) is not torch.nn.Linear:
        return False
    model.set_output_embeddings(ChunkedLossHead(head, chunk))
    return True


def next_token_loss(model, tokens: torch.Tensor, weights: torch.Tensor | None = None,
                    positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The cross-entropies of `tokens[:, 1:]` after `tokens[:, :-1]` summed with `weights` ([batch,
    length - 1]; default: their mean), to back-propagate, and each position's (fp32, detached).
    `positions`: each input's position, restarting where a packed record starts, so that a token
    attends only to its own record. `model` is a causal LM or a DeepSpeed engine holding one, its
    head chunked or not."""
    head = getattr(model, "module", model).get_output_embeddings()
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    if weights is None:
        weights = torch.full(targets.shape, 1.0 / targets.numel(), dtype=torch.float32, device=targets.device)
    # No cache: a training pass needs none, and transformers reads packed records from the positions only without one.
    arguments = {"input_ids": inputs, "use_cache": False} | ({} if positions is None else {"position_ids": positions})
    if isinstance(head, ChunkedLossHead) and head.chunk:
        with head.targeting(targets, weights):
            loss = model(**arguments).logits
            return loss, head.losses
    losses = cross_entropy(model(**arguments).logits, targets)
    return (losses * weights).sum(), losses.detach()


@torch.no_grad()
def check_chunked_loss(model, vocab_size: int, seq_len: int, device: torch.device) -> str | None:
    """With a chunked head: the per-token losses of a probe sequence (random ids, `seq_len` long, cut
    into a few chunks) both ways, chunked and from the whole logits. Where they differ (the model
    transforms its logits after the head), chunking is turned off and the reason returned. Every
    rank runs it (ZeRO-3 gathers weights collectively)."""
    module = getattr(model, "module", model)
    head = module.get_output_embeddings()
    if not isinstance(head, ChunkedLossHead) or not head.chunk:
        return None
    was_training, chunk = module.training, head.chunk
    module.eval()
    probe = torch.randint(0, vocab_size, (1, seq_len + 1), generator=torch.Generator().manual_seed(0)).to(device)
    head.chunk = max(1, seq_len // 3)
    chunked_loss, chunked = next_token_loss(model, probe)
    head.chunk = 0
    whole_loss, whole = next_token_loss(model, probe)
    module.train(was_training)
    if torch.allclose(chunked, whole, rtol=1e-4, atol=1e-4) and torch.allclose(chunked_loss, whole_loss, rtol=1e-4):
        head.chunk = chunk
        return None
    return (f"train.loss_chunk_tokens: {type(module).__name__} changes its logits after the output head; "
            f"the loss is computed from the whole logits instead")


@torch.no_grad()
def check_packed_records(model, vocab_size: int, device: torch.device) -> None:
    """Refuse a model that lets a packed record see the one before it: the losses of a probe record
    packed after another (its positions restarting) must equal its losses alone. transformers builds
    the block-diagonal attention from the positions for the models that use its masking functions;
    a model with its own attention code may ignore them. Every rank runs it (ZeRO-3)."""
    module = getattr(model, "module", model)
    was_training = module.training
    module.eval()
    probe = torch.randint(0, vocab_size, (1, 24), generator=torch.Generator().manual_seed(0)).to(device)
    alone = next_token_loss(model, probe[:, 10:])[1]
    positions = torch.cat([torch.arange(10), torch.arange(13)]).unsqueeze(0).to(device)
    packed = next_token_loss(model, probe, positions=positions)[1][:, 10:]
    module.train(was_training)
    if not torch.allclose(packed, alone, rtol=1e-3, atol=1e-3):
        raise DaptError(f"{type(module).__name__} lets a packed record attend to the record before it (its losses "
                        f"differ by up to {(packed - alone).abs().max().item():.3g} from the record's alone), so it "
                        "cannot train on tuning records packed into windows; use a model whose attention follows "
                        "transformers' masking (Llama, Mistral, Qwen, SmolLM and most causal LMs do)")
