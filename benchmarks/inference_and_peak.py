"""The machine's GEMM peak (bf16, fp32), and side by side in one run, from the same trained adapter:
SMS classified per second on the book's 300 test messages by loraft (merged eager, merged compiled,
unmerged eager, unmerged compiled as `serve` runs it), transformers + PEFT (merged) and ONNX Runtime (the `loraft export --format onnx` graph), each
against the ceiling the bf16 peak allows and against the blocks' products alone at the same batch
shapes (no attention, norms or activations: what the GEMM library itself reaches there); then greedy generation with a KV cache, new tokens per second
at batch 1 and batch 8, loraft (stream_tokens; DecodeBatch, serve's continuous batching) vs transformers'
generate, the same SmolLM2-135M weights in bf16.

    LORAFT_DATA_DIR=../shared/data python benchmarks/inference_and_peak.py runs/sms-spam/adapter
"""

import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from loraft import lora
from loraft.adapters import load_adapter, read_adapter, save_adapter
from loraft.classifier import TextFormat, predict_proba
from loraft.data.sms_spam import load_sms_spam
from loraft.export import export
from loraft.generate import DecodeBatch, generate
from loraft.inference import compile_for_inference
from loraft.models import load_model
from loraft.peft_format import export_peft
from loraft.precision import bf16_autocast, cast_frozen_weights

OUT = Path(__file__).parent / "results"


def gemm_gflops(dtype, sizes=(512, 1024, 2048), repeats=10) -> float:
    """The best rate of square matrix products over a few sizes (small ones fit the caches)."""
    return max(square_gemm_gflops(dtype, n, repeats) for n in sizes)


def square_gemm_gflops(dtype, n: int, repeats: int) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def per_second(fn, count: int, repeats=2) -> float:
    fn()  # warm up
    best = min(timed(fn) for _ in range(repeats))
    return count / best


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def products_alone_per_second(model, lengths: list[int], batch_size=32) -> float:
    """SMS/s if a pass were nothing but the blocks' linear products in bf16, at the shapes loraft runs them
    (length-sorted batches of 32, each padded to its longest): what the GEMM library allows at these
    shapes, below its rate on large square products."""
    weights = [m.weight.detach().to(torch.bfloat16) for m in model.trf_blocks.modules() if isinstance(m, nn.Linear)]
    ordered = sorted(lengths)
    rows = [
        len(batch) * max(batch) for batch in (ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size))
    ]
    inputs = {(n, w.shape[1]): torch.randn(n, w.shape[1], dtype=torch.bfloat16) for n in rows for w in weights}

    def products():
        for n in rows:
            for w in weights:
                inputs[n, w.shape[1]] @ w.t()

    return per_second(products, len(lengths))


def dense_base_folder(model_name: str) -> Path:
    """The base model as a dense transformers folder: loraft's `hf` export of an adapter whose update is
    zero. (transformers reads a GGUF's quantized blocks into its own packed layers, not bf16 weights.)"""
    model, _ = load_model(model_name)
    lora.apply_lora(model, lora.LoraConfig(rank=1, targets=("q",)))  # B starts at zero: W unchanged
    scratch = Path(tempfile.mkdtemp())
    save_adapter(model, scratch / "zero", task="instruction", template="alpaca", max_length=128)
    return export(scratch / "zero", "hf", scratch / "base")


def transformers_classifier(adapter_dir, base_folder: Path):
    """LlamaForSequenceClassification of the dense base with the adapter exported to PEFT, merged, in bf16."""
    from peft import PeftModel
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    model = LlamaForSequenceClassification.from_pretrained(str(base_folder), num_labels=2, dtype=torch.float32)
    model.config.pad_token_id = 2
    tokenizer = AutoTokenizer.from_pretrained(str(base_folder))
    peft_dir = tempfile.mkdtemp()
    export_peft(adapter_dir, peft_dir)
    model = PeftModel.from_pretrained(model, peft_dir).merge_and_unload().to(torch.bfloat16).eval()
    return model, tokenizer


def onnx_runtime_classifier(adapter_dir, texts):
    """A function that classifies `texts` with ONNX Runtime alone, in length-sorted batches of 32 (as
    loraft), from the `onnx` export's model.onnx and tokenizer.json."""
    import numpy as np
    import onnxruntime
    from tokenizers import Tokenizer

    folder = Path(tempfile.mkdtemp()) / "onnx"
    export(adapter_dir, "onnx", folder)
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"))
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    order = sorted(texts, key=len)

    def classify():
        for start in range(0, len(order), 32):
            encoded = tok.encode_batch(order[start : start + 32])
            ids, mask = (
                np.array([getattr(e, key) for e in encoded], dtype=np.int64) for key in ("ids", "attention_mask")
            )
            session.run(None, {"input_ids": ids, "attention_mask": mask})

    return classify


NEW_TOKENS = 64
PROMPT = "Below is an instruction that describes a task. Write a response that appropriately completes the request."


