import shutil

import pytest
import torch
from torch import nn

from loraft import lora
from loraft.adapters import load_adapter, save_adapter
from loraft.errors import LoraftError
from loraft.models import gpt2
from loraft.peft_format import export_peft

from .helpers import IDS, tiny_gpt2, tiny_llama, train_a_few_steps


def test_book_parameter_counts_gpt2_small():
    with torch.device("meta"):
        model = gpt2.GPTModel(gpt2.SIZES["gpt2-small"])
        model.out_head = nn.Linear(768, 2)
    frozen_before = sum(p.numel() for p in model.parameters())
    with torch.device("meta"):
        lora.apply_lora(model, rank=16, alpha=16, targets=["all-linear", "head"])
    counts = lora.parameter_summary(model)
    assert frozen_before == 124_441_346
    assert counts["trainable"] == 2_666_528
    assert counts["frozen"] == 124_441_346


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_targets_groups_and_globs(build):
    model = build()
    assert len(lora.expand_targets(model, ["q", "v"])) == 4
    mlp_layers = 3 if build is tiny_llama else 2
    assert len(lora.expand_targets(model, ["all-linear"])) == 2 * (4 + mlp_layers)
    assert lora.expand_targets(model, ["trf_blocks.1.att.W_*"]) == [
        f"trf_blocks.1.att.W_{x}" for x in ("query", "key", "value")
    ]
    with pytest.raises(LoraftError, match="matches no linear layer"):
        lora.expand_targets(model, ["nothing.here"])


@pytest.mark.parametrize("scaling,expected", [("book", 8.0), ("standard", 2.0), ("rslora", 4.0)])
def test_scaling_conventions(scaling, expected):
    model = tiny_llama()
    lora.apply_lora(model, rank=4, alpha=8, scaling=scaling)
    assert model.trf_blocks[0].att.W_query.scale["default"] == expected


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_fresh_adapter_is_identity_then_merge_equals_unmerged(build):
    model = build()
    before = model(IDS).detach()
    weight_before = model.trf_blocks[0].att.W_query.weight.detach().clone()
    lora.apply_lora(model, rank=4, alpha=8, targets=["all-linear"])
    assert torch.equal(model(IDS), before)
    train_a_few_steps(model, IDS)
    unmerged = model(IDS).detach()
    assert (unmerged - before).abs().max() > 1e-3  # training changed something
    lora.merge(model)
    merged = model(IDS).detach()
    # fp32 rounding of W + scale*BA: 1e-5 of the logits' own scale (these reach ~10).
    scale = unmerged.abs().max()
    assert (merged - unmerged).abs().max() <= 1e-5 * scale
    lora.unmerge(model)
    assert (model.trf_blocks[0].att.W_query.base.weight - weight_before).abs().max() <= 1e-6
    assert (model(IDS) - unmerged).abs().max() <= 1e-5 * scale


def test_merging_keeps_the_adapters_own_head():
    model = tiny_llama()
    lora.apply_lora(model, rank=4)
    lora.add_module_to_save(model, "out_head", nn.Linear(48, 2, bias=False))
    train_a_few_steps_cls(model)
    unmerged = model(IDS).detach()
    lora.merge(model)
    assert model(IDS).shape == (3, 20, 2)
    assert (model(IDS) - unmerged).abs().max() <= 1e-5


def test_disable_gives_base_behaviour_without_unloading():
    model = tiny_llama()
    base = model(IDS).detach()
    lora.apply_lora(model, rank=4)
    train_a_few_steps(model, IDS)
    adapted = model(IDS).detach()
    lora.set_active(model, None)
    assert torch.equal(model(IDS), base)
    lora.set_active(model, "default")
    assert torch.equal(model(IDS), adapted)


def test_only_lora_and_saved_modules_train():
    model = tiny_llama()
    lora.apply_lora(model, rank=4, targets=["q", "v"])
    lora.add_module_to_save(model, "out_head", nn.Linear(48, 3, bias=False))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        *(f"trf_blocks.{i}.att.W_{w}.lora_{m}.default" for i in range(2) for w in ("query", "value") for m in "AB"),
        "out_head.copies.default.weight",
    }
    assert model(IDS).shape == (3, 20, 3)


