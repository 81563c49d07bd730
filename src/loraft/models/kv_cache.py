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


def causal_attention(q, k, v, training: bool, dropout_p: float = 0.0, window: int | None = None, bias=None):
    """Scaled dot-product attention where query i sees keys up to its own position (and, with a
    sliding `window`, only the last `window` of them, its own included). q may have a multiple of k's
    and v's heads (grouped-query attention): query head h reads key head h // group. `bias`: added to
    the scaled scores, fp32 of shape (query heads, queries, keys) (BLOOM's ALiBi).

    With a cache, the queries are the last q.shape[2] of k.shape[2] positions; SDPA's own
    `is_causal` aligns them to the first positions instead, so that case gets an explicit mask.
    """
    if window is not None and k.shape[2] <= window:
        window = None  # every key is inside the window: plain causal attention
    if training and q.device.type == "cpu":
        # For the short sequences we train on, differentiating SDPA's CPU flash kernel is slower than
        # its math backend, and the math backend slower than CausalAttention; for inference flash is
        # as fast or faster.
        if dropout_p == 0 and q.shape[2] == k.shape[2] and window is None:
            # A key head's query heads, one after another, as one long query: no copies of k and v.
            b, heads, n, d = q.shape
            grouped = q.reshape(b, k.shape[1], heads // k.shape[1] * n, d)
            grouped_bias = None if bias is None else bias.reshape(k.shape[1], heads // k.shape[1] * n, n)
            return CausalAttention.apply(grouped, k, v, grouped_bias).view(b, heads, n, d)
        with sdpa_kernel(SDPBackend.MATH):
            return sdpa(q, k, v, dropout_p, window, bias)
    return sdpa(q, k, v, dropout_p, window, bias)


class CausalAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(d) + bias + causal mask) v, with its backward written out so that every
    matrix product reads contiguous operands: SDPA's math backend differentiates through transposed
    views, which are slow on a CPU. Scores, softmax and their gradients are fp32, as in that backend
    (same error against an fp64 reference, tested); the products with v, k and q run in the inputs'
    dtype. The bias (None, or one per head, query and key) is a constant: it gets no gradient."""

    @staticmethod
    def forward(ctx, q, k, v, bias=None):
        dtype = softmax_dtype(q)
        with torch.autocast(q.device.type, enabled=False):  # the dtypes are chosen here
            scores = torch.matmul(q.to(dtype), k.to(dtype).transpose(-2, -1).contiguous()) * q.shape[-1] ** -0.5
            if bias is not None:
                scores += bias.to(dtype)
            scores.masked_fill_(future_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
            probs = torch.softmax(scores, -1)
            ctx.save_for_backward(q, k, v, probs)
            return torch.matmul(probs.to(v.dtype), v)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, probs = ctx.saved_tensors
        with torch.autocast(q.device.type, enabled=False):
            grad_out = grad_out.to(v.dtype).contiguous()
            grad_v = torch.matmul(probs.to(v.dtype).transpose(-2, -1).contiguous(), grad_out)
            grad_probs = torch.matmul(grad_out.to(probs.dtype), v.to(probs.dtype).transpose(-2, -1).contiguous())
            grad_scores = (probs * (grad_probs - (grad_probs * probs).sum(-1, keepdim=True)) * q.shape[-1] ** -0.5).to(
                q.dtype
            )
            grad_q = torch.matmul(grad_scores, k.to(q.dtype))
            grad_k = torch.matmul(grad_scores.transpose(-2, -1).contiguous(), q).to(k.dtype)
            return grad_q, grad_k, grad_v, None


def future_mask(n_queries: int, n_keys: int, device) -> torch.Tensor:
    """True where a query must not look: query i is at position i % n_keys (queries of a group of
    heads come one after another, see causal_attention)."""
    positions = torch.arange(n_queries, device=device) % n_keys
    return torch.arange(n_keys, device=device)[None, :] > positions[:, None]


def softmax_dtype(x: torch.Tensor) -> torch.dtype:
    """At least fp32: bf16 scores would round away much of softmax's precision."""
    return torch.promote_types(x.dtype, torch.float32)


def sdpa(q, k, v, dropout_p: float, window: int | None = None, bias=None):
    n_queries, n_keys = q.shape[2], k.shape[2]
    if q.shape[1] != k.shape[1] and q.device.type != "cpu":
        # CUDA runs grouped queries in its flash kernel only (not in fp32, nor before Ampere GPUs):
        # repeated keys and values keep the memory-efficient kernel for those.
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    gqa = q.shape[1] != k.shape[1]
    if n_queries == 1 and window is None and bias is None:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if n_queries == n_keys and window is None and bias is None:
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=gqa
        )
    mask = visible_keys(n_queries, n_keys, window, q.device)
    if bias is not None:  # SDPA adds a float mask to the scores; it must be of q's dtype
        mask = bias.masked_fill(~mask, float("-inf")).to(q.dtype)
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa
    )


def visible_keys(n_queries: int, n_keys: int, window: int | None, device) -> torch.Tensor:
    """True where a query may look: the queries are the last n_queries of n_keys positions; each sees
    the keys up to its own position, and with a `window` only the last `window` of those."""
    query_positions = torch.arange(n_keys - n_queries, n_keys, device=device)[:, None]
    key_positions = torch.arange(n_keys, device=device)[None, :]
    visible = key_positions <= query_positions
    if window is not None:
        visible &= key_positions > query_positions - window
    return visible
