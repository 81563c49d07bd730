"""Adapter folders: `adapter.safetensors` (the LoRA matrices and any module trained with them) and
`adapter.json` (everything needed to put them back on the right base model). Never pickle."""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from . import __version__
from .errors import LoraftError
from .files import atomic_write, read_json, read_safetensors, write_json
from .lora import (
    LINEAR_LAYERS,
    VARIANTS,
    LoraConfig,
    LoRALinear,
    ModuleToSave,
    adapter_names,
    adapter_params,
    adapter_state,
    add_module_to_save,
    apply_lora,
    base_fingerprint,
    saved_adapter,
)
from .models import family_of

WEIGHTS_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter.json"
FORMAT = "loraft-adapter/1"

TRAINED_PREFIX = "base."  # base parameters trained in place by the non-LoRA baselines (--method full, ...)


def adapter_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors as saved (fp32): for the untouched base (lora.saved_adapter)."""
    tensors = {
        TRAINED_PREFIX + param_name: model.get_parameter(param_name).detach().float().contiguous()
        for param_name in adapter_state(model).configs[name].get("trained_parameters", [])
    }
    tensors |= {key: t.float().contiguous() for key, t in saved_adapter(model, name)[1].items()}
    return tensors


def save_adapter(model: nn.Module, folder, name: str = "default", **task) -> Path:
    """Write adapter `name` to `folder`; `task` (task, label_names, max_length, ...) goes into the JSON."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = adapter_state(model)
    if name not in state.configs:
        raise LoraftError(f"no adapter named {name!r} on this model")
    meta = {
        "format": FORMAT,
        "loraft_version": __version__,
        "name": name,
        "base_model": getattr(model, "name", "unknown"),
        "base_fingerprint": base_fingerprint(model),
        "architecture": family_of(model).name,
        "base_config": vars(model.config),
        **saved_adapter(model, name)[0],
        **task,
    }
    return write_adapter(folder, meta, adapter_tensors(model, name))


