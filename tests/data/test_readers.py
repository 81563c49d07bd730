"""Hostile input to every reader of user text: files (CSV, TSV, JSONL, JSON, the SMS format), the
texts to classify (arguments, standard input), the server's JSON and the tokenizers. Each either
reads what was written or ends in a LoraftError, never another exception."""

import csv
import io
import json
import re
import sys
from argparse import Namespace
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraft.cli import read_texts
from loraft.data.classification import load_classification_data, read_labelled_texts, read_rows
from loraft.data.instruction import Example, read_examples
from loraft.data.sms_spam import load_sms_spam, read_sms_spam
from loraft.errors import LoraftError
from loraft.tokenizer import BPETokenizer, GPT2Tokenizer, check_unicode

# Function-scoped fixtures (tmp_path) are not reset between a property's examples: each writes its own file.
# derandomize: CI runs the same examples every time, so a failure there reproduces here.
PROPERTY = settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


# ---------------------------------------------------------------- the defects, one test each


@pytest.mark.parametrize(
    "name,header,message",
    [
        ("same.csv", "text,label,text", "duplicate column names 'text' (column 1) and 'text' (column 3)"),
        ("spaces.csv", "text,label, text", "duplicate column names 'text' (column 1) and ' text' (column 3)"),
        ("same.tsv", "label\ttext\tlabel", "duplicate column names 'label' (column 1) and 'label' (column 3)"),
    ],
)
def test_a_column_name_given_twice_is_refused(tmp_path, name, header, message):
    separator = "\t" if name.endswith(".tsv") else ","
    path = write(tmp_path / name, header + "\n" + separator.join(["a", "b", "c"]) + "\n")
    with pytest.raises(LoraftError, match=re.escape(f"{name}: {message}; give each column its own name")):
        read_rows(path)


def test_trailing_unnamed_columns_are_no_duplicates(tmp_path):
    path = write(tmp_path / "sheet.csv", "text,label,,\nhi,a,,\n")
    assert read_rows(path) == [(2, {"text": "hi", "label": "a", "": ""})]


