"""GPT-2, as built in "Build a Large Language Model (From Scratch)", chapter 4.

Same module names as the book (tok_emb, trf_blocks, att.W_query, ff.layers, out_head, ...), so
parameter counts and LoRA targets read the same; attention runs through PyTorch's SDPA.
"""

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..lora import shared_input_linears
from ..tokenizer import GPT2Tokenizer
from .family import Family
from .kv_cache import LayerCache, causal_attention, position_rows


@dataclass
class GPT2Config:
    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.0
    qkv_bias: bool = True
    model_type: str = "gpt2"


class LayerNorm(nn.Module):
    def __init__(self, emb_dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        return nn.functional.layer_norm(x, x.shape[-1:], self.scale, self.shift, self.eps)


class GELU(nn.Module):
    def forward(self, x):
        return nn.functional.gelu(x, approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim), GELU(), nn.Linear(4 * cfg.emb_dim, cfg.emb_dim)
        )

    def forward(self, x):
        return self.layers(x)


class MultiHeadAttention(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.emb_dim // cfg.n_heads
        self.W_query = nn.Linear(cfg.emb_dim, cfg.emb_dim, bias=cfg.qkv_bias)
        self.W_key = nn.Linear(cfg.emb_dim, cfg.emb_dim, bias=cfg.qkv_bias)
        self.W_value = nn.Linear(cfg.emb_dim, cfg.emb_dim, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(cfg.emb_dim, cfg.emb_dim)
        self.drop_rate = cfg.drop_rate

    def forward(self, x, cache: LayerCache | None = None):
        b, t, d = x.shape
        q, k, v = (
            y.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
            for y in shared_input_linears(x, self.W_query, self.W_key, self.W_value)
        )
        padding = None
        if cache is not None:
            k, v = cache.append(k, v)
            padding = cache.padding
        out = causal_attention(q, k, v, self.training, self.drop_rate if self.training else 0.0, padding=padding)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.att = MultiHeadAttention(cfg)
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg.emb_dim)
        self.norm2 = LayerNorm(cfg.emb_dim)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(self, x, cache: LayerCache | None = None):
        x = x + self.drop_shortcut(self.att(self.norm1(x), cache))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


# Module-name patterns of each LoRA target group (see loraft.lora).
LORA_TARGETS = {
    "q": ["trf_blocks.*.att.W_query"],
    "k": ["trf_blocks.*.att.W_key"],
    "v": ["trf_blocks.*.att.W_value"],
    "o": ["trf_blocks.*.att.out_proj"],
    "mlp": ["trf_blocks.*.ff.layers.0", "trf_blocks.*.ff.layers.2"],
    "head": ["out_head"],
}


class GPTModel(nn.Module):
    lora_targets = LORA_TARGETS  # read by loraft.lora, which knows no model family

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.gradient_checkpointing = False  # training: keep only each block's input, recompute the rest in backward
        self.final_norm = LayerNorm(cfg.emb_dim)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)

    @property
    def context_length(self) -> int:
        return self.config.context_length

    def new_cache(self) -> list[LayerCache]:
        return [LayerCache() for _ in self.trf_blocks]

    def hidden_states(self, input_ids, cache: list[LayerCache] | None = None):
        """The final-normed hidden state of every position, shape (batch, tokens, emb_dim)."""
        x = self.drop_emb(self.tok_emb(input_ids) + position_rows(self.pos_emb.weight, cache, input_ids.shape[1]))
        for i, block in enumerate(self.trf_blocks):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, cache[i] if cache else None)
        return self.final_norm(x)

    def forward(self, input_ids, cache: list[LayerCache] | None = None):
        return self.out_head(self.hidden_states(input_ids, cache))


