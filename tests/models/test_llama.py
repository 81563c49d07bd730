import re

import torch
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer

from loraft.generate import generate

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Congratulations! You have won a £1000 prize. Call 09061701461 now",
]


def test_logits_equal_transformers(smollm2, hf_smollm2):
    model, tokenizer = smollm2
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            expected = hf_smollm2(ids).logits
            got = model(ids)
        assert (got - expected).abs().max() <= 1e-3, prompt


def test_greedy_continuation_knows_paris(smollm2):
    model, tokenizer = smollm2
    new = generate(model, tokenizer.encode("The capital of France is"), 8)
    assert tokenizer.decode(new).startswith(" Paris")


def test_kv_cache_generation_equals_full_recompute(smollm2):
    model, tokenizer = smollm2
    prompt = tokenizer.encode("Once upon a time")
    cached = generate(model, prompt, 10)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(10):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert cached == ids[len(prompt) :]


def test_sampling_is_seeded(smollm2):
    model, tokenizer = smollm2
    prompt = tokenizer.encode("My favourite food is")
    first = generate(model, prompt, 10, temperature=1.0, top_k=20, seed=7)
    assert first == generate(model, prompt, 10, temperature=1.0, top_k=20, seed=7)
    assert first != generate(model, prompt, 10, temperature=1.0, top_k=20, seed=8)


def test_tokenizer_equals_smollm2_reference_on_every_sms(smollm2, smollm2_gguf, sms_texts):
    """transformers' GGUF loader ignores the file's pre-tokenizer type ("smollm"): SmolLM2's own
    tokenizer.json (and llama.cpp) isolate every digit before the GPT-2 split. With that one piece
    set as in SmolLM2's tokenizer.json, transformers and loraft agree on all 5,574 messages; without
    it they differ only where whitespace precedes a digit."""
    _, tokenizer = smollm2
    assert len(sms_texts) == 5574
    ours = tokenizer.encode_batch(sms_texts)
    hf = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    plain = [hf.encode(t, add_special_tokens=False) for t in sms_texts]
    differing = [t for t, a, b in zip(sms_texts, ours, plain) if a != b]
    assert all(re.search(r"\s\d", t) for t in differing) and len(differing) <= 5
    hf.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    assert ours == [hf.encode(t, add_special_tokens=False) for t in sms_texts]
    assert [tokenizer.decode(ids) for ids in ours] == sms_texts


def test_chat_special_tokens_are_single_ids(smollm2):
    _, tokenizer = smollm2
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2 == tokenizer.eos_id