def generation_rates(model_name: str, base_folder: Path) -> dict:
    """New tokens per second, greedy, NEW_TOKENS each (no stop token), batch 1 and 8, bf16 weights."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_model(model_name, dtype=torch.bfloat16)
    model.eval()
    prompts = [tokenizer.encode(f"{PROMPT} ({i})") for i in range(8)]

    def loraft_one():
        with bf16_autocast(torch.device("cpu"), True):
            generate(model, prompts[0], NEW_TOKENS)

    def loraft_eight():
        batch = DecodeBatch(model)
        with bf16_autocast(torch.device("cpu"), True):
            logits = torch.stack([batch.join(p) for p in prompts])
            for _ in range(NEW_TOKENS - 1):
                logits = batch.step(logits.argmax(-1).tolist())

    hf = AutoModelForCausalLM.from_pretrained(str(base_folder), dtype=torch.bfloat16).eval()
    padded = torch.nn.utils.rnn.pad_sequence(
        [torch.tensor(p[::-1]) for p in prompts], batch_first=True, padding_value=2
    ).flip(1)  # left-padded
    mask = (padded != 2).long()

    @torch.no_grad()
    def hf_generate(rows):
        ids, attention = padded[:rows], mask[:rows]
        hf.generate(
            ids,
            attention_mask=attention,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=2,
        )

    return {
        "loraft, batch 1": per_second(loraft_one, NEW_TOKENS),
        "transformers generate, batch 1": per_second(lambda: hf_generate(1), NEW_TOKENS),
        "loraft DecodeBatch, batch 8": per_second(loraft_eight, 8 * NEW_TOKENS),
        "transformers generate, batch 8": per_second(lambda: hf_generate(8), 8 * NEW_TOKENS),
    }


def main():
    adapter = Path(sys.argv[1])
    texts = load_sms_spam().test.texts
    meta, _ = read_adapter(adapter)
    fmt = TextFormat.of_adapter(meta)
    results = {"gemm_gflops": {"bf16": gemm_gflops(torch.bfloat16), "fp32": gemm_gflops(torch.float32)}}

    base, tokenizer = load_model(meta["base_model"])
    load_adapter(base, adapter)
    unmerged = copy.deepcopy(base)
    cast_frozen_weights(unmerged, torch.bfloat16)
    lora.merge(base)
    cast_frozen_weights(base, torch.bfloat16)
    results["sms_per_second"] = {
        "loraft merged (bf16)": per_second(
            lambda: predict_proba(base, tokenizer, texts, fmt, autocast=True), len(texts)
        ),
        "loraft unmerged (bf16 base, fp32 LoRA)": per_second(
            lambda: predict_proba(unmerged, tokenizer, texts, fmt, autocast=True), len(texts)
        ),
    }
    compiled = copy.deepcopy(base)
    compile_for_inference(compiled, len(texts), asked=True)
    results["compile_seconds"] = timed(lambda: predict_proba(compiled, tokenizer, texts[:64], fmt, autocast=True))
    results["sms_per_second"]["loraft merged, compiled (bf16)"] = per_second(
        lambda: predict_proba(compiled, tokenizer, texts, fmt, autocast=True), len(texts)
    )
    compiled_unmerged = copy.deepcopy(unmerged)  # the adapter unmerged beside the base, as `serve` runs it
    compile_for_inference(compiled_unmerged, len(texts), asked=True)
    predict_proba(compiled_unmerged, tokenizer, texts[:64], fmt, autocast=True)
    results["sms_per_second"]["loraft unmerged, compiled (serve's)"] = per_second(
        lambda: predict_proba(compiled_unmerged, tokenizer, texts, fmt, autocast=True), len(texts)
    )
    results["sms_per_second"]["ONNX Runtime (fp32 graph)"] = per_second(
        onnx_runtime_classifier(adapter, texts), len(texts)
    )
    base_folder = dense_base_folder(meta["base_model"])
    hf, hf_tokenizer = transformers_classifier(adapter, base_folder)

    @torch.no_grad()
    def hf_classify():
        order = sorted(texts, key=len)  # the same length-sorted batches of 32 as loraft
        for start in range(0, len(order), 32):
            batch = hf_tokenizer(order[start : start + 32], return_tensors="pt", padding=True, truncation=True)
            hf(**batch).logits.softmax(-1)

    hf_tokenizer.padding_side = "right"
    results["sms_per_second"]["transformers + PEFT merged (bf16)"] = per_second(hf_classify, len(texts))
    # The ceiling: every linear weight of the blocks costs 2 FLOPs per real token, at the bf16 peak.
    lengths = [len(t) for t in fmt.encode(tokenizer, texts)]
    tokens = sum(lengths) / len(texts)
    linear_weights = sum(m.weight.numel() for m in base.trf_blocks.modules() if isinstance(m, torch.nn.Linear))
    results["tokens_per_sms"] = tokens
    results["sms_per_second_at_bf16_peak"] = results["gemm_gflops"]["bf16"] * 1e9 / (2 * linear_weights * tokens)

    print(
        f"GEMM peak (best square product): bf16 {results['gemm_gflops']['bf16']:.0f} GFLOP/s, fp32 {results['gemm_gflops']['fp32']:.0f} GFLOP/s"
    )
    print(
        f"{tokens:.1f} tokens per test SMS: at the bf16 peak, {results['sms_per_second_at_bf16_peak']:.0f} SMS/s at most"
    )
    results["sms_per_second_products_alone"] = products_alone_per_second(base, lengths)
    print(
        f"the blocks' products alone at loraft's batch shapes: {results['sms_per_second_products_alone']:.0f} SMS/s "
        f"({results['sms_per_second_products_alone'] / results['sms_per_second_at_bf16_peak']:.0%} of the ceiling)"
    )
    ceiling = results["sms_per_second_at_bf16_peak"]
    for name, rate in results["sms_per_second"].items():
        print(f"{name:42} {rate:7.1f} SMS/s  ({rate / ceiling:.0%} of the ceiling)")
    print(f"compiling took {results['compile_seconds']:.1f} s once (the first 64 texts included)")
    results["generation_tokens_per_second"] = generation_rates(meta["base_model"], base_folder)
    for name, rate in results["generation_tokens_per_second"].items():
        print(f"generation, {name:38} {rate:7.1f} new tokens/s")
    OUT.mkdir(exist_ok=True)
    (OUT / "inference_and_peak.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
