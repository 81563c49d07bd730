"""The Llama architecture and the families that are Llama with a switch or two: Llama 2 and 3 (with
Llama 3's RoPE scaling), SmolLM2, Mistral, Qwen2/Qwen2.5 (bias on q, k and v), Qwen3 (RMSNorm on
each head's q and k) and Phi-3/Phi-4-mini (`phi3.py`: fused projections, partial rotary, LongRoPE).
RMSNorm, rotary position embeddings (RoPE), grouped-query attention and a SwiGLU feed-forward.

They are one file because they are one computation: each difference is a config field here, not a
different block. Module names follow our GPT-2 (trf_blocks, att.W_query, out_head, ...) so that one
LoRA vocabulary fits all; the feed-forward's three projections are named for what they do.
"""

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import LoraftError
from ..lora import shared_input_linears
from .family import Family
from .kv_cache import LayerCache, causal_attention, position_rows


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
    head_dim: int | None = None  # None: emb_dim // n_heads
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k, before RoPE
    rotary_fraction: float = 1.0  # Phi-4-mini rotates the first 3/4 of each head only
    rope_scaling: dict = field(default_factory=dict)  # {"rope_type": "llama3" | "linear" | "longrope", ...}
    model_type: str = "llama"  # the checkpoint's own architecture (config.json's model_type)

    @property
    def head_size(self) -> int:
        return self.head_dim or self.emb_dim // self.n_heads


ROPE_TYPES = ("default", "linear", "llama3", "longrope", "divisors")


