"""The training attention's hand-written backward against PyTorch's SDPA differentiated by autograd."""

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from loraft.models.kv_cache import causal_attention


def sdpa_reference(q, k, v):
    with sdpa_kernel(SDPBackend.MATH):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def output_and_grads(attention, q, k, v, grad_out):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = attention(q, k, v)
    out.backward(grad_out)
    return [out.detach(), q.grad, k.grad, v.grad], backward_nodes(out.grad_fn)


def backward_nodes(node) -> set[str]:
    names, todo = set(), [node]
    while todo:
        node = todo.pop()
        if node is not None:
            names.add(type(node).__name__)
            todo += [next_node for next_node, _ in node.next_functions]
    return names


def ours(q, k, v):
    return causal_attention(q, k, v, training=True)


def inputs(dtype):
    torch.manual_seed(0)
    # As the models make them: (batch, tokens, heads, head_dim) seen as (batch, heads, tokens, head_dim).
    q, k, v = (3 * torch.randn(3, 37, 4, 64, dtype=torch.float64).transpose(1, 2) for _ in range(3))
    return [x.to(dtype) for x in (q, k, v, torch.randn(3, 4, 37, 64, dtype=torch.float64))]


def test_training_attention_and_its_gradients_equal_sdpa_in_fp64():
    (out, *grads), backward = output_and_grads(ours, *inputs(torch.float64))
    assert "CausalAttentionBackward" in backward  # training takes the hand-written path
    reference, _ = output_and_grads(sdpa_reference, *inputs(torch.float64))
    for name, a, b in zip(("output", "q", "k", "v"), [out, *grads], reference):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    v = inputs(torch.float64)[2]
    assert out[:, :, 0].equal(v[:, :, 0])  # the first token sees only itself


def test_in_bf16_it_is_as_precise_as_sdpa():
    """Mean error against fp64 of the output and each gradient: no more than SDPA's own, +10%."""
    exact, _ = output_and_grads(sdpa_reference, *inputs(torch.float64))
    for autocast in (False, True):  # bf16 inputs, and fp32 inputs under bf16 autocast, as in training
        dtype = torch.float32 if autocast else torch.bfloat16
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            mine, _ = output_and_grads(ours, *inputs(dtype))
            sdpa, _ = output_and_grads(sdpa_reference, *inputs(dtype))
        for name, a, b, e in zip(("output", "q", "k", "v"), mine, sdpa, exact):
            error, sdpa_error = ((x.double() - e).abs().mean().item() for x in (a, b))
            assert error <= 1.1 * sdpa_error + 1e-6, (name, autocast, error, sdpa_error)


def test_dropout_goes_through_sdpa():
    q, k, v = (torch.randn(2, 4, 9, 16, requires_grad=True) for _ in range(3))
    out = causal_attention(q, k, v, training=True, dropout_p=0.5)
    assert "CausalAttentionBackward" not in backward_nodes(out.grad_fn)
    assert not torch.allclose(out, sdpa_reference(q, k, v))


def test_grouped_query_attention_equals_sdpa_on_repeated_keys_in_fp64():
    """6 query heads over 2 key/value heads: query head h reads key head h // 3, with no copies of k, v."""
    torch.manual_seed(0)
    q, grad_out = torch.randn(2, 6, 11, 16, dtype=torch.float64), torch.randn(2, 6, 11, 16, dtype=torch.float64)
    k, v = torch.randn(2, 2, 11, 16, dtype=torch.float64), torch.randn(2, 2, 11, 16, dtype=torch.float64)
    (out, *grads), backward = output_and_grads(ours, q, k, v, grad_out)
    assert "CausalAttentionBackward" in backward and "RepeatInterleaveBackward0" not in backward

    def repeated(q, k, v):
        return sdpa_reference(q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1))

    reference, _ = output_and_grads(repeated, q, k, v, grad_out)
    for name, a, b in zip(("output", "q", "k", "v"), [out, *grads], reference):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    assert causal_attention(q, k, v, training=False).allclose(reference[0], rtol=1e-12, atol=1e-12)  # SDPA's own
    # With a cache: the last 4 of 11 positions query all 11 keys.
    assert causal_attention(q[:, :, -4:], k, v, training=False).allclose(
        reference[0][:, :, -4:], rtol=1e-12, atol=1e-12
    )


def test_a_sliding_window_sees_only_the_last_window_keys_in_training_and_with_a_cache():
    """Gemma 3's sliding layers: query i sees keys i - window + 1 .. i, against the scores written out (fp64,
    6 query heads over 2 key/value heads)."""
    torch.manual_seed(0)
    q, grad_out = torch.randn(2, 6, 11, 16, dtype=torch.float64), torch.randn(2, 6, 11, 16, dtype=torch.float64)
    k, v = torch.randn(2, 2, 11, 16, dtype=torch.float64), torch.randn(2, 2, 11, 16, dtype=torch.float64)
    window = 4

    def written_out(q, k, v):
        k, v = k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1)
        scores = q @ k.transpose(-2, -1) / 16**0.5
        query, key = torch.arange(11)[:, None], torch.arange(11)[None, :]
        scores = scores.masked_fill((key > query) | (key <= query - window), float("-inf"))
        return scores.softmax(-1) @ v

    def windowed(q, k, v):
        return causal_attention(q, k, v, training=True, window=window)

    (out, *grads), _ = output_and_grads(windowed, q, k, v, grad_out)
    reference, _ = output_and_grads(written_out, q, k, v, grad_out)
    for name, a, b in zip(("output", "q", "k", "v"), [out, *grads], reference):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    for last in (11, 4, 1):  # with a cache: the last `last` positions query all 11 keys
        got = causal_attention(q[:, :, -last:], k, v, training=False, window=window)
        assert got.allclose(reference[0][:, :, -last:], rtol=1e-12, atol=1e-12), last
    # a window as long as the keys is plain causal attention
    assert causal_attention(q, k, v, training=False, window=11).equal(causal_attention(q, k, v, training=False))


def test_a_bias_is_added_to_the_scores_in_training_and_with_a_cache():
    """BLOOM's ALiBi: a per-head bias over (query, key), against the scores written out (fp64); the
    training path's gradients too, and the last queries' rows with a cache."""
    torch.manual_seed(0)
    q, k, v, grad_out = (torch.randn(2, 3, 11, 16, dtype=torch.float64) for _ in range(4))
    bias = torch.randn(3, 11, 11, dtype=torch.float64)

    def written_out(q, k, v):
        scores = q @ k.transpose(-2, -1) / 16**0.5 + bias
        scores = scores.masked_fill(torch.ones(11, 11, dtype=torch.bool).triu(1), float("-inf"))
        return scores.softmax(-1) @ v

    def biased(q, k, v):
        return causal_attention(q, k, v, training=True, bias=bias)

    (out, *grads), backward = output_and_grads(biased, q, k, v, grad_out)
    assert "CausalAttentionBackward" in backward
    reference, _ = output_and_grads(written_out, q, k, v, grad_out)
    for name, a, b in zip(("output", "q", "k", "v"), [out, *grads], reference):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    for last in (11, 4, 1):
        got = causal_attention(q[:, :, -last:], k, v, training=False, bias=bias[:, -last:])
        assert got.allclose(reference[0][:, :, -last:], rtol=1e-12, atol=1e-12), last
