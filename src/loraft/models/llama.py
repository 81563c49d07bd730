"""The Llama architecture (SmolLM2 is one): RMSNorm, rotary position embeddings (RoPE),
grouped-query attention and a SwiGLU feed-forward, with the token embedding tied to the output head.

Module names follow our GPT-2 (trf_blocks, att.W_query, out_head, ...) so that one LoRA vocabulary
fits both; the feed-forward's three projections are named for what they do.
"""

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..lora import shared_input_linears
from .kv_cache import LayerCache, causal_attention


@dataclass
class LlamaConfig:
    vocab_size: int = 49152
    context_length: int = 8192
    emb_dim: int = 576
    n_heads: int = 9
    n_kv_heads: int = 3
    n_layers: int = 30
    hidden_dim: int = 1536
    rope_base: float = 100000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True


def rope_tables(head_dim: int, context_length: int, base: float):
    """cos and sin of every (position, frequency) pair, each half of the head dimension repeated."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(context_length, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each (i, i + head_dim/2) pair of x by its position's angle (the "rotate half" layout)."""
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class GroupedQueryAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.emb_dim // cfg.n_heads
        self.W_query = nn.Linear(cfg.emb_dim, cfg.n_heads * self.head_dim, bias=False)
        self.W_key = nn.Linear(cfg.emb_dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.W_value = nn.Linear(cfg.emb_dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.out_proj = nn.Linear(cfg.n_heads * self.head_dim, cfg.emb_dim, bias=False)

    def forward(self, x, cos, sin, cache: LayerCache | None = None):
        b, t, _ = x.shape
        q, k, v = shared_input_linears(x, self.W_query, self.W_key, self.W_value)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.append(k, v)
        out = causal_attention(q, k, v, self.training)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.emb_dim, cfg.hidden_dim, bias=False)
        self.up = nn.Linear(cfg.emb_dim, cfg.hidden_dim, bias=False)
        self.down = nn.Linear(cfg.hidden_dim, cfg.emb_dim, bias=False)

    def forward(self, x):
        gate, up = shared_input_linears(x, self.gate, self.up)
        return self.down(nn.functional.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.emb_dim, eps=cfg.norm_eps)
        self.att = GroupedQueryAttention(cfg)
        self.norm2 = nn.RMSNorm(cfg.emb_dim, eps=cfg.norm_eps)
        self.ff = FeedForward(cfg)

    def forward(self, x, cos, sin, cache: LayerCache | None = None):
        x = x + self.att(self.norm1(x), cos, sin, cache)
        return x + self.ff(self.norm2(x))


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.trf_blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.gradient_checkpointing = False  # training: keep only each block's input, recompute the rest in backward
        self.final_norm = nn.RMSNorm(cfg.emb_dim, eps=cfg.norm_eps)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.out_head.weight = self.tok_emb.weight
        cos, sin = rope_tables(cfg.emb_dim // cfg.n_heads, cfg.context_length, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @property
    def context_length(self) -> int:
        return self.config.context_length

    def new_cache(self) -> list[LayerCache]:
        return [LayerCache() for _ in self.trf_blocks]

    def hidden_states(self, input_ids, cache: list[LayerCache] | None = None):
        """The final-normed hidden state of every position, shape (batch, tokens, emb_dim)."""
        start = cache[0].length if cache else 0
        end = start + input_ids.shape[1]
        cos, sin = self.rope_cos[start:end], self.rope_sin[start:end]
        x = self.tok_emb(input_ids)
        for i, block in enumerate(self.trf_blocks):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache[i] if cache else None)
        return self.final_norm(x)

    def forward(self, input_ids, cache: list[LayerCache] | None = None):
        return self.out_head(self.hidden_states(input_ids, cache))


# Module-name patterns of each LoRA target group (see loraft.lora).
LORA_TARGETS = {
    "q": ["trf_blocks.*.att.W_query"],
    "k": ["trf_blocks.*.att.W_key"],
    "v": ["trf_blocks.*.att.W_value"],
    "o": ["trf_blocks.*.att.out_proj"],
    "mlp": ["trf_blocks.*.ff.gate", "trf_blocks.*.ff.up", "trf_blocks.*.ff.down"],
    "head": ["out_head"],
}

GGUF_NAMES = {
    "attn_norm": "norm1.weight",
    "attn_q": "att.W_query.weight",
    "attn_k": "att.W_key.weight",
    "attn_v": "att.W_value.weight",
    "attn_output": "att.out_proj.weight",
    "ffn_norm": "norm2.weight",
    "ffn_gate": "ff.gate.weight",
    "ffn_up": "ff.up.weight",
    "ffn_down": "ff.down.weight",
}


def unpermute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of query/key rows.

    llama.cpp's converter interleaves each head's two rotary halves (so that RoPE rotates adjacent
    pairs); our `apply_rope` rotates (i, i + head_dim/2) pairs as the original checkpoint does.
    """
    out_dim, in_dim = weight.shape
    return weight.reshape(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def from_gguf_tensors(tensors: dict[str, torch.Tensor], cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """Our state dict from the dequantised tensors of a llama.cpp GGUF file."""
    sd = {"tok_emb.weight": tensors["token_embd.weight"], "final_norm.weight": tensors["output_norm.weight"]}
    for i in range(cfg.n_layers):
        for gguf_name, ours in GGUF_NAMES.items():
            sd[f"trf_blocks.{i}.{ours}"] = tensors[f"blk.{i}.{gguf_name}.weight"]
        q, k = f"trf_blocks.{i}.att.W_query.weight", f"trf_blocks.{i}.att.W_key.weight"
        sd[q] = unpermute_rope_rows(sd[q], cfg.n_heads)
        sd[k] = unpermute_rope_rows(sd[k], cfg.n_kv_heads)
    sd["out_head.weight"] = tensors.get("output.weight", sd["tok_emb.weight"])
    return sd


def config_from_gguf(meta: dict) -> LlamaConfig:
    a = "llama."
    n_heads = meta[a + "attention.head_count"]
    return LlamaConfig(
        vocab_size=meta.get(a + "vocab_size") or len(meta["tokenizer.ggml.tokens"]),
        context_length=meta[a + "context_length"],
        emb_dim=meta[a + "embedding_length"],
        n_heads=n_heads,
        n_kv_heads=meta.get(a + "attention.head_count_kv", n_heads),
        n_layers=meta[a + "block_count"],
        hidden_dim=meta[a + "feed_forward_length"],
        rope_base=meta.get(a + "rope.freq_base", 10000.0),
        norm_eps=meta[a + "attention.layer_norm_rms_epsilon"],
        tie_embeddings="output.weight" not in meta["tensor_names"],
    )
