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

    return LlamaForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()


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


@pytest.fixture(scope="session")
def tiny_gpt2_weights(tmp_path_factory):
    """A tiny random GPT-2 checkpoint as transformers writes it (model.safetensors, config.json)."""
    import transformers

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_positions=128, n_embd=64, n_layer=2, n_head=4)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def small_sms_tsv(tmp_path_factory):
    """120 real messages, 60 of each class, as a user TSV file."""
    lines = [line.split("\t", 1) for line in SMS_FILE.read_text(encoding="utf-8").splitlines()]
    rows = [row for row in lines if row[0] == "ham"][:60] + [row for row in lines if row[0] == "spam"][:60]
    path = tmp_path_factory.mktemp("data") / "sms.tsv"
    path.write_text("label\ttext\n" + "".join(f"{label}\t{text}\n" for label, text in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, sms_texts):
    """A tiny random-weight Llama checkpoint (SmolLM2's config, 2 layers of width 64) as transformers
    writes it, with a tokenizer: loraft's and transformers' models of the same weights."""
    from .models.checkpoints import hf_checkpoint, write_tokenizer

    folder = tmp_path_factory.mktemp("tiny-llama")
    hf_checkpoint(folder, "smollm2-360m")
    write_tokenizer(folder, sms_texts[:500])
    return folder
