"""Text classification data: reading user files (CSV, TSV, JSONL), labels, splits, batches."""

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import LoraftError
from ..tokenizer import check_unicode


@dataclass
class Split:
    texts: list[str]
    labels: list[int]

    def __len__(self):
        return len(self.texts)

    def subset(self, indices) -> "Split":
        return Split([self.texts[i] for i in indices], [self.labels[i] for i in indices])


@dataclass
class ClassificationData:
    train: Split
    val: Split
    test: Split
    label_names: list[str]

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def read_text_file(path: Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise LoraftError(f"data file not found: {path}")
    return decode_utf8(path.read_bytes(), str(path), "save the file as UTF-8")


def decode_utf8(raw: bytes, where: str, advice: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise LoraftError(f"{where} line {line}: byte 0x{raw[e.start]:02x} is not UTF-8; {advice}") from None


class JSONObject(dict):
    repeated = None  # the first key given twice: json.loads would keep the last value silently


def json_object(pairs) -> JSONObject:
    obj = JSONObject()
    for key, value in pairs:
        if key in obj and obj.repeated is None:
            obj.repeated = key
        obj[key] = value
    return obj


def parse_json(text: str, path, line: int | None = None):
    """json.loads of a whole file or of its `line`, every failure a LoraftError (objects know a repeated key)."""
    where = f"{path} line {line}:" if line else f"{path} is"
    try:
        return json.loads(text, object_pairs_hook=json_object)
    except json.JSONDecodeError as e:
        detail = e.msg if line else f"line {e.lineno}: {e.msg}"
        raise LoraftError(f"{where} not valid JSON ({detail})") from None
    except RecursionError:
        raise LoraftError(f"{where} not valid JSON (nested too deeply)") from None
    except ValueError as e:  # an integer of over 4300 digits (the rest of the message is advice for Python code)
        raise LoraftError(f"{where} not valid JSON ({str(e).split(':')[0]})") from None


def check_keys_unique(row, where: str):
    if isinstance(row, JSONObject) and row.repeated is not None:
        raise LoraftError(f"{where}: the key {row.repeated!r} is given twice in one object; keep one")


def read_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) pairs of a CSV, TSV or JSONL file, chosen by its extension."""
    text = read_text_file(path)
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = []
        for number, line in enumerate(text.split("\n"), 1):  # JSON strings may hold other line breaks
            if not line.strip():
                continue
            row = parse_json(line, path, number)
            if not isinstance(row, dict):
                raise LoraftError(f"{path} line {number}: expected a JSON object per line")
            check_keys_unique(row, f"{path} line {number}")
            rows.append((number, row))
        return rows
    if suffix not in (".csv", ".tsv", ".tab", ".txt"):
        raise LoraftError(f"{path}: unknown data format {suffix!r}; use .csv, .tsv or .jsonl")
    delimiter = "," if suffix == ".csv" else "\t"
    reader = csv.reader(
        io.StringIO(text, newline=""), delimiter=delimiter, strict=True
    )  # quoted fields keep their newlines
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, len(text)))  # the default (128 KiB) would call a long text malformed
    try:
        header = next(reader)
        check_header(path, header, delimiter)
        rows = []
        for values in reader:
            if not any(v.strip() for v in values):
                continue
            if len(values) != len(header):
                raise LoraftError(
                    f"{path} line {reader.line_num}: {len(values)} fields, the header has {len(header)} "
                    f"({delimiter!r}-separated; quote fields that contain the separator)"
                )
            rows.append((reader.line_num, dict(zip(header, values))))
    except csv.Error as e:
        raise LoraftError(f"{path} line {reader.line_num}: malformed {suffix[1:].upper()} ({e})") from None
    except StopIteration:
        raise LoraftError(f"{path} is empty") from None
    finally:
        csv.field_size_limit(limit)
    return rows


def check_header(path, header: list[str], delimiter: str):
    """Refuse a header that would pick a column silently: a name twice (or twice but for spaces around
    it; a dict of the row keeps the last), or a single column holding the other separator."""
    other, format = (
        ("\t", "tab-separated: name it .tsv") if delimiter == "," else (",", "comma-separated: name it .csv")
    )
    if len(header) == 1 and other in header[0]:
        raise LoraftError(f"{path}: the header {header[0]!r} is one column; it looks {format}")
    columns = {}
    for number, name in enumerate(header, 1):
        if name.strip():  # unnamed columns (a spreadsheet's trailing separators) are never chosen
            columns.setdefault(name.strip(), []).append(f"{name!r} (column {number})")
    repeated = [" and ".join(names) for names in columns.values() if len(names) > 1]
    if repeated:
        raise LoraftError(f"{path}: duplicate column names {'; '.join(repeated)}; give each column its own name")


def read_labelled_texts(path: Path, text_column: str, label_column: str) -> tuple[list[str], list[str]]:
    rows = read_rows(path)
    if not rows:
        raise LoraftError(f"{path} has no rows")
    columns = list(rows[0][1])
    for column, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
        if column not in columns:
            raise LoraftError(
                f"{path} has no column {column!r} (columns: {', '.join(columns)}); choose one with {flag}"
            )
    texts, labels = [], []
    for number, row in rows:
        text, label = row.get(text_column), row.get(label_column)
        if text is not None and not isinstance(text, str):
            raise LoraftError(f"{path} line {number}: the text must be a string, not {json_type(text)}")
        if not text or not text.strip():
            raise LoraftError(f"{path} line {number}: the text is empty")
        if isinstance(label, (list, dict)):
            raise LoraftError(f"{path} line {number}: the label must be text or a number, not {json_type(label)}")
        if label is None or str(label).strip() == "":
            raise LoraftError(f"{path} line {number}: the label is empty")
        label = str(label).strip()
        check_unicode(text, f"{path} line {number}: the text")  # JSON's \ud800 escapes; CSV/TSV are checked UTF-8
        check_unicode(label, f"{path} line {number}: the label")
        texts.append(text)
        labels.append(label)
    return texts, labels


def json_type(value) -> str:
    return "null" if value is None else "dict" if isinstance(value, dict) else type(value).__name__


def encode_labels(path, raw: list[str], label_names: list[str]) -> list[int]:
    index = {name: i for i, name in enumerate(label_names)}
    unknown = sorted(set(raw) - set(index))
    if unknown:
        raise LoraftError(f"{path}: labels {unknown} are not among the known labels {label_names}")
    return [index[label] for label in raw]


def split_by_fractions(split: Split, fractions: tuple[float, float], seed: int) -> tuple[Split, Split, Split]:
    """Shuffle with `seed`, then cut off validation and test fractions (the rest trains)."""
    order = np.random.RandomState(seed).permutation(len(split))
    n_val, n_test = int(len(split) * fractions[0]), int(len(split) * fractions[1])
    n_train = len(split) - n_val - n_test
    return (
        split.subset(order[:n_train]),
        split.subset(order[n_train : n_train + n_val]),
        split.subset(order[n_train + n_val :]),
    )


def load_classification_data(
    path, text_column="text", label_column="label", val_file=None, test_file=None, seed=123, fractions=(0.1, 0.2)
) -> ClassificationData:
    """A user's data: one file split by `seed`, or separate validation/test files."""
    texts, raw = read_labelled_texts(path, text_column, label_column)
    label_names = sorted(set(raw), key=lambda name: (not name.isdecimal(), int(name) if name.isdecimal() else name))
    if len(label_names) < 2:
        raise LoraftError(f"{path} has a single class ({label_names[0]!r}): a classifier needs at least two")
    whole = Split(texts, encode_labels(path, raw, label_names))
    train, val, test = split_by_fractions(
        whole, (0.0 if val_file else fractions[0], 0.0 if test_file else fractions[1]), seed
    )
    extra = {}
    for name, file in (("val", val_file), ("test", test_file)):
        if file:
            t, r = read_labelled_texts(file, text_column, label_column)
            extra[name] = Split(t, encode_labels(file, r, label_names))
    data = ClassificationData(train, extra.get("val", val), extra.get("test", test), label_names)
    check_no_split_empty(data.sizes(), path, f"{len(whole)} rows", "rows (10 at least)")
    return data


def check_no_split_empty(sizes: dict[str, int], source, what: str, more: str):
    """A clear error where a split leaves train, validation or test without a single example."""
    empty = [name for name, size in sizes.items() if size == 0]
    if empty:
        raise LoraftError(
            f"{source}: {what} leave the {' and '.join(empty)} split empty; give more {more} or --val-file / --test-file"
        )


@dataclass
class Batch:
    input_ids: torch.Tensor  # (batch, longest), right-padded
    lengths: torch.Tensor  # (batch,) real tokens per row
    labels: torch.Tensor  # (batch,)


def collate(token_lists: list[list[int]], labels: list[int], pad_id: int, max_length: int) -> Batch:
    """Pad to the longest sequence of this batch (not a global length): truncated to `max_length`."""
    token_lists = [ids[:max_length] for ids in token_lists]
    longest = max(len(ids) for ids in token_lists)
    input_ids = torch.full((len(token_lists), longest), pad_id, dtype=torch.long)
    for row, ids in enumerate(token_lists):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    lengths = torch.tensor([len(ids) for ids in token_lists], dtype=torch.long)
    return Batch(input_ids, lengths, torch.tensor(labels, dtype=torch.long))
