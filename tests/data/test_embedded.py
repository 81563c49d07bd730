"""The public data inside the package: the SMS Spam Collection, the book's instruction data and
GPT-2's BPE files load with no
network, no LORAFT_DATA_DIR and an empty home and cache, equal the shared copies, are refused when
they are not the published files, and travel in the wheel."""

import hashlib
import shutil
import socket
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import tiktoken

from loraft import tokenizer
from loraft.data import instruction, sms_spam
from loraft.data.instruction import book_file, load_instruction_data
from loraft.data.sms_spam import load_sms_spam, sms_spam_file
from loraft.errors import LoraftError
from loraft.tokenizer import GPT2Tokenizer

from ..conftest import DATA_DIR, SMS_FILE

REPO = Path(__file__).resolve().parents[2]
BOOK_FILE = DATA_DIR / "instruction" / "instruction-data.json"
PACKAGED = {  # path inside the wheel -> the shared copy it must equal byte for byte (None: no copy there)
    "loraft/data/sms_spam_collection/SMSSpamCollection": SMS_FILE,
    "loraft/data/sms_spam_collection/readme": DATA_DIR / "sms_spam_collection" / "readme",
    "loraft/data/sms_spam_collection/LICENSE.txt": None,
    "loraft/data/gpt2_tokenizer/encoder.json": DATA_DIR / "gpt2_tokenizer" / "encoder.json",
    "loraft/data/gpt2_tokenizer/vocab.bpe": DATA_DIR / "gpt2_tokenizer" / "vocab.bpe",
    "loraft/data/gpt2_tokenizer/LICENSE.txt": None,
    "loraft/data/instruction_data/instruction-data.json": BOOK_FILE,
    "loraft/data/instruction_data/LICENSE.txt": None,
}


def go_offline(root: Path, monkeypatch) -> list[Path]:
    """No LORAFT_DATA_DIR, no tiktoken cache variables, an empty home, cache and temporary folder
    under `root`, and no connection can be opened. Returns the folders, to see what was written there."""
    for name in ("LORAFT_DATA_DIR", "TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    folders = [root / name for name in ("home", "cache", "tmp")]
    for folder in folders:
        folder.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(folders[0]))
    monkeypatch.setenv("LORAFT_CACHE", str(folders[1]))
    monkeypatch.setattr(tempfile, "tempdir", str(folders[2]))  # where tiktoken caches the files it reads

    def no_network(*args, **kwargs):
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    return folders


@pytest.fixture
def offline(tmp_path, monkeypatch):
    return go_offline(tmp_path / "offline", monkeypatch)


def files_under(folders):
    return [p for folder in folders for p in folder.rglob("*") if p.is_file()]


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- the SMS Spam Collection


def test_sms_data_loads_from_the_package_offline(offline):
    path = sms_spam_file()
    assert path == sms_spam.EMBEDDED and path.is_relative_to(Path(sms_spam.__file__).parent)
    assert path.read_bytes() == SMS_FILE.read_bytes()
    data = load_sms_spam()
    assert data.sizes() == {"train": 1045, "val": 149, "test": 300}
    assert data == load_sms_spam(str(SMS_FILE))
    assert files_under(offline) == []  # nothing downloaded, nothing cached


def test_a_corrupted_embedded_copy_is_refused(offline, tmp_path, monkeypatch):
    changed = tmp_path / "SMSSpamCollection"
    changed.write_bytes(SMS_FILE.read_bytes().replace(b"Go until jurong point", b"Go until jurong Point", 1))
    monkeypatch.setattr(sms_spam, "EMBEDDED", changed)
    with pytest.raises(LoraftError) as error:
        load_sms_spam()
    message = one_line(error)
    assert f"{changed} is not the UCI SMS Spam Collection" in message
    assert sms_spam.SHA256 in message and "reinstall loraft, or pass a copy with --data-file PATH" in message
    # The same file passed on purpose is the user's own data, and loads.
    assert load_sms_spam(str(changed)).sizes() == {"train": 1045, "val": 149, "test": 300}


