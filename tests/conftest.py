import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
os.environ.setdefault("LORAFT_DATA_DIR", str(SHARED_DATA))
DATA_DIR = Path(os.environ["LORAFT_DATA_DIR"])
SMS_FILE = DATA_DIR / "sms_spam_collection" / "SMSSpamCollection"


@pytest.fixture(scope="session")
def smollm2():
    """Our SmolLM2-135M-Instruct, fp32, with its tokenizer (shared: tests must not modify it)."""
    from loraft.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_gguf():
    from loraft.weights import smollm2_gguf

    return smollm2_gguf()


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf):
    """transformers' LlamaForCausalLM built from the same GGUF: the reference implementation."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def sms_texts():
    lines = SMS_FILE.read_text(encoding="utf-8").split("\n")
    return [line.split("\t", 1)[1] for line in lines if line]


@pytest.fixture(scope="session")
def spam_run(tmp_path_factory):
    """The main job for real, once per session: SmolLM2-135M + LoRA, one epoch of the book's SMS
    split (~2 minutes). (run folder, report); tests that need a trained spam classifier share it."""
    from loraft.finetune import train_classifier
    from loraft.train import TrainConfig

    out = tmp_path_factory.mktemp("spam") / "run"
    return out, train_classifier(out=out, quiet=True, train=TrainConfig(epochs=1, eval_every=1000))
