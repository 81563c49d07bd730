"""The job skeleton's one rule for the weights a trained adapter runs with: `loraft eval` and
`loraft classify` compute what the job measured for its report."""

import json

from .helpers import loraft, train_args


def test_eval_and_classify_compute_what_the_job_reported(tmp_path, tiny_gpt2_weights, small_sms_tsv):
    out = tmp_path / "run"
    trained = loraft(*train_args(tiny_gpt2_weights, small_sms_tsv, out, "--epochs", "2"))
    assert trained.returncode == 0, trained.stderr
    report = json.loads((out / "report.json").read_text())
    adapter = ["--adapter", str(out / "adapter"), "--weights", str(tiny_gpt2_weights)]
    evaluated = loraft("eval", *adapter, "--data", str(small_sms_tsv), "--split", "test")
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads(evaluated.stdout)
    # The mean loss is a sum over every test text's probabilities: equal floats, equal logits.
    assert metrics["loss"] == report["test"]["loss"]
    assert {k: metrics[k] for k in report["test"]} == report["test"]
    lines = [line.split("\t", 1) for line in small_sms_tsv.read_text(encoding="utf-8").splitlines()[1:]]
    texts = [text for _, text in lines[:8]]
    once, twice = (loraft("classify", *adapter, *texts) for _ in range(2))
    assert once.returncode == 0 and once.stdout == twice.stdout and len(once.stdout.splitlines()) == len(texts)
