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
        # sequences we train on (30-120 tokens; equal at 300); for inference flash is as fast or faster.
        with sdpa_kernel(SDPBackend.MATH):
            return sdpa(q, k, v, dropout_p)
    return sdpa(q, k, v, dropout_p)


def sdpa(q, k, v, dropout_p: float):
    n_queries, n_keys = q.shape[2], k.shape[2]
    if n_queries == 1:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    if n_queries == n_keys:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    mask = torch.ones(n_queries, n_keys, dtype=torch.bool, device=q.device).tril(n_keys - n_queries)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
