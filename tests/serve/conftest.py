import contextlib
import copy
import queue
import re
import subprocess
import sys
import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient

from loraft import lora
from loraft.adapters import load_adapter, save_adapter
from loraft.classifier import add_classification_head
from loraft.serve.app import Limits, create_app
from loraft.serve.registry import load_served

# Small limits, so that exceeding each one is cheap to test.
LIMITS = Limits(max_body_bytes=2000, max_texts=4, max_text_chars=200, max_new_tokens=16)


def randomize(model, name, std=0.02):
    """Make B non-zero, as training would: the adapter then changes what the model computes."""
    for module in model.modules():
        if isinstance(module, lora.LoRALinear) and name in module.lora_B:
            torch.nn.init.normal_(module.lora_B[name], std=std)


@pytest.fixture(scope="session")
def reference(smollm2, spam_run, tmp_path_factory):
    """A fp32 copy of SmolLM2 with four adapters, each also saved to a folder: the trained spam
    classifier; "mood" (2 classes, LoRA on q and v) and "topics" (3 classes, mean pooling, its own
    template, LoRA on the MLP), both random; "qa", an instruction adapter (B = 0: the base's answers).
    Returns (model, {name: folder})."""
    model = copy.deepcopy(smollm2[0])
    torch.manual_seed(0)
    lora.apply_lora(model, rank=4, targets=["q", "v"], name="mood")
    add_classification_head(model, 2, "mood")
    lora.apply_lora(model, rank=4, targets=["mlp"], name="topics")
    add_classification_head(model, 3, "topics")
    lora.apply_lora(model, rank=2, targets=["q"], name="qa")
    for name in ("mood", "topics"):
        randomize(model, name)
    folder = tmp_path_factory.mktemp("adapters")
    tasks = {
        "mood": dict(
            task="classification",
            label_names=["calm", "upset"],
            template="{text}",
            max_length=64,
            pooling="last",
            method="lora",
        ),
        "topics": dict(
            task="classification",
            label_names=["money", "plans", "other"],
            template="Topic of: {text}",
            max_length=48,
            pooling="mean",
            method="lora",
        ),
        "qa": dict(task="instruction", template="alpaca", max_length=256),
    }
    folders = {"spam": spam_run[0] / "adapter"}
    for name, task in tasks.items():
        folders[name] = save_adapter(model, folder / name, name, **task)
    load_adapter(model, folders["spam"], "spam")
    model.requires_grad_(False)
    return model, folders


@pytest.fixture(scope="session")
def served(reference):
    return load_served(reference[1])


@pytest.fixture(scope="module")
def client(served):
    with TestClient(create_app(served, LIMITS)) as client:
        yield client


class Server:
    """A `loraft serve` process on a loopback port: its URL, and what it printed."""

    def __init__(self, *args: str):
        command = [sys.executable, "-m", "loraft", "serve", "--port", "0", *args]
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        self.lines = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.process.stderr], daemon=True).start()
        self.printed, deadline = [], time.monotonic() + 240
        while not any("serving" in line for line in self.printed):
            assert self.process.poll() is None and time.monotonic() < deadline, "".join(self.printed)
            with contextlib.suppress(queue.Empty):
                self.printed.append(self.lines.get(timeout=1))
        self.url = re.search(r"http://\S+/", self.printed[-1]).group(0).rstrip("/")
        self.port = int(self.url.rsplit(":", 1)[1])

    def close(self):
        self.process.terminate()
        self.process.wait(timeout=60)


@contextlib.contextmanager
def serving(*args: str):
    server = Server(*args)
    try:
        yield server
    finally:
        server.close()
