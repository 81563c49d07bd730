"""`loraft combine` against its definitions and against PEFT's add_weighted_adapter on the same
adapters (DARE from the same seed), on a tiny Llama that loraft and transformers both load."""

import json
import shutil
from unittest import mock

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from loraft import lora
from loraft.adapters import load_adapter, save_adapter
from loraft.combine import METHODS, combine
from loraft.errors import LoraftError
from loraft.models import load_model
from loraft.peft_format import export_peft

from .helpers import assert_clear_error, export_and_compare, loraft, randomise, tiny_llama
from .test_variants import LLAMA_IDS, hf_llama

WEIGHTS = [0.7, -0.4]


def trained_adapter(base_dir, folder, rank=4, targets=("all-linear",), seed=0, task="instruction", **lora_options):
    """A random (non-zero) LoRA over the model in `base_dir`, saved as an adapter of `task`."""
    model = load_model(str(base_dir))[0]
    lora.apply_lora(model, lora.LoraConfig(rank=rank, alpha=2.0 * rank + seed, targets=targets, **lora_options))
    if task == "classification":
        lora.add_module_to_save(model, "out_head", torch.nn.Linear(64, 2, bias=False))
        randomise(model, seed=seed, std=0.05)
        return save_adapter(model, folder, task=task, label_names=["ham", "spam"], max_length=32)
    randomise(model, seed=seed, std=0.05)
    return save_adapter(model, folder, task=task, template="alpaca", max_length=64)


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory):
    """Two instruction adapters of rank 4 with other alphas, one on every linear layer, one on attention."""
    folder = tmp_path_factory.mktemp("adapters")
    return [
        trained_adapter(tiny_llama_dir, folder / "a", seed=0),
        trained_adapter(tiny_llama_dir, folder / "b", seed=1, targets=("attention",)),
    ]


def updates(folder) -> dict[str, torch.Tensor]:
    """Each layer's s B A of the adapter in `folder`."""
    meta, tensors = json.loads((folder / "adapter.json").read_text()), load_file(folder / "adapter.safetensors")
    scale = lora.LoraConfig.of_adapter(meta).scale
    return {m: scale * tensors[f"{m}.lora_B"] @ tensors[f"{m}.lora_A"] for m in meta["target_modules"]}


