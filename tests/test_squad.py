"""Question answering as an instruction task (`loraft instruct --format squad --template qa`): SQuAD's
metrics against the official evaluation script's definitions, the reader on SQuAD v1.1, v2.0 and JSONL
files and on malformed ones, and the PEFT article's system for real at tiny size: a random BLOOM with an
int8 frozen base and LoRA on query_key_value, trained on a SQuAD file."""

import json
import re

import pytest

from loraft import lora
from loraft.data.instruction import Example, format_prompt
from loraft.data.squad import read_squad
from loraft.errors import LoraftError
from loraft.evaluate import answer_scores, normalize_answer, token_f1
from loraft.instruct import load_instruct, respond
from loraft.quantize import QuantizedLinear

from .helpers import assert_clear_error, loraft
from .models.checkpoints import hf_checkpoint, write_tokenizer


def test_squad_metrics_are_the_official_scripts():
    """evaluate-v2.0.py: lower case, string.punctuation deleted (not replaced by a space), the words
    a/an/the dropped, whitespace collapsed; F1 over the words both share; each question's best gold."""
    assert normalize_answer("The Eiffel-Tower, in  Paris!") == "eiffeltower in paris"
    assert normalize_answer("Anna and the banana") == "anna and banana"  # articles as words only
    assert normalize_answer("It's a dog's life") == "its dogs life"
    assert normalize_answer("“Paris”") == "“paris”"  # curly quotes are not in string.punctuation
    assert token_f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)  # 3 shared of 4 and 3
    assert token_f1("cat cat", "cat") == pytest.approx(2 / 3)  # shared words count with repeats: 1
    assert token_f1("", "") == 1.0 and token_f1("Paris", "") == 0.0 and token_f1("", "Paris") == 0.0
    assert token_f1("the", "a") == 1.0  # both normalise to no words
    predictions = ["Denver Broncos", "the Broncos", "", "in 1990"]
    golds = [["Denver Broncos", "The Denver Broncos"], ["Denver Broncos"], [""], ["1990", "in the year 1990"]]
    scores = answer_scores(predictions, golds)
    assert scores["exact_match"] == pytest.approx((1 + 0 + 1 + 0) / 4)
    # "the Broncos": 1 shared of 1 and 2 -> 2/3; "in 1990" vs "1990": 1 of 2 and 1 -> 2/3, vs "in year 1990": 2 of 2 and 3 -> 4/5
    assert scores["f1"] == pytest.approx((1 + 2 / 3 + 1 + 4 / 5) / 4)
    assert scores["count"] == 4


def test_the_qa_template_is_the_articles_layout():
    assert format_prompt(None, "Who wrote it?", "Ann wrote it.", "qa") == (
        "### CONTEXT\nAnn wrote it.\n\n### QUESTION\nWho wrote it?\n\n### ANSWER\n"
    )


def squad_json(version: str, paragraphs: list[dict]) -> str:
    return json.dumps({"version": version, "data": [{"title": "t", "paragraphs": paragraphs}]})


def test_the_reader_takes_squad_v1_v2_and_jsonl(tmp_path):
    v1 = tmp_path / "dev-v1.1.json"
    v1.write_text(
        squad_json(
            "1.1",
            [
                {
                    "context": "Super Bowl 50 was won by the Denver Broncos.",
                    "qas": [
                        {
                            "id": "a",
                            "question": "Who won Super Bowl 50?",
                            "answers": [
                                {"text": "Denver Broncos", "answer_start": 29},
                                {"text": "the Denver Broncos", "answer_start": 25},
                            ],
                        }
                    ],
                }
            ],
        )
    )
    assert read_squad(v1) == [
        Example(
            "Who won Super Bowl 50?",
            "Super Bowl 50 was won by the Denver Broncos.",
            "Denver Broncos",
            ["Denver Broncos", "the Denver Broncos"],
        )
    ]
    v2 = tmp_path / "train-v2.0.json"
    qas = [
        {"question": "Who won?", "answers": [{"text": "Broncos", "answer_start": 0}], "is_impossible": False},
        {"question": "Who lost?", "answers": [], "plausible_answers": [{"text": "Panthers"}], "is_impossible": True},
    ]
    v2.write_text(squad_json("v2.0", [{"context": "The Broncos won.", "qas": qas}]))
    answerable, unanswerable = read_squad(v2)
    assert (answerable.output, answerable.gold_answers) == ("Broncos", ["Broncos"])
    assert (unanswerable.output, unanswerable.gold_answers) == ("", [""])  # as SQuAD v2.0 scores it
    rows = [
        {"context": "Ann wrote it.", "question": "Who wrote it?", "answer": "Ann"},
        {"context": "Ann wrote it.", "question": "Who read it?", "answer": ""},
        {"context": "Ann wrote it.", "question": "Who?", "answer": ["Ann", "ann"]},
    ]
    jsonl = tmp_path / "qa.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert [(e.instruction, e.input, e.output, e.gold_answers) for e in read_squad(jsonl)] == [
        ("Who wrote it?", "Ann wrote it.", "Ann", ["Ann"]),
        ("Who read it?", "Ann wrote it.", "", [""]),
        ("Who?", "Ann wrote it.", "Ann", ["Ann", "ann"]),
    ]


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("a.json", '{"data": [', "is not valid JSON"),
        ("a.json", "[]", 'expected SQuAD\'s JSON, an object whose "data" lists articles'),
        ("a.json", '{"data": [{"title": "t"}]}', "data[0]: missing 'paragraphs' (keys: title)"),
        ("a.json", squad_json("1.1", [{"qas": []}]), "data[0].paragraphs[0]: missing 'context'"),
        ("a.json", squad_json("1.1", [{"context": "c", "qas": {}}]), "'qas' must be a list, not dict"),
        (
            "a.json",
            squad_json("1.1", [{"context": "c", "qas": [{"question": "q", "answers": [{"answer_start": 0}]}]}]),
            "data[0].paragraphs[0].qas[0].answers[0]: missing 'text'",
        ),
        (
            "a.json",
            squad_json("1.1", [{"context": "c", "qas": [{"question": "q", "answers": []}]}]),
            "qas[0]: the question has no answers (an unanswerable SQuAD v2.0 question says is_impossible)",
        ),
        (
            "a.json",
            squad_json(
                "2.0", [{"context": "c", "qas": [{"question": "q", "answers": [{"text": "x"}], "is_impossible": True}]}]
            ),
            "the question is_impossible, yet it has answers",
        ),
        ("a.json", squad_json("2.0", [{"context": " ", "qas": []}]), "the context is empty"),
        ("a.json", '{"data": []}', "holds no questions"),
        ("a.jsonl", '{"context": "c", "question": "q"}\n', "line 1: missing 'answer' (keys: context, question)"),
        ("a.jsonl", '{"context": "c", "question": "q", "answer": 3}\n', '"answer" must be a text or a list of texts'),
    ],
)
def test_a_malformed_file_is_refused_naming_where(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(LoraftError, match=re.escape(message)):
        read_squad(tmp_path / name)


def test_the_command_refuses_a_bad_file_in_one_line_and_writes_nothing(tmp_path):
    (tmp_path / "a.json").write_text(squad_json("1.1", [{"context": "c", "qas": [{"question": "q", "answers": []}]}]))
    out = tmp_path / "out"
    result = loraft("instruct", "--data", str(tmp_path / "a.json"), "--format", "squad", "--out", str(out))
    assert_clear_error(result, f"{tmp_path / 'a.json'}: data[0].paragraphs[0].qas[0]: the question has no answers")
    result = loraft("instruct", "--format", "squad", "--out", str(out))
    assert_clear_error(result, "--format squad reads your --data FILE; the book's examples are in the Alpaca format")
    assert not out.exists()


CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Peru": "Lima", "Chile": "Santiago", "Norway": "Oslo", "Greece": "Athens", "Cuba": "Havana", "Iran": "Tehran",
}  # fmt: skip


