"""Phi-3 and Phi-4-mini: our Llama (`llama.py`) with fused checkpoint tensors. Their checkpoints
store q, k and v as one qkv_proj and the feed-forward's gate and up as one gate_up_proj; the model
itself differs from Llama only in config fields (partial rotary, LongRoPE), so the projections are
split on load into Llama's modules, and LoRA, PEFT and GGUF see the fused names again through
`hf_modules` and `to_gguf`."""

from dataclasses import replace

import torch

from .family import Family
from .llama import (
    GGUF_TOP,
    HF_NAMES,
    HF_TOP,
    Llama,
    LlamaConfig,
    config_from_hf,
    config_to_hf,
    gguf_metadata,
    renamed,
)
from .llama import config_from_gguf as llama_config_from_gguf
from .llama import from_hf_state_dict as llama_from_hf_state_dict

HF_FUSED = {"self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"), "mlp.gate_up_proj": ("gate_proj", "up_proj")}
GGUF_NAMES = {
    "norm1": "attn_norm",
    "att.W_qkv": "attn_qkv",
    "att.out_proj": "attn_output",
    "norm2": "ffn_norm",
    "ff.gate_up": "ffn_up",
    "ff.down": "ffn_down",
}


def split_sizes(cfg: LlamaConfig) -> dict[str, list[int]]:
    """Rows of each fused projection that belong to each of its parts, in order."""
    q, kv = cfg.n_heads * cfg.head_size, cfg.n_kv_heads * cfg.head_size
    return {"self_attn.qkv_proj": [q, kv, kv], "mlp.gate_up_proj": [cfg.hidden_dim, cfg.hidden_dim]}


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """Our state dict from a Phi3ForCausalLM checkpoint: the fused projections split, then Llama's."""
    unfused = {name: hf[name] for name in ("model.embed_tokens.weight", "model.norm.weight")}
    if "lm_head.weight" in hf:
        unfused["lm_head.weight"] = hf["lm_head.weight"]
    for i in range(cfg.n_layers):
        block = f"model.layers.{i}."
        for name in ("input_layernorm", "post_attention_layernorm", "self_attn.o_proj", "mlp.down_proj"):
            unfused[f"{block}{name}.weight"] = hf[f"{block}{name}.weight"]
        for fused, sizes in split_sizes(cfg).items():
            tensor = hf[f"{block}{fused}.weight"]
            if tensor.shape[0] != sum(sizes):
                raise KeyError(f"{block}{fused}.weight of {sum(sizes)} rows")
            module = fused.split(".")[0]
            for part, rows in zip(HF_FUSED[fused], tensor.split(sizes)):
                unfused[f"{block}{module}.{part}.weight"] = rows
    return llama_from_hf_state_dict(unfused, cfg)


def config_from_gguf(meta: dict, tensors: dict[str, torch.Tensor]) -> LlamaConfig:
    """Llama's config from the file, with Phi-3's partial rotary and LongRoPE factors."""
    a = "phi3."
    cfg = llama_config_from_gguf(meta, tensors)
    rope_scaling = {}
    if "rope_factors_short.weight" in tensors:
        rope_scaling = {
            "rope_type": "longrope",
            "short_factor": tensors["rope_factors_short.weight"].float().tolist(),
            "long_factor": tensors["rope_factors_long.weight"].float().tolist(),
            "original_max_position_embeddings": meta[a + "rope.scaling.original_context_length"],
            "factor": None,
            "attention_factor": meta.get(a + "rope.scaling.attn_factor"),
            "max_position_embeddings": meta[a + "context_length"],
        }
    context = rope_scaling.get("original_max_position_embeddings", cfg.context_length)
    return replace(
        cfg,
        context_length=min(context, meta.get(a + "attention.sliding_window") or context),
        rotary_fraction=meta.get(a + "rope.dimension_count", cfg.head_size) / cfg.head_size,
        rope_scaling=rope_scaling,
    )