def test_a_changed_copy_in_the_data_dir_is_refused(offline, tmp_path, monkeypatch):
    (tmp_path / "data" / "sms_spam_collection").mkdir(parents=True)
    (tmp_path / "data" / "sms_spam_collection" / "SMSSpamCollection").write_bytes(SMS_FILE.read_bytes()[:-1])
    monkeypatch.setenv("LORAFT_DATA_DIR", str(tmp_path / "data"))
    with pytest.raises(LoraftError, match="is not the UCI SMS Spam Collection") as error:
        sms_spam_file()
    assert "--data-file PATH" in one_line(error)


def test_the_uci_download_on_request(offline, tmp_path, monkeypatch):
    """from_uci: the real download code (a local zip laid out as UCI's), once, into the cache, and
    chosen over LORAFT_DATA_DIR."""
    archive = tmp_path / "sms+spam+collection.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("SMSSpamCollection", SMS_FILE.read_bytes())
        z.writestr("readme", "the dataset's readme")
    monkeypatch.setattr(sms_spam, "URL", archive.as_uri())
    monkeypatch.setenv("LORAFT_DATA_DIR", str(DATA_DIR))
    cached = offline[1] / "SMSSpamCollection"
    assert sms_spam_file(from_uci=True) == cached
    assert cached.read_bytes() == SMS_FILE.read_bytes()
    archive.unlink()  # the second time reads the cache
    assert load_sms_spam(from_uci=True) == load_sms_spam()

    cached.write_bytes(b"ham\thi\n")
    with pytest.raises(LoraftError, match="delete it to download it again") as error:
        sms_spam_file(from_uci=True)
    one_line(error)
    cached.unlink()
    with pytest.raises(LoraftError, match="could not download SMSSpamCollection") as error:
        sms_spam_file(from_uci=True)
    assert "leave out --data-from-uci" in one_line(error)
    with pytest.raises(LoraftError, match="exclude each other"):
        sms_spam_file(str(SMS_FILE), from_uci=True)


# ---------------------------------------------------------------- GPT-2's BPE files


