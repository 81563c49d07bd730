"""A run's --out folder: one process at a time (an advisory lock), and never an earlier run lost (it is
continued only with the same settings, replaced only when asked)."""

import contextlib
import fcntl
import os
import shutil
from pathlib import Path

from . import distributed
from .errors import LoraftError
from .files import read_json

LOCK_FILE = ".loraft.lock"
RUN_FILES = ("config.json", "checkpoint.pt", "metrics.jsonl", "before.json")


# Settings a continued run may change: they change the speed, the rounding, when checkpoints are
# written, or what happens to a non-finite step (a run stopped by one may resume skipping it), not
# what a finite run trains.
FREE_SETTINGS = ("compile", "save_every", "skip_nonfinite")


# Settings added since runs were first written, with the value an older run had (it had no choice)
ADDED_SETTINGS = {
    "quantize": "none",
    "max_steps": 0,
    "data_format": "alpaca",
    "variant": "lora",
    "init": "default",
    "lora_plus_ratio": 0.0,
}


def changed_settings(was: dict, now: dict) -> dict:
    """{setting: (was, now)} for each setting a continued run changes, leaving out FREE_SETTINGS (in
    nested settings too)."""
    was, now = with_added(result_settings(was), now), result_settings(now)
    return {k: (was.get(k), v) for k, v in now.items() if was.get(k) != v}


def with_added(was, now):
    """`was` with the ADDED_SETTINGS that `now` has and `was` lacks, at every level."""
    if not (isinstance(was, dict) and isinstance(now, dict)):
        return was
    added = {k: ADDED_SETTINGS[k] for k in now if k in ADDED_SETTINGS and k not in was}
    return added | {k: with_added(v, now.get(k)) for k, v in was.items()}


def result_settings(settings: dict) -> dict:
    return {k: result_settings(v) if isinstance(v, dict) else v for k, v in settings.items() if k not in FREE_SETTINGS}


@contextlib.contextmanager
def locked(out: Path):
    """Hold an exclusive lock on `out` (made if missing) while the block runs. The kernel drops a flock
    when its process ends, however it ends, so a lock is never stale; the file names the holder's pid.
    A folder this made is removed again if the block leaves it empty."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LoraftError(f"--out {out} is a file, not a folder")
    made = not out.exists()
    lock_file = out / LOCK_FILE
    try:
        out.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise LoraftError(
                    f"{out} is in use by another loraft run (pid {holder}); wait for it, or choose another --out"
                ) from None
            # The holder before us may have deleted the file while we waited to lock it: lock the new one.
            if os.path.exists(lock_file) and os.stat(lock_file).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
    except OSError as e:
        raise LoraftError(f"--out {out}: cannot write there ({e.strerror})") from None
    try:
        yield
    finally:
        os.unlink(lock_file)
        os.close(fd)
        if made and out.is_dir() and not any(out.iterdir()):
            out.rmdir()


def check_out_folder(out: Path, config: dict, resume: bool, overwrite: bool):
    """Continue an earlier run in `out` only with the same settings; replace it only when asked."""
    held = [p for p in out.iterdir() if p.name != LOCK_FILE]
    if resume:
        if not (out / "checkpoint.pt").is_file() or not (out / "config.json").is_file():
            raise LoraftError(f"--resume: no checkpoint in {out}")
        earlier = read_json(out / "config.json")
        changed = {
            k: v for k, v in changed_settings(earlier, config).items() if k not in ("resume", "overwrite", "quiet")
        }
        if changed:
            raise LoraftError(f"--resume: the run in {out} used other settings: {changed} (was, now)")
        return
    if held:
        if not overwrite:
            raise LoraftError(
                f"{out} already holds files: continue a run with --resume, or start over with --overwrite"
            )
        if not any((out / name).exists() for name in RUN_FILES):
            raise LoraftError(f"--overwrite: {out} does not hold a loraft run; it is left alone")
        for path in held:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


@contextlib.contextmanager
def claimed(out: Path, config: dict, resume: bool, overwrite: bool):
    """Lock and check `out` in process 0 while the others wait; yields True in process 0, which alone
    writes files (under torchrun the other processes only train)."""
    main = distributed.is_main()
    with locked(out) if main else contextlib.nullcontext():
        if main:
            check_out_folder(Path(out), config, resume, overwrite)
        distributed.barrier()
        yield main