def fused_state(sd: dict[str, torch.Tensor], cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """Our state dict with each block's q, k, v and gate, up concatenated, as Phi-3 stores them."""
    fused = dict(sd)
    for i in range(cfg.n_layers):
        att, ff = f"trf_blocks.{i}.att.", f"trf_blocks.{i}.ff."
        fused[att + "W_qkv.weight"] = torch.cat([fused.pop(att + f"W_{p}.weight") for p in ("query", "key", "value")])
        fused[ff + "gate_up.weight"] = torch.cat([fused.pop(ff + "gate.weight"), fused.pop(ff + "up.weight")])
    return fused


def from_gguf_tensors(tensors: dict[str, torch.Tensor], cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    hf = {"model.embed_tokens.weight": tensors["token_embd.weight"], "model.norm.weight": tensors["output_norm.weight"]}
    if "output.weight" in tensors:
        hf["lm_head.weight"] = tensors["output.weight"]
    hf_names = {
        "attn_norm": "input_layernorm",
        "attn_qkv": "self_attn.qkv_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm",
        "ffn_up": "mlp.gate_up_proj",
        "ffn_down": "mlp.down_proj",
    }
    for i in range(cfg.n_layers):
        for gguf_name, theirs in hf_names.items():
            hf[f"model.layers.{i}.{theirs}.weight"] = tensors[f"blk.{i}.{gguf_name}.weight"]
    return from_hf_state_dict(hf, cfg)


def to_gguf(sd: dict[str, torch.Tensor], cfg: LlamaConfig) -> tuple[str, dict, dict[str, torch.Tensor]]:
    tensors = {
        renamed(name, "blk", GGUF_NAMES, GGUF_TOP): tensor
        for name, tensor in fused_state(sd, cfg).items()
        if not (name == "out_head.weight" and cfg.tie_embeddings)
    }
    metadata = gguf_metadata(cfg)
    if cfg.rope_scaling.get("rope_type") == "longrope":
        tensors["rope_factors_short.weight"] = torch.tensor(cfg.rope_scaling["short_factor"])
        tensors["rope_factors_long.weight"] = torch.tensor(cfg.rope_scaling["long_factor"])
        metadata["context_length"] = cfg.rope_scaling["max_position_embeddings"]
        metadata["rope.scaling.original_context_length"] = cfg.rope_scaling["original_max_position_embeddings"]
        if cfg.rope_scaling.get("attention_factor") is not None:
            metadata["rope.scaling.attn_factor"] = float(cfg.rope_scaling["attention_factor"])
    return "phi3", metadata, tensors


def to_hf(sd: dict[str, torch.Tensor], cfg: LlamaConfig) -> tuple[dict, dict[str, torch.Tensor]]:
    names = HF_NAMES | {"att.W_qkv": "self_attn.qkv_proj", "ff.gate_up": "mlp.gate_up_proj"}
    return config_to_hf(cfg), {renamed(n, "model.layers", names, HF_TOP): t for n, t in fused_state(sd, cfg).items()}


FAMILY = Family(
    name="phi3",
    model=Llama,
    config=LlamaConfig,
    hf_blocks="model.layers",
    hf_modules={
        "self_attn.qkv_proj": ["att.W_query", "att.W_key", "att.W_value"],
        "self_attn.o_proj": ["att.out_proj"],
        "mlp.gate_up_proj": ["ff.gate", "ff.up"],
        "mlp.down_proj": ["ff.down"],
    },
    hf_conv1d=False,
    hf_model_types=("phi3",),
    config_from_hf=config_from_hf,
    from_hf_state_dict=from_hf_state_dict,
    compile_on_cpu=True,
    gguf_architectures=("phi3",),
    config_from_gguf=config_from_gguf,
    from_gguf_tensors=from_gguf_tensors,
    to_gguf=to_gguf,
    to_hf=to_hf,
)
