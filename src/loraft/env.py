"""`loraft env`: can this machine train? The Python and PyTorch build, the GPUs, native bf16, a C++
compiler for --compile, free memory and disk, and which models and data are already here.

Every fact is one probe: a probe that fails shows "unknown" (its reason under "errors") and the others
still run. Nothing is loaded or downloaded, so the check stays quick and works offline."""

import functools
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from . import weights
from .data import instruction, sms_spam
from .files import cache_dir, data_dir
from .models import MODELS
from .precision import bf16_supported
from .train import compiler_found

UNKNOWN = "unknown"
LIBRARIES = ("safetensors", "gguf", "tokenizers", "tiktoken", "huggingface_hub", "numpy", "transformers", "peft")
# /proc/cpuinfo flags that make bf16 native on a CPU: x86's AVX-512 bf16 and AMX, ARM's bf16.
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def collect() -> dict:
    errors = {}

    def probe(key, fn):
        try:
            return fn()
        except Exception as e:  # any failure, whatever it is, makes this one fact unknown, not the command fail
            errors[key] = f"{type(e).__name__}: {e}".strip().rstrip(":")
            return UNKNOWN

    report = {
        "python": probe("python", lambda: {"version": platform.python_version(), "executable": sys.executable}),
        "platform": probe("platform", lambda: platform.platform()),
        "torch": probe("torch", torch_build),
        "cpu": {
            "name": probe("cpu.name", cpu_name),
            "cores": probe("cpu.cores", usable_cores),
            "bf16": probe("cpu.bf16", bf16_supported),
            "bf16_flags": probe("cpu.bf16_flags", cpu_bf16_flags),
        },
        "gpus": probe("gpus", gpus),
        "compiler": probe("compiler", compiler),
        "memory": probe("memory", memory),
        "disk": probe("disk", lambda: {"path": str(cache_dir()), "free_bytes": shutil.disk_usage(cache_dir()).free}),
        "models": {
            name: probe(f"models.{name}", functools.partial(cached_model, info)) for name, info in MODELS.items()
        },
        "data": {
            name: {where: probe(f"data.{name}.{where}", functools.partial(file_entry, find)) for where, find in copies}
            for name, copies in DATA_COPIES.items()
        },
        "libraries": {name: probe(f"libraries.{name}", functools.partial(version_of, name)) for name in LIBRARIES},
    }
    report["errors"] = errors
    return report


# ---------------------------------------------------------------- the probes


def torch_build() -> dict:
    if torch.version.cuda:
        build = f"CUDA {torch.version.cuda}"
    elif getattr(torch.version, "hip", None):
        build = f"ROCm {torch.version.hip}"
    else:
        build = "CPU-only"
    return {"version": torch.__version__, "build": build}


