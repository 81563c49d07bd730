"""A quantized frozen base (QLoRA): int8 and nf4 layers against their dequantized full-precision twins,
the nf4 layout as QLoRA and bitsandbytes define it, and real training over a quantized base."""

import json

import numpy as np
import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from loraft import lora, quantize
from loraft.errors import LoraftError
from loraft.gguf_writer import write_gguf
from loraft.models import load_model
from loraft.quantize import NF4_LEVELS, GGUFWeight, NF4Weight, QuantizedLinear, fuse_dequantizing, quantized_weight

from .helpers import IDS, assert_clear_error, loraft, quantize_model, tiny_llama
from .models.checkpoints import hf_checkpoint, write_tokenizer
from .models.test_gguf_files import checkpoint_folder


def test_nf4_levels_and_layout_are_qloras():
    # NormalFloat4: 7 negative levels, an exact zero, 8 positive ones, from -1 to 1 (QLoRA appendix E)
    assert NF4_LEVELS[7] == 0 and NF4_LEVELS[0] == -1 and NF4_LEVELS[15] == 1
    assert (NF4_LEVELS.diff() > 0).all() and NF4_LEVELS[8].item() == pytest.approx(0.07958029955625534)
    # one block of 64: each weight is its absmax times a level; two codes a byte, the first in the high nibble
    codes = torch.arange(64) % 16
    block = NF4_LEVELS[codes] * 0.25
    weight = NF4Weight(block.reshape(1, 64))
    assert weight.codes.tolist()[0][:3] == [0x01, 0x23, 0x45]
    assert torch.equal(weight.dequantize(torch.float32), block.reshape(1, 64))
    # a weight between two levels goes to the nearer one
    nearly = NF4_LEVELS[codes] * 0.25 + torch.where(codes == 15, 0, 0.001)
    assert (NF4Weight(nearly.reshape(1, 64)).codes == weight.codes).all()


def test_nf4_double_quantizes_its_absmaxes_to_int8_blocks_of_256():
    torch.manual_seed(0)
    w = torch.randn(96, 640)  # 960 blocks of 64: 4 absmax blocks of 256, the last one partial
    weight = NF4Weight(w)
    absmax = w.reshape(-1, 64).abs().amax(1)
    assert weight.absmax_codes.dtype == torch.int8 and weight.absmax_codes.shape == (960,)
    assert weight.absmax_factor.shape == (4,)
    # int8 around the mean, 128 / (block absmax) as torchao scales them: each absmax within half a step,
    # but a block's largest, which 127 clips by one step
    centered = nn.functional.pad(absmax - absmax.mean(), (0, 64)).reshape(-1, 256)
    step = (centered.abs().amax(1) / 128).repeat_interleave(256)[:960]
    error = (weight.absmax() - absmax).abs()
    clipped = (absmax - absmax.mean()) / step > 127
    assert (error[~clipped] <= step[~clipped] / 2 + 1e-6).all() and (error[clipped] <= step[clipped] + 1e-6).all()
    assert weight.nbytes() / w.numel() < 0.52  # 4 bits a weight plus one byte per 64


