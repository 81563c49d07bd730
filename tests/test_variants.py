"""LoRA's variants and inits against their definitions and against PEFT itself: DoRA (PEFT's use_dora),
AdaLoRA (PEFT's AdaLoraConfig and RankAllocator), LoRA+ (PEFT's create_loraplus_optimizer), and the
PiSSA and OLoRA inits with their adapters saved for the untouched base; each through the jobs once."""

import copy
import json

import pytest
import torch
import transformers
from gguf import GGUFReader
from peft import AdaLoraConfig, PeftModel, get_peft_model
from peft import LoraConfig as PeftLoraConfig
from safetensors.torch import load_file
from torch import nn

from loraft import lora
from loraft.adapters import load_adapter, save_adapter
from loraft.errors import LoraftError
from loraft.export import export
from loraft.models import load_model
from loraft.peft_format import export_peft, import_peft
from loraft.train import TrainConfig, Trainer

from .helpers import (
    IDS,
    assert_clear_error,
    export_and_compare,
    loraft,
    quantize_model,
    randomise,
    tiny_llama,
    train_a_few_steps,
    train_args,
)
from .models.checkpoints import PROMPT
from .test_peft_format import GPT2_IDS, hf_gpt2, our_gpt2

HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA_IDS = torch.tensor([PROMPT, PROMPT[::-1]])


def hf_llama(tiny_llama_dir):
    return transformers.LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ---------------------------------------------------------------- DoRA


@pytest.mark.parametrize("bias", [False, True])
def test_dora_forward_and_gradients_are_its_definition(bias):
    """m (W + s B A) x / ||W + s B A|| + b, the norm per output row and detached from the gradient, in fp64."""
    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(24, 40, bias=bias), lora.AdapterState(active="a"))
    layer.add_adapter("a", lora.LoraConfig(rank=4, alpha=8, variant="dora"))
    layer.base.requires_grad_(False)
    torch.testing.assert_close(layer.lora_magnitude_vector["a"], layer.base.weight.norm(dim=1))  # m starts at ||W||
    with torch.no_grad():
        layer.lora_B["a"].normal_()
        layer.lora_magnitude_vector["a"].mul_(torch.rand(40) + 0.5)
    layer.train()
    x = torch.randn(2, 5, 24, requires_grad=True)
    grad_out = torch.randn(2, 5, 40)
    out = layer(x)
    out.backward(grad_out)

    x64 = x.detach().double().requires_grad_()
    A, B, m = (
        p.detach().double().requires_grad_()
        for p in (layer.lora_A["a"], layer.lora_B["a"], layer.lora_magnitude_vector["a"])
    )
    updated = layer.base.weight.double() + layer.scale["a"] * B @ A
    weight = (m / updated.norm(dim=1).detach())[:, None] * updated
    expected = nn.functional.linear(x64, weight, None if layer.base.bias is None else layer.base.bias.double())
    expected.backward(grad_out.double())
    pairs = [(out, expected), (x.grad, x64.grad)]
    pairs += [
        (layer.lora_A["a"].grad, A.grad),
        (layer.lora_B["a"].grad, B.grad),
        (layer.lora_magnitude_vector["a"].grad, m.grad),
    ]
    for ours, theirs in pairs:
        torch.testing.assert_close(ours.double(), theirs.detach(), rtol=1e-5, atol=1e-5)


def test_dora_merged_equals_unmerged_and_unmerges_exactly():
    model = tiny_llama()
    before = model(IDS).detach()
    weight = model.trf_blocks[0].ff.down.weight.detach().clone()
    lora.apply_lora(model, lora.LoraConfig(rank=4, alpha=8, variant="dora"))
    assert torch.equal(model(IDS), before)
    train_a_few_steps(model, IDS)
    unmerged = model(IDS).detach()
    assert relative(unmerged, before) > 1e-2
    lora.merge(model)
    assert relative(model(IDS).detach(), unmerged) <= 1e-5
    lora.unmerge(model)
    assert (model.trf_blocks[0].ff.down.base.weight - weight).abs().max() <= 1e-6
    assert relative(model(IDS).detach(), unmerged) <= 1e-5


