"""File helpers: the cache and data folders, sha256-checked copies and downloads, writes that never leave a torn file,
strict JSON and safetensors reading. Nothing here unpickles."""

import hashlib
import io
import json
import math
import os
import shutil
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import LoraftError


def cache_dir() -> Path:
    path = Path(os.environ.get("LORAFT_CACHE", Path.home() / ".cache" / "loraft"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir() -> Path | None:
    """The local data folder (laid out like the project's shared/data), if LORAFT_DATA_DIR names one."""
    value = os.environ.get("LORAFT_DATA_DIR")
    return Path(value) if value else None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checked_file(path: Path, sha256: str, what: str, advice: str) -> Path:
    """`path`, once its sha256 is `sha256`: a copy of public data (inside the package, in
    LORAFT_DATA_DIR, in the cache) that is not the published file is refused, not silently used."""
    if not Path(path).is_file():
        raise LoraftError(f"{what} not found at {path}; {advice}")
    actual = sha256_of(path)
    if actual != sha256:
        raise LoraftError(f"{path} is not the {what}: its sha256 is {actual}, not {sha256}; {advice}")
    return Path(path)


def download_checked(
    url: str, sha256: str, target: Path, what: str, local_copy_hint: str, zip_member: str | None = None
):
    """Download `url` (from a zip archive, its member `zip_member`) to `target`, which is written only
    when its sha256 is `sha256`."""
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            content = response.read()
        if zip_member:
            with zipfile.ZipFile(io.BytesIO(content)) as archive:
                content = archive.read(zip_member)
    except Exception as e:
        raise LoraftError(f"could not download {what} from {url} ({type(e).__name__}); {local_copy_hint}") from None
    if hashlib.sha256(content).hexdigest() != sha256:
        raise LoraftError(f"the downloaded {what} does not have the expected sha256 {sha256}")
    atomic_write(target, lambda tmp: tmp.write_bytes(content))


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise LoraftError(f"file not found: {path}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise LoraftError(f"{path} is truncated or corrupt: not a readable safetensors file ({e})") from None


def atomic_write(path: Path, write):
    """Write through `write(tmp)` then rename: an interruption or a failed write (a full disk, a
    read-only folder) leaves the old file as it was, and no temporary file behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save reports a full disk as a RuntimeError
        tmp.unlink(missing_ok=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise LoraftError(f"could not write {path} ({reason}); the file there before, if any, is unchanged") from None


def atomic_folder(path: Path, write, overwrite: bool = False, inputs=()) -> Path:
    """Fill a new folder through `write(folder)`, then rename it to `path`: a failure or an interruption
    leaves no half-written folder, and with `overwrite` what was at `path` stays whole until the new
    folder is complete. Without `overwrite`, an existing `path` is refused; with it, only a flat folder
    (what an export writes) that holds none of `inputs` is replaced, never a run folder or a file."""
    path = Path(path)
    check_new_folder(path, overwrite, inputs)
    tmp, old = path.with_name(f".{path.name}.tmp-{os.getpid()}"), path.with_name(f".{path.name}.old-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write(tmp)
        if path.exists():
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except OSError:
            if old.exists():
                os.replace(old, path)
            raise
    except OSError as e:
        raise LoraftError(f"could not write {path} ({e.strerror or e}); what was there before is unchanged") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return path


def check_new_folder(path: Path, overwrite: bool, inputs=()):
    """Refuse an --out that atomic_folder must not replace (see there), before any work is done."""
    path = Path(path)
    if not path.exists():
        return
    if not overwrite:
        raise LoraftError(f"{path} already exists; choose another --out, or add --overwrite to replace it")
    if not path.is_dir():
        raise LoraftError(f"--out {path} is a file; --overwrite replaces only a folder an earlier export wrote")
    if any(Path(i).resolve().is_relative_to(path.resolve()) for i in inputs):
        raise LoraftError(f"--out {path} holds an input of this command; write the export somewhere else")
    if any(p.is_dir() for p in path.iterdir()):
        raise LoraftError(
            f"--out {path} holds folders (a run folder?); --overwrite replaces only a folder an earlier export wrote"
        )


def json_safe(value):
    """`value` with NaN and infinities as null: JSON has no such numbers, and bare NaN breaks its readers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: Path, value):
    text = json.dumps(json_safe(value), indent=2, allow_nan=False) + "\n"
    atomic_write(Path(path), lambda tmp: tmp.write_text(text))


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoraftError(f"{path} is not valid JSON ({e})") from None
