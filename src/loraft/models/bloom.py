"""BLOOM (config.json model_type "bloom": bloom-560m, bloom-1b1, ...), as transformers' BloomForCausalLM
computes it. GPT-2's block (LayerNorm before attention and feed-forward, a tanh-GELU MLP four times as
wide, biases everywhere, a head tied to the embeddings) with BLOOM's own choices:

- no position embeddings: ALiBi adds -slope * distance to each head's attention scores, a slope per head;
- a LayerNorm right after the token embedding;
- query, key and value come from one fused projection whose rows are laid out per head: head 0's q, k
  and v rows, then head 1's, ... (llama.cpp's converter regroups them as all q, all k, all v).

The fused projection stays one linear layer, att.W_qkv, as PEFT's LoRA on BLOOM targets it whole
(target_modules=["query_key_value"]): the LoRA target group `query_key_value` names it, and
`attention` is it with the output projection. The frozen base runs without BLOOM's hidden and
attention dropout (0 in the released models), as every family here does.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import LoraftError
from .family import Family
from .gpt2 import GELU
from .kv_cache import LayerCache, causal_attention
from .llama import renamed


@dataclass
class BloomConfig:
    vocab_size: int = 250880
    # ALiBi has no learned positions, so no limit of its own: BLOOM was trained on 2048-token sequences
    context_length: int = 2048
    emb_dim: int = 1024
    n_heads: int = 16
    n_layers: int = 24
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    model_type: str = "bloom"


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi's slope of each head (Press et al.): 2^(-8/n), 2^(-16/n), ... for n heads, n a power of two;
    otherwise those of the largest power of two below n, then every other slope of twice that many."""

    def geometric(n):
        return [2 ** (-8 * i / n) for i in range(1, n + 1)]

    below = 2 ** math.floor(math.log2(n_heads))
    return torch.tensor(geometric(below) + geometric(2 * below)[0::2][: n_heads - below])


def alibi_bias(slopes: torch.Tensor, n_queries: int, n_keys: int) -> torch.Tensor:
    """-slope * (query position - key position) per head, (heads, queries, keys), in fp32; the queries are
    the last n_queries of n_keys positions. transformers adds slope * key position instead, which differs
    by a constant per query, which softmax ignores; this one stays small near the diagonal, where bf16
    scores keep their precision."""
    queries = torch.arange(n_keys - n_queries, n_keys, device=slopes.device)[:, None]
    keys = torch.arange(n_keys, device=slopes.device)[None, :]
    return slopes.float()[:, None, None] * (keys - queries)


class Attention(nn.Module):
    def __init__(self, cfg: BloomConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.emb_dim // cfg.n_heads
        self.W_qkv = nn.Linear(cfg.emb_dim, 3 * cfg.emb_dim)
        self.out_proj = nn.Linear(cfg.emb_dim, cfg.emb_dim)

    def forward(self, x, bias, cache: LayerCache | None = None):
        b, t, d = x.shape
        # each head's q, k and v rows follow one another
        q, k, v = self.W_qkv(x).view(b, t, self.n_heads, 3, self.head_dim).transpose(1, 2).unbind(3)
        padding = None
        if cache is not None:
            k, v = cache.append(k, v)
            padding = cache.padding  # a left-padded batch's (ALiBi's bias is relative: padding shifts nothing)
        out = causal_attention(q, k, v, self.training, bias=bias, padding=padding)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
    def __init__(self, cfg: BloomConfig):
        super().__init__()
        self.up = nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim)
        self.activation = GELU()  # BLOOM's GELU is the tanh approximation, as GPT-2's
        self.down = nn.Linear(4 * cfg.emb_dim, cfg.emb_dim)

    def forward(self, x):
        return self.down(self.activation(self.up(x)))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: BloomConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.emb_dim, eps=cfg.norm_eps)
        self.att = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.emb_dim, eps=cfg.norm_eps)
        self.ff = FeedForward(cfg)

    def forward(self, x, bias, cache: LayerCache | None = None):
        x = x + self.att(self.norm1(x), bias, cache)
        return x + self.ff(self.norm2(x))


# Module-name patterns of each LoRA target group (see loraft.lora); query_key_value is PEFT's name.
LORA_TARGETS = {
    "query_key_value": ["trf_blocks.*.att.W_qkv"],
    "o": ["trf_blocks.*.att.out_proj"],
    "attention": ["trf_blocks.*.att.W_qkv", "trf_blocks.*.att.out_proj"],
    "mlp": ["trf_blocks.*.ff.up", "trf_blocks.*.ff.down"],
    "head": ["out_head"],
}


