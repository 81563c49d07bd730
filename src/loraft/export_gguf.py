"""llama.cpp and Ollama: an instruction adapter as llama.cpp's LoRA adapter file (`gguf-lora`, applied
over the base model's own GGUF when llama.cpp runs), or merged into its base as one GGUF (`gguf`), each
with an Ollama Modelfile where its base is a GGUF file.

llama.cpp adds (alpha / rank) * B A x to each layer it finds a `<tensor>.lora_a` / `.lora_b` pair for,
with one alpha for the whole file and the rank read from B: the adapter's own scale (book, standard or
rslora) is written as alpha = scale * rank, and where llama.cpp fuses layers (Phi-3's attn_qkv) their
LoRAs stack into one of k times the rank, its A multiplied by k to keep each scale."""

from pathlib import Path

import torch

from . import weights as weight_files
from .adapters import read_adapter
from .data.instruction import DEFAULT_TEMPLATE, end_id, format_prompt
from .errors import LoraftError
from .gguf_writer import write_gguf, write_gguf_file
from .job import load_merged
from .lora import LoraConfig
from .models import FAMILIES, family_named
from .quantize import block_linears
from .tokenizer import BPETokenizer

LORA_FILE, MODEL_FILE, MODELFILE = "adapter.gguf", "model.gguf", "Modelfile"


def causal_lm_adapter(adapter_dir, fmt: str) -> tuple[dict, dict]:
    """adapter.json and tensors of an adapter llama.cpp can run: LoRA layers of a causal LM."""
    meta, tensors = read_adapter(adapter_dir)
    if meta["modules_to_save"] or meta.get("task") == "classification":
        raise LoraftError(
            f"adapter {adapter_dir} is a classifier: its head has no place in llama.cpp; export it with "
            f"--format hf, onnx or peft (--format {fmt} takes instruction adapters)"
        )
    family = family_named(meta["architecture"], str(adapter_dir))
    if family.to_gguf is None:
        gguf_families = ", ".join(name for name, f in FAMILIES.items() if f.to_gguf)
        raise LoraftError(f"loraft writes GGUF for {gguf_families} models; {adapter_dir} is over a {family.name} model")
    return meta, tensors


def write_lora(adapter_dir, folder: Path, dtype: str, weights=None):
    meta, tensors = causal_lm_adapter(adapter_dir, "gguf-lora")
    if meta.get("variant", "lora") != "lora" or meta.get("trained_parameters") or not meta["target_modules"]:
        raise LoraftError(f"adapter {adapter_dir} is not a plain LoRA, which is all a llama.cpp LoRA file holds")
    family = family_named(meta["architecture"], str(adapter_dir))
    config = family.config(**meta["base_config"])
    targets, rank = meta["target_modules"], meta["rank"]
    if "out_head" in targets and getattr(config, "tie_embeddings", False):
        raise LoraftError(
            f"adapter {adapter_dir} has a LoRA on an output head tied to the embeddings, which llama.cpp's "
            f"LoRA files cannot hold; export it merged (--format gguf)"
        )
    scale = LoraConfig.of_adapter(meta).scale
    alpha = scale * rank
    architecture, B, markers, A = lora_pairs_in_gguf_layout(family, config, tensors, targets, rank)
    out = {}
    for name, b in B.items():
        columns = markers[name].any(dim=0).nonzero().flatten()
        if not len(columns):
            continue
        owners = list(dict.fromkeys(int(markers[name][:, c].max()) for c in columns))  # in column order
        llama_scale = alpha / len(columns) if alpha else 1.0  # llama.cpp takes alpha 0 as no scaling
        out[f"{name}.lora_a"] = torch.cat([A[owner] for owner in owners]) * (scale / llama_scale)
        out[f"{name}.lora_b"] = b[:, columns]
    metadata = {"general.type": "adapter", "adapter.type": "lora", "adapter.lora.alpha": float(alpha)}
    metadata["general.name"] = f"{meta['base_model']} + {Path(adapter_dir).name}"
    write_gguf_file(folder / LORA_FILE, architecture, metadata, out, dtype)
    base = base_gguf(meta["base_model"])
    if base is not None:
        tokenizer = BPETokenizer.from_gguf(weight_files.read_gguf_metadata(base))
        write_modelfile(folder, f"FROM {base}\nADAPTER ./{LORA_FILE}", tokenizer, meta)