def test_dora_over_a_quantized_base_is_dora_over_its_dequantized_weights():
    quantized, dense = tiny_llama(), tiny_llama()
    quantize_model(quantized, "int8")
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if hasattr(module, "mode"):
                dense.get_submodule(name).weight.copy_(module.weight.dequantize(torch.float32))
    for model in (quantized, dense):
        lora.apply_lora(model, lora.LoraConfig(rank=4, variant="dora"))
        randomise(model)
    with torch.no_grad():
        assert relative(quantized(IDS), dense(IDS)) <= 1e-5
    with pytest.raises(LoraftError, match="quantized"):
        lora.merge(quantized)


@pytest.mark.parametrize(
    "targets,classify", [(["all-linear", "head"], False), (["all-linear"], True)], ids=["causal-lm", "classifier"]
)
def test_dora_runs_in_peft_and_back(tiny_llama_dir, tiny_gpt2_weights, tmp_path, targets, classify):
    """Llama's layers one by one, and GPT-2's fused c_attn, whose magnitudes stack as its rows do."""
    if classify:
        model, hf_model, ids = our_gpt2(tiny_gpt2_weights), hf_gpt2(tiny_gpt2_weights, classify=True), GPT2_IDS
    else:
        model, hf_model, ids = load_model(str(tiny_llama_dir))[0], hf_llama(tiny_llama_dir), LLAMA_IDS
    lora.apply_lora(model, lora.LoraConfig(rank=4, alpha=8, targets=tuple(targets), variant="dora"))
    if classify:
        lora.add_module_to_save(model, "out_head", nn.Linear(64, 2, bias=False))
    randomise(model, std=0.05)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # magnitudes near ||W||, as trained ones are
        for module in model.modules():
            if isinstance(module, lora.LoRALinear):
                norm = module.base.weight.norm(dim=1)
                module.lora_magnitude_vector["default"].copy_(
                    norm * (1 + 0.2 * torch.randn(norm.shape, generator=generator))
                )
    export_and_compare(model, hf_model, ids, tmp_path, classify)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["use_dora"] is True


def test_a_dora_on_part_of_a_fused_projection_is_refused_by_peft_export(tiny_gpt2_weights, tmp_path):
    model = our_gpt2(tiny_gpt2_weights)
    lora.apply_lora(model, lora.LoraConfig(rank=4, targets=("q", "v"), variant="dora"))
    save_adapter(model, tmp_path / "a")
    with pytest.raises(LoraftError, match="DoRA on part of transformers' fused c_attn"):
        export_peft(tmp_path / "a", tmp_path / "peft")


# ---------------------------------------------------------------- PiSSA, OLoRA


@pytest.mark.parametrize("init", ["pissa", "pissa-niter-4", "olora"])
def test_a_principal_init_keeps_the_model_and_saves_an_adapter_for_the_untouched_base(tmp_path, init):
    model = tiny_llama()
    before = model(IDS).detach()
    lora.apply_lora(model, lora.LoraConfig(rank=4, alpha=8, init=init))
    assert lora.adapter_params(model, "default")["trf_blocks.0.att.W_query.lora_B"].abs().max() > 0.01
    assert relative(model(IDS).detach(), before) <= 1e-5  # W - s B0 A0 + s B0 A0
    train_a_few_steps(model, IDS)
    trained = model(IDS).detach()
    assert relative(trained, before) > 1e-2
    save_adapter(model, tmp_path / "a")

    assert lora.base_changed(model) and not lora.base_changed(tiny_llama_with_lora())
    meta = json.loads((tmp_path / "a" / "adapter.json").read_text())
    assert (meta["rank"], meta["alpha"], meta["init"]) == (8, 16.0, "default")
    assert meta["converted_from"] == {"init": init, "rank": 4, "alpha": 8.0}
    untouched = tiny_llama()
    assert meta["base_fingerprint"] == lora.base_fingerprint(untouched)
    load_adapter(untouched, tmp_path / "a")
    with torch.no_grad():
        assert relative(untouched(IDS), trained) <= 1e-5