def test_adapter_round_trips_bit_exactly(tmp_path):
    model = tiny_llama()
    lora.apply_lora(model, rank=4, alpha=8, scaling="rslora", targets=["all-linear"], dropout=0.5)
    lora.add_module_to_save(model, "out_head", nn.Linear(48, 2, bias=False))
    train_a_few_steps_cls(model)
    expected = model.eval()(IDS).detach()
    save_adapter(model, tmp_path / "a", task="classification", label_names=["ham", "spam"])

    fresh = tiny_llama()  # in eval mode, as load_model gives it: the loaded LoRA runs no dropout
    meta = load_adapter(fresh, tmp_path / "a")
    assert meta["label_names"] == ["ham", "spam"] and meta["scaling"] == "rslora"
    assert torch.equal(fresh(IDS), expected)
    save_adapter(fresh, tmp_path / "b")
    assert (tmp_path / "a" / "adapter.safetensors").read_bytes() == (
        tmp_path / "b" / "adapter.safetensors"
    ).read_bytes()


def train_a_few_steps_cls(model):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(3):
        loss = model(IDS)[:, -1].logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_wrong_base_and_corrupt_files_fail_clearly(tmp_path):
    model = tiny_llama()
    lora.apply_lora(model, rank=4)
    save_adapter(model, tmp_path / "a")

    with pytest.raises(LoraftError, match="gpt2"):
        load_adapter(tiny_gpt2(), tmp_path / "a")
    with pytest.raises(LoraftError, match="other weights"):
        load_adapter(tiny_llama(seed=1), tmp_path / "a")
    other_shape = tiny_llama(n_layers=1)
    with pytest.raises(LoraftError, match="other weights"):
        load_adapter(other_shape, tmp_path / "a")

    shutil.copytree(tmp_path / "a", tmp_path / "truncated")
    weights = tmp_path / "truncated" / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    untouched = tiny_llama()
    with pytest.raises(LoraftError, match="truncated or corrupt"):
        load_adapter(untouched, tmp_path / "truncated")
    assert lora.adapter_names(untouched) == []

    shutil.copytree(tmp_path / "a", tmp_path / "badjson")
    (tmp_path / "badjson" / "adapter.json").write_text("{not json")
    with pytest.raises(LoraftError, match="not valid JSON"):
        load_adapter(tiny_llama(), tmp_path / "badjson")
    with pytest.raises(LoraftError, match="not a loraft adapter folder"):
        load_adapter(tiny_llama(), tmp_path)
    with pytest.raises(LoraftError, match="not found"):
        load_adapter(tiny_llama(), tmp_path / "missing")


def test_mixed_adapter_batch_equals_each_adapter_alone(tmp_path):
    model = tiny_llama()
    for name, seed in [("one", 1), ("two", 2)]:
        torch.manual_seed(seed)
        lora.apply_lora(model, rank=4, targets=["all-linear"], name=name)
        lora.add_module_to_save(model, "out_head", nn.Linear(48, 2, bias=False), name=name)
        train_a_few_steps_cls(model)
    alone = {}
    for name in ("one", "two", None):
        lora.set_active(model, name)
        alone[name] = model(IDS).detach()
    lora.set_per_row(model, ["two", None, "one"])
    with pytest.raises(LoraftError, match="same size"):
        model(IDS)  # the base's LM head (300 outputs) cannot share a batch with 2-class heads
    lora.set_per_row(model, ["two", "one", "one"])
    mixed = model(IDS).detach()
    assert torch.allclose(mixed[0], alone["two"][0], atol=1e-6)
    assert torch.allclose(mixed[1:], alone["one"][1:], atol=1e-6)


def test_rows_that_all_run_one_adapter_run_it_fused_over_the_whole_batch():
    model = tiny_gpt2()
    lora.apply_lora(model, rank=4, name="one")
    train_a_few_steps(model, IDS, steps=2)
    model.requires_grad_(False)
    lora.set_active(model, "one")
    alone = model(IDS)
    lora.set_per_row(model, ["one"] * len(IDS))
    layers = [m for m in model.modules() if isinstance(m, lora.LoRALinear)]
    assert {layer.fast_adapter() for layer in layers} == {"one"}
    assert torch.equal(model(IDS), alone)
    lora.set_per_row(model, [None] * len(IDS))
    assert {layer.fast_adapter() for layer in layers} == {None}


def test_mixed_lm_batch_with_base_rows():
    model = tiny_gpt2()
    for name in ("one", "two"):
        lora.apply_lora(model, rank=4, name=name)
        train_a_few_steps(model, IDS, steps=2)
    alone = {}
    for name in ("one", "two", None):
        lora.set_active(model, name)
        alone[name] = model(IDS).detach()
    lora.set_per_row(model, ["two", None, "one"])
    mixed = model(IDS).detach()
    for row, name in enumerate(["two", None, "one"]):
        assert torch.allclose(mixed[row], alone[name][row], atol=1e-5)


