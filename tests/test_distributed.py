"""Two gloo processes on this machine (torchrun, loopback) train the adapter one process trains,
and resume after a kill; on a tiny random GPT-2 and real SMS data."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from loraft.files import read_safetensors

from .helpers import kill_once_logged, loraft, train_args

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "loraft"]


def test_two_processes_train_the_adapter_of_one_and_resume(tmp_path, tiny_gpt2_weights, small_sms_tsv):
    def args(out, *extra):  # batch 8 over 84 texts: the last global batch of each epoch has 4
        return train_args(tiny_gpt2_weights, small_sms_tsv, tmp_path / out, "--epochs", "8", "--no-bf16", *extra)

    one = loraft(*args("one"))
    assert one.returncode == 0, one.stderr

    # Two processes, killed (the whole process group, as Ctrl-C in the terminal would) after a few
    # evaluations, then resumed.
    process = subprocess.Popen([*TORCHRUN, *args("two")], start_new_session=True, stderr=subprocess.PIPE, text=True)
    kill_once_logged(process, tmp_path / "two" / "metrics.jsonl", rows=4, seconds=120, kill=os.killpg)
    assert process.wait() == -signal.SIGKILL, process.stderr.read()
    resumed = subprocess.run([*TORCHRUN, *args("two", "--resume")], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr

    adapter = "adapter/adapter.safetensors"
    single, double = (read_safetensors(tmp_path / run / adapter) for run in ("one", "two"))
    assert single.keys() == double.keys()
    for name in single:
        torch.testing.assert_close(double[name], single[name], rtol=1e-4, atol=1e-5, msg=name)
    rows = [
        [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("one", "two")
    ]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]]  # one row per evaluation, from process 0 only
    for a, b in zip(*rows):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert (b["train_accuracy"], b["val_accuracy"]) == (a["train_accuracy"], a["val_accuracy"])
    reports = [json.loads((tmp_path / run / "report.json").read_text()) for run in ("one", "two")]
    assert reports[1]["test_accuracy"] == reports[0]["test_accuracy"]
    assert reports[1]["best_step"] == reports[0]["best_step"]
