import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


class LayerCache:
    """Keys and values one attention layer has seen so far, shape (batch, heads, tokens, head_dim)."""

    def __init__(self):
        self.keys = None
        self.values = None

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def append(self, keys: torch.Tensor, values: torch.Tensor):
        if self.keys is not None:
            keys = torch.cat([self.keys, keys], dim=2)
            values = torch.cat([self.values, values], dim=2)
        self.keys, self.values = keys, values
        return keys, values


def causal_attention(q, k, v, training: bool, dropout_p: float = 0.0):
    """Scaled dot-product attention where query i sees keys up to its own position.

    With a cache, the queries are the last q.shape[2] of k.shape[2] positions; SDPA's own
    `is_causal` aligns them to the first positions instead, so that case gets an explicit mask.
    """
    if training and q.device.type == "cpu":
        # Differentiating SDPA's CPU flash kernel is 2-3x slower than its math backend for the short
        # sequences we train on (30-120 tokens; equal at 300), and the math backend 2x slower than
        # CausalAttention; for inference flash is as fast or faster.
        if dropout_p == 0 and q.shape[2] == k.shape[2]:
            return CausalAttention.apply(q, k, v)
        with sdpa_kernel(SDPBackend.MATH):
            return sdpa(q, k, v, dropout_p)
    return sdpa(q, k, v, dropout_p)


class CausalAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(d) + causal mask) v, with its backward written out so that every matrix
    product reads contiguous operands: SDPA's math backend differentiates through transposed views,
    and bf16 products on those are slow on a CPU. Measured forward + backward, batch 8, 64-wide heads,
    30-120 tokens: 2.0-2.5x faster than the math backend; training steps 3-6% faster (GPT-2)."""

    @staticmethod
    def forward(ctx, q, k, v):
        n = q.shape[2]
        scores = torch.matmul(q, k.transpose(-2, -1).contiguous()).to(softmax_dtype(q)) * q.shape[-1] ** -0.5
        scores.masked_fill_(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        probs = torch.softmax(scores, -1).to(q.dtype)
        ctx.save_for_backward(q, k, v, probs)
        return torch.matmul(probs, v)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, probs = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_v = torch.matmul(probs.transpose(-2, -1).contiguous(), grad_out)
        grad_probs = torch.matmul(grad_out, v.transpose(-2, -1).contiguous()).to(softmax_dtype(q))
        p = probs.to(grad_probs.dtype)
        grad_scores = (p * (grad_probs - (grad_probs * p).sum(-1, keepdim=True)) * q.shape[-1] ** -0.5).to(q.dtype)
        return torch.matmul(grad_scores, k), torch.matmul(grad_scores.transpose(-2, -1).contiguous(), q), grad_v


def softmax_dtype(x: torch.Tensor) -> torch.dtype:
    """At least fp32: bf16 scores would round away most of softmax's precision."""
    return torch.promote_types(x.dtype, torch.float32)


def sdpa(q, k, v, dropout_p: float):
    n_queries, n_keys = q.shape[2], k.shape[2]
    if n_queries == 1:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    if n_queries == n_keys:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    mask = torch.ones(n_queries, n_keys, dtype=torch.bool, device=q.device).tril(n_keys - n_queries)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
