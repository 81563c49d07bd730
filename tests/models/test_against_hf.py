"""Each model family against transformers, litgpt's test_against_hf_* way: a tiny random-weight
checkpoint written by transformers from the family's config, loaded into loraft, gives the same
logits and the same greedy tokens."""

import pytest
import torch
import transformers

from loraft.errors import LoraftError
from loraft.generate import generate
from loraft.models import load_hf_checkpoint

PROMPT = [5, 17, 42, 250, 3, 99, 7]


def hf_llama(folder, **changes):
    """A random LlamaForCausalLM with grouped-query attention, saved as a checkpoint folder."""
    options = dict(
        vocab_size=300,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        eos_token_id=None,  # greedy decoding runs its 12 tokens, as ours does without stop ids
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**options, **changes})).eval()
    with torch.no_grad():  # weights large enough that a wrong layout changes the logits and the tokens
        for param in model.parameters():
            param.normal_(0, 0.3 if param.dim() > 1 else 1.0)
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("tied", [False, True])
def test_llama_checkpoint_gives_the_logits_and_greedy_tokens_of_transformers(tmp_path, tied):
    reference = hf_llama(tmp_path, tie_word_embeddings=tied)
    model = load_hf_checkpoint(tmp_path).eval()
    assert model.config.rope_base == 500000.0 and model.config.n_kv_heads == 2
    assert (model.out_head.weight is model.tok_emb.weight) == tied
    ids = torch.tensor([PROMPT, PROMPT[::-1]])
    with torch.no_grad():
        expected, got = reference(ids).logits, model(ids)
    assert expected.abs().max() > 1  # not a near-zero output that any layout would match
    assert (got - expected).abs().max() <= 1e-4
    tokens = reference.generate(torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False)[0, len(PROMPT) :]
    assert generate(model, PROMPT, 12) == tokens.tolist()


def test_llama_options_loraft_does_not_implement_are_refused(tmp_path):
    hf_llama(tmp_path, attention_bias=True)
    with pytest.raises(LoraftError, match="sets attention_bias, which loraft's Llama does not implement"):
        load_hf_checkpoint(tmp_path)
