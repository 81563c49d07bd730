"""The instruction job for real: SmolLM2-135M + LoRA on a few of the book's examples (~30 s), its
adapter through `respond`, `loraft generate --adapter` and `loraft chat`; answer scores; bad input."""

import json
import subprocess
import sys

import pytest

from loraft.evaluate import answer_scores, normalize_answer, rouge_l
from loraft.instruct import load_instruct, respond, train_instruct
from loraft.train import TrainConfig

from .conftest import DATA_DIR
from .helpers import assert_clear_error, loraft


def test_answer_scores():
    assert normalize_answer("The  answer: 'Paris'!") == "answer paris"
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)  # LCS 5 of 6 words each
    assert rouge_l("a b c d", "b d") == pytest.approx(2 * (2 / 4) * 1 / (2 / 4 + 1))
    assert rouge_l("", "anything") == 0.0
    scores = answer_scores(["An antonym is 'simple'.", "Red"], [["an antonym is simple"], ["Blue."]])
    assert scores == {"exact_match": 0.5, "f1": 0.5, "rouge_l": 0.5, "count": 2}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two epochs over 24 of the book's examples, validated on 8, tested on 3."""
    folder = tmp_path_factory.mktemp("instruct")
    examples = json.loads((DATA_DIR / "instruction" / "instruction-data.json").read_text())
    files = {}
    for name, part in (("train", examples[:24]), ("val", examples[24:32]), ("test", examples[32:35])):
        files[name] = folder / f"{name}.json"
        files[name].write_text(json.dumps(part))
    out = folder / "run"
    report = train_instruct(
        out=out,
        data=str(files["train"]),
        val_file=str(files["val"]),
        test_file=str(files["test"]),
        max_new_tokens=24,
        quiet=True,
        train=TrainConfig(epochs=2, batch_size=8, eval_every=2),
    )
    return out, report


def test_a_short_real_run_lowers_the_validation_loss(trained):
    out, report = trained
    assert report["sizes"] == {"train": 24, "val": 8, "test": 3}
    assert report["val_loss_after"] < 0.85 * report["val_loss_before"]  # response tokens: 0.92 -> 0.70 measured
    assert report["test_loss_after"] < report["test_loss_before"]
    assert report["test_perplexity_after"] == pytest.approx(2.718281828 ** report["test_loss_after"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3, 4, 6] and "val_response_loss" in rows[0]
    assert (out / "loss.png").is_file()
    meta = json.loads((out / "adapter" / "adapter.json").read_text())
    assert meta["task"] == "instruction" and meta["template"] == "alpaca" and meta["max_length"] == 256
    responses = json.loads((out / "test-responses.json").read_text())
    assert [r["instruction"] for r in responses] == [
        e["instruction"] for e in json.loads((out.parent / "test.json").read_text())
    ]
    assert all(set(r) == {"instruction", "input", "expected", "generated", "generated_before"} for r in responses)
    assert report["answers_after"]["count"] == 3 and 0 <= report["answers_after"]["rouge_l"] <= 1


def test_the_saved_adapter_answers_as_the_job_did(trained):
    out, _ = trained
    first = json.loads((out / "test-responses.json").read_text())[0]
    model, tokenizer, meta = load_instruct(out / "adapter")
    assert (
        respond(model, tokenizer, meta, first["instruction"], first["input"], max_new_tokens=24) == first["generated"]
    )

    generated = loraft(
        "generate",
        "--adapter",
        str(out / "adapter"),
        "--instruction",
        first["instruction"],
        "--input",
        first["input"],
        "--max-new-tokens",
        "24",
    )
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout == first["generated"] + "\n"

    chat = subprocess.run(
        [sys.executable, "-m", "loraft", "chat", "--adapter", str(out / "adapter"), "--max-new-tokens", "24"],
        input="What is the capital of France?\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert chat.returncode == 0, chat.stderr
    answer = respond(model, tokenizer, meta, "What is the capital of France?", max_new_tokens=24)
    assert f"> {answer}\n" in chat.stdout


def test_bad_input_fails_with_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    assert_clear_error(
        loraft("instruct", "--data", str(tmp_path / "missing.json"), "--out", str(out)), "data file not found"
    )
    (tmp_path / "bad.json").write_text('{"instruction": "x"')
    assert_clear_error(loraft("instruct", "--data", str(tmp_path / "bad.json"), "--out", str(out)), "is not valid JSON")
    assert not out.exists()
    assert_clear_error(loraft("generate", "--instruction", "Say hi."), "give --adapter DIR")
    assert_clear_error(loraft("chat", "--adapter", str(tmp_path)), "not a loraft adapter folder")
