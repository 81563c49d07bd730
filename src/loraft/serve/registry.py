"""The served model: one base in memory and every adapter loaded on it under its own name."""

import re
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from ..adapters import load_adapter, read_adapter
from ..classifier import TextFormat
from ..errors import LoraftError
from ..models import load_model
from ..precision import bf16_supported

TASKS = ("classification", "instruction")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass
class ServedAdapter:
    name: str
    folder: Path
    meta: dict  # adapter.json

    @property
    def task(self) -> str:
        return self.meta["task"]

    @property
    def label_names(self) -> list[str]:
        return self.meta.get("label_names", [])

    @cached_property
    def format(self) -> TextFormat:
        return TextFormat.of_adapter(self.meta)

    def describe(self) -> dict:
        keys = ("task", "label_names", "template", "max_length", "pooling", "method", "rank", "targets", "base_model")
        return {"name": self.name, **{k: self.meta[k] for k in keys if k in self.meta}}


@dataclass
class Served:
    model: nn.Module
    tokenizer: object
    adapters: dict[str, ServedAdapter]
    bf16: bool
    compiled: bool = False  # the blocks compiled for classification passes (inference.compile_for_inference)
    started: float = field(default_factory=time.time)


def parse_adapter_specs(specs: list[str]) -> dict[str, Path]:
    """["spam=runs/sms/adapter", ...] -> {"spam": Path(...)}: names unique, usable in a URL or JSON."""
    folders = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not folder:
            raise LoraftError(f"--adapter {spec!r}: expected NAME=DIR, e.g. spam=runs/sms-spam/adapter")
        if not NAME.fullmatch(name):
            raise LoraftError(
                f"--adapter {spec!r}: a name is letters, digits and _ . - (starting with a letter or digit)"
            )
        if name in folders:
            raise LoraftError(f"--adapter: the name {name!r} is given twice")
        folders[name] = Path(folder)
    return folders


def check_adapters(folders: dict[str, Path], base: str | None = None) -> dict[str, ServedAdapter]:
    """Read every adapter.json and fail before any model is loaded if they cannot share one base
    (`base`, when given: the served model's name)."""
    adapters = {name: ServedAdapter(name, folder, read_adapter(folder)[0]) for name, folder in folders.items()}
    for adapter in adapters.values():
        if adapter.meta.get("task") not in TASKS:
            raise LoraftError(
                f"adapter {adapter.name!r} ({adapter.folder}) has task {adapter.meta.get('task')!r}; loraft serves {TASKS}"
            )
        if adapter.meta.get("trained_parameters"):  # the baselines change base weights every adapter shares
            raise LoraftError(
                f"adapter {adapter.name!r} ({adapter.folder}) changes the base weights (method "
                f"{adapter.meta.get('method')!r}); only LoRA and head adapters can share one base"
            )
    bases = {adapter.meta["base_model"] for adapter in adapters.values()} | ({base} if base else set())
    if len(bases) > 1:
        listed = ", ".join(f"{a.name}: {a.meta['base_model']}" for a in adapters.values())
        served = f"the served model is {base}; " if base else ""
        raise LoraftError(
            f"all adapters must share one base model; {served}these were trained on different ones ({listed})"
        )
    return adapters


def adapter_folder(path: str, allowed: tuple[Path, ...]) -> Path:
    """The adapter folder `path` names, if it lies inside one of the `allowed` folders (links followed);
    a relative path is looked for in each of them in turn."""
    candidates = [Path(path)] if Path(path).is_absolute() else [folder / path for folder in allowed]
    found = next((c for c in candidates if c.exists()), candidates[0]).resolve()
    if not any(found.is_relative_to(folder.resolve()) for folder in allowed):
        raise LoraftError(
            f"{path} is outside the folders adapters may be loaded from (--adapter-dir: {', '.join(map(str, allowed))})"
        )
    return found


def load_served(
    folders: dict[str, Path], quantize: str = "none", base: str | None = None, weights=None, bf16: bool | None = None
) -> Served:
    """The base model (`base`, else the adapters' base; `weights`: its files from a local folder) with
    every adapter in `folders` on it; `bf16`: the base in bf16 (default: where it runs natively)."""
    adapters = check_adapters(folders, base)
    if base is None and not adapters:
        raise LoraftError("give the base model with --model, or at least one --adapter NAME=DIR")
    bf16 = bf16_supported() if bf16 is None else bf16  # halves memory traffic; the adapters, loaded after, stay fp32
    base = base or next(iter(adapters.values())).meta["base_model"]
    model, tokenizer = load_model(base, weights, dtype=torch.bfloat16 if bf16 else torch.float32, quantize=quantize)
    model.requires_grad_(False)
    for adapter in adapters.values():
        load_adapter(model, adapter.folder, adapter.name)  # checks the base's fingerprint
    model.requires_grad_(False)
    return Served(model, tokenizer, adapters, bf16)