class Bloom(nn.Module):
    lora_targets = LORA_TARGETS  # read by loraft.lora, which knows no model family

    def __init__(self, cfg: BloomConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.emb_norm = nn.LayerNorm(cfg.emb_dim, eps=cfg.norm_eps)
        self.trf_blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.gradient_checkpointing = False  # training: keep only each block's input, recompute the rest in backward
        self.final_norm = nn.LayerNorm(cfg.emb_dim, eps=cfg.norm_eps)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.out_head.weight = self.tok_emb.weight
        with torch.device("cpu"):  # real even when the model is built on the meta device to be loaded
            self.register_buffer("alibi_slopes", alibi_slopes(cfg.n_heads), persistent=False)

    @property
    def context_length(self) -> int:
        return self.config.context_length

    def new_cache(self) -> list[LayerCache]:
        return [LayerCache() for _ in self.trf_blocks]

    def hidden_states(self, input_ids, cache: list[LayerCache] | None = None):
        """The final-normed hidden state of every position, shape (batch, tokens, emb_dim). Rows padded on
        the right need no mask: a real token sees no position after it, and ALiBi's bias depends on
        distances alone."""
        start = cache[0].length if cache else 0
        bias = alibi_bias(self.alibi_slopes, input_ids.shape[1], start + input_ids.shape[1])
        x = self.emb_norm(self.tok_emb(input_ids))
        for i, block in enumerate(self.trf_blocks):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, bias, use_reentrant=False)
            else:
                x = block(x, bias, cache[i] if cache else None)
        return self.final_norm(x)

    def forward(self, input_ids, cache: list[LayerCache] | None = None):
        return self.out_head(self.hidden_states(input_ids, cache))


# Our module names in Hugging Face checkpoints and in llama.cpp's GGUF files (per block, then outside).
HF_NAMES = {
    "norm1": "input_layernorm",
    "att.W_qkv": "self_attention.query_key_value",
    "att.out_proj": "self_attention.dense",
    "norm2": "post_attention_layernorm",
    "ff.up": "mlp.dense_h_to_4h",
    "ff.down": "mlp.dense_4h_to_h",
}
HF_TOP = {
    "tok_emb": "transformer.word_embeddings",
    "emb_norm": "transformer.word_embeddings_layernorm",
    "final_norm": "transformer.ln_f",
    "out_head": "lm_head",
}
GGUF_NAMES = {
    "norm1": "attn_norm",
    "att.W_qkv": "attn_qkv",
    "att.out_proj": "attn_output",
    "norm2": "ffn_norm",
    "ff.up": "ffn_up",
    "ff.down": "ffn_down",
}
GGUF_TOP = {"tok_emb": "token_embd", "emb_norm": "token_embd_norm", "final_norm": "output_norm", "out_head": "output"}


def parameter_names(cfg: BloomConfig) -> list[str]:
    with torch.device("meta"):
        return list(Bloom(cfg).state_dict())


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: BloomConfig) -> dict[str, torch.Tensor]:
    """Our state dict from a BloomForCausalLM checkpoint; the hub's own files were saved from BloomModel,
    without the "transformer." prefix and the head (the embeddings, tied)."""
    hf = {k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}": v for k, v in hf.items()}
    sd = {}
    for name in parameter_names(cfg):
        theirs = renamed(name, "transformer.h", HF_NAMES, HF_TOP)
        sd[name] = hf[theirs] if name != "out_head.weight" else hf.get(theirs, hf["transformer.word_embeddings.weight"])
    return sd


def config_from_hf(hf: dict) -> BloomConfig:
    """Our config from a bloom config.json (older files spell the width n_embed and the head count
    num_attention_heads); options our model does not implement are refused, not ignored."""
    emb_dim = hf.get("hidden_size") or hf.get("n_embed") or 64  # BloomConfig's defaults where a key is absent
    n_heads = hf.get("n_head") or hf.get("num_attention_heads") or 8
    unsupported = {
        "apply_residual_connection_post_layernorm": hf.get("apply_residual_connection_post_layernorm", False),
        # transformers then splits the output projections in slices and drops their biases
        "slow_but_exact with pretraining_tp > 1": hf.get("slow_but_exact") and hf.get("pretraining_tp", 1) > 1,
        f"hidden_size {emb_dim} not divisible by its {n_heads} heads": emb_dim % n_heads,
    }
    named = [name for name, value in unsupported.items() if value]
    if named:
        raise LoraftError(f"this bloom config.json sets {', '.join(named)}, which loraft does not implement")
    return BloomConfig(
        vocab_size=hf.get("vocab_size", 250880),
        context_length=hf.get("seq_length", 2048),
        emb_dim=emb_dim,
        n_heads=n_heads,
        n_layers=hf.get("n_layer") or hf.get("num_hidden_layers") or 2,
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=hf.get("tie_word_embeddings", True),
    )