def test_nf4_codes_are_bitsandbytes_own(monkeypatch):
    """bitsandbytes (the QLoRA reference, on its CPU backend) quantizes a weight to the same packed codes and
    block absmaxes, and dequantizes our codes to our weights; only the absmaxes' double quantization is
    torchao's, not bitsandbytes' (which quantizes them with its dynamic 8-bit map)."""
    import bitsandbytes.functional as bnb

    monkeypatch.setattr(quantize, "BITSANDBYTES_DEVICES", ())  # dequantize: loraft's own kernel
    torch.manual_seed(0)
    w = torch.randn(96, 640)
    codes, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    ours = NF4Weight(w)
    assert torch.equal(state.code, NF4_LEVELS)
    assert torch.equal(codes.flatten(), ours.codes.flatten())
    assert torch.equal(state.absmax, w.reshape(-1, 64).abs().amax(1))
    state.absmax = ours.absmax()  # our double-quantized absmaxes: bitsandbytes' dequantization is then ours
    assert torch.equal(bnb.dequantize_4bit(codes, state), ours.dequantize(torch.float32))
    for dtype in (torch.float32, torch.bfloat16):  # the kernel loraft uses where bitsandbytes is installed
        assert torch.equal(ours.bitsandbytes_dequantize(dtype), ours.dequantize(dtype))


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_a_quantized_layer_is_its_dequantized_twin_forward_and_backward(mode):
    torch.manual_seed(0)
    linear = nn.Linear(128, 64)
    quantized = QuantizedLinear(quantized_weight(mode, "linear", linear.weight), linear.bias, mode)
    twin = nn.Linear(128, 64)
    with torch.no_grad():
        twin.weight.copy_(quantized.weight.dequantize(torch.float32))
        twin.bias.copy_(linear.bias)
    twin.requires_grad_(False)
    x = torch.randn(2, 5, 128, requires_grad=True)
    grad = torch.randn(2, 5, 64)
    ours, theirs = quantized(x), twin(x)
    assert torch.equal(ours, theirs)
    assert torch.equal(*(torch.autograd.grad(y, x, grad)[0] for y in (ours, theirs)))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the compute dtype: bf16 products of the same bf16 W
        ours, theirs = quantized(x), twin(x)
    assert ours.dtype == theirs.dtype == torch.bfloat16 and torch.equal(ours, theirs)
    bound = 0.5 if mode == "nf4" else 0.005  # the quantization error itself, per weight
    assert (quantized.weight.dequantize(torch.float32) - linear.weight).abs().max() < bound * linear.weight.abs().max()


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_lora_over_a_quantized_model_is_lora_over_its_twin(mode):
    """Every block's layers quantized, LoRA on all of them (q, k, v and gate, up share one fused product):
    logits and the gradients of input-side LoRA matrices equal those over the dequantized twin."""
    model = tiny_llama()
    assert quantize_model(model, mode) == 14
    twin = tiny_llama()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, QuantizedLinear):
                twin.get_submodule(name).weight.copy_(module.weight.dequantize(torch.float32))
    for m in (model, twin):
        torch.manual_seed(1)
        lora.apply_lora(m, rank=4)
        for name, p in lora.adapter_params(m, "default").items():
            with torch.no_grad():
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(hash(name) % 1000))
    ours, theirs = model(IDS), twin(IDS)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    ours.square().mean().backward()
    theirs.square().mean().backward()
    for (name, p), q in zip(
        lora.adapter_params(model, "default").items(), lora.adapter_params(twin, "default").values()
    ):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert all(not p.requires_grad for p in model.parameters() if p not in set(lora.adapter_parameters(model)))
    with pytest.raises(LoraftError, match="the base model is quantized .*without --quantize to merge"):
        lora.merge(model)
    assert sum(b.numel() * b.element_size() for b in model.buffers() if b.dtype in (torch.int8, torch.uint8)) > 0


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, sms_texts):
    folder = tmp_path_factory.mktemp("llama")
    hf_checkpoint(folder, "smollm2-360m")
    write_tokenizer(folder, sms_texts[:2000], pre="smollm")
    return folder


@pytest.fixture(scope="module")
def tiny_gguf(tiny_folder, tmp_path_factory):
    model, tokenizer = load_model(str(tiny_folder))
    path = tmp_path_factory.mktemp("gguf") / "tiny.q8_0.gguf"
    return write_gguf(model, path, "q8_0", tokenizer.gguf_metadata(model.config.vocab_size))


