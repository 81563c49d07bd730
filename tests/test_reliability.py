"""Nothing lost, whatever happens to a run: non-finite training, two processes on one folder, failing
writes, SIGTERM; real processes on a tiny random GPT-2 and real SMS data."""

import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraft.errors import LoraftError

from .helpers import assert_clear_error, kill_once_logged, loraft, train_args


def strict_json(text: str):
    """json.loads that refuses the bare NaN and Infinity Python's json writes by default."""

    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def start(args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "loraft", *args], stderr=subprocess.PIPE, text=True, **kwargs)


def test_non_finite_learning_rates_are_refused_and_a_diverging_run_stops(tmp_path, tiny_gpt2_weights, small_sms_tsv):
    out = tmp_path / "run"
    for flags in (["--lr", "inf"], ["--lr", "nan"], ["--clip", "inf"], ["--warmup", "nan"]):
        assert_clear_error(
            loraft(*train_args(tiny_gpt2_weights, small_sms_tsv, out, *flags)), "must be a finite number"
        )
        assert not out.exists()

    diverging = train_args(tiny_gpt2_weights, small_sms_tsv, out, "--lr", "1e3", "--epochs", "3")
    result = loraft(*diverging)
    assert_clear_error(result, "the training loss is", "the run stopped", "a lower --lr (now 1000)", "--skip-nonfinite")
    assert not (out / "report.json").exists()
    adapter = out / "adapter" / "adapter.safetensors"
    assert all(torch.isfinite(t).all() for t in load_file(adapter).values())  # written at a finite, best step
    for line in (out / "metrics.jsonl").read_text().splitlines():
        strict_json(line)

    # Continued, skipping the non-finite steps: it finishes, every file valid JSON, every weight finite.
    result = loraft(*diverging, "--resume", "--skip-nonfinite", "1000")
    assert result.returncode == 0, result.stderr
    rows = [strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped_steps"] > 0
    strict_json((out / "report.json").read_text())
    assert all(torch.isfinite(t).all() for t in load_file(adapter).values())


def test_a_second_run_on_the_same_folder_is_refused_at_once(tmp_path, tiny_gpt2_weights, small_sms_tsv):
    out = tmp_path / "run"
    first = start(train_args(tiny_gpt2_weights, small_sms_tsv, out))  # 440 steps: it runs while the others try
    deadline = time.time() + 60
    while not (out / "config.json").is_file() and time.time() < deadline:
        time.sleep(0.05)
    sweep = ["sweep", "--ranks", "2", "--alphas", "8", "--model", "gpt2-small", "--weights", str(tiny_gpt2_weights)]
    sweep += ["--data", str(small_sms_tsv), "--out", str(out), "--no-compile"]
    for args in (train_args(tiny_gpt2_weights, small_sms_tsv, out, "--resume"), sweep):
        assert_clear_error(loraft(*args), f"is in use by another loraft run (pid {first.pid})")
    assert first.wait(timeout=240) == 0, first.stderr.read()
    report = strict_json((out / "report.json").read_text())
    steps = [strict_json(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 440  # one run's rows, once each
    assert report["best_step"] is not None
    assert not (out / ".loraft.lock").exists()

    # A lock left by a process that is gone (here: an empty folder with its lock file) does not block.
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / ".loraft.lock").write_text("999999999")
    result = loraft(*train_args(tiny_gpt2_weights, small_sms_tsv, stale, "--epochs", "1"))
    assert result.returncode == 0, result.stderr


def test_sigterm_mid_run_then_resume_equals_the_uninterrupted_run(tmp_path, tiny_gpt2_weights, small_sms_tsv):
    flags = ["--dropout", "0.1", "--eval-every", "7"]  # 11 steps an epoch: most stops fall between evaluations
    whole = loraft(*train_args(tiny_gpt2_weights, small_sms_tsv, tmp_path / "whole", *flags))
    assert whole.returncode == 0, whole.stderr

    out = tmp_path / "stopped"
    process = start(train_args(tiny_gpt2_weights, small_sms_tsv, out, *flags))
    kill_once_logged(
        process, out / "metrics.jsonl", rows=4, seconds=240, kill=lambda pid, _: os.kill(pid, signal.SIGTERM)
    )
    assert process.wait(timeout=60) == 128 + signal.SIGTERM, "the run ended before it could be stopped"
    message = process.stderr.read().strip().splitlines()
    assert len(message) == 1 and "stopped by SIGTERM after step" in message[0] and "--resume" in message[0], message
    assert not (out / "report.json").exists()

    resumed = loraft(*train_args(tiny_gpt2_weights, small_sms_tsv, out, *flags, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    adapter = "adapter/adapter.safetensors"
    assert (tmp_path / "whole" / adapter).read_bytes() == (out / adapter).read_bytes()
    assert (tmp_path / "whole" / "metrics.jsonl").read_text().count("\n") == (out / "metrics.jsonl").read_text().count(
        "\n"
    )


def test_failing_writes_leave_the_earlier_files_as_they_were(tmp_path, tiny_gpt2_weights, small_sms_tsv):
    out = tmp_path / "run"
    args = train_args(tiny_gpt2_weights, small_sms_tsv, out, "--eval-every", "4")
    process = start(args)
    kill_once_logged(
        process, out / "metrics.jsonl", rows=2, seconds=240, kill=lambda pid, _: os.kill(pid, signal.SIGTERM)
    )
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    checkpoint = (out / "checkpoint.pt").read_bytes()
    adapter = (out / "adapter" / "adapter.safetensors").read_bytes()

    def small_files():  # files may grow to 20 KB, and no further: the checkpoint cannot be written
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    assert len(checkpoint) > 20_000 and len(adapter) > 20_000
    result = subprocess.run(
        [sys.executable, "-m", "loraft", *args, "--resume"],
        capture_output=True,
        text=True,
        preexec_fn=small_files,
        timeout=240,
    )
    assert_clear_error(result, f"could not write {out}", "File too large", "is unchanged")
    assert (out / "checkpoint.pt").read_bytes() == checkpoint
    assert (out / "adapter" / "adapter.safetensors").read_bytes() == adapter
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]

    # An --out that cannot be made is refused before the model loads, with nothing written.
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert_clear_error(loraft(*train_args(tiny_gpt2_weights, small_sms_tsv, a_file / "run")), "cannot write there")


def test_non_finite_adapters_are_never_saved_loaded_or_merged(tmp_path):
    from loraft import lora
    from loraft.adapters import load_adapter, save_adapter
    from loraft.files import read_json, write_json
    from loraft.models import gpt2

    def tiny():
        torch.manual_seed(0)
        model = gpt2.GPTModel(gpt2.GPT2Config(vocab_size=50, context_length=16, emb_dim=16, n_heads=2, n_layers=1))
        lora.apply_lora(model, rank=2, alpha=4.0)
        return model

    model = tiny()
    save_adapter(model, tmp_path / "good")
    saved = (tmp_path / "good" / "adapter.safetensors").read_bytes()
    layer = next(m for m in model.modules() if isinstance(m, lora.LoRALinear))
    with torch.no_grad():
        layer.lora_B["default"].fill_(float("nan"))
    with pytest.raises(LoraftError, match="hold NaN or infinite values"):
        save_adapter(model, tmp_path / "good")
    assert (tmp_path / "good" / "adapter.safetensors").read_bytes() == saved

    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(LoraftError, match="would put NaN or infinite values into the base weights"):
        lora.merge(model)
    for before, after in zip(weights, model.parameters(), strict=True):
        torch.testing.assert_close(after, before, rtol=0, atol=0, equal_nan=True)

    tensors = load_file(tmp_path / "good" / "adapter.safetensors")
    next(iter(tensors.values()))[0] = float("inf")
    save_file(tensors, tmp_path / "good" / "adapter.safetensors", metadata={"format": "loraft-adapter/1"})
    with pytest.raises(LoraftError, match="cannot be used: 1 of its"):
        load_adapter(tiny(), tmp_path / "good")

    write_json(tmp_path / "r.json", {"loss": float("nan"), "rows": [float("inf"), 1.5]})
    assert read_json(tmp_path / "r.json") == {"loss": None, "rows": [None, 1.5]}


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m: m.pop("modules_to_save"), "the key 'modules_to_save' is missing"),
        (lambda m: m.pop("rank"), "the key 'rank' is missing"),
        (lambda m: m.update(rank="16"), "'rank' must be an integer, not \"16\""),
        (lambda m: m.update(alpha=True), "'alpha' must be a number, not true"),
        (lambda m: m.update(target_modules=[1]), "'target_modules' must be a list of strings"),
        (lambda m: m.update(max_length=0), "'max_length' must be at least 1, not 0"),
        (lambda m: m.update(modules_to_save={"out_head": {"in_features": 16}}), "modules_to_save['out_head'] needs"),
        (
            lambda m: m.update(
                task="classification",
                label_names=["ham"],
                modules_to_save={"out_head": {"in_features": 16, "out_features": 2, "bias": False}},
            ),
            "'label_names' has 1 names; the adapter's head has 2 classes",
        ),
    ],
)
def test_a_hand_edited_adapter_json_fails_with_the_key_and_the_file(tmp_path, edit, message):
    from loraft import lora
    from loraft.adapters import read_adapter, save_adapter
    from loraft.files import read_json, write_json
    from loraft.models import gpt2

    model = gpt2.GPTModel(gpt2.GPT2Config(vocab_size=50, context_length=16, emb_dim=16, n_heads=2, n_layers=1))
    lora.apply_lora(model, rank=2, alpha=4.0)
    save_adapter(model, tmp_path)
    read_adapter(tmp_path)
    meta = read_json(tmp_path / "adapter.json")
    edit(meta)
    write_json(tmp_path / "adapter.json", meta)
    with pytest.raises(LoraftError) as error:
        read_adapter(tmp_path)
    assert str(error.value).startswith(f"{tmp_path / 'adapter.json'}: ") and message in str(error.value)


def test_a_run_from_before_a_setting_existed_resumes_with_its_old_value():
    from loraft.run_folder import changed_settings

    older = {"model": "smollm2-135m", "train": {"lr": 0.001, "epochs": 3}}
    assert (
        changed_settings(older, {"model": "smollm2-135m", "train": {"lr": 0.001, "epochs": 3, "quantize": "none"}})
        == {}
    )
    changed = changed_settings(older, {"model": "smollm2-135m", "train": {"lr": 0.001, "epochs": 3, "quantize": "nf4"}})
    assert list(changed) == ["train"]
    # LoRA variants came later: a plain LoRA run from before them resumes, another variant does not
    before_variants = {"model": "smollm2-135m", "rank": 16, "alpha": 16.0}
    plain = {**before_variants, "variant": "lora", "init": "default", "lora_plus_ratio": 0.0}
    assert changed_settings(before_variants, plain) == {}
    assert changed_settings(before_variants, {**plain, "variant": "dora"}) == {"variant": ("lora", "dora")}