def to_hf(sd: dict[str, torch.Tensor], cfg: BloomConfig) -> tuple[dict, dict[str, torch.Tensor]]:
    """A bloom config.json (the hub's keys) that config_from_hf reads back as `cfg`, and the tensors."""
    config = {
        "model_type": "bloom",
        "architectures": ["BloomForCausalLM"],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.emb_dim,
        "n_head": cfg.n_heads,
        "n_layer": cfg.n_layers,
        "layer_norm_epsilon": cfg.norm_eps,
        "seq_length": cfg.context_length,  # transformers ignores it; config_from_hf reads it back
        "tie_word_embeddings": cfg.tie_embeddings,
    }
    return config, {renamed(name, "transformer.h", HF_NAMES, HF_TOP): t for name, t in sd.items()}


def per_head_rows(tensor: torch.Tensor, n_heads: int, inverse: bool = False) -> torch.Tensor:
    """The fused projection's rows (a weight, a bias, a LoRA's B) from BLOOM's layout, q, k, v per head, to
    llama.cpp's, all heads' q then all k then all v; or, `inverse`, back."""
    rest = tensor.shape[1:]
    shape = (3, n_heads, -1, *rest) if inverse else (n_heads, 3, -1, *rest)
    return tensor.reshape(shape).transpose(0, 1).reshape(tensor.shape)


def to_gguf(sd: dict[str, torch.Tensor], cfg: BloomConfig) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """A "bloom" GGUF as llama.cpp's converter writes it: the fused rows regrouped, the head written even
    when it is the embeddings (llama.cpp's BLOOM reads output.weight)."""
    tensors = {}
    for name, tensor in sd.items():
        if ".att.W_qkv." in name:
            tensor = per_head_rows(tensor, cfg.n_heads)
        tensors[renamed(name, "blk", GGUF_NAMES, GGUF_TOP)] = tensor
    metadata = {
        "vocab_size": cfg.vocab_size,
        "context_length": cfg.context_length,
        "embedding_length": cfg.emb_dim,
        "feed_forward_length": 4 * cfg.emb_dim,
        "block_count": cfg.n_layers,
        "attention.head_count": cfg.n_heads,
        "attention.head_count_kv": cfg.n_heads,
        "attention.layer_norm_epsilon": float(cfg.norm_eps),
    }
    return "bloom", metadata, tensors


def config_from_gguf(meta: dict, tensors: dict[str, torch.Tensor]) -> BloomConfig:
    a = "bloom."
    output = tensors.get("output.weight")
    # (other shapes, a wider feed-forward or grouped heads, do not fit BLOOM's tensors: load_model says so)
    return BloomConfig(
        vocab_size=tensors["token_embd.weight"].shape[0],
        context_length=meta[a + "context_length"],
        emb_dim=meta[a + "embedding_length"],
        n_heads=meta[a + "attention.head_count"],
        n_layers=meta[a + "block_count"],
        norm_eps=meta[a + "attention.layer_norm_epsilon"],
        # llama.cpp's converter writes the tied head as a copy of the embeddings
        tie_embeddings=output is None or torch.equal(output, tensors["token_embd.weight"]),
    )


def from_gguf_tensors(tensors: dict[str, torch.Tensor], cfg: BloomConfig) -> dict[str, torch.Tensor]:
    """Our state dict from the dequantised tensors of a "bloom" GGUF."""
    sd = {}
    for name in parameter_names(cfg):
        theirs = renamed(name, "blk", GGUF_NAMES, GGUF_TOP)
        sd[name] = tensors[theirs] if name != "out_head.weight" else tensors.get(theirs, tensors["token_embd.weight"])
        if ".att.W_qkv." in name:
            sd[name] = per_head_rows(sd[name], cfg.n_heads, inverse=True)
    return sd


FAMILY = Family(
    name="bloom",
    model=Bloom,
    config=BloomConfig,
    hf_blocks="transformer.h",
    hf_modules={theirs: [ours] for ours, theirs in HF_NAMES.items() if "norm" not in ours},
    hf_conv1d=False,
    hf_model_types=("bloom",),
    config_from_hf=config_from_hf,
    from_hf_state_dict=from_hf_state_dict,
    gguf_architectures=("bloom",),
    config_from_gguf=config_from_gguf,
    from_gguf_tensors=from_gguf_tensors,
    to_gguf=to_gguf,
    to_hf=to_hf,
)
