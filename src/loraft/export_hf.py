"""transformers: the adapter merged into its base as a Hugging Face checkpoint folder (config.json,
model.safetensors, generation_config.json, tokenizer.json and tokenizer_config.json) that
AutoModelForCausalLM loads, or, for a classifier, AutoModelForSequenceClassification (its `score` head,
label names in id2label). The family's `to_hf` names and lays out the tensors and writes config.json."""

from pathlib import Path

import torch
from safetensors.torch import save_file

from .classifier import TextFormat
from .data.instruction import DEFAULT_TEMPLATE, end_id
from .errors import LoraftError
from .files import write_json
from .job import load_merged
from .lora import base_state_dict
from .models import family_of
from .tokenizer import save_for_transformers

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
# transformers' sequence classifier of a causal LM, where its name is not ...ForCausalLM's with the ending swapped
CLASSIFIERS = {
    "GPT2LMHeadModel": "GPT2ForSequenceClassification",
    "Gemma3ForCausalLM": "Gemma3TextForSequenceClassification",
}


def write(adapter_dir, folder: Path, dtype: str, weights=None):
    model, tokenizer, meta = load_merged(adapter_dir, weights)
    family = family_of(model)
    if family.to_hf is None:
        raise LoraftError(f"loraft does not write {family.name} models as transformers checkpoints")
    classifier = meta.get("task") == "classification"
    if classifier:
        check_pooling(meta, tokenizer)
    state = base_state_dict(model)
    config, tensors = family.to_hf(state, model.config)
    tied = state["out_head.weight"] is state["tok_emb.weight"] or torch.equal(
        state["out_head.weight"], state["tok_emb.weight"]
    )
    config["tie_word_embeddings"] = tied and not classifier
    if tied or classifier:
        del tensors["lm_head.weight"]
    ids = {"bos_token_id": getattr(tokenizer, "bos_id", None), "eos_token_id": tokenizer.eos_id}
    config |= {**ids, "pad_token_id": tokenizer.pad_id, "torch_dtype": str(DTYPES[dtype]).removeprefix("torch.")}
    if classifier:
        head = model.out_head.copies[meta["name"]]
        if head.bias is not None:
            raise LoraftError(
                "transformers' sequence classifiers have a `score` head without bias; this adapter's has one"
            )
        tensors["score.weight"] = head.weight
        name = config["architectures"][0]
        config["architectures"] = [CLASSIFIERS.get(name, name.replace("ForCausalLM", "ForSequenceClassification"))]
        config["id2label"] = dict(enumerate(meta["label_names"]))
        config["label2id"] = {label: i for i, label in enumerate(meta["label_names"])}
    else:
        template = meta.get("template", DEFAULT_TEMPLATE)
        ends = list(dict.fromkeys([end_id(tokenizer, template), tokenizer.eos_id]))
        generation = {**ids, "eos_token_id": ends, "pad_token_id": tokenizer.pad_id, "do_sample": False}
        write_json(folder / "generation_config.json", generation)
    write_json(folder / "config.json", config)
    stored = {name: t.detach().to(DTYPES[dtype]).contiguous() for name, t in tensors.items()}
    save_file(stored, folder / "model.safetensors", metadata={"format": "pt"})
    # a classifier's tokenizer puts the adapter's template around each text, as loraft reads it
    tok = TextFormat.of_adapter(meta).as_tokenizers(tokenizer) if classifier else None
    save_for_transformers(tokenizer, folder, meta.get("max_length") or model.config.context_length, tok)


def check_pooling(meta: dict, tokenizer):
    """transformers' sequence classifiers pool at each row's last token that is not padding."""
    fmt = TextFormat.of_adapter(meta)
    if fmt.pooling != "last":
        raise LoraftError(
            f"transformers' sequence classifiers pool at the last token; this adapter pools by {fmt.pooling!r}: "
            f"export it with --format onnx"
        )
    suffix = fmt.template.split("{text}")[1]
    if suffix and tokenizer.encode(suffix)[-1] == tokenizer.pad_id:
        raise LoraftError(
            "the adapter's template ends with the padding token, where transformers would not pool: "
            "export it with --format onnx"
        )
