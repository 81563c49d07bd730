"""Each model family against transformers, litgpt's test_against_hf_* way: a random-weight checkpoint
written by transformers from the family's real config (blocks cut to a few) is loaded into loraft and
gives the same logits, the same greedy tokens, and the same logits again with the KV cache.

Each family is tested twice: with its real hidden sizes, head counts and RoPE settings (one or two
blocks, a small vocabulary), and shrunk to tiny widths that keep every switch (GQA, biases, q/k norm,
partial rotary, RoPE scaling) so that the rest of the suite runs in seconds."""

import json

import pytest
import torch
import transformers
from torch import nn

from loraft import lora
from loraft.errors import LoraftError
from loraft.generate import generate
from loraft.models import load_hf_checkpoint

from ..helpers import export_and_compare, randomise
from .checkpoints import PROMPT, REAL, hf_checkpoint


def assert_same_as(reference, model, vocab_size=300, tokens=12):
    ids = torch.tensor([PROMPT, PROMPT[::-1]]) % vocab_size
    with torch.no_grad():
        expected, got = reference(ids).logits, model(ids)
    assert expected.abs().max() > 1  # not a near-zero output that any layout would match
    assert (got - expected).abs().max() <= 1e-4
    prompt = ids[0].tolist()
    greedy = reference.generate(ids[:1], max_new_tokens=tokens, do_sample=False)[0, len(prompt) :]
    assert generate(model, prompt, tokens) == greedy.tolist()
    assert_cache_equals_recompute(model, prompt + greedy.tolist())


def assert_cache_equals_recompute(model, ids):
    """Feeding `ids` one token at a time through the KV cache gives the logits of one full forward."""
    with torch.no_grad():
        full = model(torch.tensor([ids]))[0]
        cache = model.new_cache()
        cached = torch.cat([model(torch.tensor([[token]]), cache)[0] for token in ids])
    assert (cached - full).abs().max() <= 1e-4


@pytest.mark.parametrize("name", REAL)
def test_tiny_checkpoint_gives_the_logits_tokens_and_cache_of_transformers(tmp_path, name):
    reference = hf_checkpoint(tmp_path, name)
    model = load_hf_checkpoint(tmp_path).eval()
    assert model.config.model_type == reference.config.model_type
    assert (model.out_head.weight is model.tok_emb.weight) == reference.config.tie_word_embeddings
    assert_same_as(reference, model)


@pytest.mark.parametrize("name", REAL)
def test_real_widths_give_the_logits_of_transformers(tmp_path, name):
    big = name in ("mistral-7b-v0.1", "phi-4-mini")  # one block of these is 0.2 and 0.1 billion weights
    reference = hf_checkpoint(tmp_path, name, tiny=False, vocab_size=1000, layers=1 if big else 2)
    model = load_hf_checkpoint(tmp_path).eval()
    hf = reference.config
    ours = model.config
    assert (ours.emb_dim, ours.n_heads, getattr(ours, "n_kv_heads", ours.n_heads)) == (
        hf.hidden_size,
        hf.num_attention_heads,
        getattr(hf, "num_key_value_heads", hf.num_attention_heads),  # BLOOM's heads are not grouped
    )
    assert_same_as(reference, model, vocab_size=1000, tokens=4)


def test_the_switches_are_what_the_config_says(tmp_path):
    """Each family's difference is on: a test that passes with a switch off tests nothing."""
    configs = {}
    for name in REAL:
        hf_checkpoint(tmp_path / name, name)
        configs[name] = load_hf_checkpoint(tmp_path / name).config
    assert configs["qwen2.5-0.5b"].qkv_bias and not configs["qwen3-0.6b"].qkv_bias
    assert configs["qwen3-0.6b"].qk_norm and configs["qwen3-0.6b"].head_size == 32
    assert configs["phi-4-mini"].rotary_fraction == 0.75
    assert configs["phi-4-mini"].rope_scaling["rope_type"] == "longrope"
    assert configs["phi-4-mini"].context_length == 64  # the original context: long factors are not implemented
    assert configs["llama-3.2-1b"].rope_scaling["rope_type"] == "llama3"
    assert configs["mistral-7b-v0.1"].context_length == 64  # the sliding window
    gemma = configs["gemma-3-270m"]
    assert gemma.layer_types == ["sliding_attention", "full_attention"]
    assert (gemma.sliding_window, gemma.query_pre_attn_scalar, gemma.head_dim) == (4, 24, 16)
    assert (gemma.rope_base, gemma.rope_local_base) == (1e6, 1e4)
    assert gemma.sliding_window < len(PROMPT)  # the window masks some of the prompt
    assert configs["bloom-560m"].n_heads == 6  # not a power of two: ALiBi's slopes interleave two sequences


def test_gemma3_final_logit_softcapping_gives_the_logits_of_transformers(tmp_path):
    reference = hf_checkpoint(tmp_path, "gemma-3-270m", final_logit_softcapping=3.0)
    model = load_hf_checkpoint(tmp_path).eval()
    assert model.config.final_logit_softcapping == 3.0
    assert_same_as(reference, model)


