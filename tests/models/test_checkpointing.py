"""Gradient checkpointing changes memory, not results: the same loss and gradients, fewer saved activations."""

import pytest
import torch
from torch import nn

from loraft import lora

from ..helpers import IDS, tiny_gpt2, tiny_llama, train_a_few_steps


def loss_grads_and_saved_bytes(model, checkpointing: bool):
    """Loss, gradients of the trainable parameters, and the bytes autograd kept for backward."""
    model.gradient_checkpointing = checkpointing
    model.zero_grad(set_to_none=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t
    ):
        logits = model(IDS[:, :-1])
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), IDS[:, 1:].flatten())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads, sum(saved)


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama])
def test_checkpointing_gives_the_same_loss_and_gradients_with_less_saved(build):
    model = build()
    lora.apply_lora(
        model, rank=4, alpha=8, targets=["all-linear"], dropout=0.1
    )  # dropout: the recomputation must replay its masks
    train_a_few_steps(model, IDS).train()  # B no longer zero: every gradient is non-zero
    torch.manual_seed(1)
    loss, grads, saved = loss_grads_and_saved_bytes(model, checkpointing=False)
    torch.manual_seed(1)
    loss_ckpt, grads_ckpt, saved_ckpt = loss_grads_and_saved_bytes(model, checkpointing=True)

    assert loss_ckpt == pytest.approx(loss, rel=1e-6)
    assert grads.keys() == grads_ckpt.keys() and all("lora_" in name for name in grads)
    for name in grads:
        assert grads[name].abs().sum() > 0, name
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert saved_ckpt < saved / 2  # the blocks' inputs only, instead of every activation inside them
