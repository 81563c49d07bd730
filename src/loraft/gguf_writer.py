"""Writing a model as a llama.cpp GGUF file: its family names and lays out the tensors (`Family.to_gguf`),
this file stores them in one of llama.cpp's tensor types, with the tokenizer's metadata beside them."""

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import LoraftError
from .files import atomic_write
from .lora import base_state_dict
from .models import family_of

# our name -> the gguf package's type; llama.cpp's file_type number for general.file_type
TENSOR_TYPES = {"f32": ("F32", 0), "f16": ("F16", 1), "bf16": ("BF16", 32), "q8_0": ("Q8_0", 7)}


def stored(tensor: torch.Tensor, tensor_type: str):
    """(array, its gguf type) of one tensor: matrices in `tensor_type`, vectors (norms, biases,
    RoPE factors) in f32 as llama.cpp's converter keeps them."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    values = tensor.detach().float().cpu().numpy()
    kind = GGMLQuantizationType[TENSOR_TYPES[tensor_type][0]]
    if values.ndim == 1 or kind == GGMLQuantizationType.F32:
        return values, GGMLQuantizationType.F32
    if kind == GGMLQuantizationType.F16:
        return values.astype(np.float16), kind
    if kind == GGMLQuantizationType.Q8_0 and values.shape[-1] % 32:  # Q8_0 packs rows in blocks of 32
        return values.astype(np.float16), GGMLQuantizationType.F16
    return quantize(values, kind), kind


def add_value(writer, key: str, value):
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, list(value))


def write_gguf(model: nn.Module, path, tensor_type: str = "f16", tokenizer_metadata: dict | None = None) -> Path:
    """Write `model` (a loraft model: its base weights, with the adapter merged into them if one is) to
    the GGUF file `path`.

    `tokenizer_metadata` holds the file's tokenizer.* keys (tokens, merges, token types, special ids,
    chat template); a GGUF without them has weights llama.cpp can read but no way to tokenize."""
    check_tensor_type(tensor_type)
    family = family_of(model)
    if family.to_gguf is None:
        raise LoraftError(f"loraft does not write {family.name} models as GGUF")
    architecture, metadata, tensors = family.to_gguf(base_state_dict(model), model.config)
    keys = {
        "general.name": getattr(model, "name", architecture),
        "general.file_type": TENSOR_TYPES[tensor_type][1],
        "general.quantization_version": 2,
        **{f"{architecture}.{key}": value for key, value in metadata.items()},
        **(tokenizer_metadata or {}),
    }
    return write_gguf_file(path, architecture, keys, tensors, tensor_type)


def check_tensor_type(tensor_type: str):
    if tensor_type not in TENSOR_TYPES:
        raise LoraftError(f"GGUF tensor type {tensor_type!r} is not supported; choose from {', '.join(TENSOR_TYPES)}")


def write_gguf_file(
    path, architecture: str, metadata: dict, tensors: dict[str, torch.Tensor], tensor_type: str
) -> Path:
    """A GGUF of `architecture` with `metadata` (whole keys) and `tensors` (GGUF names), matrices stored
    as `tensor_type`, written atomically."""
    from gguf import GGUFWriter

    def write(target: Path):
        writer = GGUFWriter(target, architecture)
        for key, value in metadata.items():
            add_value(writer, key, value)
        for name, tensor in tensors.items():
            values, kind = stored(tensor, tensor_type)
            writer.add_tensor(name, values, raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    path = Path(path)
    atomic_write(path, write)
    return path
