"""Gemma 3's text models (config.json model_type "gemma3_text": Gemma 3 270M and 1B), as transformers'
Gemma3ForCausalLM computes them. Llama's pieces (`llama.py`: RoPE, grouped-query attention over the
KV cache, a gated feed-forward) with Gemma's own choices on top:

- the token embeddings are multiplied by sqrt(emb_dim);
- RMSNorm scales by (1 + weight) and runs in fp32; each block norms the input and the output of both
  its attention and its feed-forward (four norms), and q and k are normed per head;
- the feed-forward gates with GELU (tanh approximation) instead of SiLU;
- scores are scaled by query_pre_attn_scalar**-0.5 rather than head_dim**-0.5;
- most layers attend over a sliding window of the last `sliding_window` positions, with their own RoPE
  base; every few layers one attends over everything (config.json's layer_types).

Module names are Llama's, so LoRA targets and PEFT export are the same; the two extra norms are
`att_out_norm` and `ff_out_norm`.
"""

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import LoraftError
from ..lora import shared_input_linears
from .family import Family
from .kv_cache import LayerCache, causal_attention
from .llama import GGUF_NAMES as LLAMA_GGUF_NAMES
from .llama import (
    GGUF_TOP,
    HF_TOP,
    LORA_TARGETS,
    FeedForward,
    LlamaConfig,
    apply_rope,
    renamed,
    rope_rows,
    rope_tables,
    shared_gguf_metadata,
)

SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass
class Gemma3Config:
    vocab_size: int = 262144
    context_length: int = 32768
    emb_dim: int = 640
    n_heads: int = 4
    n_kv_heads: int = 1
    n_layers: int = 18
    hidden_dim: int = 2048
    head_dim: int = 256
    query_pre_attn_scalar: float = 256
    sliding_window: int = 512  # a sliding layer's query sees this many positions, its own included
    layer_types: list[str] = field(default_factory=lambda: ([SLIDING] * 5 + [FULL]) * 3)
    rope_base: float = 1000000.0  # of the full-attention layers
    rope_scaling: dict = field(default_factory=dict)  # of the full-attention layers: {"rope_type": "linear", ...}
    rope_local_base: float = 10000.0  # of the sliding layers
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    final_logit_softcapping: float | None = None  # logits squashed into (-cap, cap) by cap * tanh(logits / cap)
    model_type: str = "gemma3_text"

    @property
    def head_size(self) -> int:
        return self.head_dim


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: the weight starts at zero and scales by (1 + weight); normed and scaled in fp32,
    then cast back (Llama casts before scaling)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).type_as(x)