def capital_paragraphs(countries: list[str]) -> list[dict]:
    """One paragraph a country: its capital answerable, its river not (SQuAD v2.0's is_impossible)."""
    paragraphs = []
    for country in countries:
        context = f"{country} is a country. Its capital city is {CAPITALS[country]}."
        qas = [
            {"question": f"What is the capital of {country}?", "answers": [{"text": CAPITALS[country]}]},
            {"question": f"Which river runs through {country}?", "answers": [], "is_impossible": True},
        ]
        paragraphs.append({"context": context, "qas": qas})
    return paragraphs


def test_the_articles_system_trains_bloom_over_an_int8_base_on_squad(tmp_path):
    """bloom-560m's layout at tiny size, its block layers int8 (query_key_value among them), LoRA r=16,
    alpha=32, dropout 0.05 on query_key_value alone, the qa template, a SQuAD v2.0 file: the loss falls,
    and the report holds SQuAD's exact match and F1 before and after, as the saved adapter answers."""
    folder = tmp_path / "bloom"
    hf_checkpoint(folder, "bloom-560m")
    train, test = tmp_path / "train-v2.0.json", tmp_path / "test-v2.0.json"
    train.write_text(squad_json("v2.0", capital_paragraphs(list(CAPITALS))))
    test.write_text(squad_json("v2.0", capital_paragraphs(["France", "Japan"])))
    write_tokenizer(
        folder, [p["context"] + q["question"] for p in capital_paragraphs(list(CAPITALS)) for q in p["qas"]]
    )
    out = tmp_path / "run"
    trained = loraft(
        "instruct", "--model", str(folder), "--data", str(train), "--format", "squad", "--template", "qa",
        "--val-file", str(train), "--test-file", str(test), "--quantize", "int8", "--rank", "16", "--alpha", "32",
        "--dropout", "0.05", "--targets", "query_key_value", "--epochs", "6", "--batch-size", "4", "--lr", "1e-2",
        "--eval-every", "6", "--max-new-tokens", "4", "--out", str(out), "--quiet",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["format"] == "squad" and report["sizes"] == {"train": 24, "val": 24, "test": 4}
    assert report["val_loss_after"] < 0.6 * report["val_loss_before"]
    assert report["parameters"]["trainable"] == 2 * (16 * 48 + 3 * 48 * 16)  # A and B on each block's W_qkv
    for when in ("before", "after"):
        assert set(report[f"answers_{when}"]) == {"exact_match", "f1", "rouge_l", "count"}
    responses = json.loads((out / "test-responses.json").read_text())
    scores = answer_scores([r["generated"] for r in responses], [[r["expected"]] for r in responses])
    assert scores == report["answers_after"]

    model, tokenizer, meta = load_instruct(out / "adapter", quantize="int8")
    qkv = model.trf_blocks[0].att.W_qkv
    assert isinstance(qkv, lora.LoRALinear) and isinstance(qkv.base, QuantizedLinear) and qkv.base.mode == "int8"
    assert meta["target_modules"] == ["trf_blocks.0.att.W_qkv", "trf_blocks.1.att.W_qkv"]
    first = responses[0]
    assert respond(model, tokenizer, meta, first["instruction"], first["input"], max_new_tokens=4) == first["generated"]
