"""GGUF files of every family with a llama.cpp architecture: written by loraft from a random-weight
transformers checkpoint, read back by loraft (weights and tokenizer) and by transformers' own GGUF
reader, each giving the checkpoint's logits."""

import pytest
import torch
import transformers
from gguf import GGUFReader

from loraft.errors import LoraftError
from loraft.generate import generate
from loraft.gguf_writer import write_gguf
from loraft.models import family_named, load_hf_checkpoint, load_model

from ..helpers import tiny_gpt2
from .checkpoints import PROMPT, REAL, hf_checkpoint, write_tokenizer

# llama.cpp's architecture and pre-tokenizer name of each family's GGUF files
GGUF_OF = {
    "llama-3.2-1b": ("llama", "llama-bpe"),
    "smollm2-360m": ("llama", "smollm"),
    "mistral-7b-v0.1": ("llama", "gpt2"),
    "qwen2.5-0.5b": ("qwen2", "qwen2"),
    "qwen3-0.6b": ("qwen3", "qwen2"),
    "phi-4-mini": ("phi3", "gpt-4o"),
}
# every family loraft writes as GGUF is here (Gemma 3's is not written: to_gguf is None)
WRITTEN = {
    name
    for name, (kind, _) in REAL.items()
    if family_named(getattr(transformers, f"{kind}Config").model_type, name).to_gguf
}
assert set(GGUF_OF) == WRITTEN


def checkpoint_folder(folder, name, texts, **changes):
    reference = hf_checkpoint(folder, name, **changes)
    write_tokenizer(folder, texts, pre=GGUF_OF[name][1])
    return reference


@pytest.mark.parametrize("name", GGUF_OF)
def test_a_written_gguf_reads_back_as_the_same_model_and_tokenizer(tmp_path, name, sms_texts):
    reference = checkpoint_folder(tmp_path / "hf", name, sms_texts[:2000])
    model, tokenizer = load_model(str(tmp_path / "hf"))
    path = write_gguf(model, tmp_path / "model.gguf", "f32", tokenizer.gguf_metadata(model.config.vocab_size))
    reader = GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == GGUF_OF[name][0]
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output_norm.weight", "blk.1.ffn_down.weight"} <= names
    assert ("blk.0.attn_qkv.weight" in names) == (name == "phi-4-mini")

    back, back_tokenizer = load_model(str(path))
    ids = torch.tensor([PROMPT, PROMPT[::-1]])
    with torch.no_grad():
        expected = reference(ids).logits
        assert (back(ids) - expected).abs().max() <= 1e-4
    assert generate(back, PROMPT, 8) == generate(model, PROMPT, 8)
    texts = sms_texts[2000:2300]
    assert back_tokenizer.encode_batch(texts) == tokenizer.encode_batch(texts)
    assert (back_tokenizer.eos_id, back_tokenizer.pad_id) == (tokenizer.eos_id, tokenizer.pad_id)
    assert back_tokenizer.chat_template == tokenizer.chat_template


# transformers' GGUF reader ignores the file's head size (Qwen3's is taken as its config's default, 128,
# as in the real models), partial rotary and RoPE scaling, so the checkpoints it reads keep to what it
# reads; loraft's own reader checks the rest above.
PLAIN_ROPE = dict(rope_type="default", rope_theta=10000.0)


@pytest.mark.parametrize(
    "name,changes",
    [
        ("smollm2-360m", {}),
        ("mistral-7b-v0.1", {}),
        ("qwen2.5-0.5b", {}),
        ("qwen3-0.6b", dict(head_dim=128)),
        ("phi-4-mini", dict(partial_rotary_factor=1.0, rope_parameters=PLAIN_ROPE)),
    ],
)
def test_transformers_reads_the_written_gguf_as_the_checkpoint(tmp_path, name, changes, sms_texts):
    """An independent reader of llama.cpp's layout: q/k rows permuted for llama, q/k norms, biases,
    Phi-3's fused projections."""
    reference = checkpoint_folder(tmp_path / "hf", name, sms_texts[:2000], **changes)
    model, tokenizer = load_model(str(tmp_path / "hf"))
    write_gguf(model, tmp_path / "model.gguf", "f32", tokenizer.gguf_metadata(model.config.vocab_size))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        assert (theirs.eval()(ids).logits - reference(ids).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("tensor_type,bound", [("f16", 0.02), ("bf16", 0.15), ("q8_0", 0.4)])
def test_smaller_tensor_types_stay_close(tmp_path, tensor_type, bound, sms_texts):
    """Bounds: about twice the largest logit error measured."""
    reference = checkpoint_folder(tmp_path / "hf", "qwen3-0.6b", sms_texts[:2000])
    model, tokenizer = load_model(str(tmp_path / "hf"))
    path = write_gguf(model, tmp_path / "model.gguf", tensor_type, tokenizer.gguf_metadata(model.config.vocab_size))
    kinds = {t.tensor_type.name for t in GGUFReader(path).tensors}
    assert kinds == {tensor_type.upper(), "F32"}  # norms stay f32
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        error = (load_model(str(path))[0](ids) - reference(ids).logits).abs().max().item()
    assert 0 < error <= bound


def test_what_cannot_be_written_is_refused(tmp_path):
    with pytest.raises(LoraftError, match="does not write gpt2 models as GGUF"):
        write_gguf(tiny_gpt2(), tmp_path / "gpt2.gguf")
    with pytest.raises(LoraftError, match="tensor type 'q4_k' is not supported"):
        write_gguf(tiny_gpt2(), tmp_path / "gpt2.gguf", "q4_k")
    hf_checkpoint(tmp_path / "gemma", "gemma-3-270m")
    with pytest.raises(LoraftError, match="does not write gemma3_text models as GGUF"):
        write_gguf(load_hf_checkpoint(tmp_path / "gemma"), tmp_path / "gemma.gguf")
    assert not list(tmp_path.glob("*.gguf"))