SIZES = {
    "gpt2-small": GPT2Config(emb_dim=768, n_heads=12, n_layers=12),
    "gpt2-medium": GPT2Config(emb_dim=1024, n_heads=16, n_layers=24),
    "gpt2-large": GPT2Config(emb_dim=1280, n_heads=20, n_layers=36),
    "gpt2-xl": GPT2Config(emb_dim=1600, n_heads=25, n_layers=48),
}


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: GPT2Config) -> dict[str, torch.Tensor]:
    """Our state dict from a Hugging Face GPT-2 checkpoint.

    HF stores linear weights as Conv1D, (in, out), so they are transposed, and fuses query, key and
    value into one `c_attn` that is split here. Without `lm_head.weight` the head is a copy of the
    token embedding (GPT-2 ties them; the book's model keeps an untied copy).
    """
    hf = {k.removeprefix("transformer."): v for k, v in hf.items()}
    sd = {"tok_emb.weight": hf["wte.weight"], "pos_emb.weight": hf["wpe.weight"]}
    for i in range(cfg.n_layers):
        h, ours = f"h.{i}.", f"trf_blocks.{i}."
        q, k, v = hf[h + "attn.c_attn.weight"].t().chunk(3, dim=0)
        qb, kb, vb = hf[h + "attn.c_attn.bias"].chunk(3)
        sd |= {
            ours + "att.W_query.weight": q,
            ours + "att.W_query.bias": qb,
            ours + "att.W_key.weight": k,
            ours + "att.W_key.bias": kb,
            ours + "att.W_value.weight": v,
            ours + "att.W_value.bias": vb,
            ours + "att.out_proj.weight": hf[h + "attn.c_proj.weight"].t(),
            ours + "att.out_proj.bias": hf[h + "attn.c_proj.bias"],
            ours + "ff.layers.0.weight": hf[h + "mlp.c_fc.weight"].t(),
            ours + "ff.layers.0.bias": hf[h + "mlp.c_fc.bias"],
            ours + "ff.layers.2.weight": hf[h + "mlp.c_proj.weight"].t(),
            ours + "ff.layers.2.bias": hf[h + "mlp.c_proj.bias"],
            ours + "norm1.scale": hf[h + "ln_1.weight"],
            ours + "norm1.shift": hf[h + "ln_1.bias"],
            ours + "norm2.scale": hf[h + "ln_2.weight"],
            ours + "norm2.shift": hf[h + "ln_2.bias"],
        }
    sd["final_norm.scale"], sd["final_norm.shift"] = hf["ln_f.weight"], hf["ln_f.bias"]
    sd["out_head.weight"] = hf["lm_head.weight"] if "lm_head.weight" in hf else hf["wte.weight"].clone()
    return {k: v.contiguous() for k, v in sd.items()}


def config_from_hf(hf_config: dict) -> GPT2Config:
    return GPT2Config(
        vocab_size=hf_config["vocab_size"],
        context_length=hf_config["n_positions"],
        emb_dim=hf_config["n_embd"],
        n_heads=hf_config["n_head"],
        n_layers=hf_config["n_layer"],
    )


def to_hf(sd: dict[str, torch.Tensor], cfg: GPT2Config) -> tuple[dict, dict[str, torch.Tensor]]:
    """A GPT2LMHeadModel's config.json and tensors: from_hf_state_dict's inverse (Conv1D weights are
    (in, out); query, key and value fused in c_attn)."""
    hf = {"transformer.wte.weight": sd["tok_emb.weight"], "transformer.wpe.weight": sd["pos_emb.weight"]}
    for i in range(cfg.n_layers):
        h, ours = f"transformer.h.{i}.", f"trf_blocks.{i}."
        att = [ours + f"att.W_{part}." for part in ("query", "key", "value")]
        hf |= {
            h + "attn.c_attn.weight": torch.cat([sd[a + "weight"] for a in att]).t(),
            h + "attn.c_attn.bias": torch.cat([sd[a + "bias"] for a in att]),
            h + "attn.c_proj.weight": sd[ours + "att.out_proj.weight"].t(),
            h + "attn.c_proj.bias": sd[ours + "att.out_proj.bias"],
            h + "mlp.c_fc.weight": sd[ours + "ff.layers.0.weight"].t(),
            h + "mlp.c_fc.bias": sd[ours + "ff.layers.0.bias"],
            h + "mlp.c_proj.weight": sd[ours + "ff.layers.2.weight"].t(),
            h + "mlp.c_proj.bias": sd[ours + "ff.layers.2.bias"],
            h + "ln_1.weight": sd[ours + "norm1.scale"],
            h + "ln_1.bias": sd[ours + "norm1.shift"],
            h + "ln_2.weight": sd[ours + "norm2.scale"],
            h + "ln_2.bias": sd[ours + "norm2.shift"],
        }
    hf |= {"transformer.ln_f.weight": sd["final_norm.scale"], "transformer.ln_f.bias": sd["final_norm.shift"]}
    hf["lm_head.weight"] = sd["out_head.weight"]
    config = {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_embd": cfg.emb_dim,
        "n_head": cfg.n_heads,
        "n_layer": cfg.n_layers,
        "activation_function": "gelu_new",  # the book's GELU: the tanh approximation
        "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": False,  # the book's model keeps its own head (export_hf ties an equal one)
    }
    return config, {k: v.contiguous() for k, v in hf.items()}


FAMILY = Family(
    name="gpt2",
    model=GPTModel,
    config=GPT2Config,
    hf_blocks="transformer.h",
    hf_modules={
        "attn.c_attn": ["att.W_query", "att.W_key", "att.W_value"],
        "attn.c_proj": ["att.out_proj"],
        "mlp.c_fc": ["ff.layers.0"],
        "mlp.c_proj": ["ff.layers.2"],
    },
    hf_conv1d=True,
    hf_model_types=("gpt2",),
    config_from_hf=config_from_hf,
    from_hf_state_dict=from_hf_state_dict,
    hf_tokenizer=GPT2Tokenizer,
    to_hf=to_hf,
)