def test_a_jsonl_key_given_twice_is_refused(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": "y", "text": "c"}\n')
    with pytest.raises(LoraftError, match=r"d.jsonl line 2: the key 'text' is given twice in one object"):
        read_rows(path)


def test_an_instruction_key_given_twice_is_refused(tmp_path):
    path = write(
        tmp_path / "d.json", '[{"instruction": "a", "output": "b"}, {"instruction": "a", "output": "b", "output": "c"}]'
    )
    with pytest.raises(LoraftError, match=r"d.json example 2: the key 'output' is given twice"):
        read_examples(path)


def test_a_lone_surrogate_is_refused_with_its_position():
    # Python turns the byte 0xe9 of a Latin-1 argument into U+DCE9 (surrogateescape).
    with pytest.raises(
        LoraftError,
        match=r"^text 2, character 4: not valid Unicode \(the lone surrogate U\+DCE9, often a byte 0xe9 that is not UTF-8\)",
    ):
        read_texts(Namespace(input=None, texts=["fine", "caf\udce9"]))
    with pytest.raises(
        LoraftError, match=r"^where, character 1: not valid Unicode \(the lone surrogate U\+D800\); give UTF-8 text$"
    ):
        check_unicode("\ud800", "where")
    assert read_texts(Namespace(input=None, texts=["café 😀"])) == ["café 😀"]


def test_standard_input_is_decoded_strictly(monkeypatch):
    monkeypatch.setattr(sys, "stdin", SimpleNamespace(buffer=io.BytesIO(b"fine\n\n\xff\n")))
    with pytest.raises(LoraftError, match=r"^standard input line 3: byte 0xff is not UTF-8; give UTF-8 text$"):
        read_texts(Namespace(input=None, texts=["-"]))
    monkeypatch.setattr(sys, "stdin", SimpleNamespace(buffer=io.BytesIO("\ufeffcafé\r\n  \nyo\n".encode())))
    assert read_texts(Namespace(input=None, texts=["-"])) == ["café", "yo"]


def test_a_json_escape_of_a_lone_surrogate_is_refused_in_files(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "ok", "label": "x"}\n{"text": "caf\\udce9", "label": "y"}\n')
    with pytest.raises(LoraftError, match=r"d.jsonl line 2: the text, character 4: not valid Unicode"):
        read_labelled_texts(path, "text", "label")
    path = write(tmp_path / "d.json", '[{"instruction": "x", "input": "\\udfff", "output": "y"}]')
    with pytest.raises(LoraftError, match=r"d.json example 1: the input, character 1: not valid Unicode"):
        read_examples(path)


@pytest.fixture(scope="module")
def gpt2():
    return GPT2Tokenizer()


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """SmolLM2's tokenizer from its GGUF's metadata alone (the tensors are not read)."""
    from gguf import GGUFReader

    from loraft.weights import smollm2_gguf

    return BPETokenizer.from_gguf({name: field.contents() for name, field in GGUFReader(smollm2_gguf()).fields.items()})


def test_the_tokenizers_refuse_a_lone_surrogate(gpt2, smollm2_tokenizer):
    # tiktoken would replace it silently, `tokenizers` fails with a TypeError.
    for tokenizer in (gpt2, smollm2_tokenizer):
        with pytest.raises(LoraftError, match=r"^the text, character 4: not valid Unicode"):
            tokenizer.encode("caf\udce9")
        with pytest.raises(LoraftError, match=r"^text 2, character 1: not valid Unicode"):
            tokenizer.encode_batch(["fine", "\ud800"])


def test_the_server_answers_422_to_a_lone_surrogate():
    """The check comes before any model work: a served model with no weights is enough."""
    from fastapi.testclient import TestClient

    from loraft.serve.app import create_app
    from loraft.serve.registry import Served, ServedAdapter

    adapters = {
        "c": ServedAdapter("c", Path("c"), {"task": "classification", "label_names": ["a", "b"]}),
        "g": ServedAdapter("g", Path("g"), {"task": "instruction"}),
    }
    requests = [
        (
            "/v1/classify",
            '{"adapter": "c", "texts": ["fine", "caf\\udce9"]}',
            "texts[1], character 4: not valid Unicode",
        ),
        ("/v1/generate", '{"adapter": "g", "instruction": "\\ud800"}', "instruction, character 1: not valid Unicode"),
        (
            "/v1/generate",
            '{"adapter": "g", "instruction": "hi", "input": "ab\\udfff"}',
            "input, character 3: not valid Unicode",
        ),
    ]
    with TestClient(create_app(Served(SimpleNamespace(name="none"), None, adapters, False))) as client:
        for path, body, message in requests:
            reply = client.post(path, content=body.encode(), headers={"content-type": "application/json"})
            assert reply.status_code == 422, reply.text
            assert reply.json()["error"].startswith(message)


def test_a_tab_separated_file_named_csv_gets_a_hint(tmp_path):
    path = write(tmp_path / "d.csv", "text\tlabel\nhello, you\tham\n")
    with pytest.raises(
        LoraftError, match=r"d.csv: the header 'text\\tlabel' is one column; it looks tab-separated: name it .tsv"
    ):
        load_classification_data(path)
    path = write(tmp_path / "d.tsv", "text,label\nhi,ham\n")
    with pytest.raises(LoraftError, match=r"it looks comma-separated: name it .csv"):
        load_classification_data(path)


def test_a_field_over_csvs_default_limit_reads(tmp_path):
    long = "word " * 60_000  # over the csv module's default field limit of 131072 characters
    limit = csv.field_size_limit()
    path = write(tmp_path / "d.csv", f'text,label\n"{long}",a\nshort,b\n')
    assert read_labelled_texts(path, "text", "label") == ([long, "short"], ["a", "b"])
    assert csv.field_size_limit() == limit  # restored after the read


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"text": 5, "label": "x"}', "line 1: the text must be a string, not int"),
        ('{"text": ["a"], "label": "x"}', "line 1: the text must be a string, not list"),
        ('{"text": {"a": 1}, "label": "x"}', "line 1: the text must be a string, not dict"),
        ('{"text": null, "label": "x"}', "line 1: the text is empty"),
        ('{"text": "a", "label": null}', "line 1: the label is empty"),
        ('{"text": "a", "label": [[1]]}', "line 1: the label must be text or a number, not list"),
        ('{"text": "a"}', "has no column 'label'"),
        ("[" * 100_000, "line 1: not valid JSON \\(nested too deeply\\)"),
        ("1" * 5000, "line 1: not valid JSON \\(Exceeds the limit \\(4300 digits\\) for integer string conversion\\)$"),
        ("  \t ", "has no rows"),
        ("", "has no rows"),
        ('"text"', "line 1: expected a JSON object per line"),
    ],
)
def test_hostile_jsonl_values(tmp_path, line, message):
    with pytest.raises(LoraftError, match=message):
        read_labelled_texts(write(tmp_path / "d.jsonl", line + "\n"), "text", "label")