def cpuinfo_field(name: str) -> str | None:
    """The first value of `name` in /proc/cpuinfo (Linux only: elsewhere the file does not exist)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None


def cpu_name() -> str:
    return cpuinfo_field("model name") or platform.processor() or UNKNOWN


def usable_cores() -> int:
    """The cores this process may run on (a container or taskset may allow fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def cpu_bf16_flags() -> list[str]:
    flags = (cpuinfo_field("flags") or cpuinfo_field("Features") or "").split()  # x86 says flags, ARM Features
    return [flag for flag in BF16_FLAGS if flag in flags]


def gpus() -> list[dict]:
    if not torch.cuda.is_available():
        return []
    found = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        found.append(
            {
                "index": index,
                "name": props.name,
                "compute_capability": f"{props.major}.{props.minor}",
                "memory_bytes": props.total_memory,
                "bf16": bf16_supported(torch.device("cuda", index)),
            }
        )
    return found


def compiler() -> dict:
    if not compiler_found():
        return {"found": False, "path": None, "version": None}
    # The names compiler_found looks for, in its order: the first found is the one torch.compile uses.
    names = (os.environ.get("CXX", "g++"), "g++", "clang++")
    path = next(shutil.which(name) for name in names if shutil.which(name))
    try:
        result = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
        version = result.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        version = UNKNOWN
    return {"found": True, "path": path, "version": version}


def memory() -> dict:
    """Available and total memory: /proc/meminfo's MemAvailable counts the page cache the kernel can
    drop, which os.sysconf's free pages do not, so it is the better measure where it exists."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return {
            "available_bytes": int(fields["MemAvailable"].split()[0]) * 1024,
            "total_bytes": int(fields["MemTotal"].split()[0]) * 1024,
        }
    except (OSError, KeyError, ValueError):
        page = os.sysconf("SC_PAGE_SIZE")
        return {
            "available_bytes": os.sysconf("SC_AVPHYS_PAGES") * page,
            "total_bytes": os.sysconf("SC_PHYS_PAGES") * page,
        }


def file_entry(find) -> dict | None:
    path = find()
    return {"path": str(path), "bytes": path.stat().st_size} if path and path.is_file() else None


def smollm2_file() -> Path:
    """Where weights.smollm2_gguf finds the GGUF, in its order, without its download: the installed
    package, else our cache."""
    try:
        installed = Path(importlib.metadata.distribution(weights.SMOLLM2_PACKAGE).locate_file(weights.SMOLLM2_MEMBER))
        if installed.is_file():
            return installed
    except importlib.metadata.PackageNotFoundError:
        pass
    return cache_dir() / Path(weights.SMOLLM2_MEMBER).name


def hub_file(repo: str) -> Path | None:
    """The weights of a hub repository (model.safetensors, or the index of its shards), when the hub's
    cache holds them and config.json. Looked up in the cache only, never on the network."""
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(repo, "config.json"), str):
        return None
    for name in ("model.safetensors", "model.safetensors.index.json"):
        found = try_to_load_from_cache(repo, name)
        if isinstance(found, str):
            return Path(found)
    return None


def cached_model(info) -> dict | None:
    return file_entry(smollm2_file if info.hub_repo is None else functools.partial(hub_file, info.hub_repo))


# Each data set's copies, in the order loraft looks for them.
DATA_COPIES = {
    "sms-spam": [
        ("LORAFT_DATA_DIR", lambda: data_dir() and data_dir() / "sms_spam_collection" / "SMSSpamCollection"),
        ("package", lambda: sms_spam.EMBEDDED),
        ("cache", lambda: cache_dir() / "SMSSpamCollection"),  # what --data-from-uci downloads
    ],
    instruction.BOOK_DATA: [
        ("LORAFT_DATA_DIR", lambda: data_dir() and data_dir() / "instruction" / "instruction-data.json"),
        ("package", lambda: instruction.EMBEDDED),
        ("cache", lambda: cache_dir() / "instruction-data.json"),  # what --data-from-github downloads
    ],
}


def version_of(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------- plain text


def gib(n) -> str:
    return f"{n / 2**30:.1f} GiB"


def size(n) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def file_text(entry, missing: str) -> str:
    if entry == UNKNOWN:
        return UNKNOWN
    return f"{size(entry['bytes'])}  {entry['path']}" if entry else missing


def render(report: dict) -> str:
    """The report as aligned lines of plain text; an unknown fact reads "unknown", its reason at the end."""
    lines = []

    def line(label, text):
        lines.append(f"{label:<16} {text}")

    python, build, cpu, gpus = report["python"], report["torch"], report["cpu"], report["gpus"]
    line("python", python if python == UNKNOWN else f"{python['version']} ({python['executable']})")
    line("platform", report["platform"])
    line("torch", build if build == UNKNOWN else f"{build['version']}, {build['build']} build")
    line("CPU", f"{cpu['name']}, {cpu['cores']} cores")
    flags = cpu["bf16_flags"]
    flags = flags if flags == UNKNOWN else ", ".join(flags) or "none"
    # What bf16_supported says is what training does: bf16 autocast where it is true, fp32 where not.
    bf16 = {True: "yes, loraft trains in bf16", False: "no, loraft trains in fp32", UNKNOWN: UNKNOWN}[cpu["bf16"]]
    line("bf16 on CPU", f"{bf16} (flags: {flags})")
    if gpus == UNKNOWN or not gpus:
        line("GPUs", gpus or "none")
    else:
        for gpu in gpus:
            bf16 = "bf16 native" if gpu["bf16"] else "no native bf16 (fp32)"
            capability = f"compute capability {gpu['compute_capability']}"
            line(f"GPU {gpu['index']}", f"{gpu['name']}, {capability}, {gib(gpu['memory_bytes'])}, {bf16}")
    compiler = report["compiler"]
    if compiler == UNKNOWN:
        line("C++ compiler", UNKNOWN)
    elif compiler["found"]:
        line("C++ compiler", f"{compiler['path']} ({compiler['version']}): --compile can build")
    else:
        line("C++ compiler", "none on PATH: --compile cannot build, loraft trains eager")
    memory, disk = report["memory"], report["disk"]
    if memory == UNKNOWN:
        line("memory", UNKNOWN)
    else:
        line("memory", f"{gib(memory['available_bytes'])} available of {gib(memory['total_bytes'])}")
    line("disk", disk if disk == UNKNOWN else f"{gib(disk['free_bytes'])} free at {disk['path']} (the cache)")
    lines.append("models cached")
    for name, entry in report["models"].items():
        lines.append(f"  {name:<14} {file_text(entry, f'not here; comes from {MODELS[name].source}')}")
    lines.append("data cached (in the order loraft looks)")
    for name, copies in report["data"].items():
        shown = [f"{file_text(entry, '')} ({where})" for where, entry in copies.items() if entry]
        for i, text in enumerate(shown or ["not here; downloaded on first use"]):
            lines.append(f"  {name if i == 0 else '':<18} {text}")
    versions = [f"{name} {version or 'not installed'}" for name, version in report["libraries"].items()]
    line("libraries", ", ".join(versions))
    for key, reason in report["errors"].items():
        lines.append(f"unknown: {key} ({reason})")
    return "\n".join(lines)
