import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


class LayerCache:
    """Keys and values one attention layer has seen so far, shape (batch, heads, tokens, head_dim).

    Rows of different lengths share one cache left-padded (continuous batching, see generate.DecodeBatch):
    row i's first `padding[i]` columns hold no token; attention masks them, and row i's positions
    count from its own first token, so each row computes what it would alone."""

    def __init__(self, keys=None, values=None, padding=None):
        self.keys = keys
        self.values = values
        self.padding = padding  # (batch,) columns of left padding per row; None: no row is padded
        self.room = None  # buffers that keys and values are the first columns of

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def append(self, keys: torch.Tensor, values: torch.Tensor):
        """Add the new positions' keys and values; returns all of them. The cache keeps room to grow,
        so a step writes its own columns instead of copying everything held so far."""
        if self.keys is None:
            self.keys, self.values = keys, values
            return keys, values
        length, end = self.length, self.length + keys.shape[2]
        if self.room is None or end > self.room[0].shape[2]:
            capacity = end + max(16, end // 2)
            self.room = [x.new_empty(*x.shape[:2], capacity, x.shape[3]) for x in (self.keys, self.values)]
            self.room[0][:, :, :length], self.room[1][:, :, :length] = self.keys, self.values
        self.room[0][:, :, length:end], self.room[1][:, :, length:end] = keys, values
        self.keys, self.values = self.room[0][:, :, :end], self.room[1][:, :, :end]
        return self.keys, self.values

    def left_padded(self, length: int) -> "LayerCache":
        """The same rows, `length` columns long."""
        added = length - self.length
        padding = (
            self.padding if self.padding is not None else self.keys.new_zeros(self.keys.shape[0], dtype=torch.long)
        )
        pad = (0, 0, added, 0)  # the token dimension, on the left
        return LayerCache(
            torch.nn.functional.pad(self.keys, pad), torch.nn.functional.pad(self.values, pad), padding + added
        )


def joined(first: list[LayerCache], second: list[LayerCache]) -> list[LayerCache]:
    """One cache (a LayerCache per layer) of the rows of `first` then those of `second`, the shorter
    left-padded to the longer."""
    length = max(first[0].length, second[0].length)
    layers = []
    for a, b in zip(first, second):
        a, b = a.left_padded(length), b.left_padded(length)
        cat = [torch.cat(pair) for pair in ((a.keys, b.keys), (a.values, b.values), (a.padding, b.padding))]
        layers.append(LayerCache(*cat))
    return [trimmed(layer) for layer in layers]


def rows_kept(cache: list[LayerCache], rows: list[int]) -> list[LayerCache]:
    """The cache of `rows` alone, without the columns that are padding in all of them."""
    index = torch.tensor(rows, device=cache[0].keys.device)
    kept = []
    for layer in cache:
        padding = layer.padding[index] if layer.padding is not None else None
        kept.append(trimmed(LayerCache(layer.keys[index], layer.values[index], padding)))
    return kept


def trimmed(layer: LayerCache) -> LayerCache:
    """Without the leading columns that no row uses; a cache whose rows all start at column 0 has no
    padding (None), and computes as an unpadded one."""
    if layer.padding is None:
        return layer
    cut = int(layer.padding.min())
    keys, values, padding = layer.keys[:, :, cut:], layer.values[:, :, cut:], layer.padding - cut
    return LayerCache(keys, values, padding if padding.any() else None)


def position_rows(table: torch.Tensor, cache: list[LayerCache] | None, n_tokens: int) -> torch.Tensor:
    """The rows of a per-position `table` (RoPE's cos or sin, GPT-2's position embeddings) for the next
    `n_tokens` of the cached sequence: (n_tokens, dim); in a left-padded cache, each row's own positions,
    (batch, n_tokens, dim)."""
    start = cache[0].length if cache else 0
    padding = cache[0].padding if cache else None
    if padding is None:
        return table[start : start + n_tokens]
    return table[torch.arange(start, start + n_tokens, device=padding.device) - padding[:, None]]


def causal_attention(
    q, k, v, training: bool, dropout_p: float = 0.0, window: int | None = None, bias=None, padding=None
):
    """Scaled dot-product attention where query i sees keys up to its own position (and, with a
    sliding `window`, only the last `window` of them, its own included). q may have a multiple of k's
    and v's heads (grouped-query attention): query head h reads key head h // group. `bias`: added to
    the scaled scores, fp32 of shape (query heads, queries, keys) (BLOOM's ALiBi).

    With a cache, the queries are the last q.shape[2] of k.shape[2] positions; SDPA's own
    `is_causal` aligns them to the first positions instead, so that case gets an explicit mask.
    `padding`: a left-padded cache's padding columns per row (see LayerCache), masked.
    """
    if window is not None and k.shape[2] <= window:
        window = None  # every key is inside the window: plain causal attention
    if padding is not None:
        return sdpa(q, k, v, dropout_p, window, bias, padding)
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


def sdpa(q, k, v, dropout_p: float, window: int | None = None, bias=None, padding=None):
    n_queries, n_keys = q.shape[2], k.shape[2]
    if q.shape[1] != k.shape[1] and q.device.type != "cpu":
        # CUDA runs grouped queries in its flash kernel only (not in fp32, nor before Ampere GPUs):
        # repeated keys and values keep the memory-efficient kernel for those.
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    gqa = q.shape[1] != k.shape[1]
    plain = window is None and bias is None and padding is None
    if n_queries == 1 and plain:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if n_queries == n_keys and plain:
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=gqa
        )
    mask = visible_keys(n_queries, n_keys, window, q.device, padding)
    if bias is not None:  # SDPA adds a float mask to the scores; it must be of q's dtype
        mask = torch.where(mask, bias, float("-inf")).to(q.dtype)
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa
    )


def visible_keys(n_queries: int, n_keys: int, window: int | None, device, padding=None) -> torch.Tensor:
    """True where a query may look: the queries are the last n_queries of n_keys positions; each sees
    the keys up to its own position, and with a `window` only the last `window` of those. With
    `padding` (per row, see LayerCache), row i's first padding[i] keys are hidden: (batch, 1, queries, keys)."""
    query_positions = torch.arange(n_keys - n_queries, n_keys, device=device)[:, None]
    key_positions = torch.arange(n_keys, device=device)[None, :]
    visible = key_positions <= query_positions
    if window is not None:
        visible &= key_positions > query_positions - window
    if padding is not None:
        visible = visible & (key_positions >= padding[:, None, None, None])
    return visible