def test_merging_a_lora_on_a_tied_head_leaves_the_embedding_alone():
    model = tiny_llama()
    embedding = model.tok_emb.weight.detach().clone()
    lora.apply_lora(model, rank=4, targets=["q", "head"])
    train_a_few_steps(model, IDS, steps=2)
    unmerged = model(IDS).detach()
    lora.merge(model)
    assert torch.equal(model.tok_emb.weight, embedding)
    assert (model(IDS) - unmerged).abs().max() <= 1e-4


def test_a_head_cannot_have_both_a_lora_and_a_module_to_save():
    model = tiny_llama()
    lora.apply_lora(model, rank=4, targets=["q", "head"])
    with pytest.raises(LoraftError, match="has a LoRA"):
        lora.add_module_to_save(model, "out_head", nn.Linear(48, 2, bias=False))
    other = tiny_llama()
    lora.add_module_to_save(other, "out_head", nn.Linear(48, 2, bias=False))
    with pytest.raises(LoraftError, match="'head' matches no linear layer"):
        lora.apply_lora(other, rank=4, targets=["q", "head"])


@pytest.mark.parametrize(
    "bias, dropout, autocast", [(True, 0.0, False), (False, 0.3, False), (True, 0.3, True), (False, 0.0, True)]
)
@pytest.mark.parametrize("widths", [(40,), (40, 8, 8)])
def test_written_out_lora_product_equals_autograd(bias, dropout, autocast, widths):
    """LoRA layers' own forward and backward (LoRAProduct), for one layer and for layers that read
    the same input (q, k, v), give what autograd gives for W x + b + scale B A dropout(x), in fp32
    and under bf16 autocast over a bf16 base."""
    torch.manual_seed(0)
    state = lora.AdapterState(active="a")
    layers = [lora.LoRALinear(nn.Linear(24, width, bias=bias), state) for width in widths]
    for i, layer in enumerate(layers):  # ranks and scales differ, so a mixed-up split shows
        layer.add_adapter("a", lora.LoraConfig(rank=4 + i, alpha=0.5 + i, scaling="book", dropout=dropout))
        layer.base.requires_grad_(False)
        with torch.no_grad():
            layer.lora_B["a"].normal_()
            if autocast:
                layer.base.to(torch.bfloat16)
        layer.train()
    x = torch.randn(2, 5, 24, requires_grad=True)
    grad_outs = [torch.randn(2, 5, width) for width in widths]

    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        outs = lora.shared_input_linears(x, *layers)
    assert "LoRAProductBackward" in type(outs[0].grad_fn).__name__  # the fast path, not autograd's graph
    if len(layers) > 1:  # one product for all of them; dropout draws a mask per layer, so one product each
        assert (outs[0].grad_fn is outs[1].grad_fn) == (not dropout)
    torch.autograd.backward(outs, grad_outs)

    x64 = x.detach().double().requires_grad_()
    torch.manual_seed(1)  # the same dropout masks
    refs, lora64 = [], []
    for layer in layers:
        A64, B64 = (p.detach().double().requires_grad_() for p in (layer.lora_A["a"], layer.lora_B["a"]))
        mask = nn.functional.dropout(torch.ones_like(x), dropout, True) if dropout else torch.ones_like(x)
        bias64 = None if layer.base.bias is None else layer.base.bias.double()
        lora_x = (x64 * mask.double()) @ A64.t() * layer.scale["a"]
        refs.append(nn.functional.linear(x64, layer.base.weight.double(), bias64) + lora_x @ B64.t())
        lora64 += [A64, B64]
    torch.autograd.backward(refs, [g.double() for g in grad_outs])
    pairs = [(x.grad, x64.grad)] + [(out.detach(), ref.detach()) for out, ref in zip(outs, refs)]
    ours_lora = [p.grad for layer in layers for p in (layer.lora_A["a"], layer.lora_B["a"])]
    pairs += list(zip(ours_lora, [p.grad for p in lora64]))
    assert all(out.dtype == (torch.bfloat16 if autocast else torch.float32) for out in outs)
    assert all(ours.dtype == torch.float32 for ours in [x.grad, *ours_lora])
    for ours, theirs in pairs:
        if autocast:  # bf16 keeps 8 significant bits: a relative error of a few 1e-3 over the whole tensor
            assert (ours.double() - theirs).norm() / theirs.norm() < 1e-2
        else:
            torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=1e-5)


