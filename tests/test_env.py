"""`loraft env`: its facts are this machine's, the same as text and as JSON; a probe that fails is
"unknown" and the rest still comes; a bad flag is one line."""

import importlib.metadata
import json
import platform
import shutil
import sys
from pathlib import Path

import pytest
import torch

from loraft import env
from loraft.data import sms_spam
from loraft.files import cache_dir
from loraft.precision import bf16_supported
from loraft.train import compiler_found

from .conftest import DATA_DIR, SMS_FILE
from .helpers import assert_clear_error, loraft

INSTRUCTION_FILE = DATA_DIR / "instruction" / "instruction-data.json"


@pytest.fixture(scope="module")
def outputs(smollm2_gguf):
    """(JSON report, text) of one `loraft env --json` and one `loraft env`, once the SmolLM2 GGUF is here."""
    as_json, as_text = loraft("env", "--json"), loraft("env")
    assert as_json.returncode == 0 and as_text.returncode == 0, as_json.stderr + as_text.stderr
    return json.loads(as_json.stdout), as_text.stdout


def cpuinfo_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def test_json_holds_this_machines_facts(outputs, smollm2_gguf):
    report, _ = outputs
    assert report["errors"] == {}
    assert report["python"] == {"version": platform.python_version(), "executable": sys.executable}
    assert report["torch"]["version"] == torch.__version__
    assert report["torch"]["build"] == (f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only")

    assert report["cpu"]["bf16"] == bf16_supported()
    if Path("/proc/cpuinfo").is_file():
        assert set(report["cpu"]["bf16_flags"]) == cpuinfo_flags() & {"avx512_bf16", "amx_bf16", "bf16"}
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert [g["index"] for g in report["gpus"]] == list(range(gpus))
    for gpu in report["gpus"]:
        assert gpu["name"] == torch.cuda.get_device_name(gpu["index"])
        assert gpu["compute_capability"] == "{}.{}".format(*torch.cuda.get_device_capability(gpu["index"]))
        assert gpu["bf16"] == bf16_supported(torch.device("cuda", gpu["index"]))

    assert report["compiler"]["found"] == compiler_found()
    if compiler_found():
        assert Path(report["compiler"]["path"]).is_file()
        assert report["compiler"]["version"] not in (None, env.UNKNOWN)

    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    assert report["memory"]["total_bytes"] == int(meminfo["MemTotal"].split()[0]) * 1024
    assert 0 < report["memory"]["available_bytes"] <= report["memory"]["total_bytes"]
    assert report["disk"]["path"] == str(cache_dir())
    assert 0 < report["disk"]["free_bytes"] <= shutil.disk_usage(cache_dir()).total

    # Where the real (downloading) lookup finds the GGUF, and its size.
    assert report["models"]["smollm2-135m"] == {"path": str(smollm2_gguf), "bytes": smollm2_gguf.stat().st_size}
    sms = report["data"]["sms-spam"]
    assert sms["LORAFT_DATA_DIR"] == {"path": str(SMS_FILE), "bytes": SMS_FILE.stat().st_size}
    assert sms["package"] == {"path": str(sms_spam.EMBEDDED), "bytes": sms_spam.EMBEDDED.stat().st_size}
    book = report["data"]["instruction-data"]["LORAFT_DATA_DIR"]
    assert book == {"path": str(INSTRUCTION_FILE), "bytes": INSTRUCTION_FILE.stat().st_size}

    assert report["libraries"]["safetensors"] == importlib.metadata.version("safetensors")
    for name, version in report["libraries"].items():
        try:
            assert version == importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            assert version is None


def test_text_says_the_same(outputs, smollm2_gguf):
    report, text = outputs
    lines = text.splitlines()
    assert f"{platform.python_version()} ({sys.executable})" in lines[0]
    assert torch.__version__ in text and report["torch"]["build"] in text
    bf16_line = next(line for line in lines if line.startswith("bf16 on CPU"))
    assert ("yes, loraft trains in bf16" if bf16_supported() else "no, loraft trains in fp32") in bf16_line
    for flag in report["cpu"]["bf16_flags"]:
        assert flag in bf16_line
    if not report["gpus"]:
        assert any(line.split() == ["GPUs", "none"] for line in lines)
    for gpu in report["gpus"]:
        assert f"{gpu['name']}, compute capability {gpu['compute_capability']}" in text
    if compiler_found():
        assert f"{report['compiler']['path']} ({report['compiler']['version']})" in text
    assert f"free at {cache_dir()}" in text
    assert f"{env.size(smollm2_gguf.stat().st_size)}  {smollm2_gguf}" in text
    assert f"{env.size(SMS_FILE.stat().st_size)}  {SMS_FILE} (LORAFT_DATA_DIR)" in text
    assert f"{INSTRUCTION_FILE} (LORAFT_DATA_DIR)" in text
    for name, version in report["libraries"].items():
        assert f"{name} {version or 'not installed'}" in text
    assert "unknown" not in text


def test_a_cached_hub_checkpoint_is_listed(tmp_path, monkeypatch):
    """GPT-2 weights in the hub's cache layout count once model.safetensors and config.json are both there."""
    for repo, files in [("gpt2", ["model.safetensors", "config.json"]), ("gpt2-medium", ["model.safetensors"])]:
        folder = tmp_path / f"models--openai-community--{repo}"
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text("0" * 40)
        snapshot = folder / "snapshots" / ("0" * 40)
        snapshot.mkdir(parents=True)
        for name in files:
            (snapshot / name).write_bytes(b"x" * 1234)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    result = loraft("env", "--json")
    assert result.returncode == 0, result.stderr
    models = json.loads(result.stdout)["models"]
    weights = tmp_path / "models--openai-community--gpt2" / "snapshots" / ("0" * 40) / "model.safetensors"
    assert models["gpt2-small"] == {"path": str(weights), "bytes": 1234}
    assert models["gpt2-medium"] is None  # no config.json: loading it would still need the network


def test_a_failing_probe_is_unknown_and_the_rest_still_comes(tmp_path, monkeypatch):
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("")
    monkeypatch.setenv("LORAFT_CACHE", str(not_a_folder))  # cache_dir() cannot make it
    as_json, as_text = loraft("env", "--json"), loraft("env")
    assert as_json.returncode == 0 and as_text.returncode == 0, as_json.stderr + as_text.stderr
    report = json.loads(as_json.stdout)
    assert report["disk"] == "unknown" and report["data"]["instruction-data"]["cache"] == "unknown"
    assert "FileExistsError" in report["errors"]["disk"]
    assert report["torch"]["version"] == torch.__version__
    assert any(line.split() == ["disk", "unknown"] for line in as_text.stdout.splitlines())
    assert "unknown: disk (FileExistsError" in as_text.stdout


def test_every_probe_failing_still_renders(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("probe broke")

    for name in [
        "torch_build",
        "cpu_name",
        "usable_cores",
        "bf16_supported",
        "cpu_bf16_flags",
        "gpus",
        "compiler",
        "memory",
        "cache_dir",
        "cached_model",
        "file_entry",
        "version_of",
    ]:
        monkeypatch.setattr(env, name, broken)
    monkeypatch.setattr(env, "platform", None)  # the python and platform probes: None has no python_version()
    report = env.collect()
    assert report["python"] == report["gpus"] == report["cpu"]["bf16"] == report["libraries"]["gguf"] == "unknown"
    data_copies = sum(len(copies) for copies in env.DATA_COPIES.values())
    assert len(report["errors"]) == 3 + 4 + 4 + len(report["models"]) + data_copies + len(env.LIBRARIES)
    text = env.render(json.loads(json.dumps(report)))
    assert "python           unknown" in text and "unknown: libraries.peft (RuntimeError: probe broke)" in text


@pytest.mark.parametrize("args", [["--bogus"], ["--json=1"], ["extra"]])
def test_a_bad_flag_is_one_line(args):
    assert_clear_error(loraft("env", *args), args[0].split("=")[0])
