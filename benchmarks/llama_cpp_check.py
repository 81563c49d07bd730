"""llama.cpp itself runs loraft's GGUF exports of an instruction adapter: greedy answers of llama.cpp
(through llama-cpp-python, built from PyPI's source distribution) against loraft's own, token for
token, on the first 5 test instructions of the book's data, 32 new tokens each.

Each llama.cpp setup gets the same prompt token ids as loraft (and whether llama.cpp's own tokenizer
gives the same ids for the prompt text is checked too):

- `gguf-lora` (f32) over the base model's own GGUF (SmolLM2's Q4_1 file) and over an f32 GGUF of the
  same base weights written by loraft;
- the merged `gguf` export in f32, f16, bf16 and q8_0.

The reference is loraft's merged model in fp32 (and, for information, in bf16, as `loraft generate`
runs on a CPU with native bf16). Agreement is the share of the 5 x 32 tokens equal to the reference's
up to each answer's first difference (a difference changes everything after it).

    pip install llama-cpp-python   # builds llama.cpp: cmake and a C++ compiler
    LORAFT_DATA_DIR=../shared/data python benchmarks/llama_cpp_check.py runs/instruct/adapter

Results go to benchmarks/results/llama_cpp_check.json.
"""

import json
import sys
import tempfile
from pathlib import Path

import torch
from llama_cpp import Llama

from loraft.adapters import read_adapter
from loraft.data.instruction import encode_prompts, end_id, format_prompt, load_instruction_data
from loraft.export import export
from loraft.export_gguf import base_gguf
from loraft.generate import generate
from loraft.gguf_writer import write_gguf
from loraft.job import load_trained
from loraft.models import load_model
from loraft.precision import bf16_autocast

OUT = Path(__file__).parent / "results" / "llama_cpp_check.json"
NEW_TOKENS, PROMPTS = 32, 5


def loraft_answers(adapter, prompts, bf16: bool) -> list[list[int]]:
    model, _, _ = load_trained(adapter, "instruction", bf16=bf16)
    with bf16_autocast(torch.device("cpu"), bf16):
        return [generate(model, ids, NEW_TOKENS) for ids in prompts]


def llama_cpp_answers(model_path: Path, prompts, lora: Path | None = None) -> list[list[int]]:
    llm = Llama(str(model_path), lora_path=str(lora) if lora else None, n_ctx=1024, n_threads=2, verbose=False)
    answers = []
    for ids in prompts:
        llm.reset()
        answer = []
        for token in llm.generate(ids, top_k=1, temp=0.0):
            answer.append(token)
            if len(answer) == NEW_TOKENS:
                break
        answers.append(answer)
    return answers


def agreement(answers, reference) -> float:
    """The share of the reference's tokens each answer repeats before its first difference."""
    same = 0
    for ours, theirs in zip(answers, reference):
        for a, b in zip(ours, theirs):
            if a != b:
                break
            same += 1
    return same / sum(len(r) for r in reference)


def main():
    adapter = Path(sys.argv[1])
    meta, _ = read_adapter(adapter)
    template = meta.get("template", "alpaca")
    base, tokenizer = load_model(meta["base_model"])
    examples = load_instruction_data().test[:PROMPTS]
    texts = [format_prompt(tokenizer, e.instruction, e.input, template) for e in examples]
    prompts = encode_prompts(tokenizer, texts, template)
    reference = loraft_answers(adapter, prompts, bf16=False)
    results = {"adapter": str(adapter), "end_token": end_id(tokenizer, template), "agreement_with_loraft_fp32": {}}
    results["agreement_with_loraft_fp32"]["loraft bf16 (loraft generate)"] = agreement(
        loraft_answers(adapter, prompts, bf16=True), reference
    )
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        export(adapter, "gguf-lora", scratch / "lora")
        llm = Llama(str(load_base_gguf(meta)), vocab_only=True, verbose=False)
        results["llama.cpp tokenizes the prompts as loraft"] = all(
            llm.tokenize(text.encode(), add_bos=bool(tokenizer.bos_prefix), special=True) == ids
            for text, ids in zip(texts, prompts)
        )
        write_gguf(base, scratch / "base-f32.gguf", "f32", tokenizer.gguf_metadata(base.config.vocab_size))
        runs = {
            "gguf-lora over the base's own GGUF": (load_base_gguf(meta), scratch / "lora" / "adapter.gguf"),
            "gguf-lora over an f32 GGUF of the base": (scratch / "base-f32.gguf", scratch / "lora" / "adapter.gguf"),
        }
        for dtype in ("f32", "f16", "bf16", "q8_0"):
            export(adapter, "gguf", scratch / dtype, dtype)
            runs[f"merged gguf {dtype}"] = (scratch / dtype / "model.gguf", None)
        results["answers"] = {"loraft fp32": reference}
        for name, (model_path, lora) in runs.items():
            answers = llama_cpp_answers(model_path, prompts, lora)
            results["answers"][name] = answers
            results["agreement_with_loraft_fp32"][name] = agreement(answers, reference)
    print(f"llama.cpp tokenizes the prompts as loraft: {results['llama.cpp tokenizes the prompts as loraft']}")
    for name, share in results["agreement_with_loraft_fp32"].items():
        print(f"{name:42} {100 * share:5.1f}% of {PROMPTS} x {NEW_TOKENS} greedy tokens as loraft's fp32")
    OUT.write_text(json.dumps(results, indent=2) + "\n")


def load_base_gguf(meta) -> Path:
    path = base_gguf(meta["base_model"])
    if path is None:
        raise SystemExit("this check runs adapters over a GGUF base model (the default smollm2-135m)")
    return path


if __name__ == "__main__":
    main()
