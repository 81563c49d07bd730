"""The UCI SMS Spam Collection and the book's balanced split of it (chapter 6 / appendix E)."""

from pathlib import Path

import numpy as np

from ..errors import LoraftError
from ..files import cache_dir, checked_file, data_dir, download_checked
from .classification import ClassificationData, Split, read_text_file

URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
SHA256 = "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"
LABEL_NAMES = ["ham", "spam"]
# UCI's file as it is, inside the package (CC BY 4.0; attribution in LICENSE.txt beside it).
EMBEDDED = Path(__file__).parent / "sms_spam_collection" / "SMSSpamCollection"
WHAT = "UCI SMS Spam Collection (SMSSpamCollection)"


def sms_spam_file(data_file: str | None = None, from_uci: bool = False) -> Path:
    """--data-file as given; else, with `from_uci`, UCI's file, downloaded once into our cache;
    else $LORAFT_DATA_DIR/sms_spam_collection/SMSSpamCollection when there; else the copy inside
    the package. All but --data-file must have UCI's sha256."""
    if data_file and from_uci:
        raise LoraftError("--data-file and --data-from-uci exclude each other: give one")
    if data_file:
        path = Path(data_file)
        if not path.is_file():
            raise LoraftError(f"--data-file {path}: no such file")
        return path
    if from_uci:
        cached = cache_dir() / "SMSSpamCollection"
        if not cached.is_file():
            download(cached)
        return checked_file(cached, SHA256, WHAT, "delete it to download it again")
    local = data_dir() / "sms_spam_collection" / "SMSSpamCollection" if data_dir() else None
    if local and local.is_file():
        return checked_file(local, SHA256, WHAT, "pass a file of your own with --data-file PATH")
    return checked_file(EMBEDDED, SHA256, WHAT, "reinstall loraft, or pass a copy with --data-file PATH")


def download(target: Path):
    download_checked(
        URL,
        SHA256,
        target,
        "SMSSpamCollection",
        "leave out --data-from-uci to use the copy inside the package, or pass one with --data-file PATH",
        zip_member="SMSSpamCollection",
    )


def read_sms_spam(path: Path) -> tuple[list[str], list[int]]:
    """All lines, `label<TAB>text`, with no quote handling: pandas' default quoting (the book's
    read_csv) merges lines that contain a double quote and reads 5,572 of the 5,574 messages."""
    texts, labels = [], []
    for number, line in enumerate(read_text_file(path).split("\n"), 1):
        if not line.strip():
            continue
        label, sep, text = line.partition("\t")
        if not sep or label not in LABEL_NAMES:
            raise LoraftError(f"{path} line {number}: expected 'ham' or 'spam', a tab, then the message")
        texts.append(text)
        labels.append(LABEL_NAMES.index(label))
    if not texts:
        raise LoraftError(f"{path} holds no messages")
    return texts, labels


def book_split(texts: list[str], labels: list[int]) -> ClassificationData:
    """As the book: as many ham as spam sampled with random_state=123, shuffled with random_state=123,
    then 70% / 10% / 20%. (pandas' `sample(random_state=123)` is numpy's RandomState(123).choice.)"""
    labels_arr = np.array(labels)
    ham, spam = np.flatnonzero(labels_arr == 0), np.flatnonzero(labels_arr == 1)
    if len(ham) < len(spam):  # numpy's choice would fail: "Cannot take a larger sample than population"
        raise LoraftError(
            f"the SMS data has {len(ham)} ham and {len(spam)} spam messages: the book's balanced split needs as many ham as spam at least"
        )
    balanced = np.concatenate([ham[np.random.RandomState(123).choice(len(ham), len(spam), replace=False)], spam])
    order = balanced[np.random.RandomState(123).choice(len(balanced), len(balanced), replace=False)]
    whole = Split([texts[i] for i in order], [labels[i] for i in order])
    n_train, n_val = int(len(order) * 0.7), int(len(order) * 0.1)
    return ClassificationData(
        train=whole.subset(range(n_train)),
        val=whole.subset(range(n_train, n_train + n_val)),
        test=whole.subset(range(n_train + n_val, len(order))),
        label_names=list(LABEL_NAMES),
    )


def load_sms_spam(data_file: str | None = None, from_uci: bool = False) -> ClassificationData:
    path = sms_spam_file(data_file, from_uci)
    data = book_split(*read_sms_spam(path))
    empty = [name for name, size in data.sizes().items() if size == 0]
    if empty:
        total = sum(data.sizes().values())
        raise LoraftError(
            f"{path}: {total} balanced messages leave the {' and '.join(empty)} split empty; give more spam (10 at least)"
        )
    return data
