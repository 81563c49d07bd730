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

from ..helpers import loraft, tiny_gpt2
from .checkpoints import (
    GEMMA3_LAYERS,
    PROMPT,
    REAL,
    SENTENCEPIECE_STYLES,
    hf_checkpoint,
    write_sentencepiece_tokenizer,
    write_tokenizer,
)

# llama.cpp's architecture of each family's GGUF files, and their tokenizer: a byte-level one's
# pre-tokenizer name, or a SentencePiece style
GGUF_OF = {
    "llama-3.2-1b": ("llama", "llama-bpe"),
    "smollm2-360m": ("llama", "smollm"),
    "mistral-7b-v0.1": ("llama", "gpt2"),
    "qwen2.5-0.5b": ("qwen2", "qwen2"),
    "qwen3-0.6b": ("qwen3", "qwen2"),
    "phi-4-mini": ("phi3", "gpt-4o"),
    "gemma-3-270m": ("gemma3", "gemma"),
    "gemma-3-1b": ("gemma3", "gemma"),
    "bloom-560m": ("bloom", "bloom"),
}
# Gemma 3 as llama.cpp reads it: six layers of its pattern, queries scaled by head_dim (16) as in the
# real models, and room for the SentencePiece tokenizer's byte tokens
GEMMA3_AS_LLAMA_CPP = dict(layers=6, query_pre_attn_scalar=16, vocab_size=800)
CHANGES = {"gemma-3-270m": GEMMA3_AS_LLAMA_CPP, "gemma-3-1b": GEMMA3_AS_LLAMA_CPP}
# every family loraft writes as GGUF is here
WRITTEN = {
    name
    for name, (kind, _) in REAL.items()
    if family_named(getattr(transformers, f"{kind}Config").model_type, name).to_gguf
}
assert set(GGUF_OF) == WRITTEN


def checkpoint_folder(folder, name, texts, **changes):
    reference = hf_checkpoint(folder, name, **CHANGES.get(name, {}) | changes)
    tokenizer = GGUF_OF[name][1]
    if tokenizer in SENTENCEPIECE_STYLES:
        write_sentencepiece_tokenizer(folder, texts, tokenizer)
    else:
        write_tokenizer(folder, texts, pre=tokenizer)
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
    assert ("blk.0.attn_qkv.weight" in names) == (name in ("phi-4-mini", "bloom-560m"))
    assert ("blk.5.post_ffw_norm.weight" in names) == name.startswith("gemma")

    back, back_tokenizer = load_model(str(path))
    ids = torch.tensor([PROMPT, PROMPT[::-1]])
    with torch.no_grad():
        expected = reference(ids).logits
        assert (back(ids) - expected).abs().max() <= 1e-4
        assert torch.equal(back(ids), model(ids))
    assert generate(back, PROMPT, 8) == generate(model, PROMPT, 8)
    texts = sms_texts[2000:2300]
    assert back_tokenizer.encode_batch(texts) == tokenizer.encode_batch(texts)
    assert (back_tokenizer.eos_id, back_tokenizer.pad_id) == (tokenizer.eos_id, tokenizer.pad_id)
    assert back_tokenizer.chat_template == tokenizer.chat_template
    if name == "gemma-3-270m":
        generated = loraft("generate", "--model", str(path), "--prompt", "Free entry", "--max-new-tokens", "4")
        assert generated.returncode == 0, generated.stderr


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
        ("gemma-3-270m", dict(head_dim=256, query_pre_attn_scalar=256)),  # its reader's default scalar
        ("bloom-560m", {}),
    ],
)
def test_transformers_reads_the_written_gguf_as_the_checkpoint(tmp_path, name, changes, sms_texts):
    """An independent reader of llama.cpp's layout: q/k rows permuted for llama, q/k norms, biases,
    Phi-3's fused projections, Gemma's norms stored as 1 + weight, BLOOM's q, k, v rows regrouped."""
    reference = checkpoint_folder(tmp_path / "hf", name, sms_texts[:2000], **changes)
    model, tokenizer = load_model(str(tmp_path / "hf"))
    write_gguf(model, tmp_path / "model.gguf", "f32", tokenizer.gguf_metadata(model.config.vocab_size))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        assert (theirs.eval()(ids).logits - reference(ids).logits).abs().max() <= 1e-4


# about twice the largest logit error measured (Gemma's six layers and sqrt(emb_dim)-scaled embeddings
# carry its rounding further than Qwen3's two layers)
BOUNDS = {
    "qwen3-0.6b": {"f16": 0.02, "bf16": 0.15, "q8_0": 0.4},
    "gemma-3-270m": {"f16": 0.03, "bf16": 0.3, "q8_0": 0.9},
}


@pytest.mark.parametrize("name", BOUNDS)
@pytest.mark.parametrize("tensor_type", ["f16", "bf16", "q8_0"])
def test_smaller_tensor_types_stay_close(tmp_path, name, tensor_type, sms_texts):
    reference = checkpoint_folder(tmp_path / "hf", name, sms_texts[:2000])
    model, tokenizer = load_model(str(tmp_path / "hf"))
    path = write_gguf(model, tmp_path / "model.gguf", tensor_type, tokenizer.gguf_metadata(model.config.vocab_size))
    kinds = {t.tensor_type.name for t in GGUFReader(path).tensors}
    assert kinds == {tensor_type.upper(), "F32"}  # norms stay f32
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        error = (load_model(str(path))[0](ids) - reference(ids).logits).abs().max().item()
    assert 0 < error <= BOUNDS[name][tensor_type]


def test_what_cannot_be_written_is_refused(tmp_path):
    with pytest.raises(LoraftError, match="does not write gpt2 models as GGUF"):
        write_gguf(tiny_gpt2(), tmp_path / "gpt2.gguf")
    with pytest.raises(LoraftError, match="tensor type 'q4_k' is not supported"):
        write_gguf(tiny_gpt2(), tmp_path / "gpt2.gguf", "q4_k")
    assert not list(tmp_path.glob("*.gguf"))


SLIDING_ROPE = dict(rope_type="default", rope_theta=20000.0)
FULL_ROPE = dict(rope_type="default", rope_theta=1000000.0)


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(layer_types=GEMMA3_LAYERS[:3]), "layer_types other than 5 sliding-window then 1 full"),
        (
            dict(rope_parameters=dict(sliding_attention=SLIDING_ROPE, full_attention=FULL_ROPE)),
            "a sliding-window RoPE base of 20000, not 10000",
        ),
        (dict(query_pre_attn_scalar=24), "query_pre_attn_scalar 24, not 16"),
    ],
)
def test_a_gemma3_llama_cpp_would_read_differently_is_refused(tmp_path, changes, message):
    """llama.cpp assumes Gemma 3's layer pattern, sliding RoPE base and query scale instead of reading them."""
    hf_checkpoint(tmp_path / "gemma", "gemma-3-270m", **GEMMA3_AS_LLAMA_CPP | changes)
    model = load_hf_checkpoint(tmp_path / "gemma")
    with pytest.raises(LoraftError, match=f"llama.cpp would read this Gemma 3 as another model: it has {message}"):
        write_gguf(model, tmp_path / "gemma.gguf")
    assert not list(tmp_path.glob("*.gguf"))
