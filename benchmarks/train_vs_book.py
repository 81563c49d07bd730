"""Training speed: loraft vs the book's own appendix E code (PyPI llms-from-scratch==1.0.19), on the
gpt2-small architecture with the same random weights, the same SMS split, LoRA rank 16 on every
linear layer, batch 8. Pretrained GPT-2 cannot be had offline; speed does not depend on the values.

    pip install --no-deps llms-from-scratch==1.0.19 pandas
    LORAFT_DATA_DIR=../shared/data python benchmarks/train_vs_book.py

The book pads every message to the longest (120 tokens) and trains in fp32; it is timed on a sample
of batches (all have the same shape) and scaled to an epoch. loraft is timed over the book's 5 epochs
(torch.compile's one-time compiling included) and divided by 5; its last epoch alone is the steady
state, what every epoch costs once compiling is done.
"""

import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from llms_from_scratch.appendix_e import replace_linear_with_lora
from llms_from_scratch.ch04 import GPTModel as BookGPT

from loraft.classifier import ClassificationTask, TextFormat
from loraft.data.sms_spam import load_sms_spam
from loraft.finetune import prepare_model
from loraft.lora import LoraConfig
from loraft.models.gpt2 import SIZES, GPTModel
from loraft.precision import cast_frozen_weights
from loraft.tokenizer import GPT2Tokenizer
from loraft.train import TrainConfig, Trainer

BOOK_BATCHES = int(sys.argv[1]) if len(sys.argv) > 1 else 12
EPOCHS = 5  # the book's; loraft is timed over all of them, so compiling is spread as in a real run
OUT = Path(__file__).parent / "results"


def book_seconds_per_epoch(data, tokenizer) -> tuple[float, int]:
    torch.manual_seed(123)
    cfg = {
        "vocab_size": 50257,
        "context_length": 1024,
        "emb_dim": 768,
        "n_heads": 12,
        "n_layers": 12,
        "drop_rate": 0.0,
        "qkv_bias": True,
    }
    model = BookGPT(cfg)
    model.out_head = torch.nn.Linear(768, 2)
    base_weights = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith(".mask")}
    for p in model.parameters():
        p.requires_grad = False
    replace_linear_with_lora(model, rank=16, alpha=16)
    model.train()
    # The book's SpamDataset: every text padded with 50256 to the longest training text.
    encoded = tokenizer.encode_batch(data.train.texts)
    longest = max(len(e) for e in encoded)
    inputs = torch.tensor([e + [50256] * (longest - len(e)) for e in encoded])
    labels = torch.tensor(data.train.labels)
    loader = torch.utils.data.DataLoader(list(zip(inputs, labels)), batch_size=8, shuffle=True, drop_last=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1)
    times = []
    for i, (x, y) in enumerate(loader):
        if i == BOOK_BATCHES + 2:
            break
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x)[:, -1, :], y)  # the book's calc_loss_batch
        loss.backward()
        optimizer.step()
        if i >= 2:  # the first batches warm up allocators and kernels
            times.append(time.perf_counter() - start)
    return sum(times) / len(times) * len(loader), longest, base_weights


def loraft_seconds_per_epoch(data, tokenizer, base_weights, compile: bool) -> tuple[float, float]:
    """(the mean over the 5 epochs, the last epoch)"""
    model = GPTModel(SIZES["gpt2-small"])
    model.load_state_dict({k: v for k, v in base_weights.items() if not k.startswith("out_head")}, strict=False)
    torch.manual_seed(123)
    prepare_model(model, "lora", 2, LoraConfig(16, 16, "book"))
    cast_frozen_weights(model, torch.bfloat16)
    task = ClassificationTask(tokenizer, data, TextFormat(), 123, autocast=True)
    cfg = TrainConfig(epochs=EPOCHS, eval_every=10**9, lr=5e-5, compile=compile)  # compiling counts as training time
    with tempfile.TemporaryDirectory() as run_dir:
        total = Trainer(model, task, cfg, Path(run_dir), quiet=True).run()["train_seconds"]
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return total / EPOCHS, rows[-1]["train_seconds"] - rows[-2]["train_seconds"]


def main():
    data, tokenizer = load_sms_spam(), GPT2Tokenizer()
    book, longest, base_weights = book_seconds_per_epoch(data, tokenizer)
    ours, ours_last = loraft_seconds_per_epoch(data, tokenizer, base_weights, compile=False)
    compiled, compiled_last = loraft_seconds_per_epoch(data, tokenizer, base_weights, compile=True)
    result = {
        "benchmark": "LoRA training, gpt2-small architecture, SMS spam train split (1,045), batch 8, rank 16",
        "threads": torch.get_num_threads(),
        "book_seconds_per_epoch": book,
        "book_padded_length": longest,
        "book_batches_timed": BOOK_BATCHES,
        "loraft_seconds_per_epoch": ours,
        "speedup": book / ours,
        "loraft_last_epoch_seconds": ours_last,
        "speedup_last_epoch": book / ours_last,
        "loraft_compile_seconds_per_epoch": compiled,
        "speedup_compile": book / compiled,
        "loraft_compile_last_epoch_seconds": compiled_last,
        "speedup_compile_last_epoch": book / compiled_last,
    }
    print(
        f"{'':24} {'s/epoch':>8} {'speedup':>8} {'last epoch':>11} {'speedup':>8}\n{'book (fp32, pad 120)':24} {book:8.1f}"
    )
    for name, mean, last in (("loraft", ours, ours_last), ("loraft, compiled blocks", compiled, compiled_last)):
        print(f"{name:24} {mean:8.1f} {book / mean:7.1f}x {last:11.1f} {book / last:7.1f}x")
    OUT.mkdir(exist_ok=True)
    (OUT / "train_vs_book.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