def test_jsonl_numbers_as_labels_and_a_bom_read(tmp_path):
    path = write(tmp_path / "d.jsonl", '\ufeff{"text": "a", "label": 1}\n\n   \n{"text": "b", "label": 0.5}\n')
    assert read_labelled_texts(path, "text", "label") == (["a", "b"], ["1", "0.5"])


@pytest.mark.parametrize(
    "content,message",
    [
        ("", "is not valid JSON \\(line 1: Expecting value\\)"),
        ("[" * 100_000, "is not valid JSON \\(nested too deeply\\)"),
        ("[]", "holds no examples"),
        ('[{"instruction": "a", "input": null, "output": "b"}]', "example 1: 'input' must be text, not null"),
        ('[{"instruction": ["a"], "output": "b"}]', "example 1: 'instruction' must be text, not list"),
        ('[{"instruction": "a", "output": {"b": 1}}]', "example 1: 'output' must be text, not dict"),
        ("[1]", "example 1: expected an object"),
    ],
)
def test_hostile_instruction_files(tmp_path, content, message):
    with pytest.raises(LoraftError, match=message):
        read_examples(write(tmp_path / "d.json", content))


@pytest.mark.parametrize(
    "content,message",
    [
        ("", "holds no messages"),
        ("\n  \n", "holds no messages"),
        (
            "spam\ta\nspam\tb\nham\tc\n",
            "1 ham and 2 spam messages: the book's balanced split needs as many ham as spam",
        ),
        ("spam\ta\nham\tb\n", "2 balanced messages leave the val split empty"),
        ("Ham\thi\n", "line 1: expected 'ham' or 'spam', a tab, then the message"),
    ],
)
def test_hostile_sms_files(tmp_path, content, message):
    with pytest.raises(LoraftError, match=message):
        load_sms_spam(str(write(tmp_path / "SMSSpamCollection", content)))


# ---------------------------------------------------------------- properties

TEXT = st.text(max_size=40)  # any Unicode but lone surrogates
ANY_TEXT = st.text(st.one_of(st.characters(), st.characters(categories=["Cs"])), max_size=20)
# Pieces that make a reader's branches likely: separators, quotes, brackets, line breaks, a BOM, bytes that are not UTF-8.
PIECES = [
    "text",
    "label",
    "instruction",
    "output",
    "ham",
    "spam",
    ",",
    "\t",
    '"',
    "'",
    "\n",
    "\r\n",
    " ",
    "{",
    "}",
    "[",
    "]",
    ":",
]
PIECES += ["null", "1", "-0.5e3", "NaN", "true", "\\u", "\\ud800", "\\n", "\ufeff", "é", "\x00"]
HOSTILE = st.one_of(
    st.binary(max_size=200),
    st.lists(
        st.one_of(st.sampled_from([p.encode() for p in PIECES]), st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"])),
        max_size=40,
    ).map(b"".join),
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | ANY_TEXT,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.sampled_from(["text", "label", "x"]), children, max_size=3)
    ),
    max_leaves=8,
)


def loads_or_refuses(read, *args):
    try:
        return read(*args)
    except LoraftError as e:
        assert "\n" not in str(e) and str(e), repr(str(e))  # one line, never empty
        return None


@PROPERTY
@given(st.lists(st.tuples(TEXT, TEXT), max_size=8), st.sampled_from([".csv", ".tsv"]))
def test_rows_read_are_the_rows_written(tmp_path, rows, suffix):
    out = io.StringIO(newline="")
    writer = csv.writer(out, delimiter="," if suffix == ".csv" else "\t")
    writer.writerows([("text", "label"), *rows])
    path = write(tmp_path / f"rows{suffix}", out.getvalue())
    kept = [{"text": t, "label": label} for t, label in rows if t.strip() or label.strip()]  # blank rows are skipped
    assert [row for _, row in read_rows(path)] == kept


@PROPERTY
@given(
    st.lists(st.text(st.characters(codec="utf-8", exclude_characters=",\r\n\"'"), max_size=6), min_size=1, max_size=5)
)
def test_a_header_reads_unless_a_name_repeats(tmp_path, header):
    path = write(tmp_path / "header.csv", ",".join(header) + "\n" + ",".join("v" * len(header)) + "\n")
    names = [name.strip() for name in header if name.strip()]
    rows = loads_or_refuses(read_rows, path)
    if (
        len(set(names)) < len(names) or (len(header) == 1 and "\t" in header[0]) or header == [""]
    ):  # an empty line has no column
        assert rows is None
    else:
        assert rows is not None and list(rows[0][1]) == list(dict.fromkeys(header))  # unnamed columns share the name ""


