"""`loraft export`: a trained adapter in the formats the field runs models in, each written by its own
file and checked there against its own runtime (tests/test_export*.py):

- `peft`: a Hugging Face PEFT adapter folder (peft_format.py);
- `gguf-lora`, `gguf`: llama.cpp's LoRA adapter file, or the merged model as one GGUF with an Ollama
  Modelfile (export_gguf.py);
- `hf`: the merged model as a transformers checkpoint folder (export_hf.py);
- `onnx`: the merged classifier as an ONNX graph for ONNX Runtime (export_onnx.py).

A new format is one file with a `write(adapter_dir, folder, dtype, weights)` function and one line in
FORMATS. Every export is written into a fresh folder that takes --out's name only once complete.
"""

from dataclasses import dataclass
from pathlib import Path

from . import export_gguf, export_hf, export_onnx
from .adapters import read_adapter
from .errors import LoraftError
from .files import atomic_folder, check_new_folder
from .peft_format import export_peft


@dataclass(frozen=True)
class Format:
    write: object  # (adapter_dir, folder, dtype, weights) -> None: fills the new folder
    what: str  # one line for --help
    dtypes: tuple[str, ...] = ("f32",)  # the first is the default


FORMATS = {
    "peft": Format(lambda adapter, folder, dtype, weights: export_peft(adapter, folder), "a PEFT adapter folder"),
    "gguf-lora": Format(export_gguf.write_lora, "llama.cpp's LoRA adapter GGUF", ("f32", "f16", "bf16", "q8_0")),
    "gguf": Format(export_gguf.write_merged, "the merged model as a GGUF + Ollama Modelfile", ("f16", "bf16", "q8_0", "f32")),
    "hf": Format(export_hf.write, "the merged model as a transformers folder", ("f32", "bf16", "f16")),
    "onnx": Format(export_onnx.write, "the merged classifier as an ONNX graph"),
}  # fmt: skip


def export(adapter_dir, fmt: str, out, dtype: str | None = None, weights=None, overwrite: bool = False) -> Path:
    """Write the adapter in `adapter_dir` as `fmt` into the folder `out`; returns it."""
    if fmt not in FORMATS:
        raise LoraftError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    spec = FORMATS[fmt]
    dtype = dtype or spec.dtypes[0]
    if dtype not in spec.dtypes:
        raise LoraftError(f"--format {fmt} writes {', '.join(spec.dtypes)}, not --dtype {dtype}")
    read_adapter(adapter_dir)  # a broken adapter, or an --out that cannot be written, is refused before loading
    check_new_folder(out, overwrite, [adapter_dir])
    return atomic_folder(out, lambda folder: spec.write(adapter_dir, folder, dtype, weights), overwrite, [adapter_dir])