@pytest.mark.parametrize("mode", ["int8", "nf4", "gguf"])
def test_training_over_a_quantized_base_lowers_the_loss_and_loads_over_the_full_base(
    tmp_path, tiny_folder, tiny_gguf, small_sms_tsv, mode
):
    run = tmp_path / "run"
    base = tiny_gguf if mode == "gguf" else tiny_folder
    trained = loraft(
        "train", "--model", str(base), "--data", str(small_sms_tsv), "--out", str(run), "--quantize", mode,
        "--rank", "4", "--epochs", "5", "--eval-every", "4", "--quiet",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    losses = [json.loads(line)["train_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.8 * losses[0]
    meta = json.loads((run / "adapter" / "adapter.json").read_text())
    assert meta["base_quantized"] == mode
    report = json.loads((run / "report.json").read_text())
    for loaded_as in ("none", mode):  # the usual QLoRA deployment: the adapter over the full-precision base
        evaluated = loraft(
            "eval", "--adapter", str(run / "adapter"), "--data", str(small_sms_tsv), "--quantize", loaded_as
        )
        assert evaluated.returncode == 0, evaluated.stderr
        accuracy = json.loads(evaluated.stdout)["accuracy"]
        if loaded_as == mode:  # as the job measured it
            assert accuracy == report["test_accuracy"]
    exported = loraft("export-peft", "--adapter", str(run / "adapter"), "--out", str(tmp_path / "peft"))
    assert exported.returncode == 0, exported.stderr


def test_what_a_quantized_base_cannot_do_is_one_clear_line(tmp_path, tiny_folder, small_sms_tsv):
    common = ["--model", str(tiny_folder), "--data", str(small_sms_tsv), "--quiet"]
    assert_clear_error(
        loraft("train", *common, "--quantize", "nf4", "--method", "full", "--out", str(tmp_path / "full")),
        "--quantize nf4 keeps the base frozen in nf4", "use --method lora or head",
    )  # fmt: skip
    assert_clear_error(loraft("train", *common, "--quantize", "nf3", "--out", str(tmp_path / "nf3")), "nf3")
    assert not (tmp_path / "full").exists() and not (tmp_path / "nf3").exists()


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0", "Q5_0"])
def test_gguf_blocks_dequantize_in_the_layer_as_the_gguf_package_does(kind):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    weight = np.random.default_rng(0).standard_normal((24, 96)).astype(np.float32)
    rows = quantize(weight, GGMLQuantizationType[kind])
    ours = GGUFWeight(torch.from_numpy(rows), kind, (24, 96)).dequantize(torch.float32)  # Q5_0: through `gguf`
    assert torch.equal(ours, torch.from_numpy(dequantize(rows, GGMLQuantizationType[kind])))


@pytest.mark.parametrize("kind", ["int8", "nf4", "Q4_0", "Q4_1", "Q8_0"])
def test_a_fused_dequantization_is_the_eager_one_with_one_kernel_for_every_shape(kind, monkeypatch):
    from gguf import GGMLQuantizationType, quants

    def weight(rows, columns):
        w = np.random.default_rng(rows).standard_normal((rows, columns)).astype(np.float32)
        if kind in ("int8", "nf4"):
            return quantized_weight(kind, "layer", torch.from_numpy(w))
        return GGUFWeight(torch.from_numpy(quants.quantize(w, GGMLQuantizationType[kind])), kind, (rows, columns))

    monkeypatch.setattr(quantize, "BITSANDBYTES_DEVICES", ())  # nf4: loraft's own kernels, not bitsandbytes'
    graphs = counters["stats"]["unique_graphs"]
    for rows, columns in [(64, 576), (40, 576), (96, 1536)]:  # nf4: 2 blocks of absmaxes or more
        w = weight(rows, columns)
        eager = {dtype: w.dequantize(dtype) for dtype in (torch.float32, torch.bfloat16)}
        fuse_dequantizing(w)
        for dtype, values in eager.items():
            assert torch.equal(w.dequantize(dtype), values), (rows, columns, dtype)
    assert counters["stats"]["unique_graphs"] - graphs == 2  # one per dtype, for all three shapes


@pytest.mark.parametrize("name", ["llama-3.2-1b", "qwen2.5-0.5b", "phi-4-mini", "gemma-3-270m"])
def test_a_gguf_kept_in_its_blocks_is_the_gguf_read_whole(tmp_path, name, sms_texts):
    """q8_0 files of each layout (Llama's permuted q/k rows, Qwen2's biases, Phi-3's fused projections,
    Gemma's shifted norms): the layers keep the file's blocks and give the same logits, and the model
    the same fingerprint, as the file dequantized whole."""
    checkpoint_folder(tmp_path / "hf", name, sms_texts[:500])
    model, tokenizer = load_model(str(tmp_path / "hf"))
    path = write_gguf(model, tmp_path / "model.gguf", "q8_0", tokenizer.gguf_metadata(model.config.vocab_size))
    whole, _ = load_model(str(path))
    kept, _ = load_model(str(path), quantize="gguf")
    layers = [m for m in kept.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == sum(isinstance(m, nn.Linear) for m in whole.trf_blocks.modules())
    assert {m.weight.kind for m in layers} == {"Q8_0"} and kept.fingerprint == whole.fingerprint
    with torch.no_grad():
        assert torch.equal(kept(IDS % 300), whole(IDS % 300))


def test_the_default_gguf_trains_over_its_own_q4_1_blocks(smollm2, small_sms_tsv, tmp_path):
    model, tokenizer = smollm2
    kept, _ = load_model("smollm2-135m", quantize="gguf")
    assert {m.weight.kind for m in kept.modules() if isinstance(m, QuantizedLinear)} == {"Q4_1"}
    ids = torch.tensor([tokenizer.encode("Free entry in 2 a wkly comp to win FA Cup final tkts")])
    with torch.no_grad():
        assert torch.equal(kept(ids), model(ids))
    assert_clear_error(
        loraft("train", "--model", "gpt2-small", "--quantize", "gguf", "--out", str(tmp_path / "gpt2")),
        "--quantize gguf trains over a GGUF file's own quantized blocks", "use --quantize nf4 or int8",
    )  # fmt: skip
    assert not (tmp_path / "gpt2").exists()
