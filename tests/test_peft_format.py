"""PEFT interoperability against PEFT itself: adapters exported by loraft run in PeftModel on the
transformers model of the same weights, and PEFT's own adapters run in loraft, with the same logits."""

import copy
import json
import shutil

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from torch import nn

from loraft import lora
from loraft.adapters import load_adapter, save_adapter
from loraft.errors import LoraftError
from loraft.models import load_model
from loraft.peft_format import export_peft, import_peft

from .helpers import export_and_compare, randomise, tiny_llama

GPT2_CONFIG = dict(vocab_size=1000, n_positions=64, n_embd=64, n_layer=2, n_head=4)
GPT2_IDS = torch.randint(1, 1000, (2, 12), generator=torch.Generator().manual_seed(1))  # no 0: the pad id
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A random-weight GPT-2 checkpoint as transformers saves it."""
    folder = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2_CONFIG)).save_pretrained(folder)
    return folder


def our_gpt2(gpt2_dir):
    return load_model("gpt2-small", weights_path=str(gpt2_dir))[0]


def hf_gpt2(gpt2_dir, classify=False):
    if classify:
        return transformers.GPT2ForSequenceClassification.from_pretrained(gpt2_dir, num_labels=2, pad_token_id=0).eval()
    return transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()


def hf_smollm2_classifier(hf_smollm2):
    """LlamaForSequenceClassification with the base of `hf_smollm2` (its score comes from the adapter)."""
    config = copy.deepcopy(hf_smollm2.config)
    config.num_labels, config.pad_token_id = 2, 0
    with torch.device("meta"):
        model = transformers.LlamaForSequenceClassification(config)
    model.model = copy.deepcopy(hf_smollm2.model)
    model.score = nn.Linear(config.hidden_size, 2, bias=False)
    return model.eval()


@pytest.mark.parametrize(
    "scaling,targets,classify",
    [
        ("standard", ["q", "k", "v", "o", "mlp", "head"], False),
        ("rslora", ["q", "v"], False),  # c_attn's key rows stay zero
        ("book", ["k", "mlp"], True),
    ],
)
def test_gpt2_export_runs_in_peft(gpt2_dir, tmp_path, scaling, targets, classify):
    model = our_gpt2(gpt2_dir)
    lora.apply_lora(model, rank=4, alpha=8, targets=targets, scaling=scaling)
    if classify:
        lora.add_module_to_save(model, "out_head", nn.Linear(64, 2, bias=False))
    randomise(model)
    export_and_compare(model, hf_gpt2(gpt2_dir, classify), GPT2_IDS, tmp_path, classify)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert LoraConfig(**config).target_modules  # every key is one LoraConfig takes
    assert config["fan_in_fan_out"] and config["task_type"] == ("SEQ_CLS" if classify else "CAUSAL_LM")


@pytest.mark.parametrize("scaling,targets", [("standard", ["all-linear"]), ("rslora", ["attention", "head"])])
def test_smollm2_export_runs_in_peft(smollm2, hf_smollm2, tmp_path, scaling, targets):
    model, tokenizer = copy.deepcopy(smollm2[0]), smollm2[1]
    lora.apply_lora(model, rank=8, alpha=16, targets=targets, scaling=scaling)
    randomise(model, std=0.02)
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    export_and_compare(model, copy.deepcopy(hf_smollm2), ids, tmp_path, classify=False)


def test_smollm2_classifier_export_runs_in_peft(smollm2, hf_smollm2, tmp_path):
    model, tokenizer = copy.deepcopy(smollm2[0]), smollm2[1]
    lora.apply_lora(model, rank=8, alpha=4, targets=["q", "v", "mlp"], scaling="book")
    lora.add_module_to_save(model, "out_head", nn.Linear(576, 2, bias=False))
    randomise(model, std=0.02)
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    assert 0 not in ids  # the pad id: the classifier reads the last token
    export_and_compare(model, hf_smollm2_classifier(hf_smollm2), ids, tmp_path, classify=True)


def peft_adapter(hf_model, folder, **config):
    peft_model = get_peft_model(hf_model, LoraConfig(**config))
    randomise(peft_model, std=0.02)
    peft_model.save_pretrained(folder)
    return peft_model.eval()


@pytest.mark.parametrize("classify", [False, True])
def test_gpt2_peft_adapter_runs_in_loraft(gpt2_dir, tmp_path, classify):
    peft_model = peft_adapter(
        hf_gpt2(gpt2_dir, classify),
        tmp_path / "peft",
        r=4,
        lora_alpha=8,
        fan_in_fan_out=True,
        task_type="SEQ_CLS" if classify else "CAUSAL_LM",
        target_modules=["c_attn", "c_proj", "c_fc"] + ([] if classify else ["lm_head"]),
        rank_pattern={"c_fc": 2},
        alpha_pattern={"c_attn": 3},
    )
    with torch.no_grad():
        expected = peft_model(GPT2_IDS).logits
    model = our_gpt2(gpt2_dir)
    with torch.no_grad():
        base = model(GPT2_IDS)
        import_peft(tmp_path / "peft", model)
        got = model(GPT2_IDS)
    if not classify:
        assert (got - base).abs().max() > 0.05
    assert ((got[:, -1] if classify else got) - expected).abs().max() <= 1e-4
    assert lora.adapter_state(model).configs["default"]["rank"] == 4  # c_fc's rank 2 is padded

    save_adapter(model, tmp_path / "loraft")
    fresh = our_gpt2(gpt2_dir)
    load_adapter(fresh, tmp_path / "loraft")
    with torch.no_grad():
        assert torch.equal(fresh(GPT2_IDS), got)


def test_smollm2_peft_adapter_runs_in_loraft(smollm2, hf_smollm2, tmp_path):
    peft_model = peft_adapter(
        copy.deepcopy(hf_smollm2),
        tmp_path / "peft",
        r=8,
        lora_alpha=16,
        use_rslora=True,
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        rank_pattern={"o_proj": 4},
        alpha_pattern={"down_proj": 4},
    )
    model, tokenizer = copy.deepcopy(smollm2[0]), smollm2[1]
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    with torch.no_grad():
        expected = peft_model(ids).logits
        base = model(ids)
        import_peft(tmp_path / "peft", model)
        got = model(ids)
    assert (got - base).abs().max() > 0.05
    assert (got - expected).abs().max() <= 1e-3


def tiny_llama_adapter(folder):
    model = tiny_llama()
    lora.apply_lora(model, rank=4, targets=["q", "v"])
    save_adapter(model, folder / "loraft")
    return export_peft(folder / "loraft", folder / "peft")


def edit_config(source, target, **changes):
    shutil.copytree(source, target)
    config = json.loads((target / "adapter_config.json").read_text())
    (target / "adapter_config.json").write_text(json.dumps(config | changes))
    return target


def test_bad_peft_folders_fail_clearly(gpt2_dir, tmp_path):
    peft_dir = tiny_llama_adapter(tmp_path)
    model = our_gpt2(gpt2_dir)
    with pytest.raises(LoraftError, match="no counterpart in this gpt2 model"):
        import_peft(peft_dir, model)
    with pytest.raises(LoraftError, match="not a PEFT adapter folder"):
        import_peft(tmp_path / "loraft", model)
    for changes, message in [
        (dict(peft_type="LOHA"), "PEFT type 'LOHA' is not supported"),
        (dict(use_qalora=True), "use_qalora=True is not supported"),
        (dict(bias="all"), "trains biases"),
        (dict(init_lora_weights="pissa"), "changes the base weights"),
    ]:
        with pytest.raises(LoraftError, match=message):
            import_peft(edit_config(peft_dir, tmp_path / next(iter(changes)), **changes), model)
    (tmp_path / "peft" / "adapter_model.safetensors").rename(tmp_path / "peft" / "adapter_model.bin")
    with pytest.raises(LoraftError, match="never unpickles"):
        import_peft(peft_dir, model)
    assert lora.adapter_names(model) == []


def test_unexportable_adapters_fail_clearly(gpt2_dir, tmp_path):
    model = our_gpt2(gpt2_dir)
    lora.apply_lora(model, rank=4, targets=["q"])
    lora.add_module_to_save(model, "out_head", nn.Linear(64, 2, bias=True))
    save_adapter(model, tmp_path / "biased")
    with pytest.raises(LoraftError, match="no bias"):
        export_peft(tmp_path / "biased", tmp_path / "peft")

    lora.apply_lora(model, rank=4, targets=["q"], name="lm")
    save_adapter(model, tmp_path / "lm", name="lm")
    meta = json.loads((tmp_path / "lm" / "adapter.json").read_text())
    (tmp_path / "lm" / "adapter.json").write_text(json.dumps(meta | {"trained_parameters": ["final_norm.scale"]}))
    with pytest.raises(LoraftError, match="trains base parameters"):
        export_peft(tmp_path / "lm", tmp_path / "peft")
