"""The Llama architecture (SmolLM2 is one): RMSNorm, rotary position embeddings (RoPE),
grouped-query attention and a SwiGLU feed-forward, with the token embedding tied to the output head.

Module names follow our GPT-2 (trf_blocks, att.W_query, out_head, ...) so that one LoRA vocabulary
fits both; the feed-forward's three projections are named for what they do.
"""

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import LoraftError
from ..lora import shared_input_linears
from .family import Family
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


# Module-name patterns of each LoRA target group (see loraft.lora).
LORA_TARGETS = {
    "q": ["trf_blocks.*.att.W_query"],
    "k": ["trf_blocks.*.att.W_key"],
    "v": ["trf_blocks.*.att.W_value"],
    "o": ["trf_blocks.*.att.out_proj"],
    "mlp": ["trf_blocks.*.ff.gate", "trf_blocks.*.ff.up", "trf_blocks.*.ff.down"],
    "head": ["out_head"],
}


class Llama(nn.Module):
    lora_targets = LORA_TARGETS  # read by loraft.lora, which knows no model family

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
        with torch.device("cpu"):  # real even when the model is built on the meta device to be loaded
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


HF_NAMES = {
    "input_layernorm": "norm1",
    "self_attn.q_proj": "att.W_query",
    "self_attn.k_proj": "att.W_key",
    "self_attn.v_proj": "att.W_value",
    "self_attn.o_proj": "att.out_proj",
    "post_attention_layernorm": "norm2",
    "mlp.gate_proj": "ff.gate",
    "mlp.up_proj": "ff.up",
    "mlp.down_proj": "ff.down",
}


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """Our state dict from a Hugging Face LlamaForCausalLM checkpoint (the same RoPE layout as ours)."""
    sd = {"tok_emb.weight": hf["model.embed_tokens.weight"], "final_norm.weight": hf["model.norm.weight"]}
    for i in range(cfg.n_layers):
        for theirs, ours in HF_NAMES.items():
            sd[f"trf_blocks.{i}.{ours}.weight"] = hf[f"model.layers.{i}.{theirs}.weight"]
    sd["out_head.weight"] = hf.get("lm_head.weight", sd["tok_emb.weight"])
    return sd


def config_from_hf(hf: dict) -> LlamaConfig:
    """Our config from a Llama config.json; options our Llama does not implement are refused, not ignored."""
    emb_dim, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    # transformers 5 writes rope_parameters; earlier versions rope_theta and rope_scaling
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    unsupported = {
        "a RoPE scaling": rope.get("rope_type", rope.get("type", "default")) != "default",
        "attention_bias": hf.get("attention_bias", False),
        "mlp_bias": hf.get("mlp_bias", False),
        "head_dim": hf.get("head_dim", emb_dim // n_heads) != emb_dim // n_heads,
        "hidden_act": hf.get("hidden_act", "silu") != "silu",
    }
    named = [name for name, value in unsupported.items() if value]
    if named:
        raise LoraftError(f"this Llama config.json sets {', '.join(named)}, which loraft's Llama does not implement")
    return LlamaConfig(
        vocab_size=hf["vocab_size"],
        context_length=hf["max_position_embeddings"],
        emb_dim=emb_dim,
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        n_layers=hf["num_hidden_layers"],
        hidden_dim=hf["intermediate_size"],
        rope_base=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=hf.get("tie_word_embeddings", False),
    )


FAMILY = Family(
    name="llama",
    model=Llama,
    config=LlamaConfig,
    hf_blocks="model.layers",
    hf_modules={theirs: [ours] for theirs, ours in HF_NAMES.items() if "layernorm" not in theirs},
    hf_conv1d=False,
    hf_model_types=("llama",),
    config_from_hf=config_from_hf,
    from_hf_state_dict=from_hf_state_dict,
    # RMSNorm, RoPE and SwiGLU run eager as chains of small kernels, which compiling fuses
    compile_on_cpu=True,
    gguf_architectures=("llama",),
    config_from_gguf=config_from_gguf,
    from_gguf_tensors=from_gguf_tensors,
)