def test_principal_inits_are_pefts(tiny_llama_dir):
    """A, B and the base's residual W - s B A as PEFT's pissa_init and olora_init make them."""
    for init in ("pissa", "olora"):
        ours = load_model(str(tiny_llama_dir))[0]
        lora.apply_lora(ours, lora.LoraConfig(rank=4, alpha=8, init=init))
        config = PeftLoraConfig(r=4, lora_alpha=8, target_modules=HF_TARGETS, init_lora_weights=init)
        theirs = get_peft_model(hf_llama(tiny_llama_dir), config)
        layer = ours.trf_blocks[1].ff.up
        peft_layer = theirs.base_model.model.model.layers[1].mlp.up_proj
        torch.testing.assert_close(layer.lora_A["default"], peft_layer.lora_A["default"].weight)
        torch.testing.assert_close(layer.lora_B["default"], peft_layer.lora_B["default"].weight)
        torch.testing.assert_close(layer.base.weight, peft_layer.base_layer.weight)


def test_a_pissa_adapter_runs_in_peft_over_the_untouched_base(tiny_llama_dir, tmp_path):
    model = load_model(str(tiny_llama_dir))[0]
    lora.apply_lora(model, lora.LoraConfig(rank=4, alpha=8, init="pissa-niter-4", targets=("all-linear", "head")))
    train_a_few_steps(model, LLAMA_IDS)
    with torch.no_grad():
        trained = model(LLAMA_IDS)
    save_adapter(model, tmp_path / "loraft")
    export_peft(tmp_path / "loraft", tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["r"] == 8
    peft_model = PeftModel.from_pretrained(hf_llama(tiny_llama_dir), tmp_path / "peft").eval()
    with torch.no_grad():
        assert (peft_model(LLAMA_IDS).logits - trained).abs().max() <= 1e-3


def test_llama_cpp_lora_files_take_plain_lora_only(tiny_llama_dir, tmp_path):
    """A PiSSA adapter, saved as a LoRA, goes to llama.cpp's LoRA file; DoRA and AdaLoRA have no place in it."""
    for options in (dict(variant="dora"), dict(variant="adalora"), dict(init="pissa")):
        model = load_model(str(tiny_llama_dir))[0]
        lora.apply_lora(model, lora.LoraConfig(rank=4, **options))
        folder = save_adapter(model, tmp_path / "-".join(options.values()), task="instruction", template="alpaca")
        if "variant" in options:
            with pytest.raises(LoraftError, match="is not a plain LoRA"):
                export(folder, "gguf-lora", tmp_path / "out")
        else:
            export(folder, "gguf-lora", tmp_path / "out")
            ranks = {
                int(min(t.shape)) for t in GGUFReader(tmp_path / "out" / "adapter.gguf").tensors if ".lora_a" in t.name
            }
            assert ranks == {8}  # rank 2r, the converted form


# ---------------------------------------------------------------- LoRA+


class FewBatches:
    """The least a Task is, for building a Trainer."""

    best_metric = "loss"

    def train_batches(self, epoch, batch_size):
        return [None] * 10


def test_lora_plus_gives_b_its_ratio_of_the_learning_rate_as_peft_groups_them(tmp_path):
    model = tiny_llama()
    lora.apply_lora(model, lora.LoraConfig(rank=4, variant="dora", lora_plus_ratio=16))
    lora.add_module_to_save(model, "out_head", nn.Linear(48, 2, bias=True))
    cfg = TrainConfig(lr=2e-4, weight_decay=0.1)
    trainer = Trainer(model, FewBatches(), cfg, tmp_path, hook=lora.AdapterTraining(model))
    groups = {group["name"]: group for group in trainer.optimizer.param_groups}
    names = {id(p): n for n, p in model.named_parameters()}

    def kinds(group):
        return {"head" if names[id(p)].startswith("out_head") else names[id(p)].split(".")[-2] for p in group["params"]}

    # PEFT's rule: lora_B and every vector (DoRA's magnitudes, biases) learn fast, biases without weight decay
    assert {key: kinds(group) for key, group in groups.items()} == {
        "A": {"lora_A", "head"},
        "B": {"lora_B", "lora_magnitude_vector"},
        "B, no decay": {"head"},
    }
    assert [p.shape for p in groups["B, no decay"]["params"]] == [(2,)]
    assert groups["A"]["initial_lr"] == 2e-4
    assert groups["B"]["initial_lr"] == groups["B, no decay"]["initial_lr"] == 16 * 2e-4
    assert groups["B"]["lr"] == pytest.approx(16 * groups["A"]["lr"])  # the schedule scales every group alike
    assert [groups[key]["weight_decay"] for key in ("A", "B", "B, no decay")] == [0.1, 0.1, 0.0]
    plain = Trainer(tiny_llama_with_lora(), FewBatches(), cfg, tmp_path)
    assert len(plain.optimizer.param_groups) == 1


def tiny_llama_with_lora():
    model = tiny_llama()
    lora.apply_lora(model, lora.LoraConfig(rank=4))
    return model


def test_a_dora_run_with_lora_plus_trains(tmp_path, tiny_gpt2_weights, small_sms_tsv):
    """The job path of both: `loraft train --variant dora --lora-plus-ratio 16`, its loss falling."""
    out = tmp_path / "run"
    flags = ("--variant", "dora", "--lora-plus-ratio", "16", "--epochs", "6", "--lr", "5e-4")
    result = loraft(*train_args(tiny_gpt2_weights, small_sms_tsv, out, *flags))
    assert result.returncode == 0, result.stderr
    meta = json.loads((out / "adapter" / "adapter.json").read_text())
    assert (meta["variant"], meta["lora_plus_ratio"]) == ("dora", 16)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train_loss"] < 0.7 * rows[0]["train_loss"]
    groups = torch.load(out / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"]
    assert sorted((g["name"], g["initial_lr"]) for g in groups) == [("A", 5e-4), ("B", 8e-3)]  # a head without bias
    tensors = load_file(out / "adapter" / "adapter.safetensors")
    assert sum(key.endswith("lora_magnitude_vector") for key in tensors) == 2 * 6


# ---------------------------------------------------------------- AdaLoRA


def test_adalora_trains_and_allocates_ranks_as_peft(tiny_llama_dir, tmp_path):
    """The same model, the same start and the same batches: PEFT's AdaLoraModel with its RankAllocator
    and loraft's loop hook prune the same triplets, step by step, and end at the same weights."""
    schedule = dict(tinit=3, tfinal=5, deltaT=2, total_step=20)
    torch.manual_seed(0)
    config = AdaLoraConfig(
        init_r=6, target_r=4, lora_alpha=8, target_modules=HF_TARGETS, task_type="CAUSAL_LM", **schedule
    )
    peft_model = get_peft_model(hf_llama(tiny_llama_dir), config)  # its forward adds the orthogonality penalty
    peft_model.save_pretrained(tmp_path / "start")
    ours = load_model(str(tiny_llama_dir))[0]
    import_peft(tmp_path / "start", ours)
    config = lora.LoraConfig.of_adapter(lora.adapter_state(ours).configs["default"])
    assert (config.variant, config.rank, config.initial_rank, config.tinit, config.delta_t) == ("adalora", 4, 6, 3, 2)
    hook = lora.AdapterTraining(ours)
    hook.start(20)

    batches = torch.randint(0, 300, (20, 2, 12), generator=torch.Generator().manual_seed(1))
    theirs_params = [p for p in peft_model.parameters() if p.requires_grad]
    ours_params = [p for p in ours.parameters() if p.requires_grad]
    assert len(theirs_params) == len(ours_params) == 3 * 14
    optimizers = [torch.optim.AdamW(params, lr=2e-2) for params in (theirs_params, ours_params)]
    peft_model.train(), ours.train()
    for step, ids in enumerate(batches):
        peft_model(input_ids=ids, labels=ids).loss.backward()
        logits = ours(ids)[:, :-1]
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()) + hook.penalty()
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        peft_model.base_model.update_and_allocate(step)
        hook.after_step(step)
        for optimizer in optimizers:
            optimizer.zero_grad()
        if step in (5, 11, 19):  # budget falling, then final
            theirs_pattern = {
                k.split(".lora_E")[0]: v for k, v in peft_model.peft_config["default"].rank_pattern.items()
            }
            ours_pattern = {hf_name(k): v for k, v in hook.allocator.rank_pattern.items()}
            assert ours_pattern == {k.removeprefix("base_model.model."): v for k, v in theirs_pattern.items()}
    kept = sum(sum(v) for v in hook.allocator.rank_pattern.values())
    assert kept == 4 * 14  # the target budget: rank 4 on average over 14 layers
    peft_model.eval(), ours.eval()
    with torch.no_grad():
        assert (peft_model(LLAMA_IDS).logits - ours(LLAMA_IDS)).abs().max() <= 1e-3


def test_adalora_allocation_resumes_from_a_checkpoint(tmp_path):
    """The allocator's moving averages and rank pattern go through a checkpoint (torch.save, read back
    with weights_only) and a resumed run allocates as the uninterrupted one."""

    def run(model, hook, optimizer, steps):
        for step in steps:
            model(IDS).square().mean().add(hook.penalty()).backward()
            optimizer.step()
            hook.after_step(step)
            optimizer.zero_grad()

    def start(model):
        hook = lora.AdapterTraining(model)
        hook.start(12)
        return hook, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    model = tiny_llama()
    lora.apply_lora(model, lora.LoraConfig(rank=2, init_r=4, variant="adalora", tinit=2, tfinal=3))
    resumed = copy.deepcopy(model)
    hook, optimizer = start(model)
    run(model, hook, optimizer, range(6))
    torch.save(
        {"hook": hook.state_dict(), "optimizer": optimizer.state_dict(), "model": model.state_dict()}, tmp_path / "c.pt"
    )
    run(model, hook, optimizer, range(6, 12))

    checkpoint = torch.load(tmp_path / "c.pt", weights_only=True)
    resumed.load_state_dict(checkpoint["model"])
    hook_again, optimizer_again = start(resumed)
    optimizer_again.load_state_dict(checkpoint["optimizer"])
    hook_again.load_state_dict(checkpoint["hook"])
    run(resumed, hook_again, optimizer_again, range(6, 12))
    assert hook_again.allocator.rank_pattern == hook.allocator.rank_pattern
    assert sum(map(sum, hook.allocator.rank_pattern.values())) == 2 * 14
    for (name, ours), (_, again) in zip(model.named_parameters(), resumed.named_parameters()):
        assert torch.equal(ours, again), name


def hf_name(module: str) -> str:
    """trf_blocks.1.att.W_query -> model.layers.1.self_attn.q_proj"""
    from loraft.models.llama import HF_NAMES

    _, block, rest = module.split(".", 2)
    return f"model.layers.{block}.{HF_NAMES[rest]}"


def test_adalora_runs_in_peft_and_back(tiny_llama_dir, tmp_path):
    model = load_model(str(tiny_llama_dir))[0]
    lora.apply_lora(model, lora.LoraConfig(rank=4, alpha=8, variant="adalora", targets=("all-linear", "head")))
    randomise(model, std=0.05)
    export_and_compare(model, hf_llama(tiny_llama_dir), LLAMA_IDS, tmp_path, classify=False)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["init_r"], config["target_r"]) == ("ADALORA", 6, 4)


