"""The training job end to end through the CLI, on a tiny random GPT-2 (fast) and real SMS data; and
the loop's compiled blocks, on a tiny random Llama."""

import json
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from loraft.train import compiler_found

from .helpers import assert_clear_error, kill_once_logged, loraft, tiny_llama, train_args


@pytest.mark.skipif(not compiler_found(), reason="torch.compile on a CPU needs a C++ compiler")
def test_compiled_blocks_share_one_graph_and_passes_without_gradients_stay_eager():
    from torch._dynamo.utils import counters

    from loraft.lora import apply_lora
    from loraft.train import compile_blocks, uncompile_blocks

    def lora_llama(alpha):
        model = tiny_llama(n_layers=3).train()
        apply_lora(model, rank=4, alpha=alpha)
        for name, param in model.named_parameters():  # B starts at zero: give A a gradient too
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.1)
        return model

    model = lora_llama(alpha=16)

    def gradients(input_ids):
        model.zero_grad()
        model(input_ids).square().mean().backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    batches = [torch.randint(0, 300, shape) for shape in ((2, 5), (2, 9), (3, 7))]  # lengths and batch sizes vary
    eager = [gradients(ids) for ids in batches]
    torch._dynamo.reset()
    graphs = counters["stats"]["unique_graphs"]
    compile_blocks(model)
    assert "forward" not in vars(model.trf_blocks[0])
    compiled = [gradients(ids) for ids in batches]
    with torch.no_grad():
        model(batches[0])
    assert counters["stats"]["unique_graphs"] - graphs == 1
    for eager_grads, compiled_grads in zip(eager, compiled):
        for e, c in zip(eager_grads, compiled_grads):  # fused kernels sum in another order: fp32 rounding apart
            torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-5)
    model.gradient_checkpointing = True  # the blocks run (and rerun) inside torch.utils.checkpoint
    for e, c in zip(eager[0], gradients(batches[0])):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] - graphs == 1
    uncompile_blocks(model)
    assert all("forward" not in vars(block) for block in model.trf_blocks)
    model = lora_llama(alpha=64)  # a sweep's next setting: another LoRA scale, the same graph
    compile_blocks(model)
    gradients(batches[0])
    assert counters["stats"]["unique_graphs"] - graphs == 1