def test_a_gemma3_config_json_as_the_hub_has_it_loads_the_same(tmp_path):
    """transformers 4's Gemma 3 config.json: rope_theta and rope_scaling (the full-attention layers'),
    rope_local_base_freq (the sliding ones') and sliding_window_pattern instead of layer_types."""
    full = dict(rope_type="linear", rope_theta=1e6, factor=8.0)
    rope = dict(full_attention=full, sliding_attention=dict(rope_type="default", rope_theta=1e4))
    reference = hf_checkpoint(tmp_path, "gemma-3-270m", rope_parameters=rope)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["rope_parameters"], config["layer_types"]
    config |= dict(rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling=dict(rope_type="linear", factor=8.0))
    config["sliding_window_pattern"] = 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = load_hf_checkpoint(tmp_path).eval()
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    assert model.config.rope_scaling == {"rope_type": "linear", "factor": 8.0}
    assert_same_as(reference, model)


def test_a_config_json_as_the_hub_has_it_loads_the_same(tmp_path):
    """Checkpoints on the hub were written by transformers 4: rope_theta and rope_scaling beside the
    rest ({"type": ...} in the oldest), where transformers 5 writes rope_parameters."""
    reference = hf_checkpoint(tmp_path, "llama-3.2-1b")
    config = json.loads((tmp_path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = {"type" if key == "rope_type" else key: value for key, value in rope.items()}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert_same_as(reference, load_hf_checkpoint(tmp_path).eval())


@pytest.mark.parametrize(
    "name,changes,message",
    [
        ("llama-3.2-1b", dict(attention_bias=True), "sets attention_bias, which loraft does not implement"),
        ("llama-3.2-1b", dict(mlp_bias=True), "sets mlp_bias"),
        ("llama-3.2-1b", dict(hidden_act="gelu"), "sets hidden_act"),
        (
            "llama-3.2-1b",
            dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0)),
            "sets RoPE scaling 'yarn' (loraft implements default, linear, llama3, longrope)",
        ),
        ("gemma-3-270m", dict(attn_logit_softcapping=50.0), "sets attn_logit_softcapping, which loraft does not"),
        ("gemma-3-270m", dict(use_bidirectional_attention=True), "sets use_bidirectional_attention"),
        ("gemma-3-270m", dict(hidden_activation="gelu"), "sets hidden_activation 'gelu'"),
        ("gemma-3-270m", dict(attention_bias=True), "sets attention_bias"),
        ("bloom-560m", dict(apply_residual_connection_post_layernorm=True), "sets apply_residual_connection_post"),
        ("bloom-560m", dict(pretraining_tp=2, slow_but_exact=True), "sets slow_but_exact with pretraining_tp > 1"),
        (
            "gemma-3-270m",
            dict(
                rope_parameters=dict(
                    full_attention=dict(rope_type="yarn", rope_theta=1e6, factor=4.0),
                    sliding_attention=dict(rope_type="default", rope_theta=1e4),
                )
            ),
            "sets RoPE scaling 'yarn' (loraft implements default, linear)",
        ),
    ],
)
def test_options_loraft_does_not_implement_are_refused(tmp_path, name, changes, message):
    hf_checkpoint(tmp_path, name, **changes)
    with pytest.raises(LoraftError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_hf_checkpoint(tmp_path)


def test_an_unsupported_architecture_is_refused_with_the_supported_ones(tmp_path):
    hf_checkpoint(tmp_path, "llama-3.2-1b")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"model_type": "falcon"}))
    with pytest.raises(
        LoraftError,
        match="architecture 'falcon' is not supported; loraft reads gpt2, llama, mistral, qwen2, qwen3, phi3, gemma3_text, bloom",
    ):
        load_hf_checkpoint(tmp_path)


def test_gemma3_multimodal_config_is_refused_naming_the_text_models(tmp_path):
    hf_checkpoint(tmp_path, "gemma-3-270m")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"model_type": "gemma3"}))
    with pytest.raises(LoraftError, match="multimodal .* model_type gemma3_text"):
        load_hf_checkpoint(tmp_path)


# BLOOM's q, k and v are one fused layer, which PEFT targets whole
CLASSIFIER_TARGETS = {"bloom-560m": ["query_key_value", "mlp"]}


@pytest.mark.parametrize("name", REAL)
@pytest.mark.parametrize("classify", [False, True])
def test_an_exported_adapter_runs_in_peft_on_transformers(tmp_path, name, classify):
    """A LoRA on every linear layer (a causal LM), or on q, v and the feed-forward beside a new head (a
    sequence classifier), exported with export-peft, gives our logits in PeftModel."""
    hf_checkpoint(tmp_path / "base", name)
    model = load_hf_checkpoint(tmp_path / "base").eval()
    targets = CLASSIFIER_TARGETS.get(name, ["q", "v", "mlp"]) if classify else ["all-linear"]
    lora.apply_lora(model, rank=4, alpha=8, targets=targets)
    if classify:
        lora.add_module_to_save(model, "out_head", nn.Linear(model.config.emb_dim, 2, bias=False))
        hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(
            tmp_path / "base", num_labels=2, pad_token_id=0
        )
    else:
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    randomise(model, std=0.1)
    ids = torch.tensor([PROMPT, PROMPT[::-1]])
    export_and_compare(model, hf_model.eval(), ids, tmp_path, classify)