def test_an_adalora_run_trains_down_to_its_budget(tmp_path, tiny_gpt2_weights, small_sms_tsv):
    out = tmp_path / "run"
    # E starts at zero and A, B small: AdaLoRA wants a larger learning rate than LoRA
    flags = ("--variant", "adalora", "--adalora-init-r", "6", "--epochs", "6", "--alpha", "32", "--lr", "1e-2")
    result = loraft(*train_args(tiny_gpt2_weights, small_sms_tsv, out, *flags))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train_loss"] < 0.7 * rows[0]["train_loss"]
    meta = json.loads((out / "adapter" / "adapter.json").read_text())
    last = torch.load(out / "checkpoint.pt", weights_only=True)
    steps = last["state"]["step"]
    assert (meta["variant"], meta["rank"], meta["init_r"], meta["total_step"]) == ("adalora", 4, 6, steps)
    assert (meta["tinit"], meta["tfinal"]) == (round(0.1 * steps), round(0.3 * steps))
    values = [t for key, t in last["params"].items() if ".lora_E." in key]
    assert len(values) == 12 and sum(int((E != 0).sum()) for E in values) == 4 * 12


# ---------------------------------------------------------------- bad input


def test_bad_variant_flags_are_one_clear_line(tmp_path, tiny_gpt2_weights, small_sms_tsv):
    def run(*flags):
        return loraft(*train_args(tiny_gpt2_weights, small_sms_tsv, tmp_path / "bad", *flags))

    # one through each place that checks: the config, the method, the base, the parser
    assert_clear_error(run("--init", "svd"), "unknown LoRA init 'svd'")
    assert_clear_error(run("--variant", "dora", "--method", "full"), "need --method lora")
    assert_clear_error(run("--init", "olora", "--quantize", "int8"), "--quantize int8")
    assert_clear_error(run("--variant", "lokr"), "invalid choice: 'lokr'")
    # a schedule longer than the run (40 epochs of 11 steps) fails before the first measurement
    assert_clear_error(run("--variant", "adalora", "--adalora-tinit", "400"), "leaves no steps to allocate ranks")
    assert not (tmp_path / "bad").exists()
    # a sweep checks each rank of its grid before training the first: 8 is not below the initial rank 6
    sweep = [*train_args(tiny_gpt2_weights, small_sms_tsv, tmp_path / "bad", "--variant", "adalora")]
    sweep[sweep.index("--rank") : sweep.index("--rank") + 2] = ["--ranks", "2,8", "--adalora-init-r", "6"]
    assert_clear_error(loraft("sweep", *sweep[1:]), "6) must be a whole number above --rank (8)")
    assert not (tmp_path / "bad").exists()
    sweep[sweep.index("--ranks") + 1] = "2,4"  # below 6 (the default rank 16 plays no part)
    assert loraft("sweep", *sweep[1:], "--epochs", "1", "--alphas", "8").returncode == 0
    for options, message in [
        (dict(init="pissa-niter-N"), "number of iterations"),
        (dict(variant="dora", init="pissa"), "does not go with --variant dora"),
        (dict(variant="adalora", scaling="rslora"), "use --scaling standard"),
        (dict(variant="adalora", init_r=4), "must be a whole number above --rank"),
        (dict(variant="adalora", delta_t=0), "--adalora-delta-t must be a whole number of steps >= 1"),
        (dict(lora_plus_ratio=-1), "--lora-plus-ratio must be a number >= 0"),
    ]:
        with pytest.raises(LoraftError, match=message):
            lora.LoraConfig(rank=4, **options)
    with pytest.raises(LoraftError, match="must be the model's only adapter"):
        lora.apply_lora(tiny_llama_with_lora(), lora.LoraConfig(rank=4, init="pissa"), name="second")


def test_a_peft_dora_without_its_magnitudes_is_refused(tmp_path):
    model = tiny_llama_with_lora()
    save_adapter(model, tmp_path / "loraft")
    export_peft(tmp_path / "loraft", tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    untouched = tiny_llama()
    with pytest.raises(LoraftError, match="needs lora_A, lora_B, lora_magnitude_vector"):
        import_peft(tmp_path / "peft", untouched)
    assert lora.adapter_names(untouched) == []


def test_a_saved_adapter_never_takes_its_part_out_of_the_base_again(tmp_path):
    model = tiny_llama_with_lora()
    save_adapter(model, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "adapter.json").read_text())
    (tmp_path / "a" / "adapter.json").write_text(json.dumps(meta | {"init": "olora"}))
    untouched = tiny_llama()
    state = copy.deepcopy(untouched.state_dict())
    with pytest.raises(LoraftError, match="changes the base weights"):
        load_adapter(untouched, tmp_path / "a")
    assert all(torch.equal(t, state[k]) for k, t in untouched.state_dict().items())