@pytest.mark.skipif(not compiler_found(), reason="torch.compile on a CPU needs a C++ compiler")
def test_compiled_training_trains_the_eager_adapter(tmp_path, tiny_gpt2_weights, small_sms_tsv):
    """--compile changes the speed, not the result."""
    for name, compile in (("eager", False), ("compiled", True)):
        result = loraft(
            *train_args(
                tiny_gpt2_weights, small_sms_tsv, tmp_path / name, "--epochs", "3", "--no-bf16", compile=compile
            )
        )
        assert result.returncode == 0, result.stderr
    eager, compiled = (load_file(tmp_path / name / "adapter" / "adapter.safetensors") for name in ("eager", "compiled"))
    assert eager.keys() == compiled.keys()
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-3, atol=1e-4)
    assert json.loads((tmp_path / "compiled" / "config.json").read_text())["train"]["compile"] is True


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))],
)
def test_resume_after_kill_equals_uninterrupted_run(tmp_path, tiny_gpt2_weights, small_sms_tsv, device):
    """LoRA dropout draws from the device's random numbers: the checkpoint restores them too."""
    flags = ["--device", device, "--dropout", "0.1"]
    result = loraft(*train_args(tiny_gpt2_weights, small_sms_tsv, tmp_path / "whole", *flags))
    assert result.returncode == 0, result.stderr

    out = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "loraft", *train_args(tiny_gpt2_weights, small_sms_tsv, out, *flags)]
    )
    metrics = out / "metrics.jsonl"
    kill_once_logged(process, metrics, rows=5, seconds=240)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be interrupted"
    assert not (out / "report.json").exists()
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    for group in checkpoint["optimizer"]["param_groups"]:
        group["fused"] = None  # as an earlier loraft wrote it: the resumed run must still use the fused AdamW
    torch.save(checkpoint, out / "checkpoint.pt")

    resumed = loraft(*train_args(tiny_gpt2_weights, small_sms_tsv, out, *flags, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    whole, again = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("whole", "killed"))
    for key in ("train_accuracy", "val_accuracy", "test_accuracy", "test", "best_step"):
        assert whole[key] == again[key], key
    assert (tmp_path / "whole" / "metrics.jsonl").read_text().count("\n") == metrics.read_text().count("\n")
    adapter = "adapter/adapter.safetensors"
    assert (tmp_path / "whole" / adapter).read_bytes() == (out / adapter).read_bytes()


def test_max_steps_ends_the_run_and_its_schedule_there(tmp_path, tiny_gpt2_weights, small_sms_tsv):
    """40 epochs cut to 6 steps: evaluated every 4 steps and at the last; the schedule spans the 6. One
    epoch with more steps goes on into the next."""
    out = tmp_path / "run"
    result = loraft(*train_args(tiny_gpt2_weights, small_sms_tsv, out, "--max-steps", "6", "--warmup", "0"))
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [4, 6]
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["scheduler"]["last_epoch"] == 6 and checkpoint["scheduler"]["_last_lr"][0] == pytest.approx(0)
    # and past the epochs, as transformers' Trainer: 1 epoch of 11 steps (84 messages, batch 8) goes on to 14
    longer = tmp_path / "longer"
    result = loraft(*train_args(tiny_gpt2_weights, small_sms_tsv, longer, "--epochs", "1", "--max-steps", "14"))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (longer / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 8, 11, 12, 14] and rows[-1]["epoch"] == pytest.approx(14 / 11)


def test_an_earlier_run_is_never_overwritten_silently(tmp_path, tiny_gpt2_weights, small_sms_tsv):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    result = loraft(*train_args(tiny_gpt2_weights, small_sms_tsv, tmp_path / "run"))
    assert_clear_error(result, "already holds files", "--resume", "--overwrite")
    assert_clear_error(
        loraft(*train_args(tiny_gpt2_weights, small_sms_tsv, tmp_path / "run", "--overwrite")), "not hold a loraft run"
    )
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


def test_bad_flags_and_resume_mistakes_fail_before_writing(tmp_path, tiny_gpt2_weights, small_sms_tsv):
    out = tmp_path / "out"
    for flags, message in [
        (["--lr", "-1"], "--lr must be positive"),
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--max-steps", "-1"], "--max-steps must be at least 0"),
        (["--dropout", "1.5"], "dropout must be in [0, 1)"),
        (["--max-length", "5000"], "exceeds gpt2-small's context length 128"),
        (["--resume"], "no checkpoint"),
        (["--device", "tpu"], "--device 'tpu': choose auto, cpu, cuda or cuda:N"),
        *([(["--device", "cuda"], "PyTorch finds no CUDA GPU here")] if not torch.cuda.is_available() else []),
    ]:
        assert_clear_error(loraft(*train_args(tiny_gpt2_weights, small_sms_tsv, out, *flags)), message)
        assert not out.exists() or not any(out.iterdir()), flags
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert_clear_error(loraft(*train_args(tiny_gpt2_weights, small_sms_tsv, a_file)), "is a file")

    run = tmp_path / "run"
    assert loraft(*train_args(tiny_gpt2_weights, small_sms_tsv, run, "--epochs", "1")).returncode == 0
    if compiler_found():  # compiling or not may change on resuming: it changes no result
        resumed = loraft(*train_args(tiny_gpt2_weights, small_sms_tsv, run, "--epochs", "1", "--resume", compile=True))
        assert resumed.returncode == 0, resumed.stderr
    assert_clear_error(
        loraft(*train_args(tiny_gpt2_weights, small_sms_tsv, run, "--epochs", "1", "--alpha", "64", "--resume")),
        "'alpha': (16.0, 64.0)",
    )


def test_compile_without_a_compiler_fails_before_writing(tmp_path, monkeypatch, small_sms_tsv):
    from loraft import train
    from loraft.errors import LoraftError
    from loraft.finetune import train_classifier

    monkeypatch.setattr(train, "compiler_found", lambda: False)
    with pytest.raises(LoraftError, match="--compile needs a C\\+\\+ compiler"):
        train_classifier(
            out=tmp_path / "run", data=str(small_sms_tsv), train=train.TrainConfig(compile=True, device="cpu")
        )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("cols.tsv", "label\tmessage\nham\thi\nspam\tyo\n", "no column 'text'"),
        ("one.tsv", "label\ttext\nham\thi\nham\tyo\n", "single class"),
        ("blank.tsv", "label\ttext\nham\thi\nspam\t  \n", "the text is empty"),
        ("latin.tsv", "label\ttext\nham\tcaf\xe9\nspam\tyo\n", "is not UTF-8"),
    ],
)
def test_bad_training_data_writes_nothing(tmp_path, tiny_gpt2_weights, name, content, message):
    data = tmp_path / name
    data.write_bytes(content.encode("latin-1"))
    out = tmp_path / "out"
    assert_clear_error(loraft(*train_args(tiny_gpt2_weights, data, out)), message)
    assert not out.exists()
    assert_clear_error(loraft(*train_args(tiny_gpt2_weights, tmp_path / "missing.tsv", out)), "data file not found")


