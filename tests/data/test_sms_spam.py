import zipfile

import pandas as pd
import pytest

from loraft.data import sms_spam
from loraft.data.sms_spam import book_split, load_sms_spam, read_sms_spam
from loraft.errors import LoraftError

from ..conftest import SMS_FILE


def test_download_unzips_and_checks_the_sha256(tmp_path, monkeypatch):
    """The real download code, from a local zip laid out as UCI's."""
    archive = tmp_path / "sms+spam+collection.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("SMSSpamCollection", SMS_FILE.read_bytes())
        z.writestr("readme", "the dataset's readme")
    monkeypatch.setattr(sms_spam, "URL", archive.as_uri())
    sms_spam.download(tmp_path / "SMSSpamCollection")
    assert (tmp_path / "SMSSpamCollection").read_bytes() == SMS_FILE.read_bytes()

    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("SMSSpamCollection", SMS_FILE.read_bytes()[:-10])
    with pytest.raises(LoraftError, match="expected sha256"):
        sms_spam.download(tmp_path / "bad")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "SMSSpamCollection",
        "sms+spam+collection.zip",
    ]  # nothing half-written


def test_every_line_is_read():
    texts, labels = read_sms_spam(SMS_FILE)
    assert len(texts) == 5574
    assert labels.count(0) == 4827 and labels.count(1) == 747
    quoted = [t for t in texts if '"' in t]
    assert quoted and all("\n" not in t for t in quoted)


def test_book_split_sizes_and_balance():
    data = load_sms_spam()
    assert data.sizes() == {"train": 1045, "val": 149, "test": 300}
    assert data.label_names == ["ham", "spam"]
    everything = data.train.labels + data.val.labels + data.test.labels
    assert everything.count(0) == everything.count(1) == 747


def test_split_equals_the_books_pandas_code():
    """The book's create_balanced_dataset + random_split, run with pandas on the same rows."""
    texts, labels = read_sms_spam(SMS_FILE)
    df = pd.DataFrame({"Label": ["spam" if y else "ham" for y in labels], "Text": texts})
    num_spam = (df["Label"] == "spam").sum()
    ham_subset = df[df["Label"] == "ham"].sample(num_spam, random_state=123)
    balanced = pd.concat([ham_subset, df[df["Label"] == "spam"]])
    balanced["Label"] = balanced["Label"].map({"ham": 0, "spam": 1})
    shuffled = balanced.sample(frac=1, random_state=123).reset_index(drop=True)
    train_end, val_end = int(len(shuffled) * 0.7), int(len(shuffled) * 0.7) + int(len(shuffled) * 0.1)

    ours = book_split(texts, labels)
    assert ours.train.texts == shuffled["Text"][:train_end].tolist()
    assert ours.val.texts == shuffled["Text"][train_end:val_end].tolist()
    assert ours.test.texts == shuffled["Text"][val_end:].tolist()
    assert ours.test.labels == shuffled["Label"][val_end:].tolist()


def test_a_local_copy_that_is_not_utf8_fails_clearly(tmp_path):
    latin = tmp_path / "SMSSpamCollection"
    latin.write_bytes("ham\tcaf\u00e9 at 5?\n".encode("latin-1"))
    with pytest.raises(LoraftError, match="line 1: byte 0xe9 is not UTF-8"):
        load_sms_spam(str(latin))
