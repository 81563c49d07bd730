"""Text classification data: reading user files (CSV, TSV, JSONL), labels, splits, batches."""

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import LoraftError


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
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise LoraftError(f"{path} line {line}: byte 0x{raw[e.start]:02x} is not UTF-8; save the file as UTF-8") from None


def read_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) pairs of a CSV, TSV or JSONL file, chosen by its extension."""
    text = read_text_file(path)
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = []
        for number, line in enumerate(text.split("\n"), 1):  # JSON strings may hold other line breaks
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LoraftError(f"{path} line {number}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise LoraftError(f"{path} line {number}: expected a JSON object per line")
            rows.append((number, row))
        return rows
    if suffix not in (".csv", ".tsv", ".tab", ".txt"):
        raise LoraftError(f"{path}: unknown data format {suffix!r}; use .csv, .tsv or .jsonl")
    delimiter = "," if suffix == ".csv" else "\t"
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)  # quoted fields keep their newlines
    try:
        header = next(reader)
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
    return rows


def read_labelled_texts(path: Path, text_column: str, label_column: str) -> tuple[list[str], list[str]]:
    rows = read_rows(path)
    if not rows:
        raise LoraftError(f"{path} has no rows")
    columns = list(rows[0][1])
    for column, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
        if column not in columns:
            raise LoraftError(f"{path} has no column {column!r} (columns: {', '.join(columns)}); choose one with {flag}")
    texts, labels = [], []
    for number, row in rows:
        text, label = row.get(text_column), row.get(label_column)
        if not isinstance(text, str) or not text.strip():
            raise LoraftError(f"{path} line {number}: the text is empty")
        if label is None or str(label).strip() == "":
            raise LoraftError(f"{path} line {number}: the label is empty")
        texts.append(text)
        labels.append(str(label).strip())
    return texts, labels


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
        raise LoraftError(f"{source}: {what} leave the {' and '.join(empty)} split empty; give more {more} or --val-file / --test-file")


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
