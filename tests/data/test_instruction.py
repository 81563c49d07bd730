import json

import jinja2
import pytest

from loraft.data import instruction
from loraft.data.instruction import (
    Example,
    collate,
    encode_examples,
    format_prompt,
    load_instruction_data,
    read_examples,
)
from loraft.errors import LoraftError

from ..conftest import DATA_DIR

BOOK_FILE = DATA_DIR / "instruction" / "instruction-data.json"


def test_the_books_file_splits_85_10_5_by_seed():
    data = load_instruction_data(seed=123)
    assert data.sizes() == {"train": 935, "val": 55, "test": 110}
    everything = json.loads(BOOK_FILE.read_text())
    as_dicts = [{key: getattr(e, key) for key in instruction.KEYS} for e in data.train + data.val + data.test]
    assert sorted(map(json.dumps, as_dicts)) == sorted(map(json.dumps, everything))
    assert load_instruction_data(seed=123).test == data.test
    assert load_instruction_data(seed=124).test != data.test


def test_download_checks_the_sha256(tmp_path, monkeypatch):
    monkeypatch.setattr(instruction, "URL", BOOK_FILE.as_uri())  # the real download code, from a local copy
    instruction.download(tmp_path / "copy.json")
    assert (tmp_path / "copy.json").read_bytes() == BOOK_FILE.read_bytes()

    other = tmp_path / "other.json"
    other.write_text("[]")
    monkeypatch.setattr(instruction, "URL", other.as_uri())
    with pytest.raises(LoraftError, match="expected sha256"):
        instruction.download(tmp_path / "bad.json")
    assert not (tmp_path / "bad.json").exists() and not (tmp_path / "bad.tmp").exists()


def test_alpaca_template_is_the_books():
    # The book's format_input + "\n\n### Response:\n", for entries 50 (with an input) and 999 (without).
    assert format_prompt(None, "Identify the correct spelling of the following word.", "Ocassion", "alpaca") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nIdentify the correct spelling of the following word.\n\n### Input:\nOcassion\n\n### Response:\n"
    )
    assert format_prompt(None, "What is an antonym of 'complicated'?", "", "alpaca") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nWhat is an antonym of 'complicated'?\n\n### Response:\n"
    )


def test_chat_template_renders_as_the_models_own(smollm2):
    _, tokenizer = smollm2
    template = jinja2.Environment().from_string(tokenizer.chat_template)
    question = {"role": "user", "content": "Rewrite the sentence.\n\nThe cake was eaten by me."}
    expected = template.render(messages=[question], add_generation_prompt=True)
    assert format_prompt(tokenizer, "Rewrite the sentence.", "The cake was eaten by me.", "chat") == expected
    # A training example is the whole conversation up to the answer's <|im_end|>.
    answer = {"role": "assistant", "content": "I ate the cake."}
    sequences, prompt_lengths = encode_examples(
        tokenizer, [Example("Rewrite the sentence.", "The cake was eaten by me.", "I ate the cake.")], "chat", 256
    )
    assert tokenizer.decode(sequences[0]) + "\n" == template.render(messages=[question, answer])
    assert tokenizer.decode(sequences[0][: prompt_lengths[0]]) == expected
    with pytest.raises(LoraftError, match="unknown template 'vicuna'"):
        format_prompt(tokenizer, "x", "", "vicuna")


def test_collate_masks_padding_but_each_first_end_token():
    # The book's example (section 7.3): three sequences, each with its end token 50256 appended.
    batch = collate([[0, 1, 2, 3, 4, 50256], [5, 6, 50256], [7, 8, 9, 50256]], pad_id=50256)
    assert batch.input_ids.tolist() == [[0, 1, 2, 3, 4], [5, 6, 50256, 50256, 50256], [7, 8, 9, 50256, 50256]]
    assert batch.labels.tolist() == [[1, 2, 3, 4, 50256], [6, 50256, -100, -100, -100], [8, 9, 50256, -100, -100]]
    assert batch.lengths.tolist() == [5, 2, 3]


def test_prompt_masking_keeps_the_response_and_its_end_token():
    batch = collate([[0, 1, 2, 3, 4, 99], [5, 6, 99], [7, 8, 9, 99]], pad_id=0, prompt_lengths=[3, 1, 3])
    assert batch.labels.tolist() == [[-100, -100, 3, 4, 99], [6, 99, -100, -100, -100], [-100, -100, 99, -100, -100]]


def test_encoding_ends_with_the_end_token_and_truncates(smollm2):
    _, tokenizer = smollm2
    example = Example("Name a primary color.", "", "Red.")
    (sequence,), (prompt_length,) = encode_examples(tokenizer, [example], "alpaca", 256)
    assert sequence[:prompt_length] == tokenizer.encode(format_prompt(tokenizer, example.instruction, "", "alpaca"))
    assert sequence[prompt_length:] == tokenizer.encode("Red.") + [tokenizer.eos_id]
    (short,), (short_prompt,) = encode_examples(tokenizer, [example], "alpaca", 10)
    assert short == sequence[:10] and short_prompt == 10


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "content,message",
    [
        ('[{"instruction": "x", ', "is not valid JSON (line 1"),
        ('{"instruction": "x", "output": "y"}', "expected a JSON list"),
        ("[]", "holds no examples"),
        ('[{"instruction": "x", "output": "y"}, "text"]', "example 2: expected an object"),
        ('[{"instruction": "x", "input": ""}]', "example 1: missing 'output' (keys: instruction, input)"),
        ('[{"instruction": "x", "output": 3}]', "example 1: 'output' must be text, not int"),
        ('[{"instruction": "  ", "output": "y"}]', "example 1: the instruction is empty"),
    ],
    ids=["not-json", "not-a-list", "empty", "not-an-object", "missing-key", "not-text", "blank"],
)
def test_bad_files_fail_with_one_clear_line(tmp_path, content, message):
    with pytest.raises(LoraftError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        read_examples(write(tmp_path / "data.json", content))
    assert "\n" not in str(error.value)


def test_jsonl_files_missing_files_and_small_splits(tmp_path):
    rows = [{"instruction": f"Say {i}.", "output": str(i)} for i in range(30)]
    jsonl = write(tmp_path / "data.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    data = load_instruction_data(str(jsonl), seed=1)
    assert data.sizes() == {"train": 25, "val": 2, "test": 3} and data.train[0].input == ""
    with pytest.raises(LoraftError, match="data file not found"):
        load_instruction_data(str(tmp_path / "missing.json"))
    few = write(tmp_path / "few.json", json.dumps(rows[:5]))
    with pytest.raises(LoraftError, match="5 examples leave the test split empty"):
        load_instruction_data(str(few))
    test = write(tmp_path / "test.json", json.dumps(rows[:2]))
    assert load_instruction_data(str(jsonl), test_file=str(test), seed=1).sizes() == {"train": 28, "val": 2, "test": 2}