def test_eval_and_classify_with_bad_input(tmp_path, tiny_gpt2_weights, small_sms_tsv):
    out = tmp_path / "run"
    assert (
        loraft(*train_args(tiny_gpt2_weights, small_sms_tsv, out, "--epochs", "2")).returncode == 0
    )  # the last --epochs wins
    adapter = out / "adapter"

    evaluated = loraft(
        "eval", "--adapter", str(adapter), "--weights", str(tiny_gpt2_weights), "--data", str(small_sms_tsv)
    )
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["count"] == 24

    unknown = tmp_path / "unknown.tsv"
    unknown.write_text("label\ttext\nham\thi\nmaybe\tyo\n")
    assert_clear_error(
        loraft("eval", "--adapter", str(adapter), "--weights", str(tiny_gpt2_weights), "--data", str(unknown)),
        "['maybe'] are not among the known labels",
    )
    assert_clear_error(loraft("classify", "--adapter", str(tmp_path), "hello"), "not a loraft adapter folder")
    assert_clear_error(loraft("classify", "--adapter", str(adapter), "--weights", str(tiny_gpt2_weights), ""), "empty")
    classified = loraft(
        "classify", "--adapter", str(adapter), "--weights", str(tiny_gpt2_weights), "Win a prize now", "see you"
    )
    assert classified.returncode == 0, classified.stderr
    lines = [json.loads(line) for line in classified.stdout.splitlines()]
    assert [line["text"] for line in lines] == ["Win a prize now", "see you"]
    assert all(set(line["probabilities"]) == {"ham", "spam"} and line["label"] in ("ham", "spam") for line in lines)


@pytest.mark.parametrize("method", ["head", "last-block", "full"])
def test_baseline_methods_train_save_and_load(tmp_path, tiny_gpt2_weights, small_sms_tsv, method):
    out = tmp_path / method
    result = loraft(*train_args(tiny_gpt2_weights, small_sms_tsv, out, "--epochs", "2", "--method", method))
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    meta = json.loads((out / "adapter" / "adapter.json").read_text())
    assert meta["target_modules"] == [] and meta["method"] == method
    trained = {"head": 0, "last-block": 16 + 2, "full": None}[method]  # a GPT-2 block has 16 tensors, + final norm
    if trained is not None:
        assert len(meta.get("trained_parameters", [])) == trained
    evaluated = loraft(
        "eval", "--adapter", str(out / "adapter"), "--weights", str(tiny_gpt2_weights), "--data", str(small_sms_tsv)
    )
    assert evaluated.returncode == 0, evaluated.stderr
    assert abs(json.loads(evaluated.stdout)["accuracy"] - report["test_accuracy"]) <= 1 / 24