class GroupedQueryAttention(nn.Module):
    def __init__(self, cfg: Gemma3Config, sliding: bool):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.W_query = nn.Linear(cfg.emb_dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.W_key = nn.Linear(cfg.emb_dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.W_value = nn.Linear(cfg.emb_dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.out_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.emb_dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.window = cfg.sliding_window if sliding else None
        # attention scales scores by head_dim**-0.5; Gemma's are scaled by query_pre_attn_scalar**-0.5
        self.query_scale = (cfg.head_dim / cfg.query_pre_attn_scalar) ** 0.5

    def forward(self, x, cos, sin, cache: LayerCache | None = None):
        b, t, _ = x.shape
        q, k, v = shared_input_linears(x, self.W_query, self.W_key, self.W_value)
        q = self.q_norm(q.view(b, t, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(k.view(b, t, self.n_kv_heads, self.head_dim)).transpose(1, 2)
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        padding = None
        if cache is not None:
            k, v = cache.append(k, v)  # all of them: the window is a mask, so positions stay aligned
            padding = cache.padding
        if self.query_scale != 1:
            q = q * self.query_scale
        out = causal_attention(q, k, v, self.training, window=self.window, padding=padding)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, -1))


def tanh_gelu(x):
    return nn.functional.gelu(x, approximate="tanh")


class TransformerBlock(nn.Module):
    def __init__(self, cfg: Gemma3Config, sliding: bool):
        super().__init__()
        self.sliding = sliding  # which RoPE tables the model passes in
        self.norm1 = RMSNorm(cfg.emb_dim, cfg.norm_eps)
        self.att = GroupedQueryAttention(cfg, sliding)
        self.att_out_norm = RMSNorm(cfg.emb_dim, cfg.norm_eps)
        self.norm2 = RMSNorm(cfg.emb_dim, cfg.norm_eps)
        self.ff = FeedForward(cfg, tanh_gelu)
        self.ff_out_norm = RMSNorm(cfg.emb_dim, cfg.norm_eps)

    def forward(self, x, cos, sin, cache: LayerCache | None = None):
        x = x + self.att_out_norm(self.att(self.norm1(x), cos, sin, cache))
        return x + self.ff_out_norm(self.ff(self.norm2(x)))


class Gemma3(nn.Module):
    lora_targets = LORA_TARGETS  # Llama's module names

    def __init__(self, cfg: Gemma3Config):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.trf_blocks = nn.ModuleList(TransformerBlock(cfg, kind == SLIDING) for kind in cfg.layer_types)
        self.gradient_checkpointing = False  # training: keep only each block's input, recompute the rest in backward
        self.final_norm = RMSNorm(cfg.emb_dim, cfg.norm_eps)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.out_head.weight = self.tok_emb.weight
        tables = {"rope": (cfg.rope_base, cfg.rope_scaling), "rope_local": (cfg.rope_local_base, {})}
        for name, (base, scaling) in tables.items():
            rope = LlamaConfig(
                context_length=cfg.context_length, head_dim=cfg.head_dim, rope_base=base, rope_scaling=scaling
            )
            with torch.device("cpu"):  # real even when the model is built on the meta device to be loaded
                cos, sin = rope_tables(rope)
            self.register_buffer(f"{name}_cos", cos, persistent=False)
            self.register_buffer(f"{name}_sin", sin, persistent=False)

    @property
    def context_length(self) -> int:
        return self.config.context_length

    def new_cache(self) -> list[LayerCache]:
        return [LayerCache() for _ in self.trf_blocks]

    def hidden_states(self, input_ids, cache: list[LayerCache] | None = None):
        """The final-normed hidden state of every position, shape (batch, tokens, emb_dim)."""
        full = rope_rows(self.rope_cos, self.rope_sin, cache, input_ids.shape[1])
        local = rope_rows(self.rope_local_cos, self.rope_local_sin, cache, input_ids.shape[1])
        x = self.tok_emb(input_ids)
        x = x * torch.tensor(self.config.emb_dim**0.5).to(x.dtype)  # the scale rounded to the model's dtype first
        for i, block in enumerate(self.trf_blocks):
            cos, sin = local if block.sliding else full
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache[i] if cache else None)
        return self.final_norm(x)

    def forward(self, input_ids, cache: list[LayerCache] | None = None):
        logits = self.out_head(self.hidden_states(input_ids, cache))
        cap = self.config.final_logit_softcapping
        return logits if cap is None else cap * torch.tanh(logits / cap)


# Our module names in Hugging Face checkpoints (per block).
HF_NAMES = {
    "norm1": "input_layernorm",
    "att.W_query": "self_attn.q_proj",
    "att.W_key": "self_attn.k_proj",
    "att.W_value": "self_attn.v_proj",
    "att.q_norm": "self_attn.q_norm",
    "att.k_norm": "self_attn.k_norm",
    "att.out_proj": "self_attn.o_proj",
    "att_out_norm": "post_attention_layernorm",
    "norm2": "pre_feedforward_layernorm",
    "ff.gate": "mlp.gate_proj",
    "ff.up": "mlp.up_proj",
    "ff.down": "mlp.down_proj",
    "ff_out_norm": "post_feedforward_layernorm",
}


GGUF_NAMES = LLAMA_GGUF_NAMES | {"att_out_norm": "post_attention_norm", "ff_out_norm": "post_ffw_norm"}


def renamed_state(tensors: dict[str, torch.Tensor], cfg: Gemma3Config, blocks: str, names: dict, top: dict) -> dict:
    """Our state dict from `tensors` named by `blocks`, `names` and `top` (see llama.renamed), the output
    head tied to the embeddings where it is absent."""
    with torch.device("meta"):
        ours = list(Gemma3(cfg).state_dict())
    sd = {}
    for name in ours:
        theirs = renamed(name, blocks, names, top)
        embeddings = renamed("tok_emb.weight", blocks, names, top)
        sd[name] = tensors[theirs] if name != "out_head.weight" else tensors.get(theirs, tensors[embeddings])
    return sd


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: Gemma3Config) -> dict[str, torch.Tensor]:
    """Our state dict from a Gemma3ForCausalLM checkpoint."""
    return renamed_state(hf, cfg, "model.layers", HF_NAMES, HF_TOP)


def rope_of(settings: dict) -> tuple[str, dict]:
    """The RoPE type of one layer type's settings, and our rope_scaling for it."""
    kind = settings.get("rope_type", settings.get("type")) or "default"
    return kind, {} if kind != "linear" else {"rope_type": "linear", "factor": settings["factor"]}


def config_from_hf(hf: dict) -> Gemma3Config:
    """Our config from a gemma3_text config.json, as transformers 5 writes it (rope_parameters per layer
    type) or as the hub has it (transformers 4: rope_theta, rope_scaling, rope_local_base_freq); options
    our model does not implement are refused, not ignored."""
    n_layers = hf.get("num_hidden_layers", 26)
    # Older config.json files give the pattern as "one full layer in every sliding_window_pattern"
    pattern = hf.get("sliding_window_pattern", 6)
    layer_types = hf.get("layer_types") or [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n_layers)]
    per_type = hf.get("rope_parameters") or {}
    full = {"rope_theta": hf.get("rope_theta", 1000000.0), **(hf.get("rope_scaling") or {})}
    full |= per_type.get(FULL) or {}
    local = {"rope_theta": hf.get("rope_local_base_freq", 10000.0), **(per_type.get(SLIDING) or {})}
    (full_kind, rope_scaling), (local_kind, _) = rope_of(full), rope_of(local)
    activation = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    unsupported = {
        f"RoPE scaling {full_kind!r} (loraft implements default, linear)": full_kind not in ("default", "linear"),
        f"sliding-window RoPE scaling {local_kind!r} (loraft implements default)": local_kind != "default",
        f"hidden_activation {activation!r} (loraft implements gelu_pytorch_tanh)": activation != "gelu_pytorch_tanh",
        "attention_bias": hf.get("attention_bias", False),
        "attn_logit_softcapping": hf.get("attn_logit_softcapping") is not None,
        "use_bidirectional_attention": hf.get("use_bidirectional_attention", False),
        f"layer_types {sorted(set(layer_types) - {SLIDING, FULL})}": not set(layer_types) <= {SLIDING, FULL},
        f"{len(layer_types)} layer_types for {n_layers} layers": len(layer_types) != n_layers,
    }
    named = [name for name, value in unsupported.items() if value]
    if named:
        raise LoraftError(f"this gemma3_text config.json sets {', '.join(named)}, which loraft does not implement")
    # a field config.json leaves out takes Gemma3TextConfig's default
    return Gemma3Config(
        vocab_size=hf.get("vocab_size", 262208),
        context_length=hf.get("max_position_embeddings", 131072),
        emb_dim=hf.get("hidden_size", 2304),
        n_heads=hf.get("num_attention_heads", 8),
        n_kv_heads=hf.get("num_key_value_heads", 4),
        n_layers=n_layers,
        hidden_dim=hf.get("intermediate_size", 9216),
        head_dim=hf.get("head_dim", 256),
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
        sliding_window=hf.get("sliding_window") or 4096,
        layer_types=layer_types,
        rope_base=full["rope_theta"],
        rope_scaling=rope_scaling,
        rope_local_base=local["rope_theta"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=hf.get("tie_word_embeddings", True),
        final_logit_softcapping=hf.get("final_logit_softcapping"),
    )


def to_hf(sd: dict[str, torch.Tensor], cfg: Gemma3Config) -> tuple[dict, dict[str, torch.Tensor]]:
    """A gemma3_text config.json (the hub's keys) that config_from_hf reads back as `cfg`, and the tensors."""
    hf = {
        "model_type": "gemma3_text",
        "architectures": ["Gemma3ForCausalLM"],
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.context_length,
        "hidden_size": cfg.emb_dim,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "num_hidden_layers": cfg.n_layers,
        "intermediate_size": cfg.hidden_dim,
        "head_dim": cfg.head_dim,
        "query_pre_attn_scalar": cfg.query_pre_attn_scalar,
        "sliding_window": cfg.sliding_window,
        "layer_types": cfg.layer_types,
        "rope_theta": cfg.rope_base,
        "rope_local_base_freq": cfg.rope_local_base,
        "rms_norm_eps": cfg.norm_eps,
        "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": cfg.tie_embeddings,
        "final_logit_softcapping": cfg.final_logit_softcapping,
        "attn_logit_softcapping": None,
    }
    if cfg.rope_scaling:
        hf["rope_scaling"] = dict(cfg.rope_scaling)
    return hf, {renamed(name, "model.layers", HF_NAMES, HF_TOP): t for name, t in sd.items()}


# What llama.cpp assumes of every "gemma3" file rather than reading it: one full-attention layer after
# every five sliding-window ones, the sliding layers' RoPE base, and queries scaled by head_dim**-0.5
# (by (emb_dim / n_heads)**-0.5 in its 62-layer 27B, as Gemma 3 27B's query_pre_attn_scalar is).
GGUF_PATTERN, GGUF_LOCAL_BASE = 6, 10000.0


def gguf_layer_types(n_layers: int) -> list[str]:
    return [FULL if (i + 1) % GGUF_PATTERN == 0 else SLIDING for i in range(n_layers)]


def gguf_query_scalar(emb_dim: int, n_heads: int, n_layers: int, head_dim: int) -> int:
    return emb_dim // n_heads if n_layers == 62 else head_dim


def to_gguf(sd: dict[str, torch.Tensor], cfg: Gemma3Config) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """A "gemma3" GGUF as llama.cpp's converter writes it: its norms' weights stored as 1 + weight, the
    scale they apply. A config llama.cpp would read as another model is refused."""
    scalar = gguf_query_scalar(cfg.emb_dim, cfg.n_heads, cfg.n_layers, cfg.head_dim)
    differences = [
        (cfg.layer_types != gguf_layer_types(cfg.n_layers), "layer_types other than 5 sliding-window then 1 full"),
        (cfg.rope_local_base != GGUF_LOCAL_BASE, f"a sliding-window RoPE base of {cfg.rope_local_base:g}, not 10000"),
        (cfg.query_pre_attn_scalar != scalar, f"query_pre_attn_scalar {cfg.query_pre_attn_scalar:g}, not {scalar}"),
    ]
    named = [text for differs, text in differences if differs]
    if named:
        raise LoraftError(f"llama.cpp would read this Gemma 3 as another model: it has {'; '.join(named)}")
    tensors = {}
    for name, tensor in sd.items():
        if name == "out_head.weight" and cfg.tie_embeddings:
            continue
        theirs = renamed(name, "blk", GGUF_NAMES, GGUF_TOP)
        tensors[theirs] = tensor.float() + 1 if theirs.endswith("norm.weight") else tensor
    metadata = shared_gguf_metadata(cfg) | {"attention.sliding_window": cfg.sliding_window}
    if cfg.rope_scaling:  # linear, of the full-attention layers (llama.cpp leaves the sliding ones unscaled)
        metadata |= {"rope.scaling.type": "linear", "rope.scaling.factor": float(cfg.rope_scaling["factor"])}
    if cfg.final_logit_softcapping is not None:  # newer llama.cpp reads it, older builds assume none
        metadata["final_logit_softcapping"] = float(cfg.final_logit_softcapping)
    return "gemma3", metadata, tensors


def config_from_gguf(meta: dict, tensors: dict[str, torch.Tensor]) -> Gemma3Config:
    """Our config from what a "gemma3" GGUF says, and what llama.cpp assumes of it (see GGUF_PATTERN)."""
    a = "gemma3."
    n_layers, emb_dim, n_heads = meta[a + "block_count"], meta[a + "embedding_length"], meta[a + "attention.head_count"]
    head_dim = meta.get(a + "attention.key_length", emb_dim // n_heads)
    kind = meta.get(a + "rope.scaling.type", "none")
    if kind not in ("none", "linear"):
        raise LoraftError(f"this GGUF's RoPE scaling {kind!r} is not implemented in loraft (it reads linear)")
    window = meta.get(a + "attention.sliding_window") or 0
    context = meta[a + "context_length"]
    return Gemma3Config(
        vocab_size=tensors["token_embd.weight"].shape[0],
        context_length=context,
        emb_dim=emb_dim,
        n_heads=n_heads,
        n_kv_heads=meta.get(a + "attention.head_count_kv", n_heads),
        n_layers=n_layers,
        hidden_dim=meta[a + "feed_forward_length"],
        head_dim=head_dim,
        query_pre_attn_scalar=gguf_query_scalar(emb_dim, n_heads, n_layers, head_dim),
        sliding_window=window or context,
        # without a window llama.cpp attends over everything in every layer
        layer_types=gguf_layer_types(n_layers) if window else [FULL] * n_layers,
        rope_base=meta.get(a + "rope.freq_base", 10000.0),
        rope_scaling={"rope_type": "linear", "factor": meta[a + "rope.scaling.factor"]} if kind == "linear" else {},
        rope_local_base=GGUF_LOCAL_BASE,
        norm_eps=meta[a + "attention.layer_norm_rms_epsilon"],
        tie_embeddings="output.weight" not in tensors,
        final_logit_softcapping=meta.get(a + "final_logit_softcapping"),
    )


def from_gguf_tensors(tensors: dict[str, torch.Tensor], cfg: Gemma3Config) -> dict[str, torch.Tensor]:
    """Our state dict from the dequantised tensors of a "gemma3" GGUF (its norms hold 1 + weight)."""
    unshifted = {name: t - 1 if name.endswith("norm.weight") else t for name, t in tensors.items()}
    return renamed_state(unshifted, cfg, "blk", GGUF_NAMES, GGUF_TOP)


FAMILY = Family(
    name="gemma3_text",
    model=Gemma3,
    config=Gemma3Config,
    hf_blocks="model.layers",
    hf_modules={theirs: [ours] for ours, theirs in HF_NAMES.items() if "norm" not in ours},
    hf_conv1d=False,
    hf_model_types=("gemma3_text",),
    config_from_hf=config_from_hf,
    from_hf_state_dict=from_hf_state_dict,
    # as Llama's: RMSNorm, RoPE and GeGLU are chains of small kernels eager (not benchmarked for Gemma)
    compile_on_cpu=True,
    gguf_architectures=("gemma3",),
    config_from_gguf=config_from_gguf,
    from_gguf_tensors=from_gguf_tensors,
    to_gguf=to_gguf,
    to_hf=to_hf,
)
