"""Training speed and accuracy: loraft vs transformers + PEFT with its Trainer, both fine-tuning
SmolLM2-135M-Instruct loaded from the same GGUF into an SMS spam classifier, same hyperparameters:
LoRA rank 16 / alpha 16 on every linear layer of the blocks + a new trained 2-class head, AdamW lr
1e-3, cosine with 10% warmup, batch 8, clipping 1.0, seed 123, the book's split, dynamic padding.
transformers runs twice: with the Trainer's defaults (fp32, random batches: the reference the
performance issue quotes) and tuned (bf16 autocast, length-grouped batches).

    LORAFT_DATA_DIR=../shared/data python benchmarks/train_vs_peft.py [EPOCHS]

Prints seconds per epoch of the training loop (no evaluation inside it), the ratios, the test
accuracy of each at the end of training, and loraft's FLOP rate as a share of the bf16 GEMM peak
measured in the same run: over the whole run (compiling included) and over the last epoch (the
steady state); writes benchmarks/results/train_vs_peft.json.
"""

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from loraft.data.sms_spam import load_sms_spam
from loraft.finetune import train_classifier
from loraft.models import build_empty
from loraft.train import TrainConfig
from loraft.weights import smollm2_gguf

sys.path.insert(0, str(Path(__file__).parent))
from hf_trainer import trainer_arguments  # noqa: E402
from inference_and_peak import gemm_gflops  # noqa: E402

EPOCHS = int(sys.argv[1]) if len(sys.argv) > 1 else 2
OUT = Path(__file__).parent / "results"


def transformers_peft(data, tuned: bool) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoTokenizer,
        DataCollatorWithPadding,
        LlamaForSequenceClassification,
        Trainer,
    )

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.padding_side = "right"
    torch.manual_seed(123)
    dequantized = LlamaForSequenceClassification.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, num_labels=2, dtype=torch.float32
    )
    # The Trainer refuses a model marked as GGUF-quantized, though its weights are now plain fp32.
    config = dequantized.config
    del config.quantization_config
    config.pad_token_id = tokenizer.pad_token_id
    model = LlamaForSequenceClassification(config)
    model.load_state_dict(dequantized.state_dict())
    config = LoraConfig(task_type="SEQ_CLS", r=16, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    model = get_peft_model(model, config)

    def dataset(split):
        encoded = tokenizer(split.texts, truncation=True, max_length=128)["input_ids"]
        return [{"input_ids": ids, "labels": label} for ids, label in zip(encoded, split.labels)]

    with tempfile.TemporaryDirectory() as out:
        args = trainer_arguments(
            out,
            tuned,
            num_train_epochs=EPOCHS,
            per_device_train_batch_size=8,
            per_device_eval_batch_size=32,
            warmup_steps=0.1,
            logging_steps=50,
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=dataset(data.train), data_collator=DataCollatorWithPadding(tokenizer)
        )
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        # Under group_by_length the Trainer also reorders the test set: compare with the labels it returns.
        test = trainer.predict(dataset(data.test))
    accuracy = float((np.argmax(test.predictions, -1) == test.label_ids).mean())
    return {"seconds_per_epoch": seconds / EPOCHS, "test_accuracy": accuracy}


def loraft_run(compile: bool) -> dict:
    cfg = TrainConfig(epochs=EPOCHS, eval_every=10**9, compile=compile)  # evaluation per epoch, outside the timed loop
    with tempfile.TemporaryDirectory() as out:
        report = train_classifier(out=out, overwrite=True, quiet=True, train=cfg)
        rows = [{"tokens_seen": 0, "train_seconds": 0.0}] + [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
    return {
        "seconds_per_epoch": report["train_seconds"] / EPOCHS,  # compiling included
        "test_accuracy": report["test_accuracy"],
        "tokens_per_second": report["train_tokens_per_second"],
        "last_epoch_tokens_per_second": (rows[-1]["tokens_seen"] - rows[-2]["tokens_seen"])
        / (rows[-1]["train_seconds"] - rows[-2]["train_seconds"]),
    }


def main():
    data = load_sms_spam()
    runs = {
        "loraft": loraft_run(compile=False),
        "loraft --compile": loraft_run(compile=True),
        "transformers + PEFT": transformers_peft(data, tuned=False),
        "transformers + PEFT, bf16, grouped": transformers_peft(data, tuned=True),
    }
    for run in runs.values():
        run["speedup"] = runs["transformers + PEFT"]["seconds_per_epoch"] / run["seconds_per_epoch"]
        run["speedup_vs_tuned"] = (
            runs["transformers + PEFT, bf16, grouped"]["seconds_per_epoch"] / run["seconds_per_epoch"]
        )
    peak = gemm_gflops(torch.bfloat16)
    blocks = build_empty("smollm2-135m").trf_blocks
    linear_weights = sum(m.weight.numel() for m in blocks.modules() if isinstance(m, torch.nn.Linear))
    for name in (
        "loraft",
        "loraft --compile",
    ):  # frozen base: forward + input gradients, 2 + 2 FLOPs per weight and token
        runs[name]["fraction_of_bf16_peak"] = 4 * linear_weights * runs[name]["tokens_per_second"] / 1e9 / peak
        runs[name]["last_epoch_fraction_of_bf16_peak"] = (
            4 * linear_weights * runs[name]["last_epoch_tokens_per_second"] / 1e9 / peak
        )
    result = {
        "benchmark": f"LoRA training, SmolLM2-135M-Instruct (same GGUF), SMS spam, {EPOCHS} epochs, batch 8, rank 16, all linear + head",
        "threads": torch.get_num_threads(),
        "bf16_gemm_gflops": peak,
        "runs": runs,
    }
    print(f"bf16 GEMM peak {peak:.0f} GFLOP/s; speedups vs transformers + PEFT with the Trainer's defaults / tuned")
    print(
        f"{'':36} {'s/epoch':>8} {'speedup':>8} {'vs tuned':>8} {'test acc':>9} {'of bf16 peak: run / last epoch':>31}"
    )
    for name, run in runs.items():
        fraction = (
            f"{100 * run['fraction_of_bf16_peak']:.0f}% / {100 * run['last_epoch_fraction_of_bf16_peak']:.0f}%"
            if "fraction_of_bf16_peak" in run
            else ""
        )
        print(
            f"{name:36} {run['seconds_per_epoch']:8.1f} {run['speedup']:7.2f}x {run['speedup_vs_tuned']:7.2f}x {run['test_accuracy']:9.4f} {fraction:>31}"
        )
    OUT.mkdir(exist_ok=True)
    (OUT / "train_vs_peft.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