def lora_pairs_in_gguf_layout(family, config, tensors: dict, targets: list[str], rank: int):
    """Each LoRA's B laid out as llama.cpp lays out its layer's weight, by the family's own to_gguf: each
    targeted layer of a block gets `rank` columns of its own in a block-wide B, so that fusing layers
    (stacking their rows) stacks their LoRAs. Returns the GGUF architecture, B by GGUF tensor name, the
    same with each column holding its owner's number, and A by owner number."""
    with torch.device("meta"):
        model = family.model(config)
    layers = block_linears(model) + ["out_head"] * ("out_head" in targets)
    targeted_in_block = {}
    for name in layers:
        targeted_in_block.setdefault(block_of(name), []).extend([name] * (name in targets))
    B, markers, A = {}, {}, {}
    for name in layers:
        targeted = targeted_in_block[block_of(name)]
        B[f"{name}.weight"] = torch.zeros(model.get_submodule(name).out_features, max(1, rank * len(targeted)))
        markers[f"{name}.weight"] = torch.zeros_like(B[f"{name}.weight"])
        if name in targets:
            owner, start = len(A) + 1, rank * targeted.index(name)
            A[owner] = tensors[f"{name}.lora_A"]
            B[f"{name}.weight"][:, start : start + rank] = tensors[f"{name}.lora_B"]
            markers[f"{name}.weight"][:, start : start + rank] = owner
    architecture, _, laid_out = family.to_gguf(B, config)
    return architecture, laid_out, family.to_gguf(markers, config)[2], A


def block_of(layer: str) -> str:
    """ "trf_blocks.3" of "trf_blocks.3.att.W_query"; a layer outside the blocks is its own."""
    return ".".join(layer.split(".")[:2]) if layer.startswith("trf_blocks.") else layer


def write_merged(adapter_dir, folder: Path, dtype: str, weights=None):
    causal_lm_adapter(adapter_dir, "gguf")
    model, tokenizer, meta = load_merged(adapter_dir, weights)
    write_gguf(model, folder / MODEL_FILE, dtype, tokenizer.gguf_metadata(model.config.vocab_size))
    write_modelfile(folder, f"FROM ./{MODEL_FILE}", tokenizer, meta)


def base_gguf(base_model: str) -> Path | None:
    """The GGUF file a base model is, if it is one."""
    if base_model.endswith(".gguf"):
        return Path(base_model).resolve()
    return weight_files.smollm2_gguf() if base_model == "smollm2-135m" else None


PROMPT = "\x00prompt\x00"  # stands for Ollama's {{ .Prompt }} while the template renders


def write_modelfile(folder: Path, source: str, tokenizer, meta: dict):
    """An Ollama Modelfile: `source` (FROM, ADAPTER), the prompt as the adapter was trained to read it
    (its Alpaca or chat template; a chat template where the adapter names none), and its stop tokens."""
    template = meta.get("template") or ("chat" if tokenizer.chat_template else DEFAULT_TEMPLATE)
    prompt = format_prompt(tokenizer, PROMPT, "", template)
    bos = tokenizer.decode(tokenizer.bos_prefix)
    if template == "chat" and bos:  # llama.cpp puts the BOS first itself (the GGUF's add_bos_token)
        prompt = prompt.removeprefix(bos)
    if '"""' in prompt:
        raise LoraftError('the prompt template holds """, which an Ollama Modelfile cannot quote')
    prompt = prompt.replace("{{", '{{ "{{" }}').replace(PROMPT, "{{ .Prompt }}")
    stops = dict.fromkeys(tokenizer.decode([i]) for i in (end_id(tokenizer, template), tokenizer.eos_id))
    lines = [source, f'TEMPLATE """{prompt}"""', *[f'PARAMETER stop "{stop}"' for stop in stops]]
    (folder / MODELFILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