def test_cat_is_the_weighted_sum_of_the_updates_and_linear_merges_a_and_b_apart(tiny_llama_dir, adapters, tmp_path):
    smaller = trained_adapter(tiny_llama_dir, tmp_path / "r2", rank=2, seed=2, targets=("attention",))
    combine([adapters[0], smaller], WEIGHTS, "cat", tmp_path / "cat")
    meta = json.loads((tmp_path / "cat" / "adapter.json").read_text())
    assert (meta["rank"], meta["alpha"], meta["scaling"], meta["combined"]["method"]) == (6, 6.0, "standard", "cat")
    first, second, cat = updates(adapters[0]), updates(smaller), updates(tmp_path / "cat")
    assert set(cat) == set(first)  # the union of the layers; scale 1
    for module, update in cat.items():
        expected = WEIGHTS[0] * first[module] + WEIGHTS[1] * second.get(module, 0)
        torch.testing.assert_close(update, expected, rtol=1e-6, atol=1e-7)

    # linear: A = sum sqrt(|w s|) sign A_i, B = sum sqrt(|w s|) B_i, so B A has the cross terms B_i A_j
    combine(adapters, WEIGHTS, "linear", tmp_path / "linear")
    linear, tensors = updates(tmp_path / "linear"), [load_file(a / "adapter.safetensors") for a in adapters]
    scales = [lora.LoraConfig.of_adapter(json.loads((a / "adapter.json").read_text())).scale for a in adapters]
    module = "trf_blocks.1.att.W_value"  # in both
    roots = [(abs(w * s)) ** 0.5 for w, s in zip(WEIGHTS, scales)]
    A = sum(r * (1 if w * s > 0 else -1) * t[f"{module}.lora_A"] for r, w, s, t in zip(roots, WEIGHTS, scales, tensors))
    B = sum(r * t[f"{module}.lora_B"] for r, t in zip(roots, tensors))
    torch.testing.assert_close(linear[module], B @ A, rtol=1e-6, atol=1e-7)
    combine(adapters[:1], [0.3], "linear", tmp_path / "one")  # one adapter: exactly its weighted update
    one = updates(tmp_path / "one")
    for module, update in first.items():
        torch.testing.assert_close(one[module], 0.3 * update, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_is_pefts(tiny_llama_dir, adapters, tmp_path, method):
    density = 0.5 if "ties" in method or "dare" in method else None
    combine(adapters, WEIGHTS, method, tmp_path / "ours", density=density, seed=3)
    ours = load_model(str(tiny_llama_dir))[0]
    load_adapter(ours, tmp_path / "ours")

    for name, folder in zip("ab", adapters):
        export_peft(folder, tmp_path / name)
    theirs = PeftModel.from_pretrained(hf_llama(tiny_llama_dir), tmp_path / "a", adapter_name="a")
    theirs.load_adapter(tmp_path / "b", adapter_name="b")
    inject = theirs.base_model.inject_adapter

    def seeded_after_injecting(*args, **kwargs):  # the new adapter's init draws first; DARE's from seed 3
        inject(*args, **kwargs)
        torch.manual_seed(3)

    with mock.patch.object(theirs.base_model, "inject_adapter", seeded_after_injecting):
        theirs.add_weighted_adapter(["a", "b"], WEIGHTS, "c", combination_type=method, density=density)
    theirs.set_adapter("c")
    with torch.no_grad():
        expected = theirs(LLAMA_IDS).logits
        got = ours(LLAMA_IDS)
        lora.set_active(ours, None)
        assert (got - ours(LLAMA_IDS)).abs().max() > 0.05  # the combined adapter does something
    assert (got - expected).abs().max() <= 1e-3


def test_a_combined_adapter_runs_in_peft_and_back(tiny_llama_dir, adapters, tmp_path):
    combine(adapters, WEIGHTS, "dare_ties_svd", tmp_path / "combined", density=0.7, rank=6)
    model = load_model(str(tiny_llama_dir))[0]
    load_adapter(model, tmp_path / "combined", name="default")
    export_and_compare(model, hf_llama(tiny_llama_dir), LLAMA_IDS, tmp_path, classify=False)


def test_classifiers_combine_their_loras_and_keep_the_first_head(tiny_llama_dir, tmp_path):
    first = trained_adapter(tiny_llama_dir, tmp_path / "a", task="classification", seed=0)
    second = trained_adapter(tiny_llama_dir, tmp_path / "b", task="classification", seed=1)
    combine([first, second], [0.5, 0.5], "cat", tmp_path / "both")
    head = load_file(tmp_path / "both" / "adapter.safetensors")["out_head.weight"]
    assert torch.equal(head, load_file(first / "adapter.safetensors")["out_head.weight"])
    meta = json.loads((tmp_path / "both" / "adapter.json").read_text())
    assert (meta["task"], meta["label_names"], meta["modules_to_save"]["out_head"]["out_features"]) == (
        "classification",
        ["ham", "spam"],
        2,
    )


def test_bad_combinations_are_one_clear_line_and_write_nothing(tiny_llama_dir, adapters, tmp_path):
    other_base = tiny_llama()
    lora.apply_lora(other_base, lora.LoraConfig(rank=4))
    save_adapter(other_base, tmp_path / "other-base", task="instruction", template="alpaca")
    classifier = trained_adapter(tiny_llama_dir, tmp_path / "classifier", task="classification")
    out = tmp_path / "out"

    def run(*adapter_folders, weights="0.5,0.5"):
        flags = [f for folder in adapter_folders for f in ("--adapter", str(folder))]
        return loraft("combine", *flags, "--weights", weights, "--method", "linear", "--out", str(out))

    assert_clear_error(run(adapters[0], tmp_path / "other-base"), "only adapters of one base combine")
    assert_clear_error(run(adapters[0], classifier), "only adapters of one task combine")
    chat = tmp_path / "chat"  # the same adapter, its prompts asked in another template
    shutil.copytree(adapters[1], chat)
    (chat / "adapter.json").write_text((chat / "adapter.json").read_text().replace('"alpaca"', '"chat"'))
    assert_clear_error(run(adapters[0], chat), "'template': 'chat'", "only adapters that read texts alike combine")
    assert_clear_error(run(*adapters, weights="1"), "--weights gives 1 weights for 2 adapters")
    assert_clear_error(run(*adapters, weights="1,x"), "--weights takes comma-separated numbers")
    assert not out.exists()

    rank_two = trained_adapter(tiny_llama_dir, tmp_path / "r2", rank=2)
    dora = trained_adapter(tiny_llama_dir, tmp_path / "dora", variant="dora")
    for arguments, message in [
        (([adapters[0], rank_two], WEIGHTS, "linear"), "of one rank, and these have ranks \\[2, 4\\]"),
        ((adapters, WEIGHTS, "ties"), "give --density in \\(0, 1\\]"),
        ((adapters, WEIGHTS, "cat", 0.5), "--density is for ties and dare methods"),
        (([adapters[0], dora], WEIGHTS, "cat"), "is a dora adapter; combine merges plain LoRAs"),
    ]:
        with pytest.raises(LoraftError, match=message):
            combine(*arguments[:3], out, *arguments[3:])
    with pytest.raises(LoraftError, match="--rank .* sets the rank an _svd method cuts back to"):
        combine(adapters, WEIGHTS, "cat", out, rank=3)
    assert not out.exists()
