"""Gemma 3 trains as the other families do: its LoRA gradients are the same compiled (one graph per kind
of layer, sliding and full) and under gradient checkpointing as eager."""

import pytest
import torch

from loraft.lora import apply_lora
from loraft.models.gemma3 import Gemma3, Gemma3Config
from loraft.train import compile_blocks, compiler_found, uncompile_blocks

TINY = dict(vocab_size=300, context_length=64, emb_dim=32, n_heads=4, n_kv_heads=2, n_layers=3, hidden_dim=64)


@pytest.mark.skipif(not compiler_found(), reason="torch.compile on a CPU needs a C++ compiler")
def test_compiled_and_checkpointed_gradients_equal_eager():
    torch.manual_seed(0)
    layers = ["sliding_attention", "sliding_attention", "full_attention"]
    config = Gemma3Config(**TINY, head_dim=16, query_pre_attn_scalar=24, sliding_window=4, layer_types=layers)
    model = Gemma3(config).train()
    for param in model.parameters():  # norms start at zero (a scale of one): give them a value too
        torch.nn.init.normal_(param, std=0.3)
    apply_lora(model, rank=4, alpha=16)
    for name, param in model.named_parameters():  # B starts at zero: give A a gradient too
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)

    def gradients(input_ids):
        model.zero_grad()
        model(input_ids).square().mean().backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    batches = [torch.randint(0, 300, shape) for shape in ((2, 5), (2, 9), (3, 7))]  # all longer than the window
    eager = [gradients(ids) for ids in batches]
    compile_blocks(model)
    compiled = [gradients(ids) for ids in batches]
    for eager_grads, compiled_grads in zip(eager, compiled):
        for e, c in zip(eager_grads, compiled_grads):
            torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-5)
    uncompile_blocks(model)
    model.gradient_checkpointing = True
    for e, c in zip(eager[1], gradients(batches[1])):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-5)