def rope_frequencies(cfg: LlamaConfig) -> tuple[torch.Tensor, float]:
    """The inverse frequency of each rotated pair, and the factor cos and sin are scaled by."""
    dim = int(cfg.head_size * cfg.rotary_fraction)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / cfg.rope_base**exponents
    scaling = cfg.rope_scaling
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "divisors":  # as a GGUF stores Llama 3's scaling
        return inv_freq / torch.tensor(scaling["divisors"], dtype=torch.float32), 1.0
    if kind == "llama3":
        # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, those between interpolated
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        wavelength = 2 * math.pi / inv_freq
        scaled = torch.where(wavelength > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelength - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        between = (wavelength >= old_context / high) & (wavelength <= old_context / low)
        return torch.where(between, smoothed, scaled), 1.0
    if kind == "longrope":
        # Phi-3: the short factors, since contexts stop at the original length (see config_from_hf)
        original = scaling["original_max_position_embeddings"]
        factor = scaling.get("factor") or scaling["max_position_embeddings"] / original
        attention = scaling.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
        return 1.0 / (torch.tensor(scaling["short_factor"], dtype=torch.float32) * cfg.rope_base**exponents), attention
    return inv_freq, 1.0


def rope_tables(cfg: LlamaConfig):
    """cos and sin of every (position, frequency) pair, each half of the rotated dimensions repeated."""
    inv_freq, factor = rope_frequencies(cfg)
    angles = torch.outer(torch.arange(cfg.context_length, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos() * factor, angles.sin() * factor


def rope_rows(cos, sin, cache, n_tokens: int):
    """cos and sin of the next `n_tokens` positions, shaped to rotate (batch, heads, tokens, dim)."""
    cos, sin = position_rows(cos, cache, n_tokens), position_rows(sin, cache, n_tokens)
    return (cos, sin) if cos.dim() == 2 else (cos[:, None], sin[:, None])  # a row's own positions, every head


def apply_rope(x, cos, sin):
    """Rotate each (i, i + d/2) pair of x's first d = cos.shape[-1] dimensions by its position's angle
    (the "rotate half" layout); with partial rotary the rest of each head passes unrotated."""
    d = cos.shape[-1]
    if d < x.shape[-1]:
        return torch.cat([apply_rope(x[..., :d], cos, sin), x[..., d:]], dim=-1)
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class GroupedQueryAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_size
        self.W_query = nn.Linear(cfg.emb_dim, cfg.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.W_key = nn.Linear(cfg.emb_dim, cfg.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.W_value = nn.Linear(cfg.emb_dim, cfg.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(cfg.n_heads * self.head_dim, cfg.emb_dim, bias=False)
        if cfg.qk_norm:
            self.q_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps)

    def forward(self, x, cos, sin, cache: LayerCache | None = None):
        b, t, _ = x.shape
        q, k, v = shared_input_linears(x, self.W_query, self.W_key, self.W_value)
        q = q.view(b, t, self.n_heads, self.head_dim)
        k = k.view(b, t, self.n_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        padding = None
        if cache is not None:
            k, v = cache.append(k, v)
            padding = cache.padding
        out = causal_attention(q, k, v, self.training, padding=padding)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    """A gated feed-forward: SwiGLU by default (Gemma passes its tanh GELU)."""

    def __init__(self, cfg, activation=nn.functional.silu):
        super().__init__()
        self.gate = nn.Linear(cfg.emb_dim, cfg.hidden_dim, bias=False)
        self.up = nn.Linear(cfg.emb_dim, cfg.hidden_dim, bias=False)
        self.down = nn.Linear(cfg.hidden_dim, cfg.emb_dim, bias=False)
        self.activation = activation

    def forward(self, x):
        gate, up = shared_input_linears(x, self.gate, self.up)
        return self.down(self.activation(gate) * up)


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
            cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @property
    def context_length(self) -> int:
        return self.config.context_length

    def new_cache(self) -> list[LayerCache]:
        return [LayerCache() for _ in self.trf_blocks]

    def hidden_states(self, input_ids, cache: list[LayerCache] | None = None):
        """The final-normed hidden state of every position, shape (batch, tokens, emb_dim)."""
        cos, sin = rope_rows(self.rope_cos, self.rope_sin, cache, input_ids.shape[1])
        x = self.tok_emb(input_ids)
        for i, block in enumerate(self.trf_blocks):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache[i] if cache else None)
        return self.final_norm(x)

    def forward(self, input_ids, cache: list[LayerCache] | None = None):
        return self.out_head(self.hidden_states(input_ids, cache))


# Our module names in llama.cpp's GGUF files and in Hugging Face checkpoints (per block).
GGUF_NAMES = {
    "norm1": "attn_norm",
    "att.W_query": "attn_q",
    "att.W_key": "attn_k",
    "att.W_value": "attn_v",
    "att.q_norm": "attn_q_norm",
    "att.k_norm": "attn_k_norm",
    "att.out_proj": "attn_output",
    "norm2": "ffn_norm",
    "ff.gate": "ffn_gate",
    "ff.up": "ffn_up",
    "ff.down": "ffn_down",
}
HF_NAMES = {
    "norm1": "input_layernorm",
    "att.W_query": "self_attn.q_proj",
    "att.W_key": "self_attn.k_proj",
    "att.W_value": "self_attn.v_proj",
    "att.q_norm": "self_attn.q_norm",
    "att.k_norm": "self_attn.k_norm",
    "att.out_proj": "self_attn.o_proj",
    "norm2": "post_attention_layernorm",
    "ff.gate": "mlp.gate_proj",
    "ff.up": "mlp.up_proj",
    "ff.down": "mlp.down_proj",
}
# GGUF architecture of each model_type (llama.cpp converts Mistral and SmolLM2 as "llama")
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def parameter_names(cfg: LlamaConfig) -> list[str]:
    with torch.device("meta"):
        return list(Llama(cfg).state_dict())


def renamed(name: str, blocks: str, names: dict[str, str], top: dict[str, str]) -> str:
    """Our parameter `name` in another naming: `blocks`.{i}.`names`[module] inside a block, `top` outside."""
    module, kind = name.rsplit(".", 1)
    if not module.startswith("trf_blocks."):
        return f"{top[module]}.{kind}"
    _, i, inner = module.split(".", 2)
    return f"{blocks}.{i}.{names[inner]}.{kind}"


def permute_rope_rows(weight: torch.Tensor, n_heads: int, inverse: bool = False) -> torch.Tensor:
    """llama.cpp's reordering of a "llama" GGUF's query/key rows (or its inverse): its converter
    interleaves each head's two rotary halves, so that RoPE rotates adjacent pairs; our `apply_rope`
    rotates (i, i + head_dim/2) pairs as the original checkpoint does."""
    out_dim = weight.shape[0]
    pairs = (n_heads, 2, out_dim // n_heads // 2) if not inverse else (n_heads, out_dim // n_heads // 2, 2)
    return weight.reshape(*pairs, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


GGUF_TOP = {"tok_emb": "token_embd", "final_norm": "output_norm", "out_head": "output"}


def from_gguf_tensors(tensors: dict[str, torch.Tensor], cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """Our state dict from the dequantised tensors of a llama.cpp GGUF file."""
    sd = {}
    for name in parameter_names(cfg):
        theirs = renamed(name, "blk", GGUF_NAMES, GGUF_TOP)
        sd[name] = tensors[theirs] if name != "out_head.weight" else tensors.get(theirs, tensors["token_embd.weight"])
        if GGUF_ARCHITECTURES[cfg.model_type] == "llama" and (".W_query." in name or ".W_key." in name):
            sd[name] = permute_rope_rows(sd[name], cfg.n_heads if ".W_query." in name else cfg.n_kv_heads, True)
    return sd


def to_gguf(sd: dict[str, torch.Tensor], cfg: LlamaConfig) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """A GGUF's architecture, metadata and tensors from our state dict, as llama.cpp's converter writes them."""
    architecture = GGUF_ARCHITECTURES[cfg.model_type]
    tensors = {}
    for name, tensor in sd.items():
        if name == "out_head.weight" and cfg.tie_embeddings:
            continue
        if architecture == "llama" and (".W_query." in name or ".W_key." in name):
            tensor = permute_rope_rows(tensor, cfg.n_heads if ".W_query." in name else cfg.n_kv_heads)
        tensors[renamed(name, "blk", GGUF_NAMES, GGUF_TOP)] = tensor
    kind = cfg.rope_scaling.get("rope_type", "default")
    if kind in ("llama3", "divisors"):  # llama.cpp divides its frequencies by these
        base = rope_frequencies(LlamaConfig(**{**vars(cfg), "rope_scaling": {}}))[0]
        tensors["rope_freqs.weight"] = base / rope_frequencies(cfg)[0]
    metadata = gguf_metadata(cfg)
    if kind == "linear":
        metadata |= {"rope.scaling.type": "linear", "rope.scaling.factor": float(cfg.rope_scaling["factor"])}
    return architecture, metadata, tensors


def gguf_metadata(cfg: LlamaConfig) -> dict:
    """The architecture's keys of a GGUF (without the "<architecture>." prefix)."""
    return shared_gguf_metadata(cfg) | {"rope.dimension_count": int(cfg.head_size * cfg.rotary_fraction)}


def shared_gguf_metadata(cfg) -> dict:
    """The GGUF keys of a Llama-like config (Llama's, Gemma 3's)."""
    return {
        "vocab_size": cfg.vocab_size,
        "context_length": cfg.context_length,
        "embedding_length": cfg.emb_dim,
        "block_count": cfg.n_layers,
        "feed_forward_length": cfg.hidden_dim,
        "attention.head_count": cfg.n_heads,
        "attention.head_count_kv": cfg.n_kv_heads,
        "attention.key_length": cfg.head_size,
        "attention.value_length": cfg.head_size,
        "attention.layer_norm_rms_epsilon": float(cfg.norm_eps),
        "rope.freq_base": float(cfg.rope_base),
    }


def config_from_gguf(meta: dict, tensors: dict[str, torch.Tensor]) -> LlamaConfig:
    architecture = meta["general.architecture"]
    a = architecture + "."
    n_heads = meta[a + "attention.head_count"]
    rope_scaling = {}
    if "rope_freqs.weight" in tensors:  # Llama 3's scaling, written as a divisor of each frequency
        rope_scaling = {"rope_type": "divisors", "divisors": tensors["rope_freqs.weight"].float().tolist()}
    kind = meta.get(a + "rope.scaling.type", "none")
    if kind == "linear":
        rope_scaling = {"rope_type": "linear", "factor": meta[a + "rope.scaling.factor"]}
    elif kind != "none":
        raise LoraftError(
            f"this GGUF's RoPE scaling {kind!r} is not implemented in loraft (it reads linear and Llama 3's)"
        )
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
        head_dim=meta.get(a + "attention.key_length"),
        qkv_bias="blk.0.attn_q.bias" in meta["tensor_names"],
        qk_norm="blk.0.attn_q_norm.weight" in meta["tensor_names"],
        rope_scaling=rope_scaling,
        model_type=architecture,
    )


HF_TOP = {"tok_emb": "model.embed_tokens", "final_norm": "model.norm", "out_head": "lm_head"}


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """Our state dict from a Hugging Face ...ForCausalLM checkpoint (the same RoPE layout as ours)."""
    sd = {}
    for name in parameter_names(cfg):
        theirs = renamed(name, "model.layers", HF_NAMES, HF_TOP)
        sd[name] = hf[theirs] if name != "out_head.weight" else hf.get(theirs, hf["model.embed_tokens.weight"])
    return sd


SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3")
HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}


def config_from_hf(hf: dict) -> LlamaConfig:
    """Our config from the config.json of a Llama, Mistral, Qwen2, Qwen3 or Phi-3; options our model
    does not implement are refused, not ignored."""
    model_type = hf.get("model_type", "llama")
    emb_dim, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    # transformers 5 writes rope_parameters; earlier versions rope_theta and rope_scaling beside the rest
    rope = {**hf, **(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    rope_type = rope.get("rope_type", rope.get("type")) or "default"
    context = hf["max_position_embeddings"]
    unsupported = {
        f"RoPE scaling {rope_type!r} (loraft implements {', '.join(ROPE_TYPES[:-1])})": rope_type
        not in ROPE_TYPES[:-1],
        "mlp_bias": hf.get("mlp_bias", False),
        "hidden_act": hf.get("hidden_act", "silu") != "silu",
        "attention_bias": hf.get("attention_bias", False) and model_type != "qwen2",
    }
    named = [name for name, value in unsupported.items() if value]
    if named:
        raise LoraftError(f"this {model_type} config.json sets {', '.join(named)}, which loraft does not implement")
    rope_scaling = {}
    if rope_type != "default":
        keys = {
            "linear": ["factor"],
            "llama3": ["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"],
            "longrope": [
                "short_factor",
                "long_factor",
                "original_max_position_embeddings",
                "factor",
                "attention_factor",
            ],
        }[rope_type]
        rope_scaling = {"rope_type": rope_type} | {key: rope.get(key) for key in keys}
    if rope_type == "longrope":  # the long factors apply beyond the original context, which is refused
        rope_scaling["max_position_embeddings"] = context
        context = min(context, rope["original_max_position_embeddings"])
    # A context no longer than the sliding window: within it, sliding-window attention is full attention.
    window = hf.get("sliding_window")
    if window and (model_type in ("mistral", "phi3") or hf.get("use_sliding_window")):
        context = min(context, window)
    return LlamaConfig(
        vocab_size=hf["vocab_size"],
        context_length=context,
        emb_dim=emb_dim,
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        n_layers=hf["num_hidden_layers"],
        hidden_dim=hf["intermediate_size"],
        rope_base=rope.get("rope_theta", 10000.0),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        head_dim=hf.get("head_dim"),
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
        rotary_fraction=rope.get("partial_rotary_factor", 1.0),
        rope_scaling=rope_scaling,
        model_type=model_type,
    )


def config_to_hf(cfg: LlamaConfig) -> dict:
    """A config.json that config_from_hf reads back as `cfg`, in the hub's (transformers 4) keys, which
    transformers 5 reads too. A window that capped the context is gone: within it, attention is full."""
    rope = {key: value for key, value in cfg.rope_scaling.items() if value is not None}
    kind = rope.pop("rope_type", "default")
    if kind == "divisors":
        raise LoraftError("this model's RoPE scaling is a GGUF's rope_freqs tensor, which config.json cannot describe")
    hf = {
        "model_type": cfg.model_type,
        "architectures": [HF_ARCHITECTURES[cfg.model_type]],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.emb_dim,
        "intermediate_size": cfg.hidden_dim,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "num_hidden_layers": cfg.n_layers,
        "max_position_embeddings": rope.pop("max_position_embeddings", cfg.context_length),
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_base,
        "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_embeddings,
        "sliding_window": None,
    }
    if cfg.head_dim is not None:
        hf["head_dim"] = cfg.head_dim
    if cfg.rotary_fraction != 1.0:
        hf["partial_rotary_factor"] = cfg.rotary_fraction
    if kind == "longrope":  # Phi-3 keeps it beside rope_scaling
        hf["original_max_position_embeddings"] = rope["original_max_position_embeddings"]
    if kind != "default":
        hf["rope_scaling"] = {"rope_type": kind, **rope}
    return hf


def to_hf(sd: dict[str, torch.Tensor], cfg: LlamaConfig) -> tuple[dict, dict[str, torch.Tensor]]:
    return config_to_hf(cfg), {renamed(name, "model.layers", HF_NAMES, HF_TOP): t for name, t in sd.items()}


FAMILY = Family(
    name="llama",
    model=Llama,
    config=LlamaConfig,
    hf_blocks="model.layers",
    hf_modules={theirs: [ours] for ours, theirs in HF_NAMES.items() if "norm" not in ours},
    hf_conv1d=False,
    hf_model_types=SUPPORTED_TYPES,
    config_from_hf=config_from_hf,
    from_hf_state_dict=from_hf_state_dict,
    # RMSNorm, RoPE and SwiGLU run eager as chains of small kernels, which compiling fuses
    compile_on_cpu=True,
    gguf_architectures=("llama", "qwen2", "qwen3"),
    config_from_gguf=config_from_gguf,
    from_gguf_tensors=from_gguf_tensors,
    to_gguf=to_gguf,
    to_hf=to_hf,
)
