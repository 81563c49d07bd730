import pytest
import torch
import transformers

from loraft.generate import generate
from loraft.models import gpt2, load_model, parameter_count
from loraft.tokenizer import GPT2Tokenizer


def save_random_hf_gpt2(folder, **config):
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config)).eval()
    hf.save_pretrained(folder)
    return hf


@pytest.mark.parametrize(
    "config",
    [
        dict(vocab_size=1000, n_positions=64, n_embd=64, n_layer=2, n_head=4),
        dict(),  # the real gpt2-small configuration
    ],
    ids=["tiny", "gpt2-small"],
)
def test_logits_and_greedy_tokens_equal_transformers(tmp_path, config):
    hf = save_random_hf_gpt2(tmp_path, **config)
    ours, _ = load_model("gpt2-small", weights_path=str(tmp_path))
    ids = torch.randint(0, hf.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert (got - expected).abs().max() <= 1e-4

    prompt = ids[0, :5].tolist()
    hf_tokens = hf.generate(ids[:1, :5], max_new_tokens=12, do_sample=False, pad_token_id=0)[0, 5:].tolist()
    assert generate(ours, prompt, 12) == hf_tokens


def test_parameter_counts_match_the_book():
    assert parameter_count("gpt2-small") == 163_037_184
    with torch.device("meta"):
        model = gpt2.GPTModel(gpt2.SIZES["gpt2-small"])
        model.out_head = torch.nn.Linear(768, 2)
    assert sum(p.numel() for p in model.parameters()) == 124_441_346


def test_gpt2_tokenizer_offline():
    tokenizer = GPT2Tokenizer()
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert tokenizer.decode([15496, 995]) == "Hello world"
    assert tokenizer.eos_id == 50256