def write_adapter(folder: Path, meta: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """adapter.safetensors and adapter.json into `folder`, each file replaced whole."""
    check_finite(tensors, f"adapter {meta['name']!r}: not written to {folder}")
    atomic_write(folder / WEIGHTS_FILE, lambda p: save_file(tensors, p, metadata={"format": FORMAT}))
    write_json(folder / CONFIG_FILE, meta)
    return folder


NUMBER, TEXTS = (int, float), "texts"
KIND_NAMES = {
    str: "a string",
    int: "an integer",
    NUMBER: "a number",
    bool: "true or false",
    dict: "an object",
    TEXTS: "a list of strings",
}
# adapter.json's keys: (type, required). The LoRA keys are required where the adapter has LoRA layers.
SCHEMA = {
    "name": (str, True),
    "base_model": (str, True),
    "base_fingerprint": (str, True),
    "architecture": (str, True),
    "target_modules": (TEXTS, True),
    "modules_to_save": (dict, True),
    "trained_parameters": (TEXTS, False),
    "rank": (int, False),
    "alpha": (NUMBER, False),
    "scaling": (str, False),
    "dropout": (NUMBER, False),
    "variant": (str, False),
    "init": (str, False),
    "lora_plus_ratio": (NUMBER, False),
    "init_r": (int, False),
    "tinit": (int, False),
    "tfinal": (int, False),
    "delta_t": (int, False),
    "beta1": (NUMBER, False),
    "beta2": (NUMBER, False),
    "orth_reg_weight": (NUMBER, False),
    "total_step": (int, False),
    "converted_from": (dict, False),
    "combined": (dict, False),
    "task": (str, False),
    "label_names": (TEXTS, False),
    "template": (str, False),
    "max_length": (int, False),
    "pooling": (str, False),
    "mask_prompt": (bool, False),
    "seed": (int, False),
}


def check_schema(meta: dict, file: Path):
    """One line naming the key and the file for a missing or wrong-typed key, before anything reads it."""
    lora_keys = ("rank", "alpha", "scaling", "dropout") if meta.get("target_modules") else ()
    for key, (kind, required) in SCHEMA.items():
        if meta.get(key) is None:  # null reads as absent: the task checks name an adapter without a task
            if required or key in lora_keys or (key == "label_names" and meta.get("task") == "classification"):
                raise LoraftError(f"{file}: the key {key!r} is missing")
            continue
        value = meta[key]
        if kind == TEXTS:
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        else:
            ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
        if not ok:
            raise LoraftError(f"{file}: {key!r} must be {KIND_NAMES[kind]}, not {json.dumps(value)[:60]}")
    if lora_keys:
        try:
            config = LoraConfig.of_adapter(meta)
        except LoraftError as e:
            raise LoraftError(f"{file}: {e}") from None
        if config.changes_base:  # loading it would take its part out of the base again
            raise LoraftError(
                f"{file}: init {config.init!r} changes the base weights; a saved adapter is its plain LoRA form (init 'default')"
            )
    if meta.get("max_length") is not None and meta["max_length"] < 1:
        raise LoraftError(f"{file}: 'max_length' must be at least 1, not {meta['max_length']}")
    for module, spec in meta["modules_to_save"].items():
        sizes = isinstance(spec, dict) and all(
            isinstance(spec.get(k), int) and spec[k] > 0 for k in ("in_features", "out_features")
        )
        if not sizes or not isinstance(spec.get("bias"), bool):
            raise LoraftError(
                f"{file}: modules_to_save[{module!r}] needs in_features and out_features (positive integers) and bias (true or false)"
            )
    head = meta["modules_to_save"].get("out_head")
    if meta.get("task") == "classification" and head and len(meta["label_names"]) != head["out_features"]:
        raise LoraftError(
            f"{file}: 'label_names' has {len(meta['label_names'])} names; the adapter's head has {head['out_features']} classes"
        )


def check_finite(tensors: dict[str, torch.Tensor], what: str):
    bad = [key for key, tensor in tensors.items() if not torch.isfinite(tensor).all()]
    if bad:
        raise LoraftError(
            f"{what}: {len(bad)} of its {len(tensors)} tensors hold NaN or infinite values ({bad[0]}, ...)"
        )


def read_adapter(folder) -> tuple[dict, dict[str, torch.Tensor]]:
    folder = Path(folder)
    if not folder.is_dir():
        raise LoraftError(f"adapter folder not found: {folder}")
    config_file, weights_file = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_file.is_file() or not weights_file.is_file():
        raise LoraftError(f"{folder} is not a loraft adapter folder (it needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    meta = read_json(config_file)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise LoraftError(f"{config_file} is not a loraft adapter description (format {FORMAT!r})")
    check_schema(meta, config_file)
    tensors = read_safetensors(weights_file)
    check_finite(tensors, f"{weights_file} cannot be used")
    return meta, tensors


def check_fits(model: nn.Module, meta: dict, tensors: dict[str, torch.Tensor], folder):
    """Fail, before anything on the model changes, if the adapter was made for another base."""
    here = family_of(model).name
    if meta["architecture"] != here:
        raise LoraftError(
            f"adapter {folder} was trained on {meta['base_model']} ({meta['architecture']}); this model is {here}"
        )
    if meta["base_fingerprint"] != base_fingerprint(model):
        raise LoraftError(
            f"adapter {folder} was trained on {meta['base_model']} with other weights than the loaded "
            f"{getattr(model, 'name', 'model')} (fingerprint {meta['base_fingerprint']} != {base_fingerprint(model)})"
        )
    lora = LoraConfig.of_adapter(meta) if meta["target_modules"] else None
    for module_name in meta["target_modules"]:
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            raise LoraftError(f"adapter {folder} targets {module_name}, which this model does not have") from None
        linear = module.base if isinstance(module, LoRALinear) else module
        if not isinstance(linear, LINEAR_LAYERS):
            raise LoraftError(f"adapter {folder} targets {module_name}, which is not a linear layer in this model")
        for part, shape in VARIANTS[lora.variant].shapes(linear, lora).items():
            tensor = tensors.get(f"{module_name}.{part}")
            if tensor is None or tuple(tensor.shape) != shape:
                got = None if tensor is None else tuple(tensor.shape)
                raise LoraftError(f"adapter {folder}: {module_name}.{part} should have shape {shape}, has {got}")
    for module_name, spec in meta["modules_to_save"].items():
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            raise LoraftError(f"adapter {folder} trains {module_name}, which this model does not have") from None
        original = module.original if isinstance(module, ModuleToSave) else module
        if not isinstance(original, nn.Linear) or original.in_features != spec["in_features"]:
            raise LoraftError(f"adapter {folder} trains {module_name}, which is not a linear layer of its width here")
        if module_name in meta["target_modules"]:
            raise LoraftError(f"adapter {folder} has both a LoRA and a trained copy of {module_name}")
        expected = {"weight": (spec["out_features"], spec["in_features"])}
        if spec["bias"]:
            expected["bias"] = (spec["out_features"],)
        for part, shape in expected.items():
            tensor = tensors.get(f"{module_name}.{part}")
            if tensor is None or tuple(tensor.shape) != shape:
                raise LoraftError(f"adapter {folder}: {module_name}.{part} is missing or has the wrong shape")
    parameters = dict(model.named_parameters())
    for param_name in meta.get("trained_parameters", []):
        tensor = tensors.get(TRAINED_PREFIX + param_name)
        if param_name not in parameters or tensor is None or tensor.shape != parameters[param_name].shape:
            raise LoraftError(f"adapter {folder}: trained parameter {param_name} does not fit this model")


def load_adapter(model: nn.Module, folder, name: str | None = None) -> dict:
    """Put the adapter in `folder` on `model` under `name` (default: its saved name), make it active."""
    meta, tensors = read_adapter(folder)
    name = name or meta["name"]
    if name in adapter_names(model):
        raise LoraftError(f"an adapter named {name!r} is already loaded")
    check_fits(model, meta, tensors, folder)
    if meta["target_modules"]:
        apply_lora(model, LoraConfig.of_adapter(meta), name)
    for module_name, spec in meta["modules_to_save"].items():
        add_module_to_save(
            model, module_name, nn.Linear(spec["in_features"], spec["out_features"], bias=spec["bias"]), name
        )
    with torch.no_grad():
        for param_name in meta.get("trained_parameters", []):
            param = model.get_parameter(param_name)
            param.copy_(tensors[TRAINED_PREFIX + param_name].to(param.dtype))
        for key, param in adapter_params(model, name).items():
            param.copy_(tensors[key])
    keys = (*LoraConfig.__dataclass_fields__, "target_modules", "modules_to_save", "trained_parameters")
    keys += ("total_step", "converted_from", "combined")
    adapter_state(model).configs[name] = {k: meta[k] for k in keys if k in meta}
    return meta
