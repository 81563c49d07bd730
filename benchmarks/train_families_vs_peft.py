"""Training speed on bigger families: loraft vs transformers + PEFT with its Trainer, fine-tuning a
Qwen3-0.6B-shaped and a Llama-3.2-1B-shaped checkpoint (random weights that transformers writes from
the real shapes in `loraft models`, saved in bf16; no real weights can be had offline) into an SMS
spam classifier. Same data, same hyperparameters: the first 160 messages of the book's training
split (20 optimizer steps of batch 8), LoRA rank 16 / alpha 16 on every linear layer of the blocks
plus a new 2-class head, AdamW lr 1e-3, cosine schedule, clipping 1.0, dynamic padding. The
tokenizer is a byte-level BPE of 8,192 tokens trained on the SMS messages with the family's own
pre-tokenizer, so a message has about as many tokens as with the real one.

transformers runs twice: the Trainer's defaults (fp32, random batches) and tuned (bf16 autocast,
length-grouped batches; only where the CPU runs bf16 natively); loraft as `loraft train` runs
(eager; its frozen base in bf16 where the CPU runs bf16 natively, else fp32).

    LORAFT_DATA_DIR=../shared/data python benchmarks/train_families_vs_peft.py [qwen3-0.6b] [llama-3.2-1b]

Prints seconds per optimizer step of each training loop, the ratios, and loraft's FLOP rate as a
share of the GEMM peak (bf16, or fp32 without native bf16) measured in the same run; writes benchmarks/results/train_families_vs_peft.json.
"""

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from loraft.data.sms_spam import load_sms_spam
from loraft.finetune import train_classifier
from loraft.lora import LoraConfig as LoraftLoraConfig
from loraft.models import MODELS, build_empty
from loraft.precision import bf16_supported
from loraft.train import TrainConfig

ROOT = Path(__file__).parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))
from hf_trainer import trainer_arguments  # noqa: E402
from inference_and_peak import gemm_gflops  # noqa: E402

from tests.models.checkpoints import write_tokenizer  # noqa: E402

SHAPES = {"qwen3-0.6b": "qwen2", "llama-3.2-1b": "llama-bpe"}  # name -> llama.cpp's pre-tokenizer
TRAIN_MESSAGES, BATCH = 160, 8
OUT = ROOT / "results" / "train_families_vs_peft.json"


def write_tsv(path: Path, texts, labels):
    rows = "".join(f"{'spam' if label else 'ham'}\t{' '.join(text.split())}\n" for text, label in zip(texts, labels))
    path.write_text("label\ttext\n" + rows, encoding="utf-8")


def make_checkpoint(folder: Path, name: str, texts):
    import transformers

    config = transformers.AutoConfig.for_model(**MODELS[name].hub_config, pad_token_id=0)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder)
    write_tokenizer(folder, texts, pre=SHAPES[name], vocab_size=8192)


def loraft_run(folder: Path, files: dict) -> dict:
    cfg = TrainConfig(epochs=1, eval_every=10**9, compile=False, warmup=0.0)  # the Trainer warms up none by default
    with tempfile.TemporaryDirectory() as out:
        report = train_classifier(
            out=out,
            model=str(folder),
            data=str(files["train"]),
            val_file=str(files["val"]),
            test_file=str(files["test"]),
            lora_config=LoraftLoraConfig(rank=16, alpha=16, targets=["all-linear"]),
            quiet=True,
            train=cfg,
        )
    return {
        "seconds_per_step": report["train_seconds"] / (TRAIN_MESSAGES // BATCH),
        "tokens_per_second": report["train_tokens_per_second"],
    }


def transformers_peft(folder: Path, texts, labels, tuned: bool) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
    )

    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(123)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    lora = LoraConfig(task_type="SEQ_CLS", r=16, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    model = get_peft_model(model, lora)
    encoded = tokenizer([" ".join(t.split()) for t in texts], truncation=True, max_length=128)["input_ids"]
    dataset = [{"input_ids": ids, "labels": label} for ids, label in zip(encoded, labels)]
    with tempfile.TemporaryDirectory() as out:
        args = trainer_arguments(out, tuned, num_train_epochs=1, per_device_train_batch_size=BATCH)
        trainer = Trainer(
            model=model, args=args, train_dataset=dataset, data_collator=DataCollatorWithPadding(tokenizer)
        )
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    return {"seconds_per_step": seconds / (TRAIN_MESSAGES // BATCH)}


def main():
    names = sys.argv[1:] or list(SHAPES)
    sms = load_sms_spam()
    texts, labels = sms.train.texts[:TRAIN_MESSAGES], sms.train.labels[:TRAIN_MESSAGES]
    # Where the CPU has no native bf16, loraft trains in fp32 and bf16 autocast would crawl: the peak
    # is fp32's, and the tuned Trainer is left out.
    bf16 = bf16_supported()
    dtype = "bf16" if bf16 else "fp32"
    peak = gemm_gflops(torch.bfloat16 if bf16 else torch.float32)
    results = {"gemm_dtype": dtype, "gemm_gflops": peak, "threads": torch.get_num_threads(), "models": {}}
    print(f"{dtype} GEMM peak {peak:.0f} GFLOP/s", flush=True)
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            files = {split: tmp / f"{split}.tsv" for split in ("train", "val", "test")}
            write_tsv(files["train"], texts, labels)
            for split in ("val", "test"):
                part = getattr(sms, split)
                write_tsv(files[split], part.texts[:32], part.labels[:32])
            make_checkpoint(tmp / "model", name, sms.train.texts)
            runs = {"loraft": loraft_run(tmp / "model", files)}
            print(f"{name} loraft: {runs['loraft']}", flush=True)
            variants = {"transformers + PEFT": False, "transformers + PEFT, bf16, grouped": True}
            for variant, tuned in variants.items():
                if tuned and not bf16:
                    continue
                runs[variant] = transformers_peft(tmp / "model", texts, labels, tuned)
                print(f"{name} {variant}: {runs[variant]}", flush=True)
        linear = sum(m.weight.numel() for m in build_empty(name).trf_blocks.modules() if isinstance(m, torch.nn.Linear))
        runs["loraft"]["fraction_of_peak"] = 4 * linear * runs["loraft"]["tokens_per_second"] / 1e9 / peak
        for run in runs.values():
            for against, key in zip(variants, ("speedup", "speedup_vs_tuned")):
                if against in runs:
                    run[key] = runs[against]["seconds_per_step"] / run["seconds_per_step"]
        results["models"][name] = {"shape": MODELS[name].hub_config, "runs": runs}
        print(name)
        for run_name, run in runs.items():
            share = f"  {100 * run['fraction_of_peak']:.0f}% of the {dtype} peak" if "fraction_of_peak" in run else ""
            tuned = f"  vs tuned {run['speedup_vs_tuned']:5.2f}x" if "speedup_vs_tuned" in run else ""
            print(
                f"  {run_name:36} {run['seconds_per_step']:7.2f} s/step  {run['speedup']:5.2f}x{tuned}{share}",
                flush=True,
            )
    OUT.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
