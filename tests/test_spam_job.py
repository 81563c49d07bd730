"""The main job for real: SmolLM2-135M + LoRA on the book's SMS split (one epoch, ~2 minutes)."""

import json

from loraft.finetune import evaluate_adapter


def test_one_epoch_of_lora_makes_a_spam_classifier(spam_run):
    run, report = spam_run
    assert report["sizes"] == {"train": 1045, "val": 149, "test": 300}
    assert report["accuracy_before"]["test"] < 0.75  # a random head: near chance
    assert report["test_accuracy"] >= 0.95
    assert report["parameters"]["trainable"] == 4_885_632  # rank 16 on all linear layers + the 576x2 head
    for name in (
        "adapter/adapter.safetensors",
        "adapter/adapter.json",
        "metrics.jsonl",
        "config.json",
        "loss.png",
        "accuracy.png",
    ):
        assert (run / name).is_file(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["examples_seen"] == 1045 and rows[-1]["epoch"] == 1.0
    assert rows[-1]["tokens_seen"] / rows[-1]["train_seconds"] == report["train_tokens_per_second"]

    # The saved adapter, merged into a bf16 base as `loraft classify` runs it, scores as the report says.
    evaluated = evaluate_adapter(run / "adapter")
    assert abs(evaluated["accuracy"] - report["test_accuracy"]) <= 2 / 300
