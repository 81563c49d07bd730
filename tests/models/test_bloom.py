"""What BLOOM does that the generic family tests (test_against_hf.py, test_gguf_files.py) do not reach:
ALiBi's slopes for any head count, ALiBi over right-padded batches as loraft's tasks lay them out, and
PEFT's own adapter on query_key_value, the article's (r=16, alpha=32), run in loraft."""

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

from loraft import lora
from loraft.errors import LoraftError
from loraft.models import load_hf_checkpoint
from loraft.models.bloom import alibi_slopes
from loraft.peft_format import import_peft

from .checkpoints import PROMPT, hf_checkpoint


@pytest.fixture(scope="module")
def bloom(tmp_path_factory):
    """(folder, transformers' model) of a tiny random BLOOM: 6 heads, 2 layers."""
    folder = tmp_path_factory.mktemp("bloom")
    return folder, hf_checkpoint(folder, "bloom-560m")


@pytest.mark.parametrize("n_heads", [1, 4, 6, 12, 16, 112])
def test_alibi_slopes_are_transformers(n_heads):
    torch.testing.assert_close(alibi_slopes(n_heads), _get_alibi_slopes(n_heads, "cpu"), rtol=1e-6, atol=0)


def test_right_padded_rows_give_transformers_logits_with_its_attention_mask(bloom):
    """A batch as loraft's classification and instruction batches are: rows of 7, 4 and 2 real tokens
    padded on the right. Each real position's logits equal transformers' for the same batch with its
    attention mask, and loraft's for the row alone; the padding needs no mask."""
    folder, reference = bloom
    model = load_hf_checkpoint(folder).eval()
    lengths, pad = [7, 4, 2], 0
    ids = torch.full((3, 7), pad)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.tensor(PROMPT[-n:])
    mask = (torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]).long()
    with torch.no_grad():
        ours, theirs = model(ids), reference(ids, attention_mask=mask).logits
        for row, n in enumerate(lengths):
            assert (ours[row, :n] - theirs[row, :n]).abs().max() <= 1e-4
            assert (ours[row, :n] - model(ids[row : row + 1, :n])[0]).abs().max() <= 1e-5
        # in training the attention runs its own backward (kv_cache.CausalAttention), with the bias added
        model.train()
        assert (model(ids) - ours).abs().max() <= 1e-5


def test_peft_own_query_key_value_adapter_runs_in_loraft(tmp_path, bloom):
    """The article's LoRA made by PEFT itself (r=16, alpha=32, dropout 0.05, target query_key_value, bias
    none, CAUSAL_LM), B made non-zero: loraft reads it onto att.W_qkv alone, with PEFT's parameter count
    and PEFT's logits; loraft's own --targets query_key_value trains the same parameters."""
    folder, _ = bloom
    config = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["query_key_value"], bias="none", task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(folder), config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    peft_model.save_pretrained(tmp_path / "peft")
    ids = torch.tensor([PROMPT, PROMPT[::-1]])
    with torch.no_grad():
        expected = peft_model.eval()(ids).logits

    model = load_hf_checkpoint(folder)
    import_peft(tmp_path / "peft", model)
    with torch.no_grad():
        model.eval()  # the new LoRA layers too: their dropout off
        assert (model(ids) - expected).abs().max() <= 1e-4
    assert lora.adapter_state(model).configs["default"]["target_modules"] == [
        "trf_blocks.0.att.W_qkv",
        "trf_blocks.1.att.W_qkv",
    ]
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert sum(p.numel() for p in lora.adapter_params(model, "default").values()) == trainable

    fresh = load_hf_checkpoint(folder)
    assert lora.apply_lora(fresh, rank=16, alpha=32, targets=["query_key_value"]) == [
        "trf_blocks.0.att.W_qkv",
        "trf_blocks.1.att.W_qkv",
    ]
    assert lora.parameter_summary(fresh)["trainable"] == trainable
    assert len(lora.expand_targets(fresh, ["attention"])) == 4  # query_key_value and the output projection
    with pytest.raises(LoraftError, match="LoRA target 'q' matches no linear layer; groups: \\['query_key_value'"):
        lora.apply_lora(fresh, targets=["q"], name="other")