def test_a_trained_base_or_a_plain_layer_takes_autograds_path():
    """LoRAProduct gives no gradient to W and b: a base being trained must not take it, and a plain
    nn.Linear beside LoRA layers (targets "q v") is run by itself."""
    torch.manual_seed(0)
    state = lora.AdapterState(active="a")
    q, k = lora.LoRALinear(nn.Linear(8, 8), state), nn.Linear(8, 8)
    q.add_adapter("a", lora.LoraConfig(rank=2, alpha=1.0, scaling="book"))
    q.base.requires_grad_(False)
    x = torch.randn(3, 8)
    out_q, out_k = lora.shared_input_linears(x, q, k)
    assert out_q.grad_fn is not out_k.grad_fn
    assert "LoRAProduct" in type(out_q.grad_fn).__name__  # the base is not trained here
    out_q.sum().backward()
    assert q.base.weight.grad is None and q.lora_A["a"].grad is not None
    q.base.requires_grad_(True)  # now train the base too
    out = q(x)
    assert "LoRAProduct" not in type(out.grad_fn).__name__
    out.sum().backward()
    assert q.base.weight.grad is not None and q.base.bias.grad is not None


class GainLoRA(lora.LoRA):
    """A variant made up for the seam's test: a trained gain per output feature on the update, with a
    tensor of its own and no fused path."""

    fused = False

    def shapes(self, base, config):
        return {**super().shapes(base, config), "lora_gain": (base.out_features, 1)}

    def init(self, layer, name, config):
        super().init(layer, name, config)
        nn.init.ones_(layer.lora_gain[name])

    def delta(self, layer, name, x, base_out):
        return super().delta(layer, name, x, base_out) * layer.lora_gain[name].squeeze(1).to(x.dtype)

    def update(self, layer, name):
        return super().update(layer, name) * layer.lora_gain[name].float()


def test_a_variant_is_one_class_and_a_registry_line(tmp_path, monkeypatch):
    """A variant's own tensor is trained, saved, loaded and merged through the seam, with nothing else
    told about it; its unfused forward gives what merging it gives."""
    monkeypatch.setitem(lora.VARIANTS, "gain", GainLoRA())
    model = tiny_llama()
    lora.apply_lora(model, lora.LoraConfig(rank=4, variant="gain"))
    gains = {k: p for k, p in lora.adapter_params(model, "default").items() if k.endswith(".lora_gain")}
    assert len(gains) == 2 * 7 and all(p.requires_grad for p in gains.values())
    before = {k: p.detach().clone() for k, p in gains.items()}
    train_a_few_steps(model, IDS)
    assert all(not torch.equal(p, before[k]) for k, p in gains.items())
    with torch.no_grad():
        logits = model(IDS)
    save_adapter(model, tmp_path / "gain")
    assert (tmp_path / "gain" / "adapter.json").read_text().count('"variant": "gain"') == 1
    with pytest.raises(LoraftError, match="carries lora, dora and adalora"):
        export_peft(tmp_path / "gain", tmp_path / "peft")
    assert not (tmp_path / "peft").exists()

    loaded = tiny_llama()
    load_adapter(loaded, tmp_path / "gain")
    with torch.no_grad():
        assert torch.equal(loaded(IDS), logits)
        weight = loaded.trf_blocks[0].att.W_query.base.weight.clone()
        lora.merge(loaded)
        torch.testing.assert_close(loaded(IDS), logits)  # fp32 sums in another order
        lora.unmerge(loaded)
        torch.testing.assert_close(loaded.trf_blocks[0].att.W_query.base.weight, weight, atol=1e-6, rtol=0)


def test_deleting_an_adapter_leaves_the_others_as_they_were():
    model = tiny_llama()
    for name, seed in [("one", 1), ("two", 2)]:
        torch.manual_seed(seed)
        lora.apply_lora(model, rank=4, targets=["all-linear"], name=name)
        lora.add_module_to_save(model, "out_head", nn.Linear(48, 2, bias=False), name=name)
        train_a_few_steps_cls(model)
    lora.set_active(model, "two")
    two = model(IDS).detach()
    lora.set_per_row(model, ["one", "two", "one"])
    lora.delete_adapter(model, "one")
    assert lora.adapter_names(model) == ["two"] and "one" not in lora.adapter_state(model).configs
    assert lora.adapter_state(model).per_row is None  # no routing to an adapter that is gone
    assert not any("one" in name.split(".") for name, _ in model.named_parameters())
    lora.set_active(model, "two")
    assert torch.equal(model(IDS), two)
    with pytest.raises(LoraftError, match="no adapter named 'one'"):
        lora.delete_adapter(model, "one")
