import json

import pytest

from loraft.data.classification import collate, load_classification_data
from loraft.errors import LoraftError


def write(path, text, encoding="utf-8"):
    path.write_text(text, encoding=encoding)
    return path


def test_csv_tsv_jsonl_with_any_number_of_classes(tmp_path):
    rows = [("good film", "pos"), ("awful, really", "neg"), ("it was fine", "neutral")] * 10
    csv_file = write(tmp_path / "d.csv", "review,sentiment\n" + "".join(f'"{t}",{label}\n' for t, label in rows))
    tsv_file = write(tmp_path / "d.tsv", "review\tsentiment\n" + "".join(f"{t}\t{label}\n" for t, label in rows))
    jsonl_file = write(
        tmp_path / "d.jsonl", "".join(json.dumps({"review": t, "sentiment": label}) + "\n" for t, label in rows)
    )
    for file in (csv_file, tsv_file, jsonl_file):
        data = load_classification_data(file, "review", "sentiment", seed=1)
        assert data.label_names == ["neg", "neutral", "pos"]
        assert data.sizes() == {"train": 21, "val": 3, "test": 6}
        assert sorted(data.train.texts + data.val.texts + data.test.texts) == sorted(t for t, _ in rows)


def test_separate_validation_and_test_files(tmp_path):
    train = write(tmp_path / "train.csv", "text,label\n" + "a,0\nb,1\n" * 10)
    val = write(tmp_path / "val.csv", "text,label\nc,0\nd,1\n")
    test = write(tmp_path / "test.csv", "text,label\ne,1\n")
    data = load_classification_data(train, val_file=val, test_file=test)
    assert data.sizes() == {"train": 20, "val": 2, "test": 1}
    assert data.test.labels == [1] and data.label_names == ["0", "1"]


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("cols.csv", "message,class\nhi,a\nyo,b\n", "no column 'text' (columns: message, class)"),
        ("one.csv", "text,label\nhi,a\nyo,a\n", "single class ('a')"),
        ("empty.csv", "text,label\nhi,a\n   ,b\n", "line 3: the text is empty"),
        ("fields.csv", "text,label\nhi,a,extra\n", "line 2: 3 fields, the header has 2"),
        ("quote.csv", 'text,label\n"unclosed,a\nyo,b\n', "malformed CSV"),
        ("bad.jsonl", '{"text": "hi", "label": "a"}\n{oops\n', "line 2: not valid JSON"),
        ("nolabel.csv", "text,label\nhi,\n", "line 2: the label is empty"),
        ("data.xlsx", "x", "unknown data format"),
    ],
)
def test_bad_files_fail_clearly(tmp_path, name, content, message):
    with pytest.raises(LoraftError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_classification_data(write(tmp_path / name, content))


def test_non_utf8_and_missing_files(tmp_path):
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\ncafé,a\nthé,b\n".encode("latin-1"))
    with pytest.raises(LoraftError, match=r"line 2: byte 0xe9 is not UTF-8"):
        load_classification_data(latin)
    with pytest.raises(LoraftError, match="data file not found"):
        load_classification_data(tmp_path / "nope.csv")


def test_collate_pads_dynamically_and_truncates():
    batch = collate([[5, 6, 7], [8], [1, 2, 3, 4, 5, 6]], [0, 1, 0], pad_id=0, max_length=4)
    assert batch.input_ids.tolist() == [[5, 6, 7, 0], [8, 0, 0, 0], [1, 2, 3, 4]]
    assert batch.lengths.tolist() == [3, 1, 4]
    assert batch.labels.tolist() == [0, 1, 0]


def test_quoted_newlines_unicode_breaks_and_decimal_labels(tmp_path):
    rows = 'text,label\n"two\r\nlines",a\n"odd\u2028break",b\nplain,\u00b2\n' + "x,a\ny,b\n" * 5
    data = load_classification_data(write(tmp_path / "d.csv", rows), fractions=(0.1, 0.1))
    texts = data.train.texts + data.val.texts + data.test.texts
    assert "two\r\nlines" in texts and "odd\u2028break" in texts
    assert data.label_names == ["a", "b", "\u00b2"]
    jsonl = write(
        tmp_path / "d.jsonl",
        "".join(
            json.dumps({"text": t, "label": label}, ensure_ascii=False) + "\n"
            for t, label in [("a\u2028b", "x"), ("c", "y")] * 10
        ),
    )
    assert "a\u2028b" in load_classification_data(jsonl).train.texts


def test_too_few_rows_for_the_splits(tmp_path):
    with pytest.raises(LoraftError, match="leave the val and test split empty"):
        load_classification_data(write(tmp_path / "d.csv", "text,label\na,0\nb,1\nc,0\n"))