def tiktokens_own_gpt2(tmp_path, monkeypatch) -> tiktoken.Encoding:
    """tiktoken.get_encoding("gpt2") itself, from a cache folder seeded with the shared copies under
    the names tiktoken gives its downloads (the sha1 of their URL)."""
    seeded = tmp_path / "tiktoken-cache"
    seeded.mkdir()
    for name in ("vocab.bpe", "encoder.json"):
        url = f"https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/{name}"
        shutil.copy(DATA_DIR / "gpt2_tokenizer" / name, seeded / hashlib.sha1(url.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(seeded))
    encoding = tiktoken.get_encoding("gpt2")
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR")
    return encoding


def test_gpt2_tokenizer_offline_equals_tiktoken_and_the_shared_copy(tmp_path, monkeypatch, sms_texts):
    reference = tiktokens_own_gpt2(tmp_path, monkeypatch)
    monkeypatch.setenv("LORAFT_DATA_DIR", str(DATA_DIR))
    shared = GPT2Tokenizer()  # what the tests used so far
    go_offline(tmp_path / "offline", monkeypatch)
    ours = GPT2Tokenizer()
    assert ours.encoding._mergeable_ranks == reference._mergeable_ranks  # all 50,256 BPE tokens
    assert ours.encoding._special_tokens == reference._special_tokens == {"<|endoftext|>": 50256}
    ids = ours.encode_batch(sms_texts)
    assert len(ids) == 5574
    assert ids == shared.encode_batch(sms_texts) == reference.encode_batch(sms_texts, allowed_special="all")
    assert [ours.decode(row) for row in ids] == sms_texts
    assert ours.encode("Hello world<|endoftext|>") == [15496, 995, 50256]


def test_gpt2_tokenizer_reads_the_package_not_the_environment(offline):
    assert tokenizer.GPT2_FILES.is_relative_to(Path(tokenizer.__file__).parent)
    assert GPT2Tokenizer().encode("Hello world") == [15496, 995]
    for name in ("encoder.json", "vocab.bpe"):
        assert (tokenizer.GPT2_FILES / name).read_bytes() == (DATA_DIR / "gpt2_tokenizer" / name).read_bytes()
    assert all(p.parent == offline[2] / "data-gym-cache" for p in files_under(offline))  # tiktoken's own cache only


@pytest.mark.parametrize("name", ["vocab.bpe", "encoder.json"])
def test_a_corrupted_embedded_gpt2_file_is_refused(offline, tmp_path, monkeypatch, name):
    changed = tmp_path / "gpt2_tokenizer"
    shutil.copytree(tokenizer.GPT2_FILES, changed)
    (changed / name).write_bytes((changed / name).read_bytes()[:-2] + b"\n")
    monkeypatch.setattr(tokenizer, "GPT2_FILES", changed)
    with pytest.raises(LoraftError) as error:
        GPT2Tokenizer()
    message = one_line(error)
    assert f"{changed / name} is not the GPT-2 BPE file {name}" in message
    assert tokenizer.GPT2_SHA256[name] in message and "reinstall loraft" in message


def test_an_unusable_tiktoken_cache_fails_clearly(offline, tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    with pytest.raises(LoraftError, match="through tiktoken's cache") as error:
        GPT2Tokenizer()
    assert "set TIKTOKEN_CACHE_DIR to a writable folder" in one_line(error)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken's cache off
    assert GPT2Tokenizer().encode("Hello world") == [15496, 995]


# ---------------------------------------------------------------- the book's instruction data


def test_instruction_data_loads_from_the_package_offline(offline):
    assert book_file() == instruction.EMBEDDED and instruction.EMBEDDED.read_bytes() == BOOK_FILE.read_bytes()
    assert load_instruction_data().sizes() == {"train": 935, "val": 55, "test": 110}
    assert files_under(offline) == []


def test_a_changed_instruction_copy_is_refused(offline, tmp_path, monkeypatch):
    changed = tmp_path / "instruction-data.json"
    changed.write_bytes(BOOK_FILE.read_bytes().replace(b"Ocassion", b"Occasion", 1))
    monkeypatch.setattr(instruction, "EMBEDDED", changed)
    with pytest.raises(LoraftError, match=f"{changed} is not the book's instruction-data.json") as error:
        load_instruction_data()
    assert "reinstall loraft, or pass a copy with --data FILE.json" in one_line(error)
    assert load_instruction_data(str(changed)).sizes() == {"train": 935, "val": 55, "test": 110}  # on purpose: loads


def test_the_github_download_on_request(offline, monkeypatch):
    """from_github: the real download code (from a local copy), once, into the cache, chosen over
    LORAFT_DATA_DIR; a bad cached copy and a failed download each give one line."""
    monkeypatch.setattr(instruction, "URL", BOOK_FILE.as_uri())
    monkeypatch.setenv("LORAFT_DATA_DIR", str(DATA_DIR))
    cached = offline[1] / "instruction-data.json"
    assert book_file(from_github=True) == cached and cached.read_bytes() == BOOK_FILE.read_bytes()
    monkeypatch.setattr(instruction, "URL", "file:///nowhere/instruction-data.json")  # the cache is read
    assert load_instruction_data(from_github=True) == load_instruction_data()
    cached.write_bytes(b"[]")
    with pytest.raises(LoraftError, match="delete it to download it again") as error:
        book_file(from_github=True)
    one_line(error)
    cached.unlink()
    with pytest.raises(LoraftError, match="could not download instruction-data.json") as error:
        book_file(from_github=True)
    assert "leave out --data-from-github" in one_line(error)
    with pytest.raises(LoraftError, match="cannot go with --data"):
        load_instruction_data(str(BOOK_FILE), from_github=True)


# ---------------------------------------------------------------- the wheel


def test_the_wheel_holds_the_data(tmp_path):
    """A real, non-editable build (setuptools, from a copy of the sources): the data and its licence
    files are in the wheel, byte for byte."""
    source = tmp_path / "source"
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
    result = subprocess.run([*build, "-w", str(tmp_path / "wheel"), str(source)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "wheel").glob("loraft-*.whl")
    with zipfile.ZipFile(wheel) as z:
        for member, shared in PACKAGED.items():
            content = z.read(member)
            assert content == (shared.read_bytes() if shared else (REPO / "src" / member).read_bytes())
