"""Helpers shared by the test modules: the CLI runner, tiny random models, the training-job arguments."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from peft import PeftModel
from torch import nn

from loraft import lora
from loraft.adapters import adapter_tensors, save_adapter
from loraft.models import gpt2, llama
from loraft.peft_format import export_peft, import_peft

# A tiny Llama with grouped-query attention (6 query heads, 2 key/value heads).
TINY_LLAMA = dict(vocab_size=300, context_length=64, emb_dim=48, n_heads=6, n_kv_heads=2, n_layers=2, hidden_dim=96)
IDS = torch.randint(0, 300, (3, 20), generator=torch.Generator().manual_seed(0))


def loraft(*args):
    return subprocess.run([sys.executable, "-m", "loraft", *args], capture_output=True, text=True, timeout=300)


def assert_clear_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loraft: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def tiny_llama(seed=0, **changes):
    torch.manual_seed(seed)
    return llama.Llama(llama.LlamaConfig(**{**TINY_LLAMA, **changes})).eval()


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    return gpt2.GPTModel(gpt2.GPT2Config(vocab_size=300, context_length=64, emb_dim=48, n_heads=4, n_layers=2)).eval()


def train_a_few_steps(model, ids, steps=5):
    """Make B non-zero: a few AdamW steps on the language-modelling loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for _ in range(steps):
        logits = model(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def train_args(weights, data, out, *extra, compile=False):
    """`loraft train` of a tiny GPT-2 checkpoint on a small TSV file: 40 epochs, evaluated every 4 steps."""
    fixed = "train --model gpt2-small --epochs 40 --eval-every 4 --lr 1e-3 --rank 4 --quiet".split()
    paths = ["--weights", str(weights), "--data", str(data), "--out", str(out)]
    return [*fixed, *paths, *extra, "--compile" if compile else "--no-compile"]


def kill_once_logged(process, metrics: Path, rows: int, seconds: float, kill=os.kill):
    """SIGKILL `process` (`kill=os.killpg`: its whole group) once `metrics` holds `rows` lines; give up
    after `seconds` or when it ends by itself."""
    deadline = time.time() + seconds
    while time.time() < deadline and process.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= rows:
            kill(process.pid, signal.SIGKILL)
            return
        time.sleep(0.02)


def randomise(model, seed=0, std=0.05):
    """Random values for everything trainable: LoRA matrices, and heads. A fresh B is zero, which would
    make any conversion look right."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def export_and_compare(model, hf_model, ids, folder, classify):
    """Save and export adapter "default" of `model`, run it in PEFT, compare; then import the export
    back onto `model` and check that nothing changed on the way."""
    with torch.no_grad():
        ours = model(ids)
        if not classify:  # (a new head does something anyway)
            lora.set_active(model, None)
            assert (ours - model(ids)).abs().max() > 0.05  # the adapter does something worth comparing
            lora.set_active(model, "default")
    save_adapter(model, folder / "loraft")
    export_peft(folder / "loraft", folder / "peft")

    peft_model = PeftModel.from_pretrained(hf_model, folder / "peft").eval()
    with torch.no_grad():
        expected = peft_model(ids).logits
    assert (expected - (ours[:, -1] if classify else ours)).abs().max() <= 1e-3

    import_peft(folder / "peft", model, name="back")
    with torch.no_grad():
        assert torch.equal(model(ids), ours)
    back, original = adapter_tensors(model, "back"), adapter_tensors(model, "default")
    assert back.keys() == original.keys()
    assert all(torch.equal(back[key], original[key]) for key in original)


def quantize_model(model, mode: str) -> int:
    """Quantize the block linear layers of a model already in memory, in place, as `load_model` does
    each weight while it reads it; returns how many were quantized."""
    from loraft.quantize import WEIGHTS, QuantizedLinear, block_linears, check_mode, quantized_weight

    check_mode(mode)
    if mode not in WEIGHTS:
        return 0
    chosen = block_linears(model)
    for name in chosen:
        module = model.get_submodule(name)
        parent, _, child = name.rpartition(".")
        quantized = QuantizedLinear(quantized_weight(mode, name, module.weight), module.bias, mode)
        setattr(model.get_submodule(parent), child, quantized)
    model.quantized = mode
    return len(chosen)
