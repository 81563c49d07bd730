"""The training attention's hand-written backward against PyTorch's SDPA differentiated by autograd."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from loraft.models.kv_cache import CausalAttention, causal_attention


def sdpa_reference(q, k, v):
    with sdpa_kernel(SDPBackend.MATH):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def output_and_grads(attention, q, k, v, grad_out):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = attention(q, k, v)
    out.backward(grad_out)
    return [out.detach(), q.grad, k.grad, v.grad]


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.bfloat16, 3e-2)])
def test_causal_attention_and_its_gradients_equal_sdpa(dtype, tolerance):
    torch.manual_seed(0)
    # As the models make them: (batch, tokens, heads, head_dim) seen as (batch, heads, tokens, head_dim).
    q, k, v = (torch.randn(3, 37, 4, 64, dtype=dtype).transpose(1, 2) for _ in range(3))
    grad_out = torch.randn(3, 4, 37, 64, dtype=dtype)
    ours = output_and_grads(CausalAttention.apply, q, k, v, grad_out)
    reference = output_and_grads(sdpa_reference, q, k, v, grad_out)
    for name, a, b in zip(("output", "q", "k", "v"), ours, reference):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance, msg=name)
    assert ours[0][:, :, 0].equal(v[:, :, 0])  # the first token sees only itself


def test_training_uses_it_and_dropout_still_drops():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 16) for _ in range(3))
    torch.testing.assert_close(causal_attention(q, k, v, training=True), sdpa_reference(q, k, v))
    dropped = causal_attention(q, k, v, training=True, dropout_p=0.5)
    assert not torch.allclose(dropped, sdpa_reference(q, k, v))