@PROPERTY
@given(
    st.lists(
        st.tuples(TEXT.filter(str.strip), st.one_of(TEXT.filter(str.strip), st.integers())), min_size=1, max_size=8
    )
)
def test_labelled_jsonl_reads_back(tmp_path, rows):
    path = write(
        tmp_path / "labelled.jsonl", "".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in rows)
    )
    assert read_labelled_texts(path, "text", "label") == (
        [t for t, _ in rows],
        [str(label).strip() for _, label in rows],
    )


@PROPERTY
@given(HOSTILE, st.sampled_from([".csv", ".tsv", ".txt", ".jsonl", ".json"]))
def test_any_bytes_load_or_refuse_as_classification_data(tmp_path, content, suffix):
    path = tmp_path / f"any{suffix}"
    path.write_bytes(content)
    loads_or_refuses(load_classification_data, path)


@PROPERTY
@given(st.lists(st.dictionaries(st.sampled_from(["text", "label", "x"]), JSON, max_size=3), min_size=1, max_size=12))
def test_any_json_values_load_or_refuse_as_classification_data(tmp_path, objects):
    path = write(tmp_path / "values.jsonl", "".join(json.dumps(o) + "\n" for o in objects))
    data = loads_or_refuses(load_classification_data, path)
    if data is not None:
        assert sum(data.sizes().values()) == len(objects)


@PROPERTY
@given(HOSTILE)
def test_any_bytes_load_or_refuse_as_sms_data(tmp_path, content):
    path = tmp_path / "SMSSpamCollection"
    path.write_bytes(content)
    loads_or_refuses(load_sms_spam, str(path))


@PROPERTY
@given(
    st.lists(
        st.tuples(st.sampled_from(["ham", "spam"]), TEXT.filter(lambda t: "\n" not in t and t.strip())),
        min_size=1,
        max_size=8,
    )
)
def test_sms_lines_read_back(tmp_path, messages):
    path = write(tmp_path / "SMSSpamCollection", "".join(f"{label}\t{text}\n" for label, text in messages))
    assert read_sms_spam(path) == ([t for _, t in messages], [["ham", "spam"].index(label) for label, _ in messages])


@PROPERTY
@given(HOSTILE, st.sampled_from([".json", ".jsonl"]))
def test_any_bytes_load_or_refuse_as_instruction_data(tmp_path, content, suffix):
    path = tmp_path / f"any{suffix}"
    path.write_bytes(content)
    loads_or_refuses(read_examples, path)


@PROPERTY
@given(
    st.lists(
        st.one_of(JSON, st.dictionaries(st.sampled_from(["instruction", "input", "output", "x"]), JSON)), max_size=6
    )
)
def test_any_json_values_load_or_refuse_as_instruction_data(tmp_path, rows):
    examples = loads_or_refuses(read_examples, write(tmp_path / "values.json", json.dumps(rows)))
    if examples is not None:
        assert examples == [Example(r["instruction"], r.get("input", ""), r["output"]) for r in rows]


@PROPERTY
@given(st.lists(st.tuples(TEXT.filter(str.strip), TEXT, TEXT.filter(str.strip)), min_size=1, max_size=6))
def test_instruction_examples_read_back(tmp_path, triples):
    examples = [Example(*t) for t in triples]
    path = write(tmp_path / "examples.jsonl", "".join(json.dumps(vars(e)) + "\n" for e in examples))
    assert read_examples(path) == examples


# SmolLM2's vocabulary has no token for these bytes (six control characters, bytes that never occur in UTF-8 and
# the lead bytes of the unassigned planes 4-11): its tokenizer drops them, as its own tokenizer.json does.
SMOLLM2_MISSING_BYTES = set(b"\x04\x06\x13\x14\x16\x1d\xc0\xc1\xf1\xf2") | set(range(0xF5, 0x100))


@settings(max_examples=200, deadline=None, derandomize=True)
@given(ANY_TEXT)
def test_the_tokenizers_round_trip_any_text(gpt2, smollm2_tokenizer, text):
    for tokenizer in (gpt2, smollm2_tokenizer):
        ids = loads_or_refuses(tokenizer.encode, text)
        if any(0xD800 <= ord(c) <= 0xDFFF for c in text):
            assert ids is None
            continue
        assert tokenizer.encode_batch([text, text]) == [ids, ids]
        if tokenizer is gpt2 or not SMOLLM2_MISSING_BYTES & set(text.encode()):
            assert tokenizer.decode(ids) == text
